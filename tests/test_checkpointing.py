"""Checkpoints survive kills: atomic saves, stale-file cleanup, resume from the newest complete one.

Real files and real processes throughout: the kill test SIGKILLs a process that is saving, the
resume tests run gptlab's CLI on checkpoints written by a real `fit` and cut short with truncate.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from conftest import REPO, TINY_CORPUS, tiny_config
from gptlab.checkpointing import (
    AtomicCheckpointIO,
    StaleCheckpointCleanup,
    atomic_write,
    checkpoint_problem,
    remove_stale,
    resume_checkpoint,
)
from gptlab.cli import GPTLabCLI, main
from gptlab.errors import CheckpointError

NUMEL = 1 << 20  # 4 MB of float32 per save: ~20 ms to write, so many kills land inside a save


def payload(version: int) -> dict:
    return {"version": version, "weights": torch.full((NUMEL,), float(version))}


def save_forever(path: Path, first_version: int, report: Path) -> None:
    """Child process: save versions first_version, +1, ... through the CheckpointIO until killed."""
    torch.set_num_threads(1)  # as DataLoader workers do after a fork: no inherited OpenMP pool
    io = AtomicCheckpointIO()
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    version = first_version
    while True:
        io.save_checkpoint(payload(version), path)
        os.write(fd, f"{version}\n".encode())  # only after save_checkpoint returned
        version += 1


def test_random_kills_during_saves_leave_a_complete_checkpoint_and_no_temp_files(tmp_path: Path):
    """20 SIGKILLs at random moments of back-to-back saves to one path. After every kill:
    - the path loads with torch.load(weights_only=True) and is exactly one saved version: the
      last one the child reported finished, or the one whose rename had just happened;
    - the only other entries are our hidden temp files (`.last.ckpt.tmp-<pid>-<hex>`), and
      `remove_stale` removes exactly those: afterwards the folder holds last.ckpt and the
      unrelated files we planted, untouched.
    Over the 20 kills, temp files must have been left at least 3 times (kills really landed
    mid-write), and versions must have advanced (saves really completed between kills).
    """
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    ckpt = folder / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(payload(0), ckpt)
    unrelated = {"notes.txt": "keep", ".hidden": "keep", "other.ckpt.tmp": "keep", ".x.tmp-1-nothex!": "keep"}
    for name, text in unrelated.items():
        (folder / name).write_text(text)
    report = tmp_path / "saved.txt"
    report.touch()
    fork = multiprocessing.get_context("fork")
    rng = random.Random(6)
    done, kills_mid_write = 0, 0
    for _ in range(20):
        child = fork.Process(target=save_forever, args=(ckpt, done + 1, report), daemon=True)
        child.start()
        time.sleep(rng.uniform(0.02, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        finished = max([int(v) for v in report.read_text().split()], default=0)
        last_reported = max(finished, done)
        loaded = torch.load(ckpt, weights_only=True)
        assert loaded["version"] in (last_reported, last_reported + 1)
        assert torch.equal(loaded["weights"], torch.full((NUMEL,), float(loaded["version"])))
        leftovers = sorted(p for p in folder.iterdir() if p.name != "last.ckpt" and p.name not in unrelated)
        assert all(p.name.startswith(".last.ckpt.tmp-") for p in leftovers), leftovers
        kills_mid_write += bool(leftovers)
        assert remove_stale(folder) == leftovers
        assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", *unrelated])
        assert all((folder / n).read_text() == t for n, t in unrelated.items())
        done = loaded["version"]
    # A precondition, not the property: enough kills must have hit a save for the checks above to
    # mean something (serialising in memory first narrows the window in which a temp file exists).
    assert kills_mid_write >= 3, f"only {kills_mid_write} of 20 kills landed during a save"
    assert done >= 10, f"only {done} saves completed over 20 runs"


def test_interrupted_save_stages_in_the_folder_and_removes_its_temp_file(tmp_path: Path):
    ckpt = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(payload(1), ckpt)
    before = ckpt.read_bytes()
    staged = []

    def interrupted(file) -> None:
        file.write(b"partial")
        # Staged beside the target (never in $TMPDIR), under our hidden name.
        staged.extend(p.name for p in tmp_path.iterdir() if p.name.startswith(".last.ckpt.tmp-"))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(ckpt, interrupted)
    assert len(staged) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"] and ckpt.read_bytes() == before
    # remove_checkpoint still removes (Lightning's ModelCheckpoint calls it for replaced files).
    AtomicCheckpointIO().remove_checkpoint(ckpt)
    assert not ckpt.exists()


class UserIO(TorchCheckpointIO):
    """A CheckpointIO of the user's own, given in trainer.plugins."""


def test_cli_installs_the_atomic_writer_and_keeps_a_users_own(tmp_path: Path, tiny_corpus: Path):
    config = tiny_config(tmp_path, tiny_corpus)

    def strategy_io(*args: str):
        cli = GPTLabCLI(args=["--config", str(config), *args], run=False)
        assert any(isinstance(cb, StaleCheckpointCleanup) for cb in cli.trainer.callbacks)
        return cli.trainer.strategy.checkpoint_io

    assert type(strategy_io()) is AtomicCheckpointIO
    assert type(strategy_io("--trainer.strategy", "ddp", "--trainer.devices", "2")) is AtomicCheckpointIO
    # Async saving wraps ours; a user's own CheckpointIO from YAML is kept as it is.
    wrapped = strategy_io("--trainer.plugins", "lightning.pytorch.plugins.io.AsyncCheckpointIO")
    assert isinstance(wrapped, AsyncCheckpointIO) and type(wrapped.checkpoint_io) is AtomicCheckpointIO
    assert type(strategy_io("--trainer.plugins", "test_checkpointing.UserIO")) is UserIO


# --------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """(config, run) of a real 6-step fit that kept step3.ckpt, step6.ckpt and last.ckpt."""
    tmp = tmp_path_factory.mktemp("ckpt")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    config = tiny_config(tmp, corpus)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--checkpoint.save_top_k",
            "-1",
            "--checkpoint.filename",
            "step{step}",
        ]
    )
    run = tmp / "logs" / "tiny" / "version_0"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt",
        "step3.ckpt",
        "step6.ckpt",
    ]
    return config, run


def copy_run(run: Path, logs: Path, version: int) -> Path:
    target = logs / "exp" / f"version_{version}"
    shutil.copytree(run, target)
    return target / "checkpoints"


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_resume_skips_a_truncated_last_and_resumes_the_newest_complete_of_this_run(fitted, tmp_path: Path):
    config, run = fitted
    logs = tmp_path / "logs"
    old = copy_run(run, logs, 0)  # an older run whose files are all complete
    # The run to resume is written in place (ModelCheckpoint keeps its state only in its own dirpath).
    keep = ["--checkpoint.save_top_k", "-1", "--checkpoint.filename", "step{step}"]
    main(["fit", "--config", str(config), "--logs", str(logs), "--experiment", "exp", *keep])
    new = logs / "exp" / "version_1" / "checkpoints"
    truncate(new / "last.ckpt")
    old_bytes = {p.name: p.read_bytes() for p in old.iterdir()}
    # What a kill during a save leaves, and files of someone else that must stay.
    (new / ".last.ckpt.tmp-4242-0a1b2c3d").write_bytes(b"partial")
    (new / "notes.txt").write_text("mine")
    (new / ".step9.ckpt.tmp").write_text("not ours: no pid-hex suffix")

    with pytest.warns(UserWarning) as warned:
        main(
            ["fit", "--config", str(config), "--logs", str(logs), "--experiment", "exp", *keep]
            + ["--ckpt_path", "last", "--trainer.max_steps", "8", "--trainer.val_check_interval", "2"]
        )
    messages = [str(w.message) for w in warned]
    skipped = [m for m in messages if m.startswith("gptlab: skipped")]
    assert len(skipped) == 1 and str(new / "last.ckpt") in skipped[0] and "truncated" in skipped[0]
    assert "resuming from step6.ckpt (global step 6)" in skipped[0] and "version_1" in skipped[0]
    assert any(
        "removed 1 unfinished checkpoint" in m and ".last.ckpt.tmp-4242-0a1b2c3d" in m for m in messages
    )
    # Resumed in place: version_1 trained on from step 6 to 8; no new run, the old run untouched.
    assert sorted(p.name for p in (logs / "exp").iterdir()) == ["version_0", "version_1"]
    assert torch.load(new / "last.ckpt", weights_only=True)["global_step"] == 8
    assert {p.name: p.read_bytes() for p in old.iterdir()} == old_bytes
    assert sorted(p.name for p in new.iterdir()) == sorted(
        [".step9.ckpt.tmp", "last.ckpt", "notes.txt", "step3.ckpt", "step6.ckpt", "step8.ckpt"]
    )


def test_resume_never_takes_another_runs_file_and_says_what_to_do(fitted, tmp_path: Path, capsys):
    config, run = fitted
    logs = tmp_path / "logs"
    copy_run(run, logs, 0)
    new = copy_run(run, logs, 1)
    # The newest run: an empty last.ckpt, and a complete step3.ckpt -> that one, not version_0's.
    (new / "last.ckpt").write_bytes(b"")
    truncate(new / "step6.ckpt", keep=0.9)
    with pytest.warns(UserWarning, match=r"last.ckpt \(empty \(0 bytes\)\); resuming from step3.ckpt"):
        assert resume_checkpoint(logs, "exp") == new / "step3.ckpt"
    # Nothing complete in the newest run: an error naming its folder, never version_0's files.
    truncate(new / "step3.ckpt", keep=0.1)
    with pytest.raises(CheckpointError, match="version_1/checkpoints holds no complete checkpoint"):
        resume_checkpoint(logs, "exp")
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(config),
                "--logs",
                str(logs),
                "--experiment",
                "exp",
                "--ckpt_path",
                "last",
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and err[0].startswith("gptlab: error: --ckpt_path last:")
    assert "step6.ckpt: truncated" in err[0] and "move" in err[0]
    # A run that never saved anything is passed over (nothing of it to resume).
    (logs / "exp" / "version_2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="version_1"):
        resume_checkpoint(logs, "exp")


def test_explicit_truncated_ckpt_path_is_one_line_and_left_as_is(fitted, tmp_path: Path, capsys):
    config, run = fitted
    folder = copy_run(run, tmp_path / "logs", 0)
    truncate(folder / "last.ckpt")
    before = (folder / "last.ckpt").read_bytes()
    # fit with another config (LightningCLI would torch.load it for hyperparameters: traceback).
    # In-process `main` is what main.py runs; a subprocess would only add ~15 s of imports here.
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--ckpt_path", str(folder / "last.ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"gptlab: error: --ckpt_path {folder / 'last.ckpt'} is truncated")
    assert (folder / "last.ckpt").read_bytes() == before
    # test with the run's own config, and an empty file: the same kind of message.
    (folder / "step3.ckpt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_:
        main(["test", "--ckpt_path", str(folder / "step3.ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "step3.ckpt is empty (0 bytes)" in err[0]
    assert checkpoint_problem(folder / "step6.ckpt") is None


# ------------------------------------------------------------------------- sharded (FSDP2)
@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_checkpoints_are_step_folders_that_count_once_complete(tmp_path: Path):
    from gptlab.loading import load_checkpoint
    from test_distributed import launch

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    config = tiny_config(tmp_path, corpus)
    launch(
        config, "fsdp", "--config", str(REPO / "configs/trainer/fsdp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.val_check_interval", "2",
    )  # fmt: skip
    folder = tmp_path / "logs" / "fsdp" / "version_0" / "checkpoints"
    last = folder / "last.ckpt"
    # Saved at steps 2 and 4: last.ckpt links to the step-4 folder, whose marker says so; the
    # step-2 folder of last.ckpt was removed once step 4 was complete. No temp entries remain.
    assert last.is_symlink() and os.readlink(last).startswith("last.ckpt.step-4-")
    marker = json.loads((last / "COMPLETE").read_text())
    assert marker == {"global_step": 4, "world_size": 2}
    assert len(list(last.glob("*.distcp"))) == 2 and (last / "meta.pt").is_file()
    assert len([p for p in folder.iterdir() if p.name.startswith("last.ckpt.step-")]) == 1
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(last)["global_step"] == 4  # consolidates through the link
    # A save killed before its marker: a step folder with shards but no COMPLETE. It never counts
    # and is removed at the next fit start; the link keeps pointing to the complete one.
    cut = folder / "last.ckpt.step-6-0123abcd"
    shutil.copytree(last, cut, symlinks=True)
    (cut / "COMPLETE").unlink()
    assert checkpoint_problem(cut).endswith("(its save was cut off)")
    assert resume_checkpoint(tmp_path / "logs", "fsdp") == last
    assert remove_stale(folder) == [cut]
    # Killed between marker and link swap: the link is missing, the marked folder is found.
    target = folder / os.readlink(last)
    last.unlink()
    with pytest.warns(UserWarning, match=r"last.ckpt \(missing\); resuming from .* \(global step 4\)"):
        chosen = resume_checkpoint(tmp_path / "logs", "fsdp")
    # The marked folder itself, or best.ckpt when it links to a folder of the same step.
    assert chosen == target or json.loads((chosen / "COMPLETE").read_text())["global_step"] == 4
