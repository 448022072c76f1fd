"""The variable-length model: served with mixed lengths against equal lengths, and the two
ways to batch mixed lengths (group by shape, pad to the longest) in onnxruntime.

The model is ``digits_sequence`` from the default repository when it is there (the LayerNorm
LSTM over any number of digit rows, input ``[-1, -1, 8]``); otherwise ``models.recurrent``'s
RowLSTM with random weights, exported here with a dynamic length axis (the report says
which). Mixed lengths are 4, 8, 12 and 16 rows in turn, mean 10, against all at 10: the same
steps per request on average, so the difference is what the shapes cost the batching.

Pad to the longest is measured as onnxruntime runs it, on the same file: the served model
has no mask input, so its padded answers differ from each request's own (the zero rows after
a sequence's end are steps too) and the measurement counts by how much. A masked export (a
lengths input freezing the state past each end) would compute the same padded steps plus
a select per step, so the timing is a lower bound for it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.http import Target, load_matrix
from benchmarks.serving import Body, running_normserve
from service.repository import read_config

MIXED_LENGTHS = (4, 8, 12, 16)
EQUAL_LENGTH = 10  # the mixed lengths' mean
MAX_LENGTH = 64  # the cap written for the fallback model's length axis
FEATURES = 8
REQUESTS = 64  # one request per connection at c=64: the batch the padding comparison forms
REPOSITORY_MODEL = "digits_sequence"
FALLBACK_MODEL = "sequence_lstm"


@dataclass(frozen=True)
class SequenceModel:
    repository: Path
    name: str
    input_name: str
    output_name: str
    source: str  # what it is, in words, for the report

    @property
    def file(self) -> Path:
        return self.repository / self.name / "1" / "model.onnx"


def sequence_model(default_repository: Path, work: Path) -> SequenceModel:
    """``digits_sequence`` copied out of the default repository (its folder alone, so that
    the server loads nothing else), or the fallback exported into ``work``."""
    root = work / "repository-sequence"
    shutil.rmtree(root, ignore_errors=True)
    config_path = default_repository / REPOSITORY_MODEL / "config.json"
    if config_path.exists():
        config = read_config(config_path)
        (spec,) = config.inputs
        if spec.variable_axes():
            shutil.copytree(default_repository / REPOSITORY_MODEL, root / REPOSITORY_MODEL)
            latest = config.latest.version
            if latest != 1:  # the file's path below is version 1's
                (root / REPOSITORY_MODEL / str(latest)).rename(root / REPOSITORY_MODEL / "1")
            return SequenceModel(
                root,
                REPOSITORY_MODEL,
                spec.name,
                config.outputs[0].name,
                f"{REPOSITORY_MODEL} from {default_repository}",
            )
    return _export_fallback(root, work)


def _export_fallback(root: Path, work: Path) -> SequenceModel:
    import torch

    from export.axes import DynamicAxis
    from export.publish import publish
    from export.to_onnx import export_onnx
    from models.recurrent import RowLSTM

    torch.manual_seed(0)
    model = RowLSTM().eval()
    example = torch.rand(8, 8, FEATURES, generator=torch.Generator().manual_seed(0))
    report = export_onnx(
        model,
        example,
        work / f"{FALLBACK_MODEL}.onnx",
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes=[DynamicAxis("image", 1, MAX_LENGTH)],
        source="benchmarks: models.recurrent.RowLSTM, random weights",
    )
    publish(root, FALLBACK_MODEL, report, version=1, max_batch_size=128, replace=True)
    return SequenceModel(
        root,
        FALLBACK_MODEL,
        "image",
        "logits",
        f"RowLSTM (LayerNorm LSTM, hidden 96) with random weights: {REPOSITORY_MODEL} is not "
        "in the default repository",
    )


def _request(model: SequenceModel, length: int, seed: int) -> bytes:
    x = np.random.default_rng(seed).random((1, length, FEATURES), dtype=np.float32)
    tensor = {"name": model.input_name, "datatype": "FP32", "shape": list(x.shape)}
    return json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode()


def _body(model: SequenceModel, label: str, lengths: list[int]) -> Body:
    contents = tuple(_request(model, n, seed) for seed, n in enumerate(lengths))
    path = f"/v2/models/{model.name}/infer"
    return Body(label, path, contents[0], "application/json", {}, contents)


def padding_vs_grouping(model: SequenceModel, threads: int, rounds: int) -> dict[str, Any]:
    """REQUESTS one-row requests of the mixed lengths, as one batch each way, in
    onnxruntime: grouped by length (one run per length), padded with zeros to the longest
    (one run), and, for scale, all at the mean length (one run). Median ms of ``rounds``
    interleaved rounds; and how far padding moves the answers from each request's own."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model.file), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    lengths = [MIXED_LENGTHS[i % len(MIXED_LENGTHS)] for i in range(REQUESTS)]
    requests = [rng.random((1, n, FEATURES), dtype=np.float32) for n in lengths]
    longest = max(lengths)
    padded = np.zeros((REQUESTS, longest, FEATURES), np.float32)
    for i, x in enumerate(requests):
        padded[i, : x.shape[1]] = x[0]
    groups = {n: np.concatenate([x for x in requests if x.shape[1] == n]) for n in MIXED_LENGTHS}
    equal = rng.random((REQUESTS, EQUAL_LENGTH, FEATURES), dtype=np.float32)
    name = model.input_name

    def run(batches: list[np.ndarray]) -> Callable[[], list[np.ndarray]]:
        return lambda: [session.run(None, {name: b})[0] for b in batches]

    ways = {
        "grouped": run(list(groups.values())),
        "padded": run([padded]),
        "equal": run([equal]),
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, call in ways.items():
            start = time.perf_counter()
            for _ in range(5):
                call()
            times[way].append((time.perf_counter() - start) / 5 * 1000)
    alone = np.concatenate([session.run(None, {name: x})[0] for x in requests])
    (from_padded,) = session.run(None, {name: padded})
    grouped_out = {n: session.run(None, {name: b})[0] for n, b in groups.items()}
    seen = dict.fromkeys(MIXED_LENGTHS, 0)
    from_groups = []
    for n in lengths:
        from_groups.append(grouped_out[n][seen[n]])
        seen[n] += 1
    return {
        "requests": REQUESTS,
        "lengths": list(MIXED_LENGTHS),
        "threads": threads,
        "ms": {way: statistics.median(t) for way, t in times.items()},
        "grouped_max_abs_vs_alone": float(np.abs(np.stack(from_groups) - alone).max()),
        "padded_max_abs_vs_alone": float(np.abs(from_padded - alone).max()),
        "padded_top1_changed": int((from_padded.argmax(1) != alone.argmax(1)).sum()),
    }


def sequence_benchmark(
    default_repository: Path,
    concurrencies: list[int],
    rounds: int,
    duration_s: float,
    threads: int,
    work: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The model under wrk, mixed lengths against equal lengths (JSON bodies, one row each),
    and ``padding_vs_grouping``."""
    model = sequence_model(default_repository, work)
    log(f"[sequence] {model.source}")
    offline = padding_vs_grouping(model, threads, max(rounds, 3))
    ms = offline["ms"]
    log(
        f"[sequence] onnxruntime, {REQUESTS} requests of lengths {MIXED_LENGTHS}: grouped "
        f"{ms['grouped']:.2f} ms, padded {ms['padded']:.2f} ms (answers moved by up to "
        f"{offline['padded_max_abs_vs_alone']:.3f}, top-1 changed "
        f"{offline['padded_top1_changed']}/{REQUESTS}), all at {EQUAL_LENGTH}: "
        f"{ms['equal']:.2f} ms"
    )
    mixed = _body(model, "v2-json, mixed lengths 4-16", [*MIXED_LENGTHS] * 4)
    equal = _body(model, f"v2-json, all length {EQUAL_LENGTH}", [EQUAL_LENGTH] * 16)
    with running_normserve("normserve-sequence", model.repository, equal, work) as server:
        targets = [Target("normserve", server.url, server.pid, body) for body in (equal, mixed)]
        series = load_matrix(targets, concurrencies, rounds, duration_s, work, log)
    return {
        "model": model.name,
        "source": model.source,
        "offline": offline,
        "series": [row for s in series for row in s.summary()],
    }
