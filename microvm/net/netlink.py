"""pyroute2, always in a thread of its own, optionally in another network
namespace.

pyroute2 0.9's IPRoute drives an asyncio loop of its own, which cannot run
in a thread where ours runs (the CLI's and the shim's); and setns() moves
only the calling thread.  So every netlink conversation gets a fresh thread,
which ends with it: nothing else in the process changes namespace.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

from pyroute2 import netns
from pyroute2.iproute.linux import IPRoute

from microvm.errors import KataError

T = TypeVar("T")


def in_thread(fn: Callable[[], T], name: str) -> T:
    """fn() in a fresh thread that ends with it (so a namespace it enters
    stays its own); its result, or its exception raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def work() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    t = threading.Thread(target=work, name=name)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def enter(path: str) -> None:
    """Move the calling thread into path's network namespace."""
    try:
        netns.setns(path, flags=0)
    except FileNotFoundError:
        raise KataError(f"network namespace {path} does not exist") from None
    except OSError as e:
        raise KataError(f"{path} is not a network namespace ({e.strerror or e})") from None


def in_namespace(fn: Callable[[], T], path: str) -> T:
    """fn() in a fresh thread inside path's network namespace (a socket made
    there stays there, whichever thread then uses it)."""

    def work() -> T:
        enter(path)
        return fn()

    return in_thread(work, f"netns:{path}")


def run(fn: Callable[[IPRoute], T], path: str | None = None) -> T:
    """fn(ipr) in a fresh thread, inside path's network namespace if given."""

    def work() -> T:
        if path is not None:
            enter(path)
        with IPRoute() as ipr:
            return fn(ipr)

    return in_thread(work, f"netlink:{path or 'here'}")


@contextlib.contextmanager
def named_netns(prefix: str) -> Iterator[str]:
    """A network namespace /var/run/netns/<prefix>-<random>, loopback up,
    removed after."""
    name = f"{prefix}-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        # Loopback up, as in any namespace a runtime makes (lo is index 1).
        run(lambda ipr: ipr.link("set", index=1, state="up"), f"/var/run/netns/{name}")
        yield name
    finally:
        netns.remove(name)
