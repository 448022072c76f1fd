"""``python -m export onnx`` as a user runs it: a real subprocess on a user's own module.

The user module lives in the test's temporary directory and is found through PYTHONPATH,
as it would be for a user's project. Errors the user can fix must come out as one
``error:`` line with exit status 2, never a traceback. Real exports take seconds each, so
only three tests export; the refusals happen before any export starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest
import torch
from cli_runner import run_cli_in_process as run_in_process
from safetensors.torch import save_file

from export import cli_onnx
from export.publish import LabelsMismatch, PublishError, SignatureConflict, publish
from export.to_onnx import ExportReport, TensorInfo
from service.repository import CONFIG_FILE, MODEL_FILE, list_models, read_config, verified_file

USER_MODULE = "usermodels"
USER_SOURCE = '''\
"""A user's model module, as `python -m export onnx --model usermodels:tiny` imports it."""

import torch
from torch import nn


def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    # Non-default statistics: the defaults make BatchNorm an identity map.
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.1, 3.0)
        bn.weight.uniform_(-2.0, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return model


def not_a_module():
    return {"weights": [1, 2, 3]}


class TwoHeads(nn.Module):
    """Returns a dict, as torchvision's segmentation models do."""

    def __init__(self):
        super().__init__()
        self.body = tiny()[:-1]
        self.logits = nn.Linear(4, 5)
        self.embedding = nn.Linear(4, 2)

    def forward(self, x):
        features = self.body(x)
        return {"logits": self.logits(features), "embedding": self.embedding(features)}


def two_heads():
    torch.manual_seed(0)
    return TwoHeads()


def marked():
    """tiny(), leaving a file behind: a test sees whether the factory ever ran."""
    open("factory_called", "w").close()
    return tiny()
'''
INPUT_SHAPE = (3, 16, 16)
LABELS = ["a", "b", "c", "d", "e"]


def export_args(name: str = "tiny", *extra: str, factory: str = "tiny") -> list[str]:
    """A successful export of the user's tiny model into ./repo, plus ``extra``."""
    return [
        "onnx",
        "--model",
        f"{USER_MODULE}:{factory}",
        "--input-shape",
        ",".join(map(str, INPUT_SHAPE)),
        "--name",
        name,
        "--repository",
        "repo",
        "--labels",
        ",".join(LABELS),
        *extra,
    ]


TIMEOUT_S = 300


def write_user_module(directory: Path) -> Path:
    path = directory / f"{USER_MODULE}.py"
    path.write_text(USER_SOURCE)
    return path


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(cwd), env.get("PYTHONPATH", "")) if p)
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "export", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        check=False,
    )


def run_cli_in_process(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in_process(cwd, *args, user_module=USER_MODULE)


def load_user_module(path: Path) -> ModuleType:
    """The user module imported in this process, under a name no other test uses."""
    spec = importlib.util.spec_from_file_location(f"_cli_test_{USER_MODULE}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 2 with an ``error:`` line holding every fragment, and no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    message = result.stderr[result.stderr.index("error:") :]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), (
        f"expected one 'error:' line, got {len(lines)} lines:\n{result.stderr}"
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_user_module(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def first_export(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    directory = tmp_path_factory.mktemp("cli-export")
    write_user_module(directory)
    return directory, run_cli(directory, *export_args())


# --- exports ------------------------------------------------------------------------------


def test_export_installs_version_one(
    first_export: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    directory, result = first_export
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = [line for line in result.stdout.splitlines() if "parity max|Δ|" in line]
    assert len(summary) == 1, result.stdout
    assert "BN folded 1/1" in summary[0]
    assert f"{Path('repo') / 'tiny'} version 1" in result.stdout

    repo = directory / "repo"
    data = json.loads((repo / "tiny" / CONFIG_FILE).read_text())
    assert data["name"] == "tiny"
    assert data["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}]
    assert data["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 5]}]
    assert data["labels"] == LABELS
    assert [v["version"] for v in data["versions"]] == [1]
    version = data["versions"][0]
    assert version["source"] == f"{USER_MODULE}:tiny"
    assert version["bn_folded"] == 1
    assert version["bn_kept"] == 0
    assert 0 <= version["parity_max_abs_error"] <= version["parity_bound"]

    onnx_path = repo / "tiny" / "1" / MODEL_FILE
    assert onnx_path.is_file()
    config = read_config(repo / "tiny" / CONFIG_FILE)
    assert [c.name for c in list_models(repo)] == ["tiny"]
    assert verified_file(repo, config, config.latest) == onnx_path


def test_export_again_adds_version_two(
    first_export: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path
) -> None:
    directory, first = first_export
    assert first.returncode == 0, first.stderr
    shutil.copytree(directory / "repo", workdir / "repo")
    v1 = (workdir / "repo" / "tiny" / "1" / MODEL_FILE).read_bytes()

    result = run_cli(workdir, *export_args())
    assert result.returncode == 0, result.stderr
    assert f"{Path('repo') / 'tiny'} version 2" in result.stdout

    repo = workdir / "repo"
    config = read_config(repo / "tiny" / CONFIG_FILE)
    assert [v.version for v in config.versions] == [1, 2]
    assert (repo / "tiny" / "1" / MODEL_FILE).read_bytes() == v1
    for version in config.versions:
        verified_file(repo, config, version)


def test_state_dict_checkpoint_is_loaded(workdir: Path) -> None:
    user = load_user_module(workdir / f"{USER_MODULE}.py")
    factory_model = user.tiny().eval()
    trained = user.tiny()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in trained.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.5 * torch.randn(tensor.shape, generator=generator))
        trained[1].running_var.abs_().add_(0.1)
    trained.eval()
    torch.save(trained.state_dict(), workdir / "trained.pt")

    result = run_cli(workdir, *export_args("trained", "--checkpoint", "trained.pt"))
    assert result.returncode == 0, result.stderr
    assert "BN folded 1/1" in result.stdout

    session = ort.InferenceSession(
        str(workdir / "repo" / "trained" / "1" / MODEL_FILE),
        providers=["CPUExecutionProvider"],
    )
    x = torch.randn(6, *INPUT_SHAPE, generator=generator)
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        reference = trained(x).numpy()
        untrained = factory_model(x).numpy()
    bound = 1e-5 * max(1.0, float(np.abs(reference).max()))
    assert float(np.abs(got - reference).max()) <= bound
    # The checkpoint's weights were used, not the factory's.
    assert float(np.abs(got - untrained).max()) > 100 * bound


# --- refusals -----------------------------------------------------------------------------


def test_pickled_module_checkpoint_is_refused(workdir: Path) -> None:
    user = load_user_module(workdir / f"{USER_MODULE}.py")
    torch.save(user.tiny(), workdir / "whole.pt")
    result = run_cli_in_process(workdir, *export_args("tiny", "--checkpoint", "whole.pt"))
    assert_user_error(result, "whole.pt", "weights_only", "state_dict")
    assert not (workdir / "repo").exists()
    assert_one_line_error(result)


def test_unsupported_checkpoint_type_is_refused(workdir: Path) -> None:
    user = load_user_module(workdir / f"{USER_MODULE}.py")
    torch.save(user.tiny().state_dict(), workdir / "weights.bin")
    result = run_cli_in_process(workdir, *export_args("tiny", "--checkpoint", "weights.bin"))
    assert_user_error(result, "weights.bin", "'.bin'", ".safetensors", ".pt")
    assert_one_line_error(result)
    assert not (workdir / "repo").exists()


def test_safetensors_checkpoint_with_missing_keys_is_refused(workdir: Path) -> None:
    user = load_user_module(workdir / f"{USER_MODULE}.py")
    state = {k: v.contiguous() for k, v in user.tiny().state_dict().items()}
    del state["1.running_mean"]
    save_file(state, str(workdir / "partial.safetensors"))
    result = run_cli_in_process(
        workdir, *export_args("tiny", "--checkpoint", "partial.safetensors")
    )
    assert_user_error(result, "partial.safetensors", "does not fit")
    assert not (workdir / "repo").exists()
    # The message must say what does not fit: the missing key.
    assert "1.running_mean" in result.stderr, result.stderr


def test_model_without_a_colon_is_refused(workdir: Path) -> None:
    result = run_cli_in_process(
        workdir, "onnx", "--model", "nocolon", "--input-shape", "3,16,16", "--name", "x"
    )
    assert_user_error(result, "pkg.module:factory", "nocolon")
    assert_one_line_error(result)


def test_factory_returning_a_non_module_is_refused(workdir: Path) -> None:
    result = run_cli_in_process(
        workdir,
        "onnx",
        "--model",
        f"{USER_MODULE}:not_a_module",
        "--input-shape",
        "3,16,16",
        "--name",
        "x",
        "--repository",
        "repo",
    )
    assert_user_error(result, "not_a_module", "dict", "torch.nn.Module")
    assert_one_line_error(result)
    assert not (workdir / "repo").exists()


def test_bad_input_shape_is_an_argparse_error(workdir: Path) -> None:
    result = run_cli_in_process(
        workdir, "onnx", "--model", f"{USER_MODULE}:tiny", "--input-shape", "3,x", "--name", "x"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stderr
    assert "--input-shape" in result.stderr
    assert "'3,x'" in result.stderr


def test_opset_below_17_is_refused(workdir: Path) -> None:
    result = run_cli_in_process(workdir, *export_args("tiny", "--opset", "16"))
    assert_user_error(result, "opset 16", "17")
    assert_one_line_error(result)
    assert not (workdir / "repo").exists()


def test_help_lists_the_commands(workdir: Path) -> None:
    result = run_cli(workdir, "--help")
    assert result.returncode == 0, result.stderr
    assert "build" in result.stdout
    assert "onnx" in result.stdout


COMMANDS = ["build", "onnx", "behavior", "quantize", "tune"]


def test_no_arguments_lists_the_commands(workdir: Path) -> None:
    """What a new user types first gets the commands, not only argparse's complaint."""
    result = run_cli_in_process(workdir)
    assert result.returncode == 2
    listed = result.stderr.split("positional arguments:")[1].split("options:")[0]
    # "    name  what it does" (help text that wraps is indented further)
    names = [w.split()[0] for w in listed.splitlines() if w[:4] == "    " and w[4:5].isalpha()]
    assert names == COMMANDS, result.stderr
    assert "examples:" in result.stderr


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_no_restructuredtext_quotes(workdir: Path, command: str) -> None:
    result = run_cli_in_process(workdir, *([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "``" not in result.stdout, result.stdout


def test_dict_outputs_are_named_by_their_keys(workdir: Path) -> None:
    result = run_cli_in_process(workdir, *export_args("heads", factory="two_heads"))
    assert result.returncode == 0, result.stderr
    config = read_config(workdir / "repo" / "heads" / CONFIG_FILE)
    assert [(o.name, o.shape) for o in config.outputs] == [
        ("logits", [-1, 5]),
        ("embedding", [-1, 2]),
    ]
    assert config.labels == LABELS  # they name the 5 columns of 'logits'
    session = ort.InferenceSession(
        str(verified_file(workdir / "repo", config, config.latest)),
        providers=["CPUExecutionProvider"],
    )
    assert [o.name for o in session.get_outputs()] == ["logits", "embedding"]


# --- mistakes found before the export starts ----------------------------------------------


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the models export_onnx was called for: a refusal must leave it empty."""
    calls: list[str] = []

    def recording(model: torch.nn.Module, *args: object, **kwargs: object) -> ExportReport:
        calls.append(type(model).__name__)
        raise AssertionError("export_onnx ran although the command should have been refused")

    monkeypatch.setattr(cli_onnx, "export_onnx", recording)
    return calls


@pytest.fixture
def existing_tiny(
    first_export: tuple[Path, subprocess.CompletedProcess[str]], workdir: Path
) -> Path:
    """workdir with ./repo holding 'tiny' (input [-1, 3, 16, 16], output [-1, 5])."""
    directory, result = first_export
    assert result.returncode == 0, result.stderr
    shutil.copytree(directory / "repo", workdir / "repo")
    return workdir


@pytest.mark.parametrize(
    ("name", "extra", "fragments"),
    [
        ("tiny", ["--labels", "@missing.txt"], ["--labels", "missing.txt", "No such file"]),
        ("no/slash", [], ["model name 'no/slash'", "letters, digits"]),
        (".hidden", [], ["model name '.hidden'", "starting with a letter or digit"]),
        ("tiny", ["--version", "0"], ["version 0", "from 1"]),
        ("tiny", ["--dynamic-axis", "other:1"], ["dynamic axis other:1", "no input 'other'"]),
        ("tiny", ["--dynamic-axis", "input:2:8"], ["example's size 16 is above its maximum 8"]),
    ],
)
def test_mistake_is_refused_before_the_model_is_built(
    workdir: Path, name: str, extra: list[str], fragments: list[str]
) -> None:
    result = run_cli_in_process(workdir, *export_args(name, *extra, factory="marked"))
    assert_user_error(result, *fragments)
    assert_one_line_error(result)
    assert not (workdir / "factory_called").exists()
    assert not (workdir / "repo").exists()


def test_labels_file_is_read_one_label_a_line(workdir: Path, exports: list[str]) -> None:
    (workdir / "labels.txt").write_text("cat\n\ndog\n  bird \n")
    result = run_cli_in_process(workdir, *export_args("tiny", "--labels", "@labels.txt"))
    # Read (3 labels, blank lines skipped) and held against the 5 columns before any export.
    assert_user_error(result, "3 labels", "no output has 3 columns", "'output' [-1, 5]")
    assert_one_line_error(result)
    assert exports == []


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--labels", "a,b"], ["2 labels", "no output has 2 columns", "'output' [-1, 5]"]),
        (["--input-shape", "2,16,16"], ["fails on example inputs", "input:FP32[2, 2, 16, 16]"]),
        (["--output-name", "a,b"], ["2 output names for 1 outputs"]),
        (["--max-batch-size", "0"], ["model 'tiny'", "max_batch_size", "greater than or equal"]),
    ],
)
def test_mistake_is_refused_after_one_forward_before_the_export(
    workdir: Path, exports: list[str], extra: list[str], fragments: list[str]
) -> None:
    result = run_cli_in_process(workdir, *export_args("tiny", *extra, factory="marked"))
    assert_user_error(result, *fragments)
    assert_one_line_error(result)
    assert (workdir / "factory_called").exists()  # the model was built and run once
    assert exports == []
    assert not (workdir / "repo").exists()


def test_existing_model_with_other_inputs_is_refused_before_the_model_is_built(
    existing_tiny: Path,
) -> None:
    before = (existing_tiny / "repo" / "tiny" / CONFIG_FILE).read_bytes()
    result = run_cli_in_process(
        existing_tiny, *export_args("tiny", "--input-shape", "3,8,8", factory="marked")
    )
    assert_user_error(
        result, "'tiny' already exists", "input:FP32[-1, 3, 16, 16]", "[-1, 3, 8, 8]", "--replace"
    )
    assert_one_line_error(result)
    assert not (existing_tiny / "factory_called").exists()
    assert (existing_tiny / "repo" / "tiny" / CONFIG_FILE).read_bytes() == before


def test_existing_model_with_other_outputs_is_refused_before_the_export(
    existing_tiny: Path, exports: list[str]
) -> None:
    result = run_cli_in_process(existing_tiny, *export_args("tiny", "--output-name", "logits"))
    assert_user_error(result, "'tiny' already exists", "output:FP32[-1, 5]", "logits", "--replace")
    assert_one_line_error(result)
    assert exports == []


def test_replace_installs_the_new_signature_as_the_only_version(existing_tiny: Path) -> None:
    result = run_cli_in_process(
        existing_tiny, *export_args("tiny", "--input-shape", "3,8,8", "--replace")
    )
    assert result.returncode == 0, result.stderr
    config = read_config(existing_tiny / "repo" / "tiny" / CONFIG_FILE)
    assert config.inputs[0].shape == [-1, 3, 8, 8]
    assert [v.version for v in config.versions] == [2]  # the next number; version 1 dropped
    assert not (existing_tiny / "repo" / "tiny" / "1").exists()
    verified_file(existing_tiny / "repo", config, config.latest)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("ids:INT9:16", "datatype 'INT9' is not one of"),
        ("ids:INT32", "is not like NAME:DATATYPE:SHAPE"),
        ("ids:INT32:16,x", "shape '16,x'"),
        ("ids:INT32:16:9..1", "range '9..1'"),
        ("ids:UINT8:16:0..300", "does not fit UINT8 (0..255)"),
        ("flag:BOOL:4:0..1", "BOOL takes no range"),
    ],
)
def test_malformed_input_is_an_argparse_error(workdir: Path, spec: str, fragment: str) -> None:
    result = run_cli_in_process(
        workdir, "onnx", "--model", f"{USER_MODULE}:marked", "--input", spec, "--name", "x"
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "usage:" in result.stderr
    assert f"argument --input: '{spec}'" in result.stderr
    assert fragment in result.stderr
    assert not (workdir / "factory_called").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--input", "a:FP32:3", "--input", "a:INT64:3"], "--input names must be unique"),
        (["--input", "a:FP32:3", "--input-name", "b"], "--input-name goes with --input-shape"),
    ],
)
def test_inconsistent_inputs_are_refused(workdir: Path, args: list[str], fragment: str) -> None:
    result = run_cli_in_process(
        workdir, "onnx", "--model", f"{USER_MODULE}:marked", *args, "--name", "x"
    )
    assert_user_error(result, fragment)
    assert_one_line_error(result)
    assert not (workdir / "factory_called").exists()


def test_input_and_input_shape_exclude_each_other(workdir: Path) -> None:
    result = run_cli_in_process(
        workdir, *export_args("tiny", "--input", "input:FP32:3,16,16", factory="marked")
    )
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
    assert not (workdir / "factory_called").exists()


def test_missing_user_module_names_the_folder(workdir: Path) -> None:
    result = run_cli_in_process(
        workdir, "onnx", "--model", "nosuchmodule:f", "--input-shape", "3", "--name", "x"
    )
    assert_user_error(result, "no module 'nosuchmodule'", str(workdir), "path/to/file.py")
    assert_one_line_error(result)


def test_model_file_named_like_an_imported_module_is_refused(workdir: Path) -> None:
    (workdir / "torch.py").write_text("def f():\n    raise AssertionError('imported')\n")
    result = run_cli_in_process(
        workdir, "onnx", "--model", "torch.py:f", "--input-shape", "3", "--name", "x"
    )
    assert_user_error(result, "torch.py", "'torch'", "already imported", "rename the file")
    assert_one_line_error(result)
    assert sys.modules["torch"] is torch


# --- the Python API refuses what the command line refuses ---------------------------------


def fake_report(path: Path, outputs: list[TensorInfo]) -> ExportReport:
    """A report as export_onnx returns it, for a file that never existed."""
    return ExportReport(
        path=path, opset=18, bn_folded=0, bn_kept=0, kept_reasons={}, batchnorm_nodes=0,
        layernorm_nodes=0, dropout_nodes=0, nodes_before=1, nodes_after=1, params_before=0,
        params_after=0, parity_max_abs_error=0.0, parity_bound=1e-5, parity_batches=[1],
        inputs=[TensorInfo("input", "FP32", [-1, 4])], outputs=outputs,
    )  # fmt: skip


def test_publish_refuses_labels_that_match_no_output_width(tmp_path: Path) -> None:
    report = fake_report(tmp_path / "never.onnx", [TensorInfo("logits", "FP32", [-1, 10])])
    with pytest.raises(LabelsMismatch, match=r"3 labels, but no output has 3 columns") as caught:
        publish(tmp_path / "repo", "m", report, labels=["a", "b", "c"])
    assert isinstance(caught.value, ValueError)
    assert "'logits' [-1, 10]" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "repo").exists()


def test_publish_refuses_a_name_the_repository_refuses(tmp_path: Path) -> None:
    report = fake_report(tmp_path / "never.onnx", [TensorInfo("logits", "FP32", [-1, 10])])
    with pytest.raises(PublishError, match=r"model name '\.\./up' is not allowed"):
        publish(tmp_path / "repo", "../up", report)
    assert not (tmp_path / "repo").exists()


def test_publish_refuses_another_signature_unless_replace(
    first_export: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    directory, result = first_export
    assert result.returncode == 0, result.stderr
    repo = shutil.copytree(directory / "repo", tmp_path / "repo")
    before = (repo / "tiny" / CONFIG_FILE).read_bytes()
    report = fake_report(tmp_path / "never.onnx", [TensorInfo("output", "FP32", [-1, 5])])
    with pytest.raises(SignatureConflict, match=r"replace=True"):
        publish(repo, "tiny", report)
    assert (repo / "tiny" / CONFIG_FILE).read_bytes() == before
