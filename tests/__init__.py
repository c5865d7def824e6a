"""Test suite of the pipeline; a package so fixtures can be shared as `tests.<module>`."""
