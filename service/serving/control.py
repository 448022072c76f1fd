"""Model control, Triton's three modes: what is loaded, when, and the repository index.

- ``none``: every model folder is loaded at start-up; load/unload are refused.
- ``poll``: the same at start-up, then the repository is rescanned every
  ``repository_poll_secs``: a new folder is loaded, a removed one unloaded, a changed one
  (config.json or a version file) reloaded; load/unload are refused.
- ``explicit``: only the ``load_model`` names (``*``: all) at start-up, then only what the
  load/unload API asks.

A load reads the folder's config.json (plus an optional override), builds and warms up
every version its version policy serves (in a thread: the event loop keeps serving), and
only then swaps them in (ModelStore.install); a load that fails leaves what was served
untouched. Names come only from the repository folder: a name is checked against the
model-name allow-list, never used as a path. One lock serializes control operations; the
request path never takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.errors import ControlDisabled, InvalidInput, RepositoryError
from service.repository import (
    CONFIG_FILE,
    MODEL_NAME,
    ModelConfig,
    model_names,
    read_model,
)
from service.serving.store import ModelStore, Served

log = logging.getLogger("normserve.control")

# Triton's words, which its clients and scripts look for.
DISABLED = "explicit model load / unload is not allowed if polling is enabled"


class ModelControl:
    def __init__(
        self, store: ModelStore, on_change: Callable[[str, bool], None] | None = None
    ) -> None:
        self.store = store
        self.settings = store.settings
        self.mode = self.settings.model_control_mode
        # Called with (name, served?) after every change, e.g. for the readiness gauge.
        self._on_change = on_change
        self._lock = asyncio.Lock()
        self._loading: dict[str, list[int]] = {}  # name -> versions being built
        self._unloaded: set[str] = set()  # unloaded through the API (index reason)
        self._seen: dict[str, str] = {}  # poll mode: name -> fingerprint of its folder
        self._poller: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- life cycle

    async def start(self) -> None:
        """Load what the mode loads at start-up; with strict_models the first failure
        raises RepositoryError. Poll mode then starts rescanning."""
        root = self.settings.repository
        if self.mode == "explicit":
            wanted = self.settings.load_models
            names = model_names(root) if "*" in wanted else wanted
        else:
            names = model_names(root)
        if self.mode == "poll":
            self._seen = await asyncio.to_thread(self._fingerprints)
        for name in names:
            try:
                await self._load(name, None)
            except InvalidInput as exc:
                if self.settings.strict_models:
                    raise RepositoryError(f"{exc} (strict_models is on)") from None
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    # ----------------------------------------------------------------- the API

    async def load(self, name: str, config: str | None = None) -> None:
        """Load (or reload) ``name`` from its repository folder, ``config`` overriding the
        supported fields; InvalidInput worded as Triton's ``failed to load '<m>', ...``."""
        self._check_allowed()
        _check_name(name, "load")
        async with self._lock:
            await self._load(name, config)

    async def unload(self, name: str) -> None:
        """Stop serving ``name``: new requests are refused at once, requests already
        admitted or queued finish on it (the index says UNLOADING meanwhile)."""
        self._check_allowed()
        _check_name(name, "unload")
        async with self._lock:
            known = name in self.store.versions or name in self.store.failed
            if not known and name not in await asyncio.to_thread(model_names, self._root):
                raise InvalidInput(
                    f"failed to unload '{name}', no model of that name is loaded or in the "
                    "repository"
                )
            self._unload(name)

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every model folder (and every model served or failed), each version with its
        state (READY, LOADING, UNLOADING, UNAVAILABLE) and reason."""
        store = self.store
        draining: dict[str, list[str]] = {}
        for name, version in store.draining():
            draining.setdefault(name, []).append(version)
        names = {*model_names(self._root), *store.versions, *store.failed, *self._loading}
        entries: list[dict[str, Any]] = []
        for name in sorted(names):
            ready = store.versions.get(name, {})
            states = {v: ("READY", "") for v in ready}
            for number in self._loading.get(name, []):
                states.setdefault(str(number), ("LOADING", ""))
            for version in draining.get(name, []):
                states.setdefault(version, ("UNLOADING", "finishing its requests"))
            mine = [
                {"name": name, "version": v, "state": state, "reason": reason}
                for v, (state, reason) in sorted(states.items(), key=lambda i: int(i[0]))
            ]
            if name in store.failed:
                mine.append({"name": name, "state": "UNAVAILABLE", "reason": store.failed[name]})
            elif not mine:
                reason = "unloaded" if name in self._unloaded else "not loaded"
                mine.append({"name": name, "state": "UNAVAILABLE", "reason": reason})
            entries += mine
        if ready_only:
            return [e for e in entries if e["state"] == "READY"]
        return entries

    # ----------------------------------------------------------------- internals

    @property
    def _root(self) -> Path:
        return self.settings.repository

    def _check_allowed(self) -> None:
        if self.mode != "explicit":
            raise ControlDisabled(DISABLED)

    async def _load(self, name: str, override: str | None) -> None:
        try:
            config = await asyncio.to_thread(self._read, name)
        except RepositoryError as exc:
            raise self._failed(name, str(exc)) from None
        if override is not None:
            # Imported at the first load that has one: its models cost every start ~6 ms.
            from service.serving.override import OverrideError, apply_override

            try:
                config = apply_override(config, override)
            except OverrideError as exc:
                # The request's mistake: nothing changes, what was served stays served.
                raise InvalidInput(f"failed to load '{name}', {exc}") from None
        versions = config.served_versions()
        if not versions:
            raise self._failed(
                name, f"at least one version must be available under the version policy "
                f"of model '{name}'"
            )  # fmt: skip
        self._loading[name] = [v.version for v in versions]
        built: list[Served] = []
        try:
            for version in versions:
                built.append(await asyncio.to_thread(self.store.build, config, version))
        except RepositoryError as exc:
            raise self._failed(name, str(exc)) from None
        finally:
            self._loading.pop(name, None)
        self.store.install(name, built)
        self._unloaded.discard(name)
        log.info("model '%s' serving version(s) %s", name, ", ".join(s.version for s in built))
        self._changed(name)

    def _read(self, name: str) -> ModelConfig:
        if not (self._root / name / CONFIG_FILE).is_file():
            raise RepositoryError(
                f"failed to poll from model repository: no model folder '{name}' with a "
                f"{CONFIG_FILE}"
            )
        return read_model(self._root, name)

    def _failed(self, name: str, reason: str) -> InvalidInput:
        """The error for a load that failed; the model is marked failed unless an earlier
        load of it is still being served (Triton keeps that one)."""
        if name in self.store.versions:
            log.error("model '%s' reload failed, the loaded one stays: %s", name, reason)
        else:
            self.store.fail(name, reason)
            self._changed(name)
        return InvalidInput(f"failed to load '{name}', {reason}")

    def _unload(self, name: str) -> None:
        self.store.retire(name)
        self._unloaded.add(name)
        log.info("model '%s' unloaded (its requests finish first)", name)
        self._changed(name)

    def _changed(self, name: str) -> None:
        if self._on_change is not None:
            self._on_change(name, name in self.store.served)

    # ----------------------------------------------------------------- poll mode

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.poll()
            except Exception:  # one bad scan must not end polling
                log.exception("repository poll failed")

    async def poll(self) -> None:
        """One rescan: load what appeared or changed, unload what disappeared."""
        now = await asyncio.to_thread(self._fingerprints)
        async with self._lock:
            for name in sorted(set(self._seen) - set(now)):
                if name in self.store.versions or name in self.store.failed:
                    self._unload(name)
                    self._unloaded.discard(name)  # gone from the repository, not listed
            for name, fingerprint in sorted(now.items()):
                if self._seen.get(name) != fingerprint:
                    log.info("model folder '%s' changed; loading it", name)
                    with contextlib.suppress(InvalidInput):  # logged and in the index
                        await self._load(name, None)
            self._seen = now

    def _fingerprints(self) -> dict[str, str]:
        """For each model folder: a digest of its config.json and of its version files'
        sizes and modification times (a changed file changes it)."""
        result: dict[str, str] = {}
        for name in model_names(self._root):
            folder = self._root / name
            digest = hashlib.sha256()
            try:
                digest.update((folder / CONFIG_FILE).read_bytes())
                for path in sorted(folder.glob("*/*")):
                    stat = path.stat()
                    digest.update(f"{path.relative_to(folder)}:{stat.st_size}:".encode())
                    digest.update(str(stat.st_mtime_ns).encode())
            except OSError:  # half-written or vanishing: as it was, looked at next time
                if name in self._seen:
                    result[name] = self._seen[name]
                continue
            result[name] = digest.hexdigest()
        return result


def _check_name(name: str, action: str) -> None:
    if not MODEL_NAME.fullmatch(name):
        raise InvalidInput(
            f"failed to {action} '{name[:64]}', not a model name: names are 1-128 letters, "
            "digits, '_', '.', '-', start with a letter or digit, and name a folder of the "
            "repository (never a path)"
        )
