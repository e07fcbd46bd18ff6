"""Errors raised by the infra package; each message names the problem and the fix."""

from __future__ import annotations


class InfraError(RuntimeError):
    """Infrastructure could not be started, stopped or reached."""


class MissingBinary(InfraError):
    """A program the local stack needs is not installed."""


class PortInUse(InfraError):
    """A port the local stack wants is held by another process."""


class CorruptState(InfraError):
    """The project's state directory is in a shape the server cannot use."""
