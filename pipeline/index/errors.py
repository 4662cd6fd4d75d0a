"""Errors of the index and embeddings formats (one module so that every part of the package can raise them)."""
from __future__ import annotations


class IndexFormatError(ValueError):
    """Base for index problems (bad input, unreadable or inconsistent version directory)."""


class IndexMismatchError(IndexFormatError):
    """The index was built with another encoder than the one it is queried with."""


class IndexVerificationError(IndexFormatError):
    """A version directory's files disagree with each other or with its manifest."""
