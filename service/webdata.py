"""The data files the web page shows beside the models, and where they live.

* The digits test split, written by ``python -m export build`` into the repository as
  ``_web/digits_test.json``: the service never imports scikit-learn, so the page's test
  samples must come as a file. ``_web`` can never be a model (model names start with a
  letter or digit) and has no config.json, so ``list_models`` never sees it.
* The behaviour report's plots, written by ``python -m export behavior`` into the report
  directory (setting ``report_dir``). Only the names in ``SERVED_PLOTS`` are ever served.

The samples format is defined once, here: export writes it through ``write_samples`` and
the service reads it through ``SamplesFile``, so both sides agree by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import RepositoryError, ResourceNotFound
from service.repository import atomic_write

log = logging.getLogger("normserve.webdata")

SAMPLES_PATH = Path("_web") / "digits_test.json"
SIDE = 8
# The headline figure of the behaviour report (both BatchNorm panels), then two plots it
# summarises. The page shows the first that exists.
REPORT_HEADLINE = "headline.png"
REPORT_PLOTS = (REPORT_HEADLINE, "batch_dependence.png", "train_vs_eval_accuracy.png")
# The report's sequence-length experiment (LayerNorm vs per-step BatchNorm LSTMs by number of
# rows): the page shows it beside the headline when it exists.
LENGTH_PLOT = "length_accuracy.png"
SERVED_PLOTS = (*REPORT_PLOTS, LENGTH_PLOT)
BUILD_COMMAND = "python -m export build --skip-existing (or make repository)"
REPORT_COMMAND = "python -m export behavior"

Pixel = Annotated[int, Field(ge=0)]


class DigitSamples(BaseModel):
    """Images as integer intensities 0..scale (ints keep the file small; divide by ``scale``
    for the model input in [0, 1], ink = 1), row-major 8x8, and their class names."""

    # Its validator is built when the page first asks for the samples, not at every start.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    source: str
    scale: Annotated[int, Field(ge=1)] = 16
    labels: list[str]
    images: list[Annotated[list[Pixel], Field(min_length=SIDE * SIDE, max_length=SIDE * SIDE)]]

    @model_validator(mode="after")
    def _consistent(self) -> DigitSamples:
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.labels)} labels for {len(self.images)} images")
        if any(p > self.scale for image in self.images for p in image):
            raise ValueError(f"pixel values must lie in 0..{self.scale}")
        return self


def write_samples(repository: Path, samples: DigitSamples) -> Path:
    path = repository / SAMPLES_PATH
    # compact: 360 images are ~60 KB this way, twice that indented.
    atomic_write(path, samples.model_dump_json().encode() + b"\n")
    return path


@dataclass
class _Cached:
    stamp: tuple[int, ...]
    body: bytes


class SamplesFile:
    """The repository's samples file, validated once per change of the file (inode, mtime,
    size; a rebuild replaces the file, so its inode changes even within one clock tick): a
    build run while the server is up is picked up without a restart."""

    def __init__(self, repository: Path) -> None:
        self.path = repository / SAMPLES_PATH
        self._cached: _Cached | None = None

    def exists(self) -> bool:
        return self.path.is_file()

    def read(self) -> tuple[bytes, str]:
        """(the file's bytes, an ETag for them). Raises ResourceNotFound when missing and
        RepositoryError, with a message safe to show, when invalid."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            # Read and validated on the event loop, once per change: ~60 KB, a few ms.
            fresh = self._cached is None or self._cached.stamp != stamp
            body = self.path.read_bytes() if fresh else b""
        except OSError:
            raise ResourceNotFound(
                f"the model repository has no test samples ({SAMPLES_PATH}); build them with "
                f"`{BUILD_COMMAND}`"
            ) from None
        cached = self._cached
        if cached is None or fresh:
            try:
                DigitSamples.model_validate_json(body)
            except ValidationError as exc:
                log.error("invalid samples file %s: %s", self.path, exc)
                raise RepositoryError(
                    f"the repository's {SAMPLES_PATH} is invalid; rebuild it with `{BUILD_COMMAND}`"
                ) from None
            cached = self._cached = _Cached(stamp, body)
        return cached.body, _etag(stamp)


def report_plot(report_dir: Path, name: str) -> tuple[Path, str]:
    """(path, ETag) of an allow-listed plot of the behaviour report. Only the names in
    ``SERVED_PLOTS`` ever reach the file system, so nothing else can be read."""
    if name not in SERVED_PLOTS:
        raise ResourceNotFound(
            f"unknown report plot {name[:64]!r}; the page serves {list(SERVED_PLOTS)}"
        )
    path = report_dir / name
    try:
        stat = path.stat()
    except OSError:
        raise ResourceNotFound(
            f"the behaviour report has no {name} yet; make it with `{REPORT_COMMAND}`"
        ) from None
    return path, _etag((stat.st_ino, stat.st_mtime_ns, stat.st_size))


def available_plots(report_dir: Path) -> list[str]:
    """The headline's alternatives that exist, best first."""
    return [name for name in REPORT_PLOTS if (report_dir / name).is_file()]


def length_plot(report_dir: Path) -> str | None:
    """The length experiment's plot when it exists."""
    return LENGTH_PLOT if (report_dir / LENGTH_PLOT).is_file() else None


def _etag(stamp: tuple[int, ...]) -> str:
    return '"' + "-".join(f"{part:x}" for part in stamp) + '"'
