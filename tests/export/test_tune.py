"""``python -m export tune``: every candidate timed as the service loads it; the best recorded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from cli_runner import run_cli_in_process

from export.tune import DEFAULT, LEVELS, tune
from service.repository import read_config, write_config


@pytest.fixture
def repository(model_copies: Callable[..., Path]) -> Path:
    return model_copies("digits_transformer")


def test_tune_times_every_candidate_and_records_the_choice(repository: Path) -> None:
    result = tune(repository, "digits_transformer", threads=1, rounds=2)

    labels = [c.runtime for c in result.candidates]
    assert [r.graph_optimization_level for r in labels[: len(LEVELS)]] == list(LEVELS)
    assert DEFAULT in labels
    for c in result.candidates:
        assert len(c.latency_ms) == 2 and len(c.samples_per_s) == 2
        assert c.latency > 0 and c.throughput > 0
    bound = result.config.latest.parity_bound
    assert result.chosen.max_abs_error <= bound
    on_disk = read_config(repository / "digits_transformer" / "config.json")
    assert on_disk.runtime.engine == result.chosen.runtime.engine
    assert (
        on_disk.runtime.graph_optimization_level == result.chosen.runtime.graph_optimization_level
    )
    assert "<- chosen" in result.table()


def test_candidates_outside_the_parity_bound_are_never_chosen(repository: Path) -> None:
    config = read_config(repository / "digits_transformer" / "config.json")
    strict = config.latest.model_copy(update={"parity_bound": 0.0})
    write_config(repository, config.model_copy(update={"versions": [strict]}))

    result = tune(repository, "digits_transformer", threads=1, rounds=1, write=False)

    assert result.chosen.max_abs_error == 0.0
    # Optimized graphs fuse and reorder float arithmetic: some candidate must differ a little,
    # or this test would not test the rule.
    assert any(c.max_abs_error > 0 for c in result.candidates)


def test_dry_run_leaves_the_config_alone_and_bad_models_are_one_line_errors(
    repository: Path,
) -> None:
    before = (repository / "digits_transformer" / "config.json").read_bytes()
    args = ["--repository", str(repository), "--rounds", "1", "--dry-run"]
    ok = run_cli_in_process(repository.parent, "tune", "--model", "digits_transformer", *args)
    assert ok.returncode == 0, ok.stderr
    assert "chosen:" in ok.stdout
    assert (repository / "digits_transformer" / "config.json").read_bytes() == before

    missing = run_cli_in_process(repository.parent, "tune", "--model", "nope",
                                 "--repository", str(repository))  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.startswith("error: ")
