"""The one exception type that `featurize` raises for problems a user can fix."""

__all__ = ["FeaturizeError", "error_text"]


class FeaturizeError(ValueError):
    """A user-facing problem (bad source, unknown model, missing weights, ...).

    The message is one line that says what was wrong and what to do; the CLI prints it as is.
    """


def error_text(e: BaseException) -> str:
    """How a failure is recorded in one line: ``Type: first line of the message`` (``Type`` when it has none)."""
    message = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {message}".rstrip(": ")

