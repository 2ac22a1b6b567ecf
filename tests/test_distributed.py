"""Distributed training on CPU (gloo): DDP and FSDP2 give the losses of one process, checkpoints reload.

Every distributed run is `tests/dist_run.py` (main.py plus a recorder callback) launched as a user
would, with 2 CPU processes, under a hard timeout that kills the whole process group. Each rank
writes rank<N>.json when training ends and exit<N> once its main() has returned: a run succeeds
only with both from every rank, whatever the launcher's exit status (Lightning's launcher is
rank 0, which does not wait for the other ranks' status). The reference is the same tiny
experiment in one process with the same global batch (2 x the per-rank batch): 4 steps, 20 for DDP.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CORPUS, finish_dist_run, start_dist_run, tiny_config
from gptlab.cli import main
from gptlab.loading import load_checkpoint
from gptlab.tasks import CausalLM

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

PER_RANK_BATCH = 4
STEPS = 4
DDP_STEPS = 20  # world size 1 x batch 8 vs 2 x 4, losses within 1e-5 over 20 steps
N_LAYER = 2
TIMEOUT = 240  # seconds for one 2-process run; a healthy one takes ~20-40 s on a loaded 2-core machine

# Same experiment everywhere: 2 blocks, every window full length (stride 1) so that each rank's
# mean loss has the same weight, weight decay and clipping on (both must behave under sharding).
OVERRIDES = [
    "--data.init_args.stride", "1",
    "--model.init_args.backbone.init_args.n_layer", str(N_LAYER),
    "--model.init_args.optimizer.init_args.weight_decay", "0.1",
    "--trainer.gradient_clip_val", "1.0",
    "--trainer.max_steps", str(STEPS),
    "--trainer.val_check_interval", str(STEPS),
    "--trainer.callbacks+=dist_run.Recorder",
    # A fixed peak skips measuring one: this test is about correctness, not speed.
    "--throughput.peak_flops", "1e11",
]  # fmt: skip


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dist")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    return tiny_config(tmp, corpus)


def run_dir(config: Path, experiment: str) -> Path:
    return config.parent / "logs" / experiment / "version_0"


def one_process(experiment: Path, name: str, *args: str) -> dict:
    """One process, global batch 2 x PER_RANK_BATCH, in this process (no launch cost)."""
    out = experiment.parent / f"{name}_out"
    out.mkdir()
    os.environ["GPTLAB_TEST_OUT"] = str(out)
    try:
        main(
            ["fit", "--config", str(experiment), *OVERRIDES, "--experiment", name]
            + ["--data.init_args.batch_size", str(2 * PER_RANK_BATCH), *args]
        )
    finally:
        del os.environ["GPTLAB_TEST_OUT"]
    record = json.loads((out / "rank0.json").read_text())
    assert record["world_size"] == 1
    return record


@pytest.fixture(scope="module")
def reference(experiment: Path) -> dict:
    record = one_process(experiment, "ref")
    assert len(record["losses"]) == STEPS
    return record


def run_ranks(experiment: Path, name: str, *args: str) -> tuple[int, str, Path]:
    """Run a 2-process fit under the hard timeout; return (exit status, output, out folder)."""
    out = experiment.parent / f"{name}_out"
    out.mkdir()
    command = ["fit", "--config", str(experiment)]
    command += [*OVERRIDES, "--experiment", name, "--data.init_args.batch_size", str(PER_RANK_BATCH), *args]
    # Returns once every rank closed the output pipe (they share it), i.e. every rank exited.
    code, output = finish_dist_run(start_dist_run(command, experiment.parent, out), name, TIMEOUT)
    return code, output, out


def assert_every_rank_succeeded(name: str, code: int, output: str, out: Path) -> None:
    assert code == 0, output[-3000:]
    for marker in ("rank", "exit"):
        missing = [r for r in range(2) if not list(out.glob(f"{marker}{r}*"))]
        assert not missing, f"{name}: ranks {missing} wrote no {marker} marker\n{output[-3000:]}"


def launch(experiment: Path, name: str, *args: str) -> list[dict]:
    """Run a 2-process fit; return every rank's record (asserting each rank finished)."""
    code, output, out = run_ranks(experiment, name, *args)
    assert_every_rank_succeeded(name, code, output, out)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_a_rank_crashing_after_rank_0_finished_fails_the_run(experiment: Path):
    code, output, out = run_ranks(
        experiment, "crash", "--config", str(REPO / "configs/trainer/ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.max_steps", "2",
        "--trainer.callbacks+=dist_run.CrashAfterFit",
    )  # fmt: skip
    # Rank 0 finished cleanly and the launcher (rank 0) exits 0: its status alone would pass.
    assert code == 0 and (out / "exit0").is_file(), output[-3000:]
    with pytest.raises(AssertionError, match=r"ranks \[1\] wrote no exit marker"):
        assert_every_rank_succeeded("crash", code, output, out)


def assert_same_losses(records: list[dict], reference: dict) -> None:
    """The mean of the ranks' losses is the one-process loss at every step (equal token counts)."""
    steps = len(reference["losses"])
    assert all(r["world_size"] == 2 and len(r["losses"]) == steps for r in records)
    mean = torch.tensor([r["losses"] for r in records], dtype=torch.float64).mean(0)
    expected = torch.tensor(reference["losses"], dtype=torch.float64)
    # Two different halves of each batch: the ranks really saw different data.
    assert records[0]["losses"][0] != records[1]["losses"][0]
    torch.testing.assert_close(mean, expected, rtol=0, atol=1e-5)


def assert_same_weights(checkpoint: dict, reference_ckpt: Path) -> None:
    expected = torch.load(reference_ckpt, weights_only=True)["state_dict"]
    state = checkpoint["state_dict"]
    assert set(state) == set(expected)
    # A rank counts the tokens it saw itself (half of them here); the parameters are global.
    assert state.pop("tokens_seen") * 2 == expected.pop("tokens_seen")
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-5, msg=key)


def test_ddp_matches_one_process(experiment: Path):
    longer = ["--trainer.max_steps", str(DDP_STEPS), "--trainer.val_check_interval", str(DDP_STEPS)]
    reference = one_process(experiment, "ref20", *longer)
    records = launch(
        experiment, "ddp", "--config", str(REPO / "configs/trainer/ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", *longer,
    )  # fmt: skip
    assert {r["strategy"] for r in records} == {"DDPStrategy"}
    assert len(reference["losses"]) == DDP_STEPS
    assert_same_losses(records, reference)


def test_fsdp_matches_one_process_and_reloads_on_one_device(experiment: Path, reference: dict):
    records = launch(
        experiment, "fsdp", "--config", str(REPO / "configs/trainer/fsdp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy.init_args.activation_checkpointing", "true",
        # Generation after validation runs forwards through the sharded blocks: on every rank.
        "--trainer.callbacks+=gptlab.callbacks.SampleGeneration",
        "--trainer.callbacks.init_args.max_new_tokens", "4",
    )  # fmt: skip
    assert_same_losses(records, reference)
    assert records[0]["samples"] == records[1]["samples"] and len(records[0]["samples"][0]) == 1
    for record in records:
        assert record["strategy"] == "FSDP"
        # One unit per backbone block (block_class read from the model), each wrapped for
        # activation checkpointing, plus the root.
        assert record["fsdp_units"] == ["FSDPCausalLM"] + ["FSDPCheckpointWrapper(Block)"] * N_LAYER
        assert record["sharded"] and record["checkpoint_wrapped"]
        # Weight decay on exactly the matrices of the unsharded model, by name.
        assert record["groups"] == reference["groups"]
        assert [g["weight_decay"] for g in record["groups"]] == [0.1, 0.0]

    # Sharded checkpoint: a folder of per-rank shards that consolidates to the one-process weights.
    fsdp_run, ref_run = run_dir(experiment, "fsdp"), run_dir(experiment, "ref")
    last = fsdp_run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert_same_weights(load_checkpoint(last), ref_run / "checkpoints" / "last.ckpt")
    # In Python too: the folder rebuilds the task on one device with no other argument.
    model = CausalLM.load_from_checkpoint(last)
    assert_same_weights({"state_dict": model.state_dict()}, ref_run / "checkpoints" / "last.ckpt")

    # `test` on one device reads the folder (consolidated on the fly) and scores like the reference.
    one_device = ["--trainer.strategy", "auto", "--trainer.devices", "1", "--throughput.peak_flops", "0"]
    main(["test", "--ckpt_path", str(last), *one_device])
    main(["test", "--ckpt_path", str(ref_run / "checkpoints" / "last.ckpt")])
    got = json.loads((fsdp_run / "reports" / "test_report.json").read_text())
    expected = json.loads((ref_run / "reports" / "test_report.json").read_text())
    assert got["metrics"]["loss"] == pytest.approx(expected["metrics"]["loss"], abs=1e-4)
    assert got["meta"]["checkpoint"] == str(last)


def test_lightning_model_parallel_strategy_full_state(experiment: Path, reference: dict):
    # Lightning's own ModelParallelStrategy (FSDP2 over a 2 x 1 mesh) shards through the same hook,
    # and with save_distributed_checkpoint=False gathers one full checkpoint file on rank 0.
    strategy = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {
            "data_parallel_size": 2,
            "tensor_parallel_size": 1,
            "save_distributed_checkpoint": False,
        },
    }
    records = launch(
        experiment, "mp", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", json.dumps(strategy),
    )  # fmt: skip
    assert_same_losses(records, reference)
    assert all(
        r["sharded"] and r["fsdp_units"] == ["FSDPBlock"] * N_LAYER + ["FSDPCausalLM"] for r in records
    )
    last = run_dir(experiment, "mp") / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert_same_weights(load_checkpoint(last), run_dir(experiment, "ref") / "checkpoints" / "last.ckpt")
