"""Server settings: environment variables ``NORMSERVE_*`` or ``python -m service`` flags.

Read once at start-up and passed into ``create_app(settings)``; nothing reads the environment
later. Per-model values in config.json (``batching``, ``runtime``) override these defaults.
"""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.protocol.request_limits import Limits
from service.repository import MODEL_NAME

OptimizationLevel = Literal["disable", "basic", "extended", "all"]
AUTO = "auto"
# The default number of workers: one per CPU available, up to this many. On 2 cores, 2
# workers × 1 onnxruntime thread answered 1.40x (binary) and 1.48x (JSON) the requests/s of
# 1 × 2 at 64 connections, because one process is limited by its event loop, not by
# onnxruntime (README: Choosing the number of workers). Each worker holds its own models and
# its sessions get CPUs ÷ workers threads, so a large host gets a few workers with several
# threads each rather than one single-threaded worker per core.
AUTO_WORKERS_MAX = 4
# File descriptors kept back from max_connections: an idle server holds 16 (listening socket,
# event loop, logs, metric files); model loads and onnxruntime open more for a moment.
OPEN_FILES_RESERVE = 64


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMSERVE_", extra="forbid")

    repository: Path = Field(
        Path("model_repository"), description="Model repository directory (written by export)."
    )
    report_dir: Path = Field(
        Path("reports/behavior"),
        description="Behaviour report directory (python -m export behavior) whose headline "
        "plot the web page shows when it exists.",
    )
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 in a container).")
    port: Annotated[int, Field(ge=1, le=65535)] = Field(8000, description="TCP port.")
    grpc_port: Annotated[int, Field(ge=0, le=65535)] = Field(
        8001,
        description="TCP port of the Open Inference Protocol's gRPC API (service.grpc), on the "
        "same host; 0 turns gRPC off. Every worker listens on it (SO_REUSEPORT).",
    )
    grpc_max_concurrent_rpcs: Annotated[int, Field(ge=1)] = Field(
        1024,
        description="RPCs (streams included) in progress per process; beyond it a new one is "
        "refused with RESOURCE_EXHAUSTED before it costs anything.",
    )
    grpc_max_streams_per_connection: Annotated[int, Field(ge=1)] = Field(
        128, description="HTTP/2 streams one gRPC connection may have open at once."
    )
    grpc_keepalive_s: Annotated[float, Field(gt=0)] = Field(
        60.0,
        description="The gRPC server pings a connection idle this long, and closes it when "
        "the ping is not answered within 20 s: dead clients do not hold streams.",
    )
    workers: Annotated[int, Field(ge=1)] = Field(
        # Shown as the default by --help; resolved to a number before validation
        # (_resolve_auto_workers), so a Settings' workers is always an int.
        AUTO,  # type: ignore[assignment]
        description="Server processes; the CPU budget is split between them. 'auto': one per "
        f"CPU available, at most {AUTO_WORKERS_MAX}, and 1 in explicit model control mode. "
        "Each worker holds its own copy of the models.",
    )
    intra_op_threads: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="onnxruntime threads per session; default: CPUs available (affinity and "
        "cgroup quota) divided by workers.",
    )
    graph_optimization_level: OptimizationLevel = Field(
        "all", description="onnxruntime graph optimizations (disable|basic|extended|all)."
    )
    max_batch_size: Annotated[int, Field(ge=1)] = Field(
        64, description="Largest batch the batcher forms (capped by each model's own limit)."
    )
    max_queue_delay_ms: Annotated[float, Field(ge=0)] = Field(
        0.0,
        description="Extra wait for more requests before running a batch. 0: run what queued "
        "while the previous batch ran (a fixed window costs latency at low load).",
    )
    max_queue_size: Annotated[int, Field(ge=1)] = Field(
        256, description="Requests waiting per model; beyond it: 503 with Retry-After."
    )
    request_timeout_ms: Annotated[float, Field(gt=0)] = Field(
        30_000, description="Default per-request deadline; V2 'timeout' parameter overrides."
    )
    max_request_bytes: Annotated[int, Field(ge=1024)] = Field(
        16 * 1024 * 1024, description="Largest request body accepted (413 beyond)."
    )
    max_json_depth: Annotated[int, Field(ge=4)] = Field(
        32, description="Deepest JSON nesting accepted in a request (400 beyond)."
    )
    max_tensor_elements: Annotated[int, Field(ge=1)] = Field(
        16_777_216,
        description="Most elements one request tensor may declare (400 beyond, before allocating).",
    )
    max_tensors: Annotated[int, Field(ge=1)] = Field(
        64, description="Most inputs plus outputs named in one request (400 beyond)."
    )
    model_control_mode: Literal["none", "poll", "explicit"] = Field(
        "none",
        description="Triton's model control: none (load every model at start-up, no "
        "load/unload), poll (also rescan the repository every repository_poll_secs and "
        "load, reload or unload what changed), explicit (load only load_model at start-up, "
        "then what POST /v2/repository/models/{m}/load|unload asks).",
    )
    repository_poll_secs: Annotated[float, Field(gt=0)] = Field(
        15.0, description="Seconds between repository rescans in poll mode (Triton's default)."
    )
    load_model: str = Field(
        "",
        description="Explicit mode: models to load at start-up, comma-separated or the flag "
        "repeated; '*' loads every model.",
    )
    strict_models: bool = Field(
        False,
        description="Exit at start-up when any model fails to load (Triton's exit-on-error); "
        "by default the others serve and the failed one is UNAVAILABLE with its reason.",
    )
    # The HTTP front (service.front.limits): what one connection may cost before the app
    # sees a request. Every refusal there is JSON {"error": ...} and closes the connection.
    max_header_bytes: Annotated[int, Field(ge=1024, le=16 * 1024 * 1024)] = Field(
        64 * 1024,
        description="Largest request line plus headers accepted (431 and close beyond); "
        "counted as they arrive, so memory stays bounded.",
    )
    header_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0, description="From a request's first byte until its headers are complete (408)."
    )
    body_timeout_s: Annotated[float, Field(gt=0)] = Field(
        30.0,
        description="From the end of a request's headers until its body is complete (408); "
        "30 s carries a 16 MB body at 4.5 Mbit/s.",
    )
    idle_timeout_s: Annotated[float, Field(gt=0)] = Field(
        5.0,
        description="How long a connection may stay open without a request: a fresh one "
        "that has sent nothing, or a kept-alive one between requests.",
    )
    max_connections: Annotated[int, Field(ge=1)] = Field(
        1000,
        description="Open connections per process. At the cap the one waiting longest "
        "without a request in progress is closed to admit the new one; when all have one, "
        "the new one is closed. At most the open-file limit (raised to its hard limit at "
        f"start-up) minus {OPEN_FILES_RESERVE}.",
    )
    graceful_shutdown_s: Annotated[float, Field(gt=0)] = Field(
        30.0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    drain_delay_s: Annotated[float, Field(ge=0, le=300)] = Field(
        0.0,
        description="On SIGTERM, how long /v2/health/ready answers 503 while requests are "
        "still served, before the listener closes: above a load balancer's health-check "
        "interval times its fall count. 0 behind Kubernetes, whose preStop pause does this.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level."
    )
    log_format: Literal["json", "text"] = Field(
        "text",
        description="json: every line, uvicorn's included, is one JSON object (time, level, "
        "logger, message, request_id, the access log's fields, traceback) for log shippers; "
        "text: for people.",
    )
    access_log: bool = Field(True, description="One log line per request.")

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_workers(cls, data: object) -> object:
        # A model validator, not a field one: the number depends on model_control_mode, a
        # later field; and absent means "auto" (the default) here too.
        if not isinstance(data, dict):
            return data
        workers = data.get("workers", AUTO)
        if not (isinstance(workers, str) and workers.strip().lower() == AUTO):
            return data
        explicit = str(data.get("model_control_mode", "")).strip() == "explicit"
        return {**data, "workers": 1 if explicit else auto_workers()}

    @field_validator("max_connections")
    @classmethod
    def _fits_open_files(cls, value: int) -> int:
        # The default is lowered to fit at start-up instead (service.front.limits.configure),
        # so that it works under any limit; a value asked for explicitly must fit.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        default = cls.model_fields["max_connections"].default
        too_many = hard != resource.RLIM_INFINITY and value > hard - OPEN_FILES_RESERVE
        if too_many and value != default:
            raise ValueError(
                f"max_connections={value} exceeds the open-file hard limit ({hard}) minus "
                f"{OPEN_FILES_RESERVE} reserved for model, log and metric files; lower "
                "NORMSERVE_MAX_CONNECTIONS or raise the limit (ulimit -Hn)"
            )
        return value

    @field_validator("load_model")
    @classmethod
    def _model_names(cls, value: str) -> str:
        names = [n.strip() for n in value.split(",") if n.strip()]
        bad = [n for n in names if n != "*" and not MODEL_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"{bad[:3]} are not model names (or '*')")
        return ",".join(names)

    @model_validator(mode="after")
    def _control_fits_workers(self) -> Settings:
        # Each worker process has its own models: a load or unload would reach one of them.
        if self.model_control_mode == "explicit" and self.workers > 1:
            raise ValueError(
                "model_control_mode=explicit needs workers=1 (a load or unload request would "
                "reach only one worker process); use poll mode with several workers"
            )
        return self

    @model_validator(mode="after")
    def _fits_cpu_budget(self) -> Settings:
        budget = cpu_budget()
        if self.workers > budget:
            raise ValueError(
                f"workers={self.workers} exceeds the {budget} CPU(s) available to this process; "
                "scale out with replicas instead"
            )
        if self.intra_op_threads is not None and self.workers * self.intra_op_threads > budget:
            raise ValueError(
                f"workers × intra_op_threads = {self.workers * self.intra_op_threads} exceeds "
                f"the {budget} CPU(s) available; lower NORMSERVE_INTRA_OP_THREADS"
            )
        return self

    @property
    def load_models(self) -> list[str]:
        return [n for n in self.load_model.split(",") if n]

    @property
    def limits(self) -> Limits:
        return Limits(self.max_json_depth, self.max_tensor_elements, self.max_tensors)

    @property
    def threads_per_session(self) -> int:
        return self.intra_op_threads or session_threads(self.workers)


def session_threads(workers: int) -> int:
    """onnxruntime threads per session by default: the CPU budget split between workers."""
    return max(1, cpu_budget() // workers)


def auto_workers() -> int:
    """What ``workers=auto`` (the default) means on this machine, outside explicit mode."""
    return min(cpu_budget(), AUTO_WORKERS_MAX)


def cpu_budget() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` reports the host's cores, which oversubscribes a container limited
    to fewer (onnxruntime ignores cgroup limits itself).
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _cgroup_quota() -> int | None:
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else math.ceil(int(quota) / int(period))
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else math.ceil(quota_us / period_us)
    except (OSError, ValueError):
        return None
