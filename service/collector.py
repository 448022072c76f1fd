"""Python's cyclic garbage collector around start-up: held while the server starts, then
resumed with what start-up built frozen.

Start-up imports ~640 modules and builds the app and the models: objects that live as long
as the process. The collector would scan them ~150 times while they are made, one full
collection among them, for nothing to free: ~65 ms of CPU on the 2-core VM, about a tenth of
the start. Frozen afterwards (``gc.freeze``), they are never scanned again, so no later full
collection stalls the event loop walking them (one full collection over them took 50-85 ms
there). The cost: the few cyclic leftovers of start-up (~0.5 MiB) are never freed.

``python -m service`` holds the collector before it imports the server; the app resumes it
once start-up is over (service.app), successful or not; ``python -m service`` releases it
if the app never got that far. An app built any other way (tests,
uvicorn's worker processes) finds the collector running and leaves it alone.
"""

from __future__ import annotations

import gc


def hold() -> None:
    gc.disable()


def started() -> None:
    """Start-up is over: freeze what it built and resume collecting."""
    if gc.isenabled():
        return  # not held: nothing to resume, and nothing of ours to freeze
    gc.freeze()
    gc.enable()


def release() -> None:
    """Resume collecting, freezing nothing (start-up stopped short, or this process only
    supervises others)."""
    gc.enable()
