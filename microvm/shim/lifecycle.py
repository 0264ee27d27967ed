"""A process's life as containerd's Task API sees it: one table of what may
happen in which state.

    created --start--> running --pause--> paused --resume--> running
       |                  |                  |
       +------exit--------+------exit--------+---> stopped
    created, stopped --delete--> deleted

Every Task RPC asks `check` before it acts and `advance` once it has; the
answer for a refused event is the error containerd's runc shim gives for it,
with the same status code.  Pause, resume, exec and update are asked of a
container's init process only.  Kill: a created init may be killed (it ends
a container that never started; containerd does so on a failed `run`); a
stopped process may not, except with `all` (runc's `kill --all`: whatever
else is left in its container).
"""

from __future__ import annotations

import enum

from microvm.protocol import task_pb2, ttrpc


class Status(enum.IntEnum):
    # containerd's values, so a status goes into a StateResponse as it is.
    CREATED = task_pb2.CREATED
    RUNNING = task_pb2.RUNNING
    STOPPED = task_pb2.STOPPED
    PAUSED = task_pb2.PAUSED
    DELETED = 100  # ours alone: a deleted process is no longer reported


class Event(enum.Enum):
    START = "start"
    PAUSE = "pause"
    RESUME = "resume"
    KILL = "kill"
    KILL_ALL = "kill all"
    EXEC = "exec in"      # a new exec, asked of the container's init
    UPDATE = "update"     # resources, asked of the init
    RESIZE = "resize"
    EXIT = "exit"
    DELETE = "delete"


S, E = Status, Event
# (state, event) -> the next state.  What is not here is refused.
_NEXT: dict[tuple[Status, Event], Status] = {
    (S.CREATED, E.START): S.RUNNING,
    (S.CREATED, E.KILL): S.CREATED,
    (S.CREATED, E.KILL_ALL): S.CREATED,
    (S.CREATED, E.RESIZE): S.CREATED,   # kept for the start
    (S.CREATED, E.UPDATE): S.CREATED,
    (S.CREATED, E.EXIT): S.STOPPED,
    (S.CREATED, E.DELETE): S.DELETED,
    (S.RUNNING, E.PAUSE): S.PAUSED,
    (S.RUNNING, E.KILL): S.RUNNING,
    (S.RUNNING, E.KILL_ALL): S.RUNNING,
    (S.RUNNING, E.EXEC): S.RUNNING,
    (S.RUNNING, E.UPDATE): S.RUNNING,
    (S.RUNNING, E.RESIZE): S.RUNNING,
    (S.RUNNING, E.EXIT): S.STOPPED,
    (S.PAUSED, E.RESUME): S.RUNNING,
    (S.PAUSED, E.KILL): S.PAUSED,       # SIGKILL reaches a frozen process
    (S.PAUSED, E.KILL_ALL): S.PAUSED,
    (S.PAUSED, E.UPDATE): S.PAUSED,
    (S.PAUSED, E.RESIZE): S.PAUSED,
    (S.PAUSED, E.EXIT): S.STOPPED,
    (S.STOPPED, E.KILL_ALL): S.STOPPED,  # what the init left behind
    (S.STOPPED, E.RESIZE): S.STOPPED,    # a late SIGWINCH is no error
    (S.STOPPED, E.DELETE): S.DELETED,
}
# Events only a container's init may see.
_INIT_ONLY = {E.PAUSE, E.RESUME, E.EXEC, E.UPDATE}


def refusal(status: Status, event: Event, name: str) -> ttrpc.RpcError:
    """The error for an event its state does not allow, as runc's shim words
    and codes it."""
    if status is S.DELETED:
        return ttrpc.NotFound(f"process {name} does not exist")
    if event in (E.KILL, E.KILL_ALL) and status is S.STOPPED:
        return ttrpc.NotFound("process already finished")
    if event is E.KILL and status is S.CREATED:
        return ttrpc.FailedPrecondition(f"process {name} not created")
    if event is E.START:
        return ttrpc.FailedPrecondition(f"process {name} already started")
    if event is E.DELETE:
        return ttrpc.FailedPrecondition(f"cannot delete a {status.name.lower()} process")
    if event is E.EXEC and status is S.STOPPED:
        return ttrpc.FailedPrecondition(f"container {name} is stopped")
    return ttrpc.FailedPrecondition(
        f"cannot {event.value} container {name}: it is {status.name.lower()}")


class Lifecycle:
    """One process's state.  `name` is what errors call it."""

    def __init__(self, name: str, init: bool) -> None:
        self.name = name
        self.init = init
        self.status = S.CREATED

    def check(self, event: Event) -> Status:
        """The state event leads to, or the ttrpc error refusing it."""
        if event in _INIT_ONLY and not self.init:
            raise ttrpc.InvalidArgument(f"{event.value}: only a container's init process")
        if event is E.KILL and not self.init and self.status is S.CREATED:
            # An exec not started has no process to signal.
            raise refusal(self.status, event, self.name)
        nxt = _NEXT.get((self.status, event))
        if nxt is None:
            raise refusal(self.status, event, self.name)
        return nxt

    def advance(self, event: Event) -> None:
        """After the act: the state event leads to.  An exit that came while
        the act was under way (a process can end at once) stands."""
        if self.status is S.STOPPED and event is not E.DELETE:
            return
        self.status = self.check(event)

    def exited(self) -> None:
        """The process ended (whatever it was doing): stopped, unless it was
        deleted already, which stays."""
        if self.status is not S.DELETED:
            self.status = S.STOPPED
