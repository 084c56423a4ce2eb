"""Errors a user can act on: they name the file and the problem (raised by every layer of moed)."""

from __future__ import annotations

import os


class MoedError(Exception):
    """A user-facing error: bad path, bad file, unsupported input."""

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UnsupportedError(MoedError):
    """The input is valid but moed does not handle it (yet)."""


class FormatError(MoedError):
    """A file is truncated, corrupt, or disagrees with its own description."""
