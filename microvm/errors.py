"""Errors a user sees: one line each, with docker's exit codes.

They cross two ttrpc hops (agent -> shim, shim -> CLI) as a status code
plus, where the code alone is not enough, a reason (an ErrorInfo in the
status details): a command not found is 127 because of its reason, never
because of the words of its message.
"""

from __future__ import annotations

from microvm.protocol import REASON_COMMAND_NOT_EXECUTABLE, REASON_COMMAND_NOT_FOUND, ttrpc


class KataError(Exception):
    """kata-py itself failed (docker's 125)."""

    exit_code = 125
    # The ttrpc status code it came with (ttrpc.OK: it did not come over ttrpc).
    status = ttrpc.OK


class ConfigError(KataError):
    pass


class VMError(KataError):
    """The VM could not be started or stopped working."""


class CommandNotExecutable(KataError):
    exit_code = 126
    reason = REASON_COMMAND_NOT_EXECUTABLE


class CommandNotFound(KataError):
    exit_code = 127
    reason = REASON_COMMAND_NOT_FOUND


_BY_REASON: dict[str, type[KataError]] = {
    cls.reason: cls for cls in (CommandNotFound, CommandNotExecutable)}


def from_rpc(e: ttrpc.RpcError) -> KataError:
    """A failed call as the user sees it, its status code kept."""
    err = _BY_REASON.get(e.reason, KataError)(e.message)
    err.status = e.code
    return err


def to_rpc(e: KataError, default: type[ttrpc.RpcError] = ttrpc.FailedPrecondition
           ) -> ttrpc.RpcError:
    """A user-facing error as a Task API status: a command's absence or its
    permissions as the agent reported them (NotFound, PermissionDenied) with
    their reason; anything else as default."""
    if isinstance(e, CommandNotFound):
        return ttrpc.NotFound(str(e), reason=e.reason)
    if isinstance(e, CommandNotExecutable):
        return ttrpc.PermissionDenied(str(e), reason=e.reason)
    return default(str(e))
