"""Errors of the build's inputs that more than one module raises."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """The token data is unusable; the message says what is wrong and how to fix it."""
