"""The project's error type: a problem the user can fix, reported as one line."""


class PipelineError(Exception):
    """Bad input or an unreachable resource; the message says what was tried and what to do."""
