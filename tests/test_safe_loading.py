"""Safe loading (docs/design.md §6.3): what gptlab writes loads with weights_only=True, a crafted pickle is
refused by every entry point without running, remote code stays off, exports are safetensors.

The crafted checkpoint is a real `torch.save` of a dict holding an object whose `__reduce__` would
create a marker file when unpickled; every test asserts the marker never appears.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO
from gptlab.errors import CheckpointError, ConfigError
from gptlab.runs import checkpoint_hparams, pretrained_backbone
from gptlab.tasks import CausalLM, TaskModule
from test_bad_inputs import one_line_error
from tiny_runs import TASKS, run_cli


class _Marker:
    """Unpickling this creates `path` (what an attacker's payload would do with os.system)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mknod, (str(self.path),))


def crafted_checkpoint(path: Path, like: Path | None = None) -> tuple[Path, Path]:
    """A checkpoint that runs code when fully unpickled: `like`'s contents (or a minimal dict) + a payload."""
    marker = path.parent / f"{path.stem}.PWNED"
    contents = torch.load(like, weights_only=True) if like is not None else {"state_dict": {}}
    contents["hyper_parameters"] = {**contents.get("hyper_parameters", {}), "payload": _Marker(marker)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(contents, path)
    return path, marker


def _assert_refused(code: int, err: str, path: Path, marker: Path) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab: error:"), err
    assert str(path) in lines[0] and "not a weights-only checkpoint" in lines[0], err
    assert "checkpoints you trust" in lines[0] and "re-save" in lines[0], err
    assert "posix.mknod" in lines[0]  # which object it refused
    assert not marker.exists(), "the crafted pickle ran"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_every_task_checkpoint_loads_weights_only(tiny_runs, task):
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(
            tiny_runs.runs[task] / "checkpoints" / name, map_location="cpu", weights_only=True
        )
        assert checkpoint["state_dict"] and checkpoint["hyper_parameters"]["backbone"]["class_path"]


def test_consolidated_sharded_checkpoint_loads_weights_only(tmp_path):
    # A sharded (DCP) folder as the FSDP strategy writes it, consolidated into one file.
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    from gptlab.loading import save_consolidated

    folder = tmp_path / "last.ckpt"
    dcp.save({"model": {"backbone.wte.weight": torch.randn(4, 2)}}, checkpoint_id=folder)
    torch.save(
        {"hyper_parameters": {"lr": 0.1, "names": ["a"]}, "global_step": 3}, folder / _METADATA_FILENAME
    )
    out = save_consolidated(folder, tmp_path / "single.ckpt")
    loaded = torch.load(out, weights_only=True)
    assert loaded["global_step"] == 3 and loaded["hyper_parameters"]["names"] == ["a"]


def _sharded(folder: Path, extra: dict | None = None, meta: dict | None = None) -> Path:
    """A sharded (DCP) checkpoint folder as FSDP writes it: tensors, non-tensor entries, meta.pt."""
    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    state = {
        "state_dict": {"backbone.wte.weight": torch.randn(4, 2)},
        "optimizer_0": {"lr": 0.1, **(extra or {})},
    }
    dcp.save(state, checkpoint_id=folder)
    torch.save(meta or {"hyper_parameters": {"lr": 0.1}, "global_step": 3}, folder / _METADATA_FILENAME)
    return folder


def test_crafted_sharded_checkpoint_is_refused_before_dcp_reads_it(tmp_path):
    # torch.distributed.checkpoint unpickles `.metadata` with pickle.load and non-tensor entries
    # with torch.load(weights_only=False): each of the three places can carry a payload.
    import pickle

    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    from gptlab.loading import consolidate_checkpoint, save_consolidated, verify_checkpoint

    genuine = _sharded(tmp_path / "genuine")
    verify_checkpoint(genuine)
    assert consolidate_checkpoint(genuine)["global_step"] == 3
    markers = {name: tmp_path / f"{name}.PWNED" for name in ("metadata", "entry", "meta")}
    folders = {
        "metadata": _sharded(tmp_path / "metadata"),
        "entry": _sharded(tmp_path / "entry", extra={"payload": _Marker(markers["entry"])}),
        "meta": _sharded(tmp_path / "meta", meta={"global_step": 3, "payload": _Marker(markers["meta"])}),
    }
    (folders["metadata"] / ".metadata").write_bytes(pickle.dumps(_Marker(markers["metadata"])))
    for name, folder in folders.items():
        for load in (
            verify_checkpoint,  # what the CLI calls on every checkpoint it is given
            consolidate_checkpoint,
            lambda path: save_consolidated(path, tmp_path / "single.ckpt"),
            CausalLM.load_from_checkpoint,
        ):
            with pytest.raises(CheckpointError, match=r"does not load safely.*refusing to read the folder"):
                load(folder)
        assert not markers[name].exists(), name
    assert not (tmp_path / "single.ckpt").exists()
    # The threat is real: DCP's own loading runs the payloads of the first two.
    for name in ("metadata", "entry"):
        try:
            _load_distributed_checkpoint(folders[name])
        except BaseException:  # noqa: BLE001 - DCP's CheckpointException is one; the payload ran before
            pass
        assert markers[name].exists(), name


@pytest.mark.slow
def test_crafted_pickle_is_refused_by_every_cli_entry_point(tiny_runs, tmp_path, capsys):
    run = tiny_runs.runs["causal_lm"]
    config = tiny_runs.configs["causal_lm"]
    before = {p: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    # A copy of the run whose last.ckpt is replaced by the crafted one: the run-directory path
    # of test / validate / predict (config.yaml and tokenizer found beside it).
    evil_run = tmp_path / "logs" / "evil" / "version_0"
    shutil.copytree(run, evil_run)
    evil, marker = crafted_checkpoint(
        evil_run / "checkpoints" / "last.ckpt", like=run / "checkpoints" / "last.ckpt"
    )
    commands = {
        "fit --ckpt_path": ["fit", "--config", str(config), "--ckpt_path", str(evil)],
        "test (run dir)": ["test", "--ckpt_path", str(evil)],
        "validate (run dir)": ["validate", "--ckpt_path", str(evil)],
        "predict (run dir)": ["predict", "--ckpt_path", str(evil)],
        "test --config": ["test", "--config", str(config), "--ckpt_path", str(evil)],
        "export": ["export", "--ckpt_path", str(evil), "--out", str(tmp_path / "export")],
        "init_from": ["fit", "--config", str(config), "--model.init_args.init_from", str(evil)],
    }
    for name, args in commands.items():
        code, err = run_cli(capsys, *args)
        assert code == 2, (name, err)
        _assert_refused(code, err, evil, marker)
    assert not (tmp_path / "export").exists()
    # Nothing of the original run changed, and the failed commands started no new run.
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_crafted_pickle_is_refused_by_the_python_entry_points(tmp_path):
    evil, marker = crafted_checkpoint(tmp_path / "checkpoints" / "evil.ckpt")
    for load in (
        lambda: CausalLM.load_from_checkpoint(evil),
        lambda: TaskModule.load_from_checkpoint(evil, weights_only=None),
        lambda: checkpoint_hparams(evil),
        lambda: pretrained_backbone(evil),
    ):
        with pytest.raises(CheckpointError, match=r"not a weights-only checkpoint.*checkpoints you trust"):
            load()
        assert not marker.exists()


def _custom_code_model(directory: Path) -> Path:
    """A tiny GPT-2 directory whose config.json names code to run (auto_map), like custom-code hub repos."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gptlab_custom"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (directory / "config.json").write_text(json.dumps(config))
    marker = directory / "IMPORTED"
    (directory / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return marker


def test_remote_code_is_refused_unless_the_config_asks(tiny_runs, tmp_path, capsys):
    from gptlab.models import HFBackbone

    model_dir = tmp_path / "custom"
    marker = _custom_code_model(model_dir)
    with pytest.raises(ConfigError, match=r"ships its own model code.*trust_remote_code: true"):
        HFBackbone(name_or_path=str(model_dir))
    # init_from a directory with custom code, through the CLI: one line, nothing imported.
    code, err = run_cli(
        capsys, "fit", "--config", str(tiny_runs.configs["classification"]),
        "--model.init_args.init_from", str(model_dir),
    )  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "auto_map" in err and "trust_remote_code: true" in err, err
    # A tokenizer with custom code is refused too.
    from gptlab.data.tokenizers import load_tokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_runs.runs["classification"] / "tokenizer", tok_dir)
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    tok_config["auto_map"] = {"AutoTokenizer": ["custom.CustomTokenizer", None]}
    tok_config["tokenizer_class"] = "CustomTokenizer"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (tok_dir / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ConfigError, match="own Python code"):
        load_tokenizer(str(tok_dir))
    assert not marker.exists(), "custom code ran"


def _remote_code_record(tiny_runs, tmp_path: Path, model_dir: Path) -> Path:
    """A copy of the classifier run whose checkpoint and config.yaml record an HFBackbone on
    `model_dir` with trust_remote_code: true (what a run that trusted that code would record)."""
    run = tmp_path / "logs" / "remote" / "version_0"
    shutil.copytree(tiny_runs.runs["classification"], run)
    backbone = {
        "class_path": "gptlab.models.HFBackbone",
        "init_args": {"name_or_path": str(model_dir), "trust_remote_code": True},
    }
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["hyper_parameters"]["backbone"] = backbone
    torch.save(checkpoint, last)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["init_args"]["backbone"] = backbone
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return last


def test_a_recorded_trust_remote_code_never_switches_it_on(tiny_runs, tmp_path, capsys):
    from gptlab.cli import user_asks_for_remote_code
    from gptlab.tasks import SequenceClassification

    model_dir = tmp_path / "custom"
    marker = _custom_code_model(model_dir)
    last = _remote_code_record(tiny_runs, tmp_path, model_dir)
    # A fine-tune config that leaves the backbone out (as every shipped one does) + init_from.
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config["model"]["init_args"]["backbone"] = None
    config["logs"] = str(tmp_path / "new_logs")
    own = tmp_path / "finetune.yaml"
    own.write_text(yaml.safe_dump(config))
    commands = {
        "init_from": (["fit", "--config", str(own), "--model.init_args.init_from", str(last)], str(last)),
        "test (run dir)": (["test", "--ckpt_path", str(last)], str(last.parent.parent / "config.yaml")),
        "validate --config": (
            ["validate", "--config", str(own), "--ckpt_path", str(last)],
            f"the checkpoint {last}",
        ),
    }
    for name, (args, source) in commands.items():
        code, err = run_cli(capsys, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert f"trust_remote_code: true comes from {source}" in err, (name, err)
        assert "not consent" in err and "trust_remote_code" in err.split("add ")[-1], (name, err)
        assert not marker.exists(), f"{name}: the model's own code ran"
    assert not (tmp_path / "new_logs").exists()
    # The Python entry point (and export, which uses it) refuses the record as well.
    with pytest.raises(CheckpointError, match="trust_remote_code: true.*pass the backbone yourself"):
        SequenceClassification.load_from_checkpoint(last)
    code, err = run_cli(capsys, "export", "--ckpt_path", str(last), "--out", str(tmp_path / "out"))
    assert code == 2 and "trust_remote_code" in err and not (tmp_path / "out").exists(), err
    assert not marker.exists()
    # Only the user's own config or command line is consent; a run folder's config.yaml is not.
    run_config = str(last.parent.parent / "config.yaml")
    assert not user_asks_for_remote_code(["test", "--config", run_config, "--ckpt_path", str(last)])
    flag = "--model.init_args.backbone.init_args.trust_remote_code"
    assert user_asks_for_remote_code(["test", "--config", run_config, flag, "true"])
    assert user_asks_for_remote_code(["test", f"{flag}=true"])
    assert not user_asks_for_remote_code(["test", flag, "false"])
    trusting = tmp_path / "trusting.yaml"
    trusting.write_text(
        yaml.safe_dump({"model": {"init_args": {"backbone": {"init_args": {"trust_remote_code": True}}}}})
    )
    assert user_asks_for_remote_code(["fit", "-c", str(trusting)])
    assert user_asks_for_remote_code(
        ["fit", "--model.init_args.backbone", '{"init_args": {"trust_remote_code": true}}']
    )


def test_every_from_pretrained_call_passes_trust_remote_code():
    # transformers' default (None) prompts on a terminal and runs the code on "y": every call in
    # gptlab passes the flag explicitly (False, or HFBackbone's own option, which defaults to False).
    calls = []
    for path in (REPO / "src" / "gptlab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("from_pretrained", "from_config")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.startswith("Auto")
            ):
                calls.append((f"{path.name}:{node.lineno}", {k.arg for k in node.keywords}))
    assert len(calls) >= 5
    assert [where for where, keywords in calls if "trust_remote_code" not in keywords] == []


@pytest.mark.slow
def test_export_writes_safetensors_only(tiny_runs, tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "export"
    last = tiny_runs.runs["causal_lm"] / "checkpoints" / "last.ckpt"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(last), "--out", str(out))
    assert code == 0, err
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt")) and not list(out.glob("*.pkl"))
    weights = load_file(out / "model.safetensors")
    assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())


def test_torch_requirement_excludes_known_weights_only_bypasses():
    # CVE-2025-32434 (torch < 2.6) and CVE-2026-24747 (torch < 2.10) bypass weights_only=True.
    # (tomllib is 3.11+; the project supports 3.10) the dependency string as written in pyproject.toml
    torch_req = Requirement(
        re.search(r'^\s*"(torch[<>=!~ ].*?)",', (REPO / "pyproject.toml").read_text(), re.M)[1]
    )
    assert not torch_req.specifier.contains("2.9.1")
    # the floor is the oldest version tested (2.13: at or above 2.10, the first without them)
    assert all(
        not torch_req.specifier.contains(v) or Version(v) >= Version("2.10") for v in ("2.9.1", "2.10.0")
    )
    assert torch_req.specifier.contains("3.0.0")  # a range, no upper cap
    assert Version(torch.__version__.split("+")[0]) >= Version("2.10")


def test_the_trainer_loads_checkpoints_weights_only(tiny_runs, tmp_path):
    # Lightning passes weights_only=None to torch.load, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1
    # turns into a full unpickle; the CLI asks for weights_only=True unless the user says otherwise.
    import sys
    from unittest import mock

    from lightning.pytorch.strategies import Strategy

    from gptlab.cli import GPTLabCLI

    run = tmp_path / "logs" / "copy" / "version_0"
    shutil.copytree(tiny_runs.runs["causal_lm"], run)
    last = str(run / "checkpoints" / "last.ckpt")
    for extra, expected in (([], True), (["--weights_only", "false"], False)):
        load = mock.patch.object(
            Strategy, "load_checkpoint", autospec=True, side_effect=Strategy.load_checkpoint
        )
        with mock.patch.object(sys, "argv", sys.argv[:1]), load as spy:
            GPTLabCLI(args=["validate", "--ckpt_path", last, *extra])
        assert spy.call_args.kwargs["weights_only"] is expected


def _hf_dir(tiny_runs, directory: Path) -> Path:
    """A tiny Llama directory (save_pretrained) with the classifier run's tokenizer beside it."""
    from gptlab.models import HFBackbone

    llama = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    HFBackbone(model_type="llama", config_overrides=dict(llama, num_attention_heads=2)).model.save_pretrained(
        directory
    )
    for file in (tiny_runs.runs["classification"] / "tokenizer").iterdir():
        shutil.copy(file, directory / file.name)
    return directory


def _fit_on(tiny_runs, tmp_path: Path, directory: Path, how: str) -> Path:
    """The classifier config, its base taken from `directory` by `how` (name_or_path / init_from)."""
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config["logs"] = str(tmp_path / "logs")
    model = config["model"]["init_args"]
    if how == "name_or_path":
        model["backbone"] = {
            "class_path": "gptlab.models.HFBackbone",
            "init_args": {"name_or_path": str(directory)},
        }
        config["data"]["init_args"]["tokenizer"] = str(directory)
    else:
        model.pop("backbone")
        model["init_from"] = str(directory)
        config["data"]["init_args"].pop("tokenizer")
    path = tmp_path / f"{how}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("how", ["name_or_path", "init_from"])
def test_a_crafted_pickle_or_a_wrong_config_json_under_a_model_directory_is_one_line(
    how, tiny_runs, tmp_path, capsys
):
    """A pytorch_model.bin pickle with a payload (was a 64-148-line trace; nothing ran), and a
    config.json whose sizes are not its weights' (was transformers' RuntimeError and report)."""
    crafted = _hf_dir(tiny_runs, tmp_path / "crafted")
    (crafted / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save(
        {"model.embed_tokens.weight": torch.zeros(1), "payload": _Marker(marker)},
        crafted / "pytorch_model.bin",
    )
    code, err = run_cli(capsys, "fit", "--config", str(_fit_on(tiny_runs, tmp_path, crafted, how)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{how}={crafted}: pytorch_model.bin is a pickle that the weights-only loader refuses" in err, err
    assert "posix.mknod" in err and "safetensors" in err, err
    assert not marker.exists(), "the crafted pickle ran"
    wrong = _hf_dir(tiny_runs, tmp_path / "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["intermediate_size"] = 48
    (wrong / "config.json").write_text(json.dumps(config))
    code, err = run_cli(capsys, "fit", "--config", str(_fit_on(tiny_runs, tmp_path, wrong, how)))
    line = one_line_error(code, err, f"{how}={wrong}: config.json does not describe its weights (3 tensors")
    assert "(64, 32) in the weights, (48, 32) by config.json" in line or "(32, 48) by config.json" in line
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").rglob("*.ckpt"))
