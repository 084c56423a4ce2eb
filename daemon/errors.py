"""Errors a user can act on; defined in offload/ so that the lower layers raise the same ones."""

from offload.errors import FormatError, MoedError, UnsupportedError

__all__ = ["FormatError", "MoedError", "UnsupportedError"]
