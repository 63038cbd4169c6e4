"""The project's error type: a problem the user can fix, reported as one line."""


class PipelineError(Exception):
    """Bad input or an unreachable resource; the message says what was tried and what to do."""


def error_line(error: BaseException | None) -> str:
    """`Type: the first line of its message`, cut to 300 characters: an error in a log line."""
    if error is None:
        return "unknown error"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"
