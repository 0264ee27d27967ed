"""`microvm`: the command's entry point, light on purpose.

`microvm run` is run by a child of the fork server of this place
(microvm/forkserver.py), which has imported the CLI and the sandbox
core already: otherwise 0.1 s of every run.  Every other command, and a run
where no server runs yet (one is then made for the next), runs here.
"""

from __future__ import annotations

import os
import signal
import sys

# The group's options that take a value (microvm/cli/commands.py `cli`).
_VALUED = ("--config",)


def subcommand(argv: list[str]) -> str:
    return split(argv)[1]


def split(argv: list[str]) -> tuple[list[str], str, list[str]]:
    """The group's options, the subcommand ("" if none) and its arguments."""
    skip = False
    for n, word in enumerate(argv):
        if skip:
            skip = False
        elif word in _VALUED:
            skip = True
        elif not word.startswith("-"):
            return argv[:n], word, argv[n + 1:]
    return argv, "", []


def main() -> None:
    argv = sys.argv[1:]
    if subcommand(argv) == "run":
        from microvm import forkserver
        try:
            how, n = forkserver.run_cli(argv)
        except forkserver.Unavailable:
            pass
        else:
            if how == "signal":  # end as the runner did, for whoever waits for us
                signal.signal(n, signal.SIG_DFL)
                os.kill(os.getpid(), n)
                n = 128 + n
            sys.exit(n)
    from microvm.cli.commands import main as full
    full()


if __name__ == "__main__":
    main()
