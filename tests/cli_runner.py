"""Run ``python -m export``'s entry point in this process, for the refusals.

They stop before any export, so a subprocess would spend most of its time importing torch
again; the entry point, argument parsing and error printing are the same.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path


def run_cli_in_process(
    cwd: Path, *args: str, user_module: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``export.__main__.main(args)`` run in ``cwd``; ``user_module`` is forgotten after."""
    from export.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_path = os.getcwd(), list(sys.path)
    os.chdir(cwd)
    sys.path.insert(0, str(cwd))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse errors exit 2, as in a real run
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(old_cwd)
        sys.path[:] = old_path
        if user_module is not None:
            sys.modules.pop(user_module, None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())
