"""Exceptions that map to the CLI's exit codes (DESIGN.md: 2 bad input, 3 gate failed)."""
from __future__ import annotations


class CompressError(Exception):
    exit_code = 1


class BadInput(CompressError):
    """Something the user gave us is wrong; the message names it in one line."""

    exit_code = 2


class GateFailed(CompressError):
    """A stage or the export fell below its gate; the run report says which."""

    exit_code = 3
