"""Periodic `last.ckpt` by default (gptlab.resilience.Preemption): a run that never validates still saves.

The shipped SmolLM2 fine-tunes validate only at their end; without a time-based save a kill at the
last step but one would lose the whole run. The clock is faked (7 minutes per reading), the run is
real: the tiny pretraining experiment of tests/test_resume.py, with its helpers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptlab import resilience
from test_resume import (
    assert_same_batches,
    batches_before,
    checkpoint,
    experiment,
    options,
    run,
)


def test_a_run_without_validation_saves_every_30_minutes_and_resumes_exactly(tmp_path: Path, monkeypatch):
    (tmp_path / "pretrain").mkdir()
    config = experiment(tmp_path / "pretrain", "pretrain")
    # No validation at all, no step-based save: only preemption.every_n_minutes (default 30) saves.
    args = [*options(0, 1), "--trainer.limit_val_batches", "0", "--preemption.every_n_steps", "0"]
    args += ["--trainer.max_steps", "16"]  # into the second epoch
    ref = run(config, "reference", *args)
    assert ref[-1]["step"] == 16 and ref[-1]["epoch"] == 1
    clock = [0.0]

    def minutes_pass() -> float:
        clock[0] += 7 * 60
        return clock[0]

    # Read when built, at the start, after every optimizer step and at every save: steps 1-4 make
    # 28 minutes, step 5 makes 35 and saves. A NaN loss at step 8 (still in the first epoch, whose end would
    # save too) stops the run without saving: last.ckpt is the time-based save.
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(resilience.Preemption, "_clock", staticmethod(minutes_pass))
        run(
            config,
            "killed",
            *args,
            "--trainer.callbacks+=dist_run.PoisonLoss",
            "--trainer.callbacks.init_args.step",
            "8",
        )
    assert stopped.value.code == 2
    assert ref[batches_before(ref, 8)]["epoch"] == 0
    saved = checkpoint(config, "killed")["global_step"]
    assert saved == 5
    again = run(config, "killed", *args, resume=True)
    assert_same_batches(again, ref, batches_before(ref, saved), f"(from the time-based save at step {saved})")
    assert len(again) == len(ref) - batches_before(ref, saved)
    got, expected = checkpoint(config, "killed"), checkpoint(config, "reference")
    assert got["global_step"] == expected["global_step"] == 16
    assert got["loops"] == expected["loops"]
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def test_every_n_minutes_must_not_be_negative():
    with pytest.raises(resilience.ConfigError, match=r"preemption.every_n_minutes=-1 must be >= 0"):
        resilience.Preemption(every_n_minutes=-1)
    assert resilience.Preemption().every_n_minutes == 30  # on by default
