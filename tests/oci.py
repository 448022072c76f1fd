"""Build and run the project's OCI image with buildah, where no Docker engine runs.

What this machine allows (and a plain CI machine does): buildah builds with
``--isolation chroot`` and starts the built image with ``buildah run --isolation chroot``,
which shares the host's network, so a server in the image is reachable on 127.0.0.1.
No registry is reachable, so the Dockerfile's base image is made locally: a Debian bookworm
root file system from debootstrap, with Python 3.11 and venv, committed under the base
image's own name. The host's CA bundle goes into it so pip in RUN steps can reach PyPI
through this network's TLS proxy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BASE_IMAGE = "docker.io/library/python:3.11-slim-bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# A stand-in carries this label so that a real image of the same name is never replaced.
STAND_IN_LABEL = "org.normserve.stand-in=debootstrap"


def missing_tools() -> str | None:
    """Why the image cannot be built here, or None when it can."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (Debian package 'buildah'; .ci/run installs it)"
    if not image_exists(BASE_IMAGE):
        if shutil.which("debootstrap") is None:
            return f"no {BASE_IMAGE} image and no debootstrap to make one"
        if os.geteuid() != 0:
            return f"no {BASE_IMAGE} image, and debootstrap needs root to make one"
    return None


def buildah(*args: str, timeout: float = 600, check: bool = True) -> str:
    result = subprocess.run(
        ["buildah", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"buildah {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def image_exists(name: str) -> bool:
    probe = subprocess.run(
        ["buildah", "inspect", "--type", "image", name], capture_output=True, check=False
    )
    return probe.returncode == 0


def inspect_image(name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads(buildah("inspect", "--type", "image", name))
    return data


def ensure_base_image(work: Path) -> str:
    """The Dockerfile's base image, made from debootstrap when the engine has none."""
    if image_exists(BASE_IMAGE):
        return "present"
    rootfs = work / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(rootfs), DEBIAN_MIRROR],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    # What python:3.11-slim leaves out too: package caches, docs, man pages, locales.
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
        shutil.rmtree(rootfs / junk, ignore_errors=True)
    shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc/ssl/certs/ca-certificates.crt")
    archive = work / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
    shutil.rmtree(rootfs)
    container = buildah("from", "scratch").strip()
    try:
        buildah("add", container, str(archive), "/")
        buildah("config", "--label", STAND_IN_LABEL, "--cmd", "python3", container)
        buildah("commit", "--quiet", container, BASE_IMAGE)
    finally:
        buildah("rm", container, check=False)
        archive.unlink(missing_ok=True)
    return "made with debootstrap"


def build_context(root: Path, into: Path, repository: Path | None) -> Path:
    """A copy of what the Dockerfile needs, plus ``repository`` as ./model_repository."""
    into.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy2(root / name, into / name)
    for name in ("requirements", "models", "export", "service"):
        shutil.copytree(root / name, into / name, ignore=ignore)
    if repository is not None:
        shutil.copytree(repository, into / "model_repository")
    return into


def build_image(
    context: Path,
    tag: str,
    build_args: Sequence[str] = (),
    volumes: Sequence[str] = (),
    timeout: float = 900,
) -> str:
    """``buildah bud`` with chroot isolation (what works unprivileged); returns the log.

    ``--format docker`` keeps HEALTHCHECK, which the OCI image format has no field for.
    """
    args = [
        "bud", "--isolation", "chroot", "--pull-never", "--format", "docker", "--layers",
        "--tag", tag,
    ]  # fmt: skip
    for build_arg in build_args:
        args += ["--build-arg", build_arg]
    for volume in volumes:
        args += ["--volume", volume]
    return buildah(*args, str(context), timeout=timeout)


@contextmanager
def mounted_image(name: str) -> Iterator[Path]:
    """The image's root file system, read through a temporary working container."""
    container = buildah("from", "--pull-never", name).strip()
    try:
        yield Path(buildah("mount", container).strip())
    finally:
        buildah("umount", container, check=False)
        buildah("rm", container, check=False)


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                total += path.lstat().st_size
    return total


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def real_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise RuntimeError(f"no Uid line for process {pid}")
