"""The project's error type: one line for the user, an exit code for the shell."""

from __future__ import annotations


class Dsv3Error(Exception):
    """A problem with the input data or a runtime failure (exit code 1).

    The message is a single line that names the file or tensor and, where possible, what to do.
    """

    exit_code = 1


class UsageError(Dsv3Error):
    """The command line asks for something that cannot be done (exit code 2)."""

    exit_code = 2


class HeaderError(Dsv3Error):
    """A safetensors file whose header is unreadable or inconsistent."""
