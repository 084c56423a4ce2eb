"""Errors a request can meet, each naming the gRPC status code it maps to."""

from __future__ import annotations

from daemon.errors import MoedError


class RequestError(MoedError):
    """The request is malformed or out of range (INVALID_ARGUMENT)."""

    code = "INVALID_ARGUMENT"


class NotFound(RequestError):
    """The request names a model or file that is not there."""

    code = "NOT_FOUND"


class QueueFull(RequestError):
    """Every batch slot and queue place is taken."""

    code = "RESOURCE_EXHAUSTED"


class Precondition(RequestError):
    """The daemon is not in a state to do this (no model loaded, requests still running)."""

    code = "FAILED_PRECONDITION"


class Unavailable(RequestError):
    """The daemon is loading or shutting down; try again later or elsewhere."""

    code = "UNAVAILABLE"
