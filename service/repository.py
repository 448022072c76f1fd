"""The model repository format: the only thing that crosses from export/ to service/.

Layout, familiar to Triton users::

    <root>/<model>/config.json          ModelConfig below (signature, labels, batching, versions)
    <root>/<model>/<version>/model.onnx one directory per integer version

The format is defined once, here, by the pydantic models; export/ writes it through
``install_model`` and the service reads it through ``load_repository``, so both sides agree
by construction. Every model file's sha256 is recorded at export and checked at load.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service.errors import IntegrityError, RepositoryError

CONFIG_FILE = "config.json"
MODEL_FILE = "model.onnx"
FORMAT_VERSION: Literal[1] = 1

# Open Inference Protocol tensor datatypes (the names V2 clients send and expect).
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
# Model names: an allow-list, so a name can never be a path (checked again on every request).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
ModelName = Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]
MAX_LABELS = 100_000
MAX_LABEL_LENGTH = 256


class _Strict(BaseModel):
    # Unknown keys are typos, not extensions: reject them at load with the key's name.
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output: axis 0 is the batch axis and is always -1 (any size); another
    -1 axis is variable too (a sequence's length: Triton's variable-size dims)."""

    name: Annotated[str, Field(min_length=1)]
    datatype: Datatype
    shape: Annotated[list[Annotated[int, Field(ge=-1)]], Field(min_length=1)]
    # The largest size of each variable axis, as TensorRT's optimization profiles bound
    # Triton's -1 dims (its model configuration has no field for it): same rank as ``shape``,
    # -1 at the batch axis (max_batch_size bounds it) and the fixed axes' own sizes; a
    # variable axis at -1 has no cap but the request body limits. Left out of config.json
    # when None, so files written before it read and write back unchanged.
    max_shape: list[Annotated[int, Field(ge=-1)]] | None = Field(
        default=None, exclude_if=lambda value: value is None
    )

    @model_validator(mode="after")
    def _batch_axis_is_variable(self) -> TensorSpec:
        if self.shape[0] != -1:
            raise ValueError(
                f"tensor '{self.name}': axis 0 is the batch axis and must be -1, got {self.shape}"
            )
        if self.max_shape is not None:
            _check_max_shape(self.name, self.shape, self.max_shape)
        return self

    def metadata(self) -> dict[str, object]:
        """The tensor as V2 metadata describes one: name, datatype, shape (-1: any size)."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def variable_axes(self) -> list[int]:
        """The axes other than the batch axis whose size a request chooses."""
        return [axis for axis, dim in enumerate(self.shape) if axis > 0 and dim == -1]


def _check_max_shape(name: str, shape: list[int], max_shape: list[int]) -> None:
    expected = [-1, *("N" if d == -1 else d for d in shape[1:])]
    if len(max_shape) != len(shape) or max_shape[0] != -1 or 0 in max_shape:
        raise ValueError(
            f"tensor '{name}': max_shape {max_shape} must have the rank of shape {shape}, -1 "
            f"at the batch axis and a size of at least 1 (or -1) at each variable axis: "
            f"{expected}"
        )
    for axis, (dim, cap) in enumerate(zip(shape[1:], max_shape[1:], strict=True), start=1):
        if dim != -1 and cap != dim:
            raise ValueError(
                f"tensor '{name}': max_shape {max_shape} gives axis {axis} size {cap}, but "
                f"shape {shape} fixes it at {dim}; only -1 axes take a cap"
            )


class Batching(_Strict):
    """Per-model dynamic batching; a field left out (None) takes the server's default."""

    max_batch_size: Annotated[int, Field(ge=1)] | None = None
    max_queue_delay_ms: Annotated[float, Field(ge=0)] | None = None
    max_queue_size: Annotated[int, Field(ge=1)] | None = None


class RuntimeOptions(_Strict):
    """Per-model runtime options; None takes the server's default."""

    intra_op_threads: Annotated[int, Field(ge=1)] | None = None
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] | None = None
    # What runs the ONNX file. onnxruntime is always installed; OpenVINO is the optional
    # `openvino` extra, faster on some models here (int8 QDQ files: ~1.8x onnxruntime fp32
    # vs ~1.45x for onnxruntime int8 on the CIFAR CNN). graph_optimization_level is
    # onnxruntime's and does not apply to it.
    engine: Literal["onnxruntime", "openvino"] | None = None


class LatestVersions(_Strict):
    num_versions: Annotated[int, Field(ge=1)] = 1


class AllVersions(_Strict):
    pass


class SpecificVersions(_Strict):
    versions: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)]


class VersionPolicy(_Strict):
    """Which recorded versions are served, in Triton's words: exactly one of
    ``{"latest": {"num_versions": N}}``, ``{"all": {}}``, ``{"specific": {"versions": [..]}}``."""

    latest: LatestVersions | None = None
    all: AllVersions | None = None
    specific: SpecificVersions | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> VersionPolicy:
        given = [k for k in ("latest", "all", "specific") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "version_policy needs exactly one of 'latest', 'all', 'specific', "
                f"got {given or 'none'}"
            )
        return self

    def triton(self) -> dict[str, object]:
        """The policy as Triton's model configuration shows it."""
        return self.model_dump(exclude_none=True)


LATEST_ONE = VersionPolicy(latest=LatestVersions(num_versions=1))


class ModelVersion(_Strict):
    """One exported file and the evidence that it is right."""

    version: Annotated[int, Field(ge=1)]
    # A plain file name inside the version directory: no path may leave the repository.
    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\.onnx$")] = MODEL_FILE
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    opset: int
    exported_at: datetime
    source: str = ""
    bn_folded: int = 0
    bn_kept: int = 0
    layernorm_nodes: int = 0
    # max|onnxruntime - float64 copy of the model| over the parity inputs (vs PyTorch float32
    # where no float64 copy could run), and the bound it was held to (export/parity.py).
    parity_max_abs_error: float
    parity_bound: float
    # Quality measured at export, e.g. {"test_accuracy": 0.99} on the held-out split.
    metrics: dict[str, float] = {}
    # Arithmetic of the weights and activations. For "int8" (``python -m export quantize``)
    # the parity fields compare with the fp32 model it was made from, and ``metrics`` holds
    # the accuracy gate it passed (fp32 and int8 test accuracy, top-1 agreement).
    precision: Literal["fp32", "int8"] = "fp32"


class ModelConfig(_Strict):
    format: Literal[1] = FORMAT_VERSION
    name: ModelName
    description: str = ""
    platform: Literal["onnxruntime_onnx"] = "onnxruntime_onnx"
    # The largest batch one inference request may carry (and the batcher forms).
    max_batch_size: Annotated[int, Field(ge=1)] = 64
    inputs: Annotated[list[TensorSpec], Field(min_length=1)]
    outputs: Annotated[list[TensorSpec], Field(min_length=1)]
    # Class names of a classifier, index i naming output column i; None for other models.
    # Bounded: V1 answers repeat every label per row, so 10 labels of 1 MB each once turned a
    # 21 KB request into a 704 MB response.
    labels: (
        Annotated[
            list[Annotated[str, Field(max_length=MAX_LABEL_LENGTH)]],
            Field(max_length=MAX_LABELS),
        ]
        | None
    ) = None
    batching: Batching = Batching()
    runtime: RuntimeOptions = RuntimeOptions()
    # True when one row's output depends on the other rows of its batch (e.g. BatchNorm with
    # batch statistics). Such a model answers correctly only for the batch a client sends, so
    # each request must be its own batch: the service never merges its requests with others.
    batch_dependent: bool = False
    # The model whose trained weights this one reuses (digits_cnn_batchstats: digits_cnn), so
    # that a client can put the two side by side without knowing naming conventions.
    derived_from: ModelName | None = None
    versions: list[ModelVersion] = []
    # Which of ``versions`` are served at once (Triton's version_policy); None: the latest.
    version_policy: VersionPolicy | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind} names must be unique, got {names}")
        numbers = [v.version for v in self.versions]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"versions must be unique, got {numbers}")
        if self.labels is not None:
            widths = {s.shape[-1] for s in self.outputs if len(s.shape) == 2}
            if len(self.labels) not in widths:
                raise ValueError(
                    f"{len(self.labels)} labels do not match any [-1, C] output "
                    f"(widths {sorted(widths)})"
                )
        policy = self.version_policy
        if policy is not None and policy.specific is not None:
            missing = sorted(set(policy.specific.versions) - set(numbers))
            if missing:
                raise ValueError(
                    f"version_policy names versions {missing} that are not recorded "
                    f"(recorded: {sorted(numbers)})"
                )
        return self

    @property
    def policy(self) -> VersionPolicy:
        return self.version_policy or LATEST_ONE

    def served_versions(self) -> list[ModelVersion]:
        """The recorded versions the policy serves, lowest first."""
        ordered = sorted(self.versions, key=lambda v: v.version)
        policy = self.policy
        if policy.all is not None:
            return ordered
        if policy.specific is not None:
            wanted = set(policy.specific.versions)
            return [v for v in ordered if v.version in wanted]
        assert policy.latest is not None
        return ordered[-policy.latest.num_versions :]

    @property
    def latest(self) -> ModelVersion:
        if not self.versions:
            raise RepositoryError(f"model '{self.name}' has no versions")
        return max(self.versions, key=lambda v: v.version)

    def version(self, number: int | None) -> ModelVersion:
        """The given version, or the latest when ``number`` is None."""
        if number is None:
            return self.latest
        for v in self.versions:
            if v.version == number:
                return v
        raise RepositoryError(f"model '{self.name}' has no version {number}")

    def same_signature(self, other: ModelConfig) -> bool:
        return self.inputs == other.inputs and self.outputs == other.outputs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(root: Path, config: ModelConfig, version: ModelVersion) -> Path:
    return root / config.name / str(version.version) / version.file


def read_config(path: Path, shown: Path | str | None = None) -> ModelConfig:
    """The validated config at ``path``; RepositoryError names the file (as ``shown``, when
    given) and the problem."""
    shown = path if shown is None else shown
    try:
        return ModelConfig.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise RepositoryError(f"{shown}: no such file") from exc
    except OSError as exc:  # e.g. files copied into an image without read permission
        raise RepositoryError(f"{shown}: cannot be read ({exc.strerror})") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise RepositoryError(f"{shown}: invalid model config: {problems}") from exc


def list_models(root: Path) -> list[ModelConfig]:
    """Every model config under ``root``, sorted by name; RepositoryError at the first bad one."""
    configs, failed = scan_repository(root)
    if failed:
        raise RepositoryError(next(iter(failed.values())))
    return configs


def scan_repository(root: Path) -> tuple[list[ModelConfig], dict[str, str]]:
    """The valid model configs under ``root`` (sorted by name), and for each model directory
    that cannot be used, its name and why: one bad model never hides the others.

    RepositoryError only when ``root`` itself is unusable. Messages name paths relative to
    ``root``: they reach clients.
    """
    if not root.is_dir():
        raise RepositoryError(f"model repository {root} does not exist or is not a directory")
    configs: list[ModelConfig] = []
    failed: dict[str, str] = {}
    for config_path in sorted(root.glob(f"*/{CONFIG_FILE}")):
        name = config_path.parent.name
        try:
            config = read_model(root, name)
        except RepositoryError as exc:
            failed[name] = str(exc)
            continue
        configs.append(config)
    return configs, failed


def model_names(root: Path) -> list[str]:
    """The model folders of ``root`` (directories holding a config.json), sorted."""
    return sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}"))


def read_model(root: Path, name: str) -> ModelConfig:
    """The validated config of model folder ``name``: RepositoryError when the folder, its
    config or the config's name is not right. ``name`` must already be a valid model name
    (never a path: callers check it against MODEL_NAME)."""
    if not MODEL_NAME.fullmatch(name):
        raise RepositoryError(f"invalid model name {name[:64]!r}")
    config_path = root / name / CONFIG_FILE
    shown = config_path.relative_to(root)
    inside(root.resolve(), config_path, shown)
    config = read_config(config_path, shown)
    if config.name != name:
        raise RepositoryError(
            f"{name}/{CONFIG_FILE}: name '{config.name}' differs from its directory '{name}'"
        )
    return config


def inside(real_root: Path, path: Path, shown: Path | str) -> None:
    """RepositoryError when ``path`` resolves (following symlinks) outside ``real_root``: a
    link in the repository must never make the server read a file elsewhere."""
    try:
        path.resolve(strict=False).relative_to(real_root)
    except ValueError:
        raise RepositoryError(
            f"{shown} resolves outside the model repository (a symbolic link?); refused"
        ) from None
    except (OSError, RuntimeError):  # a symlink loop
        raise RepositoryError(f"{shown} cannot be resolved (a symbolic link loop?)") from None


def verified_file(root: Path, config: ModelConfig, version: ModelVersion) -> Path:
    """The model file of ``version``, after checking that its sha256 is the recorded one."""
    path = model_file(root, config, version)
    shown = path.relative_to(root)  # messages reach clients: no absolute server paths
    inside(root.resolve(), path, f"model '{config.name}' version {version.version}: {shown}")
    if not path.is_file():
        raise RepositoryError(
            f"model '{config.name}' version {version.version}: {shown} is missing"
        )
    try:
        actual = sha256_file(path)
    except OSError as exc:
        raise RepositoryError(
            f"model '{config.name}' version {version.version}: {shown} cannot be read "
            f"({exc.strerror})"
        ) from exc
    if actual != version.sha256:
        raise IntegrityError(
            f"model '{config.name}' version {version.version}: {shown} has sha256 {actual}, "
            f"but {version.sha256} was recorded at export (file changed or corrupt; re-export it)"
        )
    return path


def atomic_write(path: Path, data: bytes) -> None:
    # Write then rename: a reader never sees a half-written config or model.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        # mkstemp creates 0600; a repository is read by other users (the image's non-root
        # server), so give it the mode an ordinary file gets under the current umask.
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def install_model(
    root: Path,
    config: ModelConfig,
    onnx_path: Path,
    version: ModelVersion,
    *,
    replace: bool = False,
) -> ModelConfig:
    """Copy ``onnx_path`` in as ``version`` of ``config.name`` and record it in config.json.

    The sha256 is computed here from the copied bytes (``version.sha256`` is overwritten).
    An existing model keeps its other versions when the signature is unchanged; a different
    signature needs ``replace=True``, which drops the old versions. Returns the new config.
    """
    target_dir = root / config.name
    existing: ModelConfig | None = None
    if (target_dir / CONFIG_FILE).exists():
        existing = read_config(target_dir / CONFIG_FILE)
        if not replace and not existing.same_signature(config):
            raise RepositoryError(
                f"model '{config.name}' already exists in {root} with another signature "
                f"(inputs/outputs differ): choose another name or replace it"
            )
    version_file = target_dir / str(version.version) / version.file
    version_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = version_file.with_name(f".{version_file.name}.tmp")
    shutil.copyfile(onnx_path, tmp)
    os.replace(tmp, version_file)
    recorded = version.model_copy(update={"sha256": sha256_file(version_file)})
    kept = [] if existing is None or replace else existing.versions
    versions = [v for v in kept if v.version != version.version] + [recorded]
    if replace and existing is not None:
        for old in existing.versions:
            if old.version != version.version:
                shutil.rmtree(target_dir / str(old.version), ignore_errors=True)
    merged = config.model_copy(update={"versions": sorted(versions, key=lambda v: v.version)})
    # Validate the merged result (model_copy does not) before it reaches the disk.
    merged = ModelConfig.model_validate(merged.model_dump())
    atomic_write(target_dir / CONFIG_FILE, merged.model_dump_json(indent=2).encode() + b"\n")
    return merged


def write_config(root: Path, config: ModelConfig) -> ModelConfig:
    """Replace an existing model's config.json (e.g. tuned runtime options), validated."""
    path = root / config.name / CONFIG_FILE
    if not path.exists():
        raise RepositoryError(f"model '{config.name}' is not in {root}")
    checked = ModelConfig.model_validate(config.model_dump())
    atomic_write(path, checked.model_dump_json(indent=2).encode() + b"\n")
    return checked


def next_version(root: Path, name: str) -> int:
    """1 for a new model, else one more than its latest version."""
    path = root / name / CONFIG_FILE
    return read_config(path).latest.version + 1 if path.exists() else 1


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
