"""Command line: ``python -m hvdagents {doctor,launch,plot} ...`` (also the ``hvdagents`` script)."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Sequence

__all__ = ["main"]

#: sub-command -> (module whose ``main(argv) -> int`` runs it, one-line help)
COMMANDS = {
    "doctor": ("hvdagents.doctor", "check MPI, Horovod, frameworks and GPUs; non-zero exit if broken"),
    "launch": ("hvdagents.launch", "start a script on N ranks with srun, mpirun or horovodrun"),
    "plot": ("hvdagents.plot", "draw loss/accuracy curves from a metrics CSV to a PNG"),
}


def _usage() -> str:
    lines = ["usage: hvdagents <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"hvdagents: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
