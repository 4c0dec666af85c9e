"""Errors raised by meshwright's library code.

Every error carries where it came from (``file:line`` or ``file``), so the CLI can print one
line a user can act on. Third-party errors are wrapped at the boundary and chained
(``raise InputError(...) from exc``).
"""

from __future__ import annotations


class MeshwrightError(Exception):
    """Base class. ``origin`` names the file (and line) at fault; ``hint`` says how to fix it."""

    exit_code = 1

    def __init__(self, message: str, *, origin: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.origin = origin
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.origin}: {self.message}" if self.origin else self.message


class InputError(MeshwrightError):
    """An input is missing, unreadable, or not in any format meshwright knows."""

    exit_code = 3


class FormatError(InputError):
    """An input's content is malformed beyond line-level recovery (bad format string, ...)."""


class InventoryError(InputError):
    """The cluster inventory could not be read (bad dump, API unreachable, forbidden)."""


class UsageError(MeshwrightError):
    """Options contradict each other or name something that does not exist."""

    exit_code = 2
