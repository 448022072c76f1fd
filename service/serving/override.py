"""A load request's configuration override (Triton's ``config`` load parameter).

Triton takes a whole model configuration as JSON; here only the fields this server can
change at load are accepted, in Triton's spelling, and anything else is refused by name (a
field silently ignored would look applied). The result is validated as a repository config
would be, so an override can never serve something config.json could not say.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.repository import ModelConfig, VersionPolicy

SUPPORTED = ("name", "max_batch_size", "dynamic_batching", "version_policy")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class QueuePolicy(_Strict):
    max_queue_size: Annotated[int, Field(ge=1)] | None = None


class DynamicBatching(_Strict):
    max_queue_delay_microseconds: Annotated[int, Field(ge=0)] | None = None
    default_queue_policy: QueuePolicy | None = None


class ConfigOverride(_Strict):
    name: str | None = None
    max_batch_size: Annotated[int, Field(ge=1)] | None = None
    dynamic_batching: DynamicBatching | None = None
    version_policy: VersionPolicy | None = None


class OverrideError(ValueError):
    """The override cannot be applied; the message says why (safe to show)."""


def apply_override(config: ModelConfig, text: str) -> ModelConfig:
    """``config`` with the override's fields; OverrideError naming the problem."""
    try:
        override = ConfigOverride.model_validate_json(text)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error["loc"]) or "<root>"
            if error["type"] == "extra_forbidden":
                problems.append(f"{where}: not a field that can be overridden")
            else:
                problems.append(f"{where}: {error['msg']}")
        raise OverrideError(
            f"the config override is not valid: {'; '.join(problems)} "
            f"(fields that can be overridden: {', '.join(SUPPORTED)})"
        ) from None
    if override.name is not None and override.name != config.name:
        raise OverrideError(
            f"the config override names model '{override.name[:64]}', not '{config.name}'"
        )
    update: dict[str, object] = {}
    if override.max_batch_size is not None:
        update["max_batch_size"] = override.max_batch_size
    batching = override.dynamic_batching
    if batching is not None:
        changes: dict[str, object] = {}
        if batching.max_queue_delay_microseconds is not None:
            changes["max_queue_delay_ms"] = batching.max_queue_delay_microseconds / 1000
        if batching.default_queue_policy is not None:
            changes["max_queue_size"] = batching.default_queue_policy.max_queue_size
        update["batching"] = config.batching.model_copy(update=changes)
    if override.version_policy is not None:
        update["version_policy"] = override.version_policy
    merged = config.model_copy(update=update)
    try:
        # model_copy does not validate: check the result as config.json would be checked.
        return ModelConfig.model_validate(merged.model_dump())
    except ValidationError as exc:
        found = "; ".join(e["msg"] for e in exc.errors())
        raise OverrideError(f"the config override does not fit the model: {found}") from None
