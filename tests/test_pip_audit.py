"""Known vulnerabilities in the installed serving dependencies, by pip-audit.

pip-audit asks a vulnerability service (PyPI's JSON API by default) about every installed
distribution. When that service cannot answer (no network, a proxy that serves only part of
the API, a timeout) the audit proves nothing, so the test skips and says why; it never
passes without an answer for each serving dependency. A known vulnerability in a serving
dependency fails the test; those in other packages (torch, the dev tools) are reported in
the output only: they never reach the runtime image.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

# The runtime image's packages: [project].dependencies in pyproject.toml.
SERVING = {
    "uvicorn",
    "onnxruntime",
    "pydantic",
    "pydantic-core",
    "pydantic-settings",
    "numpy",
    "orjson",
    "prometheus-client",
}
TIMEOUT_S = 120
UNREACHABLE = re.compile(
    r"ConnectionError|ConnectTimeout|ReadTimeout|Timeout|NameResolutionError|"
    r"Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"ProxyError|SSLError|HTTPError|ServiceError",
    re.I,
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run_pip_audit() -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "pip_audit",
        "--local",  # the installed environment: what this venv (and so the image) holds
        "--skip-editable",  # normserve itself is not on PyPI
        "--progress-spinner",
        "off",
        "--timeout",
        "20",  # per request; the whole run is bounded by TIMEOUT_S
        "--format",
        "json",
    ]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip-audit did not finish within {TIMEOUT_S} s (vulnerability service slow?)")
    # 0: nothing found, 1: vulnerabilities found; anything else: it could not audit.
    if result.returncode not in (0, 1):
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        if UNREACHABLE.search(result.stderr):
            pytest.skip(f"pip-audit could not reach its vulnerability service: {' | '.join(tail)}")
        pytest.fail(f"pip-audit failed (exit {result.returncode}): {result.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_serving_dependencies_have_no_known_vulnerabilities() -> None:
    report = run_pip_audit()
    dependencies = {normalize(d["name"]): d for d in report["dependencies"]}
    missing = sorted(SERVING - set(dependencies))
    assert not missing, f"serving dependencies not installed, so not audited: {missing}"

    # pip-audit counts a package it could not look up as "skipped" and still reports "No known
    # vulnerabilities found": an audit that checked nothing must not read as a pass.
    unaudited = {
        name: dependencies[name]["skip_reason"]
        for name in SERVING
        if "skip_reason" in dependencies[name]
    }
    if unaudited:
        name, reason = sorted(unaudited.items())[0]
        pytest.skip(
            f"pip-audit could not audit {len(unaudited)}/{len(SERVING)} serving dependencies "
            f"(the vulnerability service did not answer for them), e.g. {name}: {reason}"
        )

    def findings(names: set[str]) -> list[str]:
        return [
            f"{name} {dependencies[name]['version']}: {vuln['id']} "
            f"(fixed in {', '.join(vuln.get('fix_versions') or ['no release yet'])})"
            for name in sorted(names)
            for vuln in dependencies[name].get("vulns", [])
        ]

    others = findings(set(dependencies) - SERVING)
    if others:
        print("known vulnerabilities outside the serving set (not failing):", *others, sep="\n  ")
    serving = findings(SERVING)
    assert not serving, "known vulnerabilities in serving dependencies:\n  " + "\n  ".join(serving)
