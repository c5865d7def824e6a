"""The exception types the pipeline raises for bad input or unusable state.

Stages raise `PipelineError` with a one-line message naming what is wrong and where, so entry points
can print it without a traceback. Subclasses say what a caller may do about it: a failed stage
(`JobError`), data that may be skipped for an older copy (`IntegrityError`), or an error no restart can
fix (`PermanentError`). A driver told to stop (Ctrl-C, SIGTERM) raises `Interrupted`, which is not an
error of the job: running it again resumes it.
"""

from __future__ import annotations


class PipelineError(Exception):
    """A clear, one-line, user-facing failure: bad config, missing file, corrupt checkpoint, and the like."""


class JobError(PipelineError):
    """A stage of a job failed; the message is one line: `<stage>: <reason>`."""


class IntegrityError(PipelineError):
    """Stored data that does not match its manifest or commit marker: missing, truncated or altered.

    A reader that holds an older good copy (the previous checkpoint) may skip such data; a plain
    storage failure (endpoint down, access denied) is a PipelineError and must not be skipped.
    """


class PermanentError(PipelineError):
    """Bad input found where training runs (a worker): a restart would meet it again, so the run stops at
    its first occurrence instead of being restarted (`pipeline.train.permanent`)."""


class Interrupted(KeyboardInterrupt):
    """The driver was told to stop, by `signal` ("Ctrl-C" or "SIGTERM"), during `stage` (None: before the
    job's stages began). Running the same job again resumes it."""

    def __init__(self, signal: str, stage: str | None = None) -> None:
        super().__init__(signal, stage)
        self.signal, self.stage = signal, stage

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by that signal: 130 for SIGINT, 143 for SIGTERM."""
        return 143 if self.signal == "SIGTERM" else 130
