"""The root of ciuic's error hierarchy. Each domain subclasses these; the edges (gRPC, HTTP,
CLI) translate them into a status, a response or an exit code."""

from __future__ import annotations


class CiuicError(Exception):
    """Base of every error ciuic raises on purpose. The message is meant for a person."""


class InvalidArgument(CiuicError):
    """The caller sent something malformed (gRPC INVALID_ARGUMENT, HTTP 400)."""


class NotFound(CiuicError):
    """The named thing does not exist (gRPC NOT_FOUND, HTTP 404)."""


class AlreadyExists(CiuicError):
    """The thing to create exists already (gRPC ALREADY_EXISTS, HTTP 409)."""


class FailedPrecondition(CiuicError):
    """The system is not in a state that allows the operation (gRPC FAILED_PRECONDITION)."""


class Unavailable(CiuicError):
    """A dependency cannot be reached right now; retrying later may work (gRPC UNAVAILABLE)."""


class ConfigError(CiuicError):
    """A setting is missing or wrong; the message names the setting."""
