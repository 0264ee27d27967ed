"""Run by the image builder inside the staged guest tree (chroot).

Imports the agent and drives it through a ttrpc round trip and a container
error path, so the modules it loads lazily are loaded too; then prints, as
JSON, every file the process has loaded: module files and mapped libraries.
A failure here fails the image build: the image is checked before it boots.
"""

import asyncio
import json
import os
import socket
import sys

sys.path.insert(0, "/opt/kata-py")

from guest import agent, init  # noqa: E402,F401
from microvm.protocol import AGENT_SERVICE, agent_pb2, ttrpc  # noqa: E402


async def smoke() -> None:
    a, b = socket.socketpair()
    ag = agent.Agent(0.0)
    r1, w1 = await asyncio.open_connection(sock=a)
    serving = asyncio.ensure_future(agent.serve(ag, r1, w1))
    r2, w2 = await asyncio.open_connection(sock=b)
    client = ttrpc.Client(r2, w2)
    try:
        await client.call(AGENT_SERVICE, "WaitProcess",
                          agent_pb2.ProcessRef(container_id="none"), agent_pb2.WaitResponse)
    except ttrpc.NotFound:
        pass
    else:
        raise SystemExit("agent smoke test: expected NotFound")
    await client.aclose()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


def main() -> None:
    from google.protobuf.internal import api_implementation
    if api_implementation.Type() != "upb":
        raise SystemExit(f"protobuf runs as {api_implementation.Type()!r}, not upb: "
                         "a library of its extension is missing from the image")
    asyncio.run(smoke())
    # What tracebacks and the logging module touch when they first run.
    import logging
    import traceback
    try:
        raise ValueError("x")
    except ValueError:
        traceback.format_exc()
    logging.getLogger("x").debug("x")
    files = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f:
            files.add(os.path.realpath(f))
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("/"):
                files.add(os.path.realpath(parts[5]))
    json.dump(sorted(files), sys.stdout)


if __name__ == "__main__":
    main()
