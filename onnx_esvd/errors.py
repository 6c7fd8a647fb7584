"""One exception family. Every message names the file, column, node or value and says what to do.

Only the command-line layer turns these into exit codes (2 for all of them).
"""

from __future__ import annotations


class EsvdError(Exception):
    """Base class of every error onnx-esvd raises on purpose."""


class ModelError(EsvdError, ValueError):
    """The ONNX file cannot be read or has no usable form."""


class LayerError(EsvdError, KeyError):
    """A linear node cannot be found or cannot be repaired."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(EsvdError, ValueError):
    """The calibration data cannot be read or does not fit the model."""


class OptionError(EsvdError, ValueError):
    """An option value is out of range or inconsistent with the others."""


class OutputError(EsvdError, OSError):
    """The output file cannot be written where it was asked for."""
