"""Stages of the FP8 fine-tuning pipeline: config, storage, data, training, evaluation, export."""
