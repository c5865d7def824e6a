"""The job's driver side: preflight, the FP8 decision, where things live, running the stages in order."""
