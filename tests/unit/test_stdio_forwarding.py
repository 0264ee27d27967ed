"""Signal forwarding and SIGWINCH, one routine for the foreground CLI (to
the agent) and the detached exec (to the shim): real signals to ourselves."""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios

from microvm.core.stdio import FORWARDED, forwarding


def test_signals_and_resizes_go_where_they_are_sent_then_stop() -> None:
    got: list[object] = []

    async def to_signal(sig: int) -> None:
        got.append(sig)

    async def to_resize(rows: int, cols: int) -> None:
        got.append((rows, cols))

    async def broken(sig: int) -> None:
        raise ConnectionError("the shim is gone")

    async def go() -> None:
        r, w = os.openpty()  # a terminal of a known size, not ours
        os.set_blocking(w, True)
        try:
            fcntl.ioctl(w, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 111, 0, 0))
            with forwarding(to_signal, to_resize, r):
                for sig in (signal.SIGUSR1, signal.SIGHUP, signal.SIGWINCH):
                    os.kill(os.getpid(), sig)
                    await asyncio.sleep(0.05)
            with forwarding(broken, None, r):  # a failure is dropped, not raised
                os.kill(os.getpid(), signal.SIGUSR2)
                await asyncio.sleep(0.05)
            # Outside, the default handlers are back.
            assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        finally:
            os.close(r)
            os.close(w)

    asyncio.run(go())
    assert got == [signal.SIGUSR1, signal.SIGHUP, (33, 111)]
    assert signal.SIGWINCH not in FORWARDED  # a resize, not a signal to pass on
