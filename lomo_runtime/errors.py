"""Errors that reach the user, each with the process exit code the CLI maps it to.

Exit codes (the CLI contract in DESIGN.md): 0 success, 2 usage or bad input,
3 the job does not fit its memory budget, 1 internal error. Library code raises
these; only the CLI turns them into a message and an exit code, so a user error
never shows a traceback.
"""
from __future__ import annotations


class LomoError(Exception):
    """Base class for errors lomo-run reports to the user."""

    exit_code = 1


class UserError(LomoError):
    """Bad input or usage: a file, tensor, flag or value the user can fix (exit 2)."""

    exit_code = 2


class DoesNotFit(LomoError):
    """The job cannot run within the memory budget (exit 3)."""

    exit_code = 3


class StoreError(LomoError):
    """The working store is damaged or locked (exit 2: the user must act)."""

    exit_code = 2
