"""Exact resume after kill -9 and preemption signals, non-finite losses, determinism (issue 6).

Every run is a real `fit` in its own process (tests/dist_run.py: main.py plus StepLog, which
writes one JSON line per training batch as it happens). A run is killed with SIGKILL at a random
step in the middle of an epoch, or sent SIGTERM / SIGUSR1, and continued in a new process with
`--ckpt_path last`; every batch the continuation trains must equal the uninterrupted run's
(sample identities, loss and learning rate to 1e-6) and the final weights must be identical.
The experiment has dropout, a per-step LR schedule and shuffled data, and runs over two epochs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_CORPUS, tiny_config
from finetune_data import finetune_config, write_sentiment
from gptlab.resilience import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 50
EVERY = 4  # preemption.every_n_steps: the periodic last.ckpt a killed run resumes from
TIMEOUT = 180

COMMON = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "20",
    "--trainer.limit_val_batches", "2",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.callbacks+=dist_run.StepLog",
    "--preemption.every_n_steps", str(EVERY),
    "--throughput.peak_flops", "0",
]  # fmt: skip


def experiment(tmp: Path, task: str) -> Path:
    """A tiny pretraining or fine-tuning config with dropout, warmup + cosine LR over STEPS steps."""
    if task == "pretrain":
        corpus = tmp / "corpus"
        corpus.mkdir()
        for i, text in enumerate(TINY_CORPUS):
            (corpus / f"doc{i}.txt").write_text(text)
        path = tiny_config(tmp, corpus)
        config = yaml.safe_load(path.read_text())
        config["data"]["init_args"]["tokenizer"] = {"class_path": "gptlab.data.Char"}
    else:
        config = finetune_config(tmp, "classification", write_sentiment(tmp, rows=160))
        config["model"]["init_args"]["scheduler"] = {"class_path": "gptlab.optim.WarmupCosine"}
        config["seed_everything"] = 7
    model = config["model"]["init_args"]
    model["backbone"]["init_args"]["dropout"] = 0.1
    model["scheduler"]["init_args"] = {"warmup_steps": 5, "max_steps": STEPS}
    path = tmp / f"{task}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def records(out: Path, rank: int = 0) -> list[dict]:
    path = out / f"steps{rank}.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def fit(
    config: Path,
    name: str,
    *args: str,
    resume: bool = False,
    interrupt: tuple[int, int] | None = None,
    devices: int = 1,
) -> tuple[int, str, Path]:
    """Run `fit` in a new process (session); `interrupt=(signal, step)` sends it once rank 0 logged `step`.

    SIGKILL goes to the whole process group (every rank dies at once, as on a lost node); other
    signals go to every process of the group too, as SLURM signals every task.
    """
    out = config.parent / f"out_{name}_{len(list(config.parent.glob(f'out_{name}_*')))}"
    out.mkdir()
    command = [sys.executable, str(REPO / "tests" / "dist_run.py"), "fit", "--config", str(config)]
    command += [*COMMON, "--experiment", name, *args]
    if devices > 1:
        command += ["--config", str(REPO / "configs/trainer/ddp.yaml"), "--trainer.accelerator", "cpu"]
        command += ["--trainer.devices", str(devices)]
    if resume:
        command += ["--ckpt_path", "last"]
    env = {**os.environ, "GPTLAB_TEST_OUT": str(out), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        command, cwd=config.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    if interrupt is not None:
        signum, step = interrupt
        while proc.poll() is None and time.monotonic() < deadline:
            if any(r["step"] >= step for r in records(out)):
                os.killpg(proc.pid, signum)
                break
            time.sleep(0.01)
    try:
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{name}: no result within {TIMEOUT}s\n{output[-3000:]}")
    return proc.returncode, output, out


def checkpoint(config: Path, name: str) -> dict:
    path = config.parent / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_batches(got: list[dict], reference: list[dict], first: int, to_the_end: bool = True) -> None:
    """`got` are the reference's batches from number `first` (0-based) on (to its end), to 1e-6."""
    expected = reference[first:] if to_the_end else reference[first : first + len(got)]
    assert got and len(got) == len(expected)
    assert [r["ids"] for r in got] == [r["ids"] for r in expected], "other samples than the reference"
    assert [(r["step"], r["epoch"]) for r in got] == [(r["step"], r["epoch"]) for r in expected]
    torch.testing.assert_close([r["loss"] for r in got], [r["loss"] for r in expected], rtol=0, atol=1e-6)
    torch.testing.assert_close([r["lr"] for r in got], [r["lr"] for r in expected], rtol=0, atol=1e-9)


def assert_same_weights(config: Path, name: str, reference: str) -> None:
    got, expected = checkpoint(config, name), checkpoint(config, reference)
    assert got["global_step"] == expected["global_step"] == STEPS
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


_references: dict[tuple, list[dict]] = {}


def reference(config: Path, key: tuple, *args: str, devices: int = 1) -> list[dict]:
    """The uninterrupted run's batches (run once per configuration in this module)."""
    if key not in _references:
        code, output, out = fit(config, "ref_" + "_".join(map(str, key)), *args, devices=devices)
        assert code == 0, output[-3000:]
        _references[key] = records(out)
        assert _references[key][-1]["step"] == STEPS
    return _references[key]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    configs = {}
    for task in ("pretrain", "finetune"):
        (tmp / task).mkdir()
        configs[task] = experiment(tmp / task, task)
    return configs


def kill_resume_chain(config: Path, name: str, ref: list[dict], args: list[str], first: tuple[int, int]) -> None:
    """Interrupt a run with `first` = (signal, step), then SIGKILL its continuation, then finish it."""
    accumulate = int(args[args.index("--trainer.accumulate_grad_batches") + 1])
    signum, step = first
    code, output, out = fit(config, name, *args, interrupt=first)
    done = records(out)
    assert done and done == ref[: len(done)] or pytest.fail(output[-3000:])  # bit-identical before
    if signum == signal.SIGKILL:
        assert code == -signal.SIGKILL
        saved = periodic_checkpoint_step(config, name, done)
    else:
        # Saved at the end of the step in progress, and nothing trained after that.
        assert code == REQUEUE_EXIT_CODE, output[-3000:]
        saved = checkpoint(config, name)["global_step"]
        assert done[-1]["step"] == saved and step <= saved
    assert checkpoint(config, name)["global_step"] == saved
    # Continue, and SIGKILL that process too, at a random later step.
    kill_at = random.Random(saved).randint(saved + 1, min(saved + 2 * EVERY, STEPS - 1))
    code, output, out = fit(config, name, *args, resume=True, interrupt=(signal.SIGKILL, kill_at))
    again = records(out)
    assert code == -signal.SIGKILL, output[-3000:]
    assert_same_batches(again, ref, saved * accumulate, to_the_end=False)
    saved = periodic_checkpoint_step(config, name, again, resumed_from=saved)
    code, output, out = fit(config, name, *args, resume=True)
    assert code == 0, output[-3000:]
    assert_same_batches(records(out), ref, saved * accumulate)
    assert_same_weights(config, name, "ref_" + "_".join(map(str, ref_key(args))))


def periodic_checkpoint_step(config: Path, name: str, done: list[dict], resumed_from: int = 0) -> int:
    """The step of the last.ckpt a killed run left: the newest periodic one, or the one it resumed from.

    The kill can land between the save at step k x EVERY and the log line of that step, so the
    log may end one step before the checkpoint.
    """
    step = checkpoint(config, name)["global_step"]
    newest = max(resumed_from, done[-1]["step"] // EVERY * EVERY)
    assert step in (newest, newest + EVERY) and step <= done[-1]["step"] + 1, (step, newest)
    return step


def ref_key(args: list[str]) -> tuple:
    return tuple(a for a in args if not a.startswith("--"))


@pytest.mark.parametrize(
    "task, workers, accumulate, first",
    [
        ("pretrain", 0, 1, (signal.SIGTERM, 9)),
        ("pretrain", 2, 2, (signal.SIGKILL, 11)),
        ("finetune", 0, 2, (signal.SIGUSR1, 7)),
    ],
)
def test_kill_and_resume_is_exact(work, task, workers, accumulate, first):
    config = work[task]
    args = ["--data.init_args.num_workers", str(workers), "--trainer.accumulate_grad_batches", str(accumulate)]
    ref = reference(config, ref_key(args), *args)
    epochs = {r["epoch"] for r in ref}
    assert len(epochs) >= 2, "the run must cross an epoch boundary"
    kill_resume_chain(config, f"{task}_w{workers}_a{accumulate}", ref, args, first)


def test_same_seed_same_losses_bit_for_bit(work):
    config = work["pretrain"]
    args = ["--data.init_args.num_workers", "0", "--trainer.accumulate_grad_batches", "1"]
    ref = reference(config, ref_key(args), *args)
    code, output, out = fit(config, "again", *args)
    assert code == 0, output[-3000:]
    again = records(out)
    assert len(again) == STEPS
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]  # bit-identical, 50 steps


def test_stop_at_epoch_end_then_continue(work):
    """N steps ending exactly at an epoch's end, then continued to 2N: the batches of one 2N run."""
    config = work["pretrain"]
    args = ["--data.init_args.num_workers", "0", "--trainer.accumulate_grad_batches", "1"]
    ref = reference(config, ref_key(args), *args)
    epoch_length = sum(r["epoch"] == 0 for r in ref)
    assert 2 * epoch_length <= STEPS
    code, output, out = fit(config, "halves", *args, "--trainer.max_steps", str(epoch_length))
    assert code == 0, output[-3000:]
    assert checkpoint(config, "halves")["global_step"] == epoch_length
    code, output, out = fit(config, "halves", *args, "--trainer.max_steps", str(2 * epoch_length), resume=True)
    assert code == 0, output[-3000:]
    assert_same_batches(records(out), ref[: 2 * epoch_length], epoch_length)


@pytest.mark.distributed
def test_ddp_kill_and_resume_across_an_epoch_boundary(work):
    config = work["pretrain"]
    args = ["--data.init_args.num_workers", "0", "--trainer.accumulate_grad_batches", "1"]
    name = "ddp"
    ref_code, output, ref_out = fit(config, "ref_ddp", *args, devices=2)
    assert ref_code == 0, output[-3000:]
    ref = [records(ref_out, rank) for rank in range(2)]
    assert ref[0][0]["ids"] != ref[1][0]["ids"] and len({r["epoch"] for r in ref[0]}) >= 2
    epoch_length = sum(r["epoch"] == 0 for r in ref[0])
    kill_at = epoch_length + 2  # resumes from the periodic checkpoint before the boundary
    code, output, out = fit(config, name, *args, devices=2, interrupt=(signal.SIGKILL, kill_at))
    assert code == -signal.SIGKILL
    saved = periodic_checkpoint_step(config, name, records(out))
    assert saved < epoch_length or pytest.skip("killed too late to cross the boundary")
    code, output, out = fit(config, name, *args, devices=2, resume=True)
    assert code == 0, output[-3000:]
    for rank in range(2):
        assert_same_batches(records(out, rank), ref[rank], saved)
    assert_same_weights(config, name, "ref_ddp")


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(work):
    config = work["pretrain"]
    code, output, out = fit(config, "nan_stop", "--trainer.callbacks+=dist_run.PoisonLoss",
                            "--trainer.callbacks.init_args.step", "11")  # fmt: skip
    assert code == 2, output[-3000:]
    assert "gptlab: error: the training loss is not finite at step 11" in output
    assert "Traceback" not in output
    assert records(out)[-1]["step"] == 10
    saved = checkpoint(config, "nan_stop")
    assert saved["global_step"] == 8  # the periodic checkpoint before it, untouched
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_nonfinite_loss_skip_policy_skips_that_step(work):
    config = work["pretrain"]
    code, output, out = fit(config, "nan_skip", "--trainer.callbacks+=dist_run.PoisonLoss",
                            "--trainer.callbacks.init_args.step", "11", "--nonfinite_loss.policy", "skip",
                            "--trainer.max_steps", "12")  # fmt: skip
    assert code == 0, output[-3000:]
    assert "non-finite training loss at step 11: skipping this step (1 so far)" in output
    saved = checkpoint(config, "nan_skip")
    assert saved["global_step"] == 12
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    # AdamW counts the updates each parameter received: one fewer than the optimizer steps.
    states = saved["optimizer_states"][0]["state"].values()
    assert {int(s["step"]) for s in states} == {11}
    assert saved["callbacks"]["NonFiniteLoss"]["skipped"] == 1
