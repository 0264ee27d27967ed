"""containerd.task.v2.Task from the caller's side: what containerd calls on a shim.

One client for the CLI's detached mode, the shim's own `delete`, and the
tests.  Each RPC's response type comes from the service descriptor, so a
call cannot parse an Empty as a StateResponse.  Errors keep their ttrpc
status code (KataError.status) and reason: a command not found is
CommandNotFound (127) because the status says so.  A shim that goes away
mid-call is ShimGone.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf import message_factory
from google.protobuf.message import Message

from microvm.errors import KataError, from_rpc
from microvm.protocol import MONITOR_SERVICE, monitor_pb2, task_pb2, ttrpc

SERVICE = "containerd.task.v2.Task"
_METHODS = task_pb2.DESCRIPTOR.services_by_name["Task"].methods_by_name
# How long each step of release() may take: a shim that does not answer is
# the caller's to kill.
RELEASE_STEP_TIMEOUT = 2.0


class ShimGone(KataError):
    def __init__(self) -> None:
        super().__init__("the container's shim is gone (killed?); its VM went with it")


class TaskClient:
    def __init__(self, client: ttrpc.Client) -> None:
        self._client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, address: str, namespace: str,
                      sock: socket.socket | None = None) -> AsyncIterator[TaskClient]:
        """address: the shim's socket path (unix:// accepted), or sock, a
        socket already connected to it.  OSError if nothing listens there."""
        if sock is not None:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_unix_connection(
                address.removeprefix("unix://"))
        client = ttrpc.Client(reader, writer, {"containerd-namespace-ttrpc": namespace})
        try:
            yield cls(client)
        finally:
            await client.aclose()

    async def call(self, method: str, request: Message, timeout: float | None = 30) -> Any:
        response_type = message_factory.GetMessageClass(_METHODS[method].output_type)
        return await self._call(SERVICE, method, request, response_type, timeout)

    async def _call(self, service: str, method: str, request: Message,
                    response_type: type[Message], timeout: float | None) -> Any:
        try:
            return await self._client.call(service, method, request, response_type, timeout)
        except ConnectionError:
            raise ShimGone() from None
        except ttrpc.RpcError as e:
            raise from_rpc(e) from None

    async def create(self, request: task_pb2.CreateTaskRequest) -> task_pb2.CreateTaskResponse:
        # Unbounded: a cold boot under TCG, or a pull, may take long.
        resp: task_pb2.CreateTaskResponse = await self.call("Create", request, timeout=None)
        return resp

    async def start(self, id: str, exec_id: str = "") -> task_pb2.StartResponse:
        resp: task_pb2.StartResponse = await self.call(
            "Start", task_pb2.StartRequest(id=id, exec_id=exec_id))
        return resp

    async def state(self, id: str, exec_id: str = "", timeout: float | None = 30
                    ) -> task_pb2.StateResponse:
        resp: task_pb2.StateResponse = await self.call(
            "State", task_pb2.StateRequest(id=id, exec_id=exec_id), timeout)
        return resp

    async def kill(self, id: str, signal: int, exec_id: str = "", all: bool = False,
                   timeout: float | None = 30) -> None:
        await self.call("Kill", task_pb2.KillRequest(id=id, exec_id=exec_id, signal=signal,
                                                     all=all), timeout)

    async def wait(self, id: str, exec_id: str = "", timeout: float | None = None
                   ) -> task_pb2.WaitResponse:
        resp: task_pb2.WaitResponse = await self.call(
            "Wait", task_pb2.WaitRequest(id=id, exec_id=exec_id), timeout)
        return resp

    async def delete(self, id: str, exec_id: str = "", timeout: float | None = 30
                     ) -> task_pb2.DeleteResponse:
        resp: task_pb2.DeleteResponse = await self.call(
            "Delete", task_pb2.DeleteRequest(id=id, exec_id=exec_id), timeout)
        return resp

    async def exec(self, request: task_pb2.ExecProcessRequest) -> None:
        await self.call("Exec", request)

    async def resize_pty(self, id: str, exec_id: str, width: int, height: int) -> None:
        await self.call("ResizePty", task_pb2.ResizePtyRequest(
            id=id, exec_id=exec_id, width=width, height=height))

    async def close_io(self, id: str, exec_id: str = "") -> None:
        await self.call("CloseIO", task_pb2.CloseIORequest(id=id, exec_id=exec_id, stdin=True))

    async def shutdown(self, id: str, timeout: float | None = 30) -> None:
        await self.call("Shutdown", task_pb2.ShutdownRequest(id=id), timeout)

    async def describe(self, timeout: float | None = 10) -> monitor_pb2.SandboxInfo:
        """Our own service beside the Task API (a shim of ours only)."""
        info: monitor_pb2.SandboxInfo = await self._call(
            MONITOR_SERVICE, "Describe", monitor_pb2.DescribeRequest(), monitor_pb2.SandboxInfo,
            timeout)
        return info

    async def release(self, id: str, running: bool = True) -> None:
        """The teardown containerd does for a task, each step best-effort and
        bounded: kill every process, wait, delete, and shut the shim down
        (it exits once it serves no container)."""
        steps: list[tuple[str, Message]] = []
        if running:
            steps += [("Kill", task_pb2.KillRequest(id=id, signal=9, all=True)),
                      ("Wait", task_pb2.WaitRequest(id=id))]
        steps += [("Delete", task_pb2.DeleteRequest(id=id)),
                  ("Shutdown", task_pb2.ShutdownRequest(id=id))]
        for method, request in steps:
            with contextlib.suppress(KataError):
                await self.call(method, request, RELEASE_STEP_TIMEOUT)
