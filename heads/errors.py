"""The one exception type that `heads` raises for problems a user can fix."""

__all__ = ["HeadsError"]


class HeadsError(ValueError):
    """A user-facing problem (unknown head, too few samples, one class only, ...), as one clear line."""
