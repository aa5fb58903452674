"""Errors that lowbit reports to users as one clear line."""

from __future__ import annotations


class LowbitError(Exception):
    """A problem with the user's input (file, format name, tensor), reported without a traceback."""


class FormatError(LowbitError):
    """A tensor cannot be quantized with the requested format."""


class ModelLoadError(LowbitError):
    """A model file or directory cannot be read."""
