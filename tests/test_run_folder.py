"""A run folder is the run's record: what resumes, exports and refusals may do to it.

- a resume continues the run's own `last.ckpt` / `best.ckpt`, however its checkpoint is spelled
  (relative, absolute, `last`) and wherever the run folder was moved or copied;
- one fit at a time trains a run folder: a second is refused, a crashed holder's lock is taken over;
- `export --overwrite` replaces only what an earlier export wrote, never a run's base model;
- a refused or failed resume leaves the run folder as it was (config.yaml included), and the
  refusal of other model settings holds for `--ckpt_path last` too, with advice that works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import REPO
from tiny_runs import run_cli


def _copy_run(tiny_runs, tmp_path: Path, task: str = "causal_lm") -> Path:
    run = tmp_path / "logs" / task / "version_0"
    shutil.copytree(tiny_runs.runs[task], run)
    return run


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def test_a_resume_continues_the_runs_own_checkpoints_however_it_is_named(
    tiny_runs, tmp_path, capsys, monkeypatch
):
    # A copied run folder (its checkpoints record the original folder), then the same run resumed
    # through an absolute path, a relative one and `--ckpt_path last`: always last.ckpt / best.ckpt.
    run = _copy_run(tiny_runs, tmp_path)
    folder = run / "checkpoints"
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["logs"] = str(tmp_path / "logs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    spellings = [str(folder / "last.ckpt"), "logs/causal_lm/version_0/checkpoints/last.ckpt", "last"]
    for steps, ckpt in enumerate(spellings, start=3):
        code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", ckpt,
                            "--trainer.max_steps", str(steps))  # fmt: skip
        assert code == 0, err
        assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"], (ckpt, err)
        assert _step(folder / "last.ckpt") == steps, ckpt
        assert _step(folder / "best.ckpt") <= steps


def test_a_second_fit_of_the_same_run_is_refused_and_a_crashed_holders_lock_is_not(
    tiny_runs, tmp_path, capsys
):
    run = _copy_run(tiny_runs, tmp_path)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["logs"] = str(tmp_path / "logs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    # Another process holds the run, as a fit training it does (gptlab.runs.hold_run).
    script = (
        "import time\nfrom pathlib import Path\nfrom gptlab.runs import hold_run\n"
        f"with hold_run(Path({str(run)!r})):\n    print('held', flush=True)\n    time.sleep(600)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last",
                            "--trainer.max_steps", "3")  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"the run {run} is being trained by process {holder.pid}" in err, err
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()  # a crash: its lock file stays behind
        holder.wait()
    assert (run / ".fit.lock").exists()
    code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last",
                        "--trainer.max_steps", "3")  # fmt: skip
    assert code == 0, err
    assert _step(run / "checkpoints" / "last.ckpt") == 3
    assert not (run / ".fit.lock").exists()


def test_export_overwrite_replaces_only_the_files_an_earlier_export_wrote(tiny_runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = _copy_run(tiny_runs, tmp_path)
    last = str(run / "checkpoints" / "last.ckpt")
    out = tmp_path / "export"
    assert run_cli(capsys, "export", "--ckpt_path", last, "--out", str(out))[0] == 0
    # The user's own files beside an earlier export stay; the export's own files are replaced.
    (out / "NOTES.md").write_text("mine")
    (out / "scripts").mkdir()
    (out / "scripts" / "serve.sh").write_text("mine too")
    (out / "model.safetensors").write_bytes(b"stale")
    code, err = run_cli(capsys, "export", "--ckpt_path", last, "--out", str(out), "--overwrite", "true")
    assert code == 0, err
    assert (out / "NOTES.md").read_text() == "mine"
    assert (out / "scripts" / "serve.sh").read_text() == "mine too"
    assert (out / "model.safetensors").read_bytes() != b"stale"
    AutoModelForCausalLM.from_pretrained(out)

    def refused(target: Path, needle: str) -> None:
        before = {p: p.read_bytes() for p in target.rglob("*") if p.is_file()}
        code, err = run_cli(capsys, "export", "--ckpt_path", last, "--out", str(target),
                            "--overwrite", "true")  # fmt: skip
        # (a clash is seen once the new files are written: transformers' progress lines come first)
        assert code == 2 and err.count("gptlab: error:") == 1 and needle in err.strip().splitlines()[-1], err
        assert {p: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before

    # A save_pretrained directory that gptlab never wrote (no list of an export's files).
    theirs = tmp_path / "theirs"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(theirs)
    refused(theirs, "no gptlab_export.json listing the files an export wrote")
    # A file of the user's where this export would write one of its own.
    (out / "NOTES.md").unlink()
    info = json.loads((out / "gptlab_export.json").read_text())
    info["files"].remove("tokenizer.json")
    (out / "gptlab_export.json").write_text(json.dumps(info))
    refused(out, "tokenizer.json is not a file of the earlier export there")
    info["files"].append("tokenizer.json")
    (out / "gptlab_export.json").write_text(json.dumps(info))
    # The base model of a run recorded under the same logs root (init_from; peft adapters' base).
    other = tmp_path / "logs" / "finetune" / "version_0"
    other.mkdir(parents=True)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["init_args"]["init_from"] = str(out)
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    refused(out, f"--out {out} is the base model of a run ({other / 'config.yaml'} starts from it)")


def test_a_refused_or_failed_resume_leaves_the_run_folder_as_it_was(tiny_runs, tmp_path, capsys):
    run = _copy_run(tiny_runs, tmp_path, "classification")
    last = run / "checkpoints" / "last.ckpt"
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config["logs"] = str(tmp_path / "logs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))

    def files() -> dict[Path, bytes]:
        return {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    before = files()
    # Other model settings than the checkpoint's: refused for `last` as for the file's path, and
    # the advice names the command that resumes with the run's own settings.
    for ckpt in ("last", str(last)):
        code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", ckpt,
                            "--model.init_args.head_bias", "false", "--trainer.max_steps", "3")  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, (ckpt, err)
        assert "model.init_args.head_bias: False here, True in the checkpoint" in err, err
        assert f"main.py fit --ckpt_path {last}" in err, err
        assert files() == before, ckpt
    # The run's own config with a model change on the command line: refused the same way (the
    # checkpoint would not load into the changed model), nothing of the run changed.
    code, err = run_cli(capsys, "fit", "--ckpt_path", str(last), "--model.init_args.head_bias", "false",
                        "--trainer.max_steps", "3")  # fmt: skip
    assert code == 2 and "model.init_args.head_bias: False here, True in the checkpoint" in err, err
    assert files() == before
    # ... and so is `last` with the run's own config named.
    code, err = run_cli(capsys, "fit", "--config", str(run / "config.yaml"), "--logs", str(tmp_path / "logs"),
                        "--ckpt_path", "last", "--model.init_args.head_bias", "false",
                        "--trainer.max_steps", "3")  # fmt: skip
    assert code == 2 and "model.init_args.head_bias: False here, True in the checkpoint" in err, err
    assert files() == before
    # A resume that fails after its config was read, before its first batch (a bug at train
    # start): config.yaml is not rewritten, and no earlier config is moved or lost.
    from gptlab.tasks import SequenceClassification

    with mock.patch.object(SequenceClassification, "on_train_start", side_effect=RuntimeError("crash")):
        with pytest.raises(RuntimeError, match="crash"):
            run_cli(capsys, "fit", "--ckpt_path", str(last), "--trainer.max_steps", "3")
    assert files() == before
    # The advice, followed: the run resumes with its own config.
    code, err = run_cli(capsys, "fit", "--ckpt_path", str(last), "--trainer.max_steps", "3")
    assert code == 0, err
    assert _step(last) == 3


def test_a_resume_with_another_learning_rate_is_refused_and_the_advice_trains_with_it(
    tiny_runs, tmp_path, capsys
):
    # Lightning restores the optimizer's state, lr included, and the scheduler's: a new lr on a
    # resume would train on the old schedule while config.yaml recorded the new one.
    run = _copy_run(tiny_runs, tmp_path, "classification")
    last = run / "checkpoints" / "last.ckpt"
    for key in ("lr", "weight_decay"):
        option = f"--model.init_args.optimizer.init_args.{key}"
        code, err = run_cli(capsys, "fit", "--ckpt_path", str(last), option, "0.1",
                            "--trainer.max_steps", "3")  # fmt: skip
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{option[2:]}: 0.1 here" in err and "in the checkpoint" in err, err
    assert _step(last) == 2
    # The advice: a new run from its weights, with the new learning rate.
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config.update(logs=str(tmp_path / "logs"), experiment="lower_lr")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    lr = "--model.init_args.optimizer.init_args.lr"
    code, err = run_cli(capsys, "fit", "--config", str(path), "--model.init_args.init_from", str(last),
                        lr, "0.1", "--trainer.max_steps", "1")  # fmt: skip
    assert code == 0, err
    new = tmp_path / "logs" / "lower_lr" / "version_0" / "checkpoints" / "last.ckpt"
    groups = torch.load(new, map_location="cpu", weights_only=True)["optimizer_states"][0]["param_groups"]
    assert {g["initial_lr"] if "initial_lr" in g else g["lr"] for g in groups} == {0.1}


def test_fit_ckpt_path_last_without_a_run_says_it_starts_from_scratch(tiny_runs, tmp_path, capsys, caplog):
    """Not an error (a preemptible job's first launch), but said: a mistyped experiment shows."""
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    config["logs"] = str(tmp_path / "logs")
    config["experiment"] = "never_run"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level("INFO"):
        code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last",
                            "--trainer.max_steps", "1")  # fmt: skip
    assert code == 0, err
    said = f"--ckpt_path last: experiment 'never_run' has no checkpoint under {tmp_path / 'logs'} yet"
    assert said in caplog.text + err
    assert "starting from scratch" in caplog.text + err
    assert (tmp_path / "logs" / "never_run" / "version_0" / "checkpoints" / "last.ckpt").exists()
