"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class SeppError(Exception):
    """A problem the user can fix (bad input, missing path, refused overwrite).

    The message must name the problem and what to do about it.
    """

    exit_code = 2


class IncompleteError(SeppError):
    """A location holds no manifest: it is absent, still being written, or a crashed write."""
