"""The one exception type the pipeline raises for bad input or unusable state.

Stages raise `PipelineError` with a one-line message naming what is wrong and where, so entry points
can print it without a traceback.
"""


class PipelineError(Exception):
    """A clear, one-line, user-facing failure: bad config, missing file, corrupt checkpoint, and the like."""


class JobError(PipelineError):
    """A stage of a job failed; the message is one line: `<stage>: <reason>`."""
