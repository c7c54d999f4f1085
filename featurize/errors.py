"""The one exception type that `featurize` raises for problems a user can fix."""

__all__ = ["FeaturizeError"]


class FeaturizeError(ValueError):
    """A user-facing problem (bad source, unknown model, missing weights, ...).

    The message is one line that says what was wrong and what to do; the CLI prints it as is.
    """
