"""Exact resume after kill -9 and preemption signals, and determinism (docs/design.md §6.1).

Every run is a real `fit` (main.py plus dist_run.StepLog, which writes one JSON line per training
batch as it happens). A run is killed with SIGKILL at a random step in the middle of an epoch, or
sent SIGTERM / SIGUSR1, always in its own process, and continued with `--ckpt_path last` in
another process; every batch the continuation trains must equal the uninterrupted run's (sample
identities, loss and learning rate to 1e-6) and the final weights must be identical. The
experiments have dropout, a per-step LR schedule, shuffled data and validation in between, and
run over several epochs (an epoch is ~10 batches).

What must be a separate process is: the interrupted run (a real signal, a real kill) and, under
DDP, everything. Uninterrupted references and final continuations run in this process
(gptlab.cli.main), which has never seen the interrupted run's state: a Python start costs
~10 s of imports here, the training itself ~1-3 s.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_CORPUS, finish_dist_run, start_dist_run, tiny_config
from finetune_data import finetune_config, write_sentiment
from gptlab.cli import main
from gptlab.resilience import REQUEUE_EXIT_CODE

pytestmark = pytest.mark.slow

STEPS = 50  # optimizer steps of every run (the determinism test's 50 CPU steps)
EVERY = 4  # preemption.every_n_steps: the periodic last.ckpt a killed run resumes from
TIMEOUT = 180
# The seed of the random kill steps (it is in every message): fixed by default so that CI is
# reproducible; GPTLAB_TEST_SEED=<n> draws other steps. The default puts the fine-tune's SIGUSR1
# at an epoch's last step, the case where Lightning, resuming, miscounted the next epoch
# (gptlab.resilience.Preemption.on_train_start).
SEED = int(os.environ.get("GPTLAB_TEST_SEED", 346548))

COMMON = [
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", "15",
    "--trainer.limit_val_batches", "1",
    "--trainer.num_sanity_val_steps", "0",
    "--trainer.enable_model_summary", "false",
    "--trainer.callbacks+=dist_run.StepLog",
    "--preemption.every_n_steps", str(EVERY),
    "--throughput.peak_flops", "0",
]  # fmt: skip


def experiment(tmp: Path, task: str) -> Path:
    """A tiny pretraining or fine-tuning config with dropout, warmup + cosine LR over STEPS steps.

    Sized so that an epoch is ~10 batches of 4 (pretraining) or 8 (fine-tuning).
    """
    if task == "pretrain":
        corpus = tmp / "corpus"
        corpus.mkdir()
        for i, text in enumerate(TINY_CORPUS):
            (corpus / f"doc{i}.txt").write_text(text[:220])
        path = tiny_config(tmp, corpus)
        config = yaml.safe_load(path.read_text())
        config["data"]["init_args"].update(tokenizer={"class_path": "gptlab.data.Char"}, block_size=16)
        config["model"]["init_args"]["backbone"]["init_args"].update(block_size=16, n_embd=16)
    else:
        config = finetune_config(tmp, "classification", write_sentiment(tmp, rows=110))
        config["model"]["init_args"]["scheduler"] = {"class_path": "gptlab.optim.WarmupCosine"}
        config["model"]["init_args"]["backbone"]["init_args"].update(n_embd=16)
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


def new_out(config: Path, name: str) -> Path:
    out = config.parent / f"out_{name}_{len(list(config.parent.glob(f'out_{name}_*')))}"
    out.mkdir()
    return out


def command(config: Path, name: str, args: list[str], resume: bool) -> list[str]:
    argv = ["fit", "--config", str(config), *COMMON, "--experiment", name, *args]
    return argv + (["--ckpt_path", "last"] if resume else [])


def run(config: Path, name: str, *args: str, resume: bool = False) -> list[dict]:
    """An uninterrupted `fit` in this process; its batches."""
    out = new_out(config, name)
    os.environ["GPTLAB_TEST_OUT"] = str(out)
    try:
        main(command(config, name, list(args), resume))
    finally:
        del os.environ["GPTLAB_TEST_OUT"]
    return records(out)


def spawn(
    config: Path,
    name: str,
    *args: str,
    resume: bool = False,
    interrupt: tuple[int, Callable[[list[dict]], bool]] | None = None,
    devices: int = 1,
) -> tuple[int, str, Path]:
    """`fit` in a new process (session); `interrupt=(signal, when)` signals it once `when(rank 0's batches)`.

    The signal goes to the whole process group: SIGKILL kills every rank and loader worker at once
    (a lost node); SLURM too signals every task of a job.
    """
    out = new_out(config, name)
    argv = command(config, name, list(args), resume)
    if devices > 1:
        argv += ["--config", str(REPO / "configs/trainer/ddp.yaml"), "--trainer.accelerator", "cpu"]
        argv += ["--trainer.devices", str(devices)]
    proc = start_dist_run(argv, config.parent, out)
    deadline = time.monotonic() + TIMEOUT
    if interrupt is not None:
        signum, when = interrupt
        while proc.poll() is None and time.monotonic() < deadline:
            if when(records(out)):
                os.killpg(proc.pid, signum)
                break
            time.sleep(0.005)
    code, output = finish_dist_run(proc, name, max(1.0, deadline - time.monotonic()))
    return code, output, out


def at_step(step: int) -> Callable[[list[dict]], bool]:
    return lambda done: any(r["step"] >= step for r in done)


def checkpoint(config: Path, name: str) -> dict:
    path = config.parent / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_batches(got: list[dict], reference: list[dict], first: int, why: str = "") -> None:
    """`got` are the reference's batches from number `first` (0-based) on, to 1e-6."""
    expected = reference[first : first + len(got)]
    assert got and len(got) == len(expected), why
    assert [r["ids"] for r in got] == [r["ids"] for r in expected], f"other samples than the reference {why}"
    assert [(r["step"], r["epoch"]) for r in got] == [(r["step"], r["epoch"]) for r in expected], why
    torch.testing.assert_close(
        [r["loss"] for r in got], [r["loss"] for r in expected], rtol=0, atol=1e-6, msg=why
    )
    torch.testing.assert_close(
        [r["lr"] for r in got], [r["lr"] for r in expected], rtol=0, atol=1e-9, msg=why
    )


def assert_same_weights(config: Path, name: str, reference: str) -> None:
    """The final checkpoints hold the same weights and the same loop progress (epochs, batches)."""
    got, expected = checkpoint(config, name), checkpoint(config, reference)
    assert got["global_step"] == expected["global_step"] == STEPS
    assert got["epoch"] == expected["epoch"]
    loops = got["loops"]["fit_loop"], expected["loops"]["fit_loop"]
    for key in ("epoch_progress", "epoch_loop.batch_progress", "epoch_loop.state_dict"):
        assert loops[0][key] == loops[1][key], key
    for key, value in expected["state_dict"].items():
        assert torch.equal(got["state_dict"][key], value), key


def batches_before(ref: list[dict], step: int) -> int:
    """How many of the reference's batches come before optimizer step `step` + 1.

    Not step x accumulate: Lightning steps the optimizer at an epoch's last batch whatever the
    accumulation count, and a record's "step" is the global step after its batch (a micro-batch
    that does not step the optimizer carries the previous step).
    """
    return 0 if step == 0 else 1 + next(i for i, r in enumerate(ref) if r["step"] == step)


def mid_epoch_step(ref: list[dict], rng: random.Random, low: int, high: int) -> int:
    """A random optimizer step in [low, high] that neither starts nor ends an epoch."""
    ends = {ref[i]["step"] for i in range(len(ref) - 1) if ref[i]["epoch"] != ref[i + 1]["epoch"]}
    starts = {ref[i + 1]["step"] for i in range(len(ref) - 1) if ref[i]["epoch"] != ref[i + 1]["epoch"]}
    return rng.choice([s for s in range(low, high + 1) if s not in ends | starts])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("resume")
    configs = {}
    for task in ("pretrain", "finetune"):
        (tmp / task).mkdir()
        configs[task] = experiment(tmp / task, task)
    return configs


_references: dict[tuple, list[dict]] = {}


def reference(config: Path, task: str, args: list[str]) -> tuple[str, list[dict]]:
    """(experiment name, batches) of the uninterrupted run of a configuration, run once in this module."""
    name = "ref_" + "_".join([task, *(a for a in args if not a.startswith("--"))])
    if name not in _references:
        _references[name] = run(config, name, *args)
        assert _references[name][-1]["step"] == STEPS
    return name, _references[name]


def options(workers: int, accumulate: int) -> list[str]:
    return [
        "--data.init_args.num_workers",
        str(workers),
        "--trainer.accumulate_grad_batches",
        str(accumulate),
    ]


@pytest.mark.parametrize(
    "task, workers, accumulate, signals",
    [
        # SIGTERM (preemption), continue to the end.
        ("pretrain", 0, 1, (signal.SIGTERM,)),
        # kill -9 with two loader workers and gradient accumulation, continue to the end.
        ("pretrain", 2, 2, (signal.SIGKILL,)),
        # SIGUSR1 (SLURM's --signal), continue in a new process and kill -9 that one, continue.
        ("finetune", 0, 2, (signal.SIGUSR1, signal.SIGKILL)),
    ],
)
def test_interrupt_and_resume_is_exact(work, task, workers, accumulate, signals):
    config, args = work[task], options(workers, accumulate)
    ref_name, ref = reference(config, task, args)
    assert len({r["epoch"] for r in ref}) >= 3, "the runs must cross epoch boundaries"
    rng = random.Random(SEED)
    name, saved = f"{task}_w{workers}_a{accumulate}", 0
    for signum in signals:
        # After the first periodic checkpoint of this segment, at most 3 of them later.
        step = mid_epoch_step(ref, rng, saved + EVERY + 1, saved + 3 * EVERY)
        why = f"({signal.Signals(signum).name} at step {step}, GPTLAB_TEST_SEED={SEED})"
        code, output, out = spawn(config, name, *args, resume=saved > 0, interrupt=(signum, at_step(step)))
        done = records(out)
        # Up to the interruption: the reference's batches.
        assert_same_batches(done, ref, batches_before(ref, saved), why)
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL, output[-3000:]
            # The newest checkpoint before the kill: periodic, or the checkpoint callback's after a
            # validation. The kill can fall between a step's log line and its save (or a save and
            # its log line, or inside a save: the previous file stays, gptlab.checkpointing).
            newest = done[-1]["step"] // EVERY * EVERY
            before, saved = saved, checkpoint(config, name)["global_step"]
            assert saved >= newest - EVERY, (saved, newest, why)
            assert before <= saved <= done[-1]["step"] + 1, (saved, before, why)
        else:
            # Saved at the end of the step in progress, nothing trained after it, exit code 75.
            assert code == REQUEUE_EXIT_CODE, output[-3000:]
            assert f"gptlab: {signal.Signals(signum).name}: saved" in output
            saved = checkpoint(config, name)["global_step"]
            assert done[-1]["step"] == saved and saved >= step, why
    # The continuation, in another process than the interrupted one, to the end.
    again = run(config, name, *args, resume=True)
    assert_same_batches(
        again, ref, batches_before(ref, saved), f"(from step {saved}, GPTLAB_TEST_SEED={SEED})"
    )
    assert len(again) == len(ref) - batches_before(ref, saved)
    assert len(list((config.parent / "logs" / name).iterdir())) == 1  # resumed in place
    assert not list((config.parent / "logs" / name).glob("*/checkpoints/last-v*")), "one last.ckpt"
    assert_same_weights(config, name, ref_name)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_kill_after_a_periodic_save_at_an_epoch_end(work, accumulate):
    """A periodic save that falls on an epoch's last batch, then kill -9: the resume is exact.

    The checkpoint then holds an epoch with every batch done but not ended (saved from that
    batch's on_train_batch_end): Lightning must close that epoch on restore while the data
    position moves on to the next epoch's order, epoch labels included.
    """
    config, args = work["pretrain"], options(0, accumulate)
    ref_name, ref = reference(config, "pretrain", args)
    end = next(ref[i]["step"] for i in range(len(ref) - 1) if ref[i]["epoch"] != ref[i + 1]["epoch"])
    # No validation save (every 15 batches) may come between the periodic save and the kill.
    assert batches_before(ref, end + 1) < 15
    # Periodic saves every epoch: the first one is the first epoch's last batch.
    name, every = f"pretrain_epoch_end_save_a{accumulate}", ["--preemption.every_n_steps", str(end)]
    code, output, _ = spawn(config, name, *args, *every, interrupt=(signal.SIGKILL, at_step(end + 1)))
    assert code == -signal.SIGKILL, output[-3000:]
    assert checkpoint(config, name)["global_step"] == end
    again = run(config, name, *args, *every, resume=True)
    assert_same_batches(again, ref, batches_before(ref, end), f"(from the save at epoch end, step {end})")
    assert_same_weights(config, name, ref_name)


def test_resume_from_a_save_between_micro_batches(work):
    """A validation between the two micro-batches of a step saves last.ckpt there; resuming it is exact.

    Epochs of 11 batches, accumulation 2: the 14th batch is the first micro-batch of step 8, and
    the validation after it writes last.ckpt at step 7 plus half a step. Without periodic saves and
    with a NaN at step 9 stopping the run (nonfinite_loss: stop, no checkpoint written), that save
    is the one resumed.
    """
    config, args = work["pretrain"], options(2, 2)
    ref_name, ref = reference(config, "pretrain", args)
    assert sum(r["epoch"] == 0 for r in ref) == 11
    args = [*args, "--trainer.val_check_interval", "14", "--preemption.every_n_steps", "0"]
    with pytest.raises(SystemExit) as stopped:
        run(
            config,
            "micro",
            *args,
            "--trainer.callbacks+=dist_run.PoisonLoss",
            "--trainer.callbacks.init_args.step",
            "9",
        )
    assert stopped.value.code == 2
    assert checkpoint(config, "micro")["global_step"] == 7
    again = run(config, "micro", *args, resume=True)
    assert_same_batches(again, ref, batches_before(ref, 7), "(from step 7 + 1 micro-batch)")
    assert len(again) == len(ref) - batches_before(ref, 7)
    assert_same_weights(config, "micro", ref_name)


def test_same_seed_same_losses_bit_for_bit(work):
    _, ref = reference(work["pretrain"], "pretrain", options(0, 1))
    again = run(work["pretrain"], "again", *options(0, 1))
    assert len(again) == len(ref) == STEPS
    assert [r["loss"] for r in again] == [r["loss"] for r in ref]  # bit-identical, 50 steps
    assert [r["ids"] for r in again] == [r["ids"] for r in ref]


def test_stop_at_epoch_end_then_continue_to_2n(work):
    """N steps ending exactly at an epoch's end, then continued to 2N: the batches of one run."""
    config, args = work["pretrain"], options(0, 1)
    _, ref = reference(config, "pretrain", args)
    n = sum(r["epoch"] == 0 for r in ref)
    assert 2 * n <= STEPS
    first = run(config, "halves", *args, "--trainer.max_steps", str(n))
    assert_same_batches(first, ref, 0)
    assert checkpoint(config, "halves")["global_step"] == n
    second = run(config, "halves", *args, "--trainer.max_steps", str(2 * n), resume=True)
    assert len(second) == n
    assert_same_batches(second, ref, n)


@pytest.mark.distributed
def test_ddp_kill_and_resume_across_an_epoch_boundary(work):
    """2 CPU processes, kill -9 of both in epoch 1, resumed from a checkpoint of epoch 0.

    The reference of the steps after the checkpoint is the killed run itself (it was uninterrupted
    up to the kill): no third 2-process run needed.
    """
    config, args = work["pretrain"], options(0, 1)
    _, single = reference(config, "pretrain", args)
    # Per rank: half the samples of an epoch, in batches of 4.
    samples = sum(len(r["ids"]) for r in single if r["epoch"] == 0)
    epoch = math.ceil(math.ceil(samples / 2) / 4)
    every = epoch - 1  # a checkpoint one step before the boundary, the next one well after it
    assert every >= 3
    args = [*args, "--preemption.every_n_steps", str(every), "--trainer.max_steps", str(3 * epoch)]
    # Killed two steps into epoch 1 (rank 0's log; the kill lands a little later).
    code, output, out = spawn(config, "ddp", *args, devices=2, interrupt=(signal.SIGKILL, at_step(epoch + 2)))
    assert code == -signal.SIGKILL, output[-3000:]
    killed = [records(out, rank) for rank in range(2)]
    assert killed[0][0]["ids"] != killed[1][0]["ids"], "the ranks must train on different samples"
    saved = checkpoint(config, "ddp")["global_step"]
    assert saved == every, "resumes from the checkpoint before the boundary"
    code, output, out = spawn(config, "ddp", *args, devices=2, resume=True)
    assert code == 0, output[-3000:]
    for rank in range(2):
        resumed = records(out, rank)
        assert resumed[-1]["step"] == 3 * epoch and resumed[0]["step"] == saved + 1
        # The overlap with the killed run crosses the boundary: epoch 0's last batch, epoch 1's first.
        overlap = resumed[: len(killed[rank]) - saved]
        assert {r["epoch"] for r in overlap} == {0, 1}
        assert_same_batches(overlap, killed[rank], saved, f"rank {rank}")
