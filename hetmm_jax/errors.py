"""Exceptions raised by hetmm_jax.

Every error a user can cause derives from :class:`HetmmError`, so a command line or a service can
catch one type. Messages are single lines that name the offending file or value and say what was
expected.
"""

from __future__ import annotations


class HetmmError(Exception):
    """Base class of every error hetmm_jax raises on purpose."""


class InputError(HetmmError, ValueError):
    """A bad argument: wrong shape, dtype, range or option."""


class DataError(InputError):
    """A data set, image or mask on disk is missing, unreadable or inconsistent."""


class ModelFileError(HetmmError):
    """A checkpoint or saved model is missing, truncated, corrupt, hostile or of another format."""


class NotFittedError(HetmmError, AttributeError):
    """A fitted-state method was called before ``fit``."""
