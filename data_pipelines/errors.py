"""The error every data reader and writer raises for bad input (re-exported by `layout`)."""

from __future__ import annotations


class LayoutError(ValueError):
    """Bad or missing data in a capture layout or an input file; the message names the file and the problem."""
