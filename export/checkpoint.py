"""Loading and saving weights without executing code from the file.

Accepted: safetensors files, and ``.pt``/``.pth`` state dicts through
``torch.load(weights_only=True)``, which refuses pickled code. Anything else is refused with
a message that says what to do, because a pickle can run arbitrary code when loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

SAFETENSORS_SUFFIXES = {".safetensors"}
TORCH_SUFFIXES = {".pt", ".pth"}


class CheckpointError(ValueError):
    """The checkpoint cannot be read safely or does not fit the model."""


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from exc
    if suffix in TORCH_SUFFIXES:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            # torch's own message is several lines and suggests weights_only=False, the unsafe
            # option this refusal exists for: keep only the line naming what was refused.
            found = re.search(
                r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) (\S+)", _plain(str(exc))
            )
            what = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path} cannot be loaded with torch.load(weights_only=True){what}: it is not a "
                "plain state_dict; save model.state_dict() (not the pickled module) or use "
                "safetensors"
            ) from exc
        state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
        if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(
                f"{path} holds a {type(loaded).__name__}, not a state_dict of tensors; "
                "save model.state_dict() instead"
            )
        return dict(state)
    raise CheckpointError(
        f"{path}: unsupported checkpoint type '{suffix or '(none)'}'; use .safetensors, or a "
        ".pt/.pth state_dict (loaded with weights_only=True: pickled code is refused)"
    )


def load_into(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the weights of ``path``; every key must match (strict)."""
    state = load_state_dict(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(
        k for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    problems = [
        f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape differs for", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model


def _plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def save_safetensors(model: nn.Module, path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=dict(metadata))
    tmp.replace(path)
