"""Runs that collide, runs that stop before training, and what they leave behind.

- two runs started at the same moment never share a `version_N` (claimed with an exclusive mkdir);
- a command stopped by bad input, or by any unexpected exception before its first batch, leaves no
  run folder (nor the empty experiment / logs folders it created).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import REPO
from gptlab.runs import claim_version
from tiny_runs import run_cli


def _claim_many(root: str, count: int) -> list[int]:
    return [claim_version(Path(root)) for _ in range(count)]


def test_claim_version_never_hands_out_a_version_twice(tmp_path):
    root = tmp_path / "logs" / "exp"
    (root / "version_3").mkdir(parents=True)  # numbering continues after what exists
    claimed: list[int] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()  # all threads list the directory at the same moment
        claimed.extend(_claim_many(str(root), 10))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with ProcessPoolExecutor(4) as pool:
        for result in pool.map(_claim_many, [str(root)] * 4, [10] * 4):
            claimed.extend(result)
    assert len(claimed) == 120 and len(set(claimed)) == 120, sorted(claimed)
    assert min(claimed) == 4
    assert sorted(int(p.name.split("_")[1]) for p in root.iterdir()) == [3, *sorted(claimed)]


def test_a_runs_config_yaml_records_no_version(tiny_runs):
    # The run's directory is claimed by number, but config.yaml records no version: fitting from
    # it again starts a new run rather than writing into this one.
    for run in tiny_runs.runs.values():
        logger = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["logger"]
        assert logger["init_args"]["version"] is None, run


@pytest.mark.slow
def test_runs_started_at_the_same_moment_get_their_own_run_directories(tiny_runs, tmp_path):
    # Four real `main.py fit` processes on one experiment, started together; each records its own
    # seed, so a shared directory would show as one config.yaml for two runs.
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    config.update(logs=str(tmp_path / "logs"), experiment="race")
    config["trainer"].update(max_steps=1, val_check_interval=1)
    config["data"]["init_args"]["cache_dir"] = str(tiny_runs.tmp / "cache")  # tokenized already
    path = tmp_path / "race.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }
    seeds = [11, 12, 13, 14]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(REPO / "main.py"),
                "fit",
                "--config",
                str(path),
                "--seed_everything",
                str(s),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for s in seeds
    ]
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [e[-2000:] for e in errors]
    runs = sorted((tmp_path / "logs" / "race").iterdir())
    assert [r.name for r in runs] == [f"version_{i}" for i in range(4)]
    recorded = sorted(yaml.safe_load((r / "config.yaml").read_text())["seed_everything"] for r in runs)
    assert recorded == seeds
    for run in runs:
        last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert last["global_step"] == 1


def test_bad_input_leaves_no_experiment_or_logs_folder(tiny_runs, tmp_path, capsys):
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    config["logs"] = str(tmp_path / "fresh" / "logs")
    config["data"]["init_args"]["train_files"] = str(tmp_path / "nowhere.txt")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(path))
    assert code == 2 and "nowhere.txt" in err, err
    assert not (tmp_path / "fresh").exists(), list((tmp_path / "fresh").rglob("*"))


def test_an_unexpected_exception_before_training_leaves_no_run_folder(tiny_runs, tmp_path):
    from gptlab.cli import main
    from gptlab.data import TextDataModule

    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    logs = tmp_path / "logs"
    (logs / "causal_lm").mkdir(parents=True)  # an experiment folder that exists stays
    config["logs"] = str(logs)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))

    def broken(self, stage):  # a bug anywhere in setup
        raise RuntimeError("bug")

    with mock.patch.object(TextDataModule, "setup", broken), mock.patch.object(sys, "argv", sys.argv[:1]):
        with pytest.raises(RuntimeError, match="bug"):
            main(["fit", "--config", str(path)])
    assert list(logs.rglob("*")) == [logs / "causal_lm"]


def test_export_overwrite_replaces_only_an_earlier_export(tiny_runs, tmp_path, capsys):
    logs = tmp_path / "logs"
    run = logs / "exp" / "version_0"
    shutil.copytree(tiny_runs.runs["causal_lm"], run)
    last = run / "checkpoints" / "last.ckpt"
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "todo.txt").write_text("mine")
    (stray / "drafts").mkdir()
    cases = {
        "the run itself": (run, "holds the checkpoint being exported"),
        "the logs root": (logs, "holds the checkpoint being exported"),
        "the checkpoints folder": (run / "checkpoints", "holds the checkpoint being exported"),
        "another run": (tiny_runs.runs["classification"].parent, "contains a run folder or checkpoints"),
        "a folder of other files": (stray, "does not look like a model directory written by export"),
        "a file": (stray / "todo.txt", "is a file, not an export directory"),
    }
    for name, (out, needle) in cases.items():
        before = (
            {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else out.read_bytes()
        )
        code, err = run_cli(
            capsys, "export", "--ckpt_path", str(last), "--out", str(out), "--overwrite", "true"
        )
        assert code == 2 and len(err.strip().splitlines()) == 1, (name, err)
        assert needle in err and f"--out {out}" in err, (name, err)
        after = (
            {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} if out.is_dir() else out.read_bytes()
        )
        assert after == before, f"{name}: export --overwrite changed it"
    # An earlier export is replaced, and its files are readable by others as normal files are.
    out = tmp_path / "export"
    assert run_cli(capsys, "export", "--ckpt_path", str(last), "--out", str(out))[0] == 0
    info = out / "gptlab_export.json"
    info.write_text(info.read_text().replace('"files": [', '"files": [\n    "stale.txt",'))
    (out / "stale.txt").write_text("old")  # a file of the earlier export that this one does not write
    code, err = run_cli(capsys, "export", "--ckpt_path", str(last), "--out", str(out), "--overwrite", "true")
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (path, oct(path.stat().st_mode))


def test_a_resume_keeps_the_runs_tokenizer_when_the_training_files_changed(tiny_runs, tmp_path, capsys):
    from transformers import AutoTokenizer

    from gptlab.cli import GPTLabCLI

    run = tmp_path / "logs" / "causal_lm" / "version_0"
    shutil.copytree(tiny_runs.runs["causal_lm"], run)
    saved = AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab()
    # The corpus was edited since: a tokenizer recipe trained on it now gives other ids.
    corpus = tmp_path / "edited.txt"
    corpus.write_text("zebra quartz jumps vexingly over wizard boxes, 0123456789 !?\n" * 200)
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    config.update(logs=str(tmp_path / "logs"))
    config["data"]["init_args"].update(train_files=str(corpus), cache_dir=str(tmp_path / "cache"))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = GPTLabCLI(
            args=["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "3"]
        )
    assert cli.trainer.global_step == 3
    assert cli.datamodule.tokenizer.get_vocab() == saved
    assert AutoTokenizer.from_pretrained(run / "tokenizer").get_vocab() == saved
    # Asking for another tokenizer on the command line while resuming is refused, naming both.
    other = tiny_runs.runs["classification"] / "tokenizer"
    code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last",
                        "--data.init_args.tokenizer", str(other))  # fmt: skip
    assert code == 2 and "--data.init_args.tokenizer: resuming" in err and str(run / "tokenizer") in err, err


def test_lightning_noise_is_not_shown(tiny_runs, tmp_path, caplog, recwarn):
    # Its advertising tips at start, "`weights_only` was not set, defaulting to False" after every
    # fit (it describes what goes into a saved file, and reads as unsafe loading), and "dataloader
    # is not resumable" on a mid-epoch resume, which gptlab's loaders do exactly.
    import logging

    from gptlab.cli import GPTLabCLI

    run = tmp_path / "logs" / "causal_lm" / "version_0"
    shutil.copytree(tiny_runs.runs["causal_lm"], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["logs"] = str(tmp_path / "logs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.INFO), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = GPTLabCLI(
            args=["fit", "--config", str(path), "--ckpt_path", "last", "--trainer.max_steps", "3",
                  "--preemption.every_n_steps", "1"]
        )  # fmt: skip
    assert cli.trainer.global_step == 3 and 0 < 3 % cli.trainer.num_training_batches  # resumed mid-epoch
    messages = [record.getMessage() for record in caplog.records]
    assert any("Seed set to" in m for m in messages)  # Lightning's other info lines still show
    assert not [m for m in messages if "Tip:" in m or "`weights_only` was not set" in m]
    assert not [w for w in recwarn if "not resumable" in str(w.message)]


def test_ckpt_path_with_other_model_settings_is_refused_naming_both(tiny_runs, tmp_path, capsys):
    run = tmp_path / "logs" / "classification" / "version_0"
    shutil.copytree(tiny_runs.runs["classification"], run)
    last = run / "checkpoints" / "last.ckpt"
    config = str(tiny_runs.configs["classification"])
    code, err = run_cli(capsys, "test", "--config", config, "--ckpt_path", str(last),
                        "--model.init_args.freeze_backbone", "true")  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "model.init_args.freeze_backbone: True here, False in the checkpoint" in err, err
    assert f"drop --config to use the run's own {run / 'config.yaml'}" in err, err
    # The same config without the override agrees with the checkpoint: it runs, and the report
    # names the config that was used (not the run's config.yaml).
    code, err = run_cli(capsys, "test", "--config", config, "--ckpt_path", str(last))
    assert code == 0, err
    report = json.loads((run / "reports" / "test_report.json").read_text())
    assert report["meta"]["config"] == config


def test_init_from_with_ckpt_path_says_the_checkpoint_wins(tiny_runs, tmp_path, capsys, recwarn):
    run = tmp_path / "logs" / "classification" / "version_0"
    shutil.copytree(tiny_runs.runs["classification"], run)
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config["logs"] = str(tmp_path / "logs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    other = tiny_runs.runs["causal_lm"] / "checkpoints" / "last.ckpt"
    code, err = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last",
                        "--trainer.max_steps", "3", "--model.init_args.init_from", str(other))  # fmt: skip
    assert code == 0, err
    messages = [str(w.message) for w in recwarn]
    assert any(f"init_from={other} is not used: --ckpt_path" in m and "resumes" in m for m in messages), (
        messages
    )
