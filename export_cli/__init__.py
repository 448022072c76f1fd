"""The installed ``normserve`` command: ``normserve serve ...`` and ``normserve export ...``.

``normserve serve`` is ``python -m service`` and ``normserve export`` is ``python -m export``,
with the same flags. Each subcommand imports only its own side: serving never imports torch
(the runtime image has none), so this package imports neither side at module level.

A top-level package of its own because ``export/__init__.py`` imports torch, and named to
fall under pyproject's ``packages.find`` patterns. As an installed script it also avoids the
shadowing ``python -m`` is prone to: the script's folder, not the current directory, comes
first on ``sys.path``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

PROG = "normserve"
# subcommand -> (module with main(argv), one-line description)
COMMANDS = {
    "serve": ("service.__main__", "serve a model repository (python -m service; --help: flags)"),
    "export": ("export.__main__", "export models into a repository (python -m export)"),
}
USAGE = f"usage: {PROG} {{{','.join(COMMANDS)}}} [ARGS...]\n\n" + "\n".join(
    f"  {name:<8}{about}" for name, (_, about) in COMMANDS.items()
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(USAGE, file=sys.stderr)
        print(
            f"error: unknown command '{command}'; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    if command == "export":
        return int(module.main(rest, prog=f"{PROG} export"))
    return int(module.main(rest))
