"""Training: the Ray launch, the worker and its loop, the optimizer, parallelism, checkpoints, faults."""
