"""The error every data-file check raises."""

from __future__ import annotations


class DataFormatError(ValueError):
    """A user's data file is malformed; the message names the file and the fix."""
