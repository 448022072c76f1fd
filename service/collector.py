"""Python's cyclic garbage collector around start-up: held while the server starts, then
resumed with what start-up built frozen.

Start-up imports ~640 modules and builds the app and the models: objects that live as long
as the process. Frozen once start-up is over (``gc.freeze``), they are never scanned again:
full collections walking them had stalled the event loop for tens of ms (p99 at 64
connections 88 -> 46 ms, and 12% more requests/s, measured). While they are being made, the
collector would scan them ~150 times (one full collection among them) for nothing to free:
~65 ms of CPU on the 2-core VM, about a tenth of the start, so ``python -m service`` holds it
before it imports the server. No collection precedes the freeze either (one costs 50-85 ms
there, at the end of start-up): the few cyclic leftovers of start-up (~0.5 MiB) stay.

The app calls ``started`` when its start-up is over (service.app), successful or not;
``python -m service`` releases a collector still held if the app never got that far. An
app built any other way (tests, uvicorn's worker processes) finds the collector running:
only the freeze applies.
"""

from __future__ import annotations

import gc


def hold() -> None:
    gc.disable()


def started() -> None:
    """Start-up is over: freeze what it built and collect again."""
    gc.freeze()
    gc.enable()


def release() -> None:
    """Resume collecting, freezing nothing (start-up stopped short, or this process only
    supervises others)."""
    gc.enable()
