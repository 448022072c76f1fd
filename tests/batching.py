"""Driving a real Batcher from a test: requests that wait together."""

from __future__ import annotations

import asyncio

import numpy as np

from service.serving.batcher import Batcher


async def submit_together(
    batcher: Batcher, inputs: list[np.ndarray], output: str
) -> list[np.ndarray]:
    """All requests (input ``x``) enqueued before the batcher's loop runs once, so that they
    wait together; each caller's ``output``."""
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit({"x": x}) for x in inputs))
    finally:
        await batcher.stop()
    return [r[output] for r in results]
