"""Stages of the FP8 fine-tuning pipeline: config, storage, data, training, evaluation, export.

Each stage is a module that can run and be tested alone; `pipeline.job.driver` runs them in order as one
job under one MLflow parent run. `jobs/` holds the thin entry points. The package map, and where to
change what: docs/architecture.md.
"""
