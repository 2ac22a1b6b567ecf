"""`main.py` plus test callbacks, for the distributed and resume tests (run as a script, relaunched per rank).

    python tests/dist_run.py fit --config ... --trainer.callbacks+=dist_run.Recorder

Lightning's launcher re-runs this same script for every extra rank, so `dist_run` is importable
on all of them (a script's directory is on sys.path). Into $GPTLAB_TEST_OUT:

- `rank<N>.json` (Recorder) when training ends: per-step losses, what the optimizer groups hold
  and how the model is wrapped;
- `steps<N>.jsonl` (StepLog): one line per training batch, flushed as it happens, so a process
  killed with SIGKILL leaves the record of every batch it finished;
- `exit<N>` once `main()` has returned normally on rank N: the success marker. A rank that
  raises, crashes or hangs at any point, also after rank 0 finished, writes none.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import lightning as L

from gptlab.callbacks import SampleGeneration
from gptlab.cli import main
from gptlab.optim import canonical_name


def unit_name(module) -> str:
    """ "FSDPBlock", or "FSDPCheckpointWrapper(Block)" for a block wrapped for activation checkpointing."""
    inner = getattr(module, "_checkpoint_wrapped_module", None)
    return type(module).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


class Recorder(L.Callback):
    """Per-step training loss on this rank, and the facts the tests check about sharding."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.facts: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before the sanity check: after a forward FSDP2 leaves the root's parameters gathered
        # (registered unsharded until backward), and the optimizer holds the sharded ones.
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        names = {id(p): canonical_name(n) for n, p in pl_module.named_parameters()}
        groups = trainer.optimizers[0].param_groups
        matrices = [p for p in pl_module.parameters() if isinstance(p, DTensor) and p.dim() >= 2]
        env = getattr(trainer.strategy, "cluster_environment", None)  # none on a single device
        mesh = matrices[0].device_mesh if matrices else None
        self.facts = {
            "world_size": trainer.world_size,
            "cluster_environment": type(env).__name__ if env is not None else None,
            "ranks": [env.global_rank(), env.local_rank(), env.node_rank()] if env is not None else [0, 0, 0],
            # The mesh a sharded matrix lives on and how it is laid out over it (HSDP: 2-D).
            "mesh": None if mesh is None else list(mesh.shape),
            "placements": None if mesh is None else [str(p) for p in matrices[0].placements],
            "strategy": type(trainer.strategy).__name__,
            "groups": [
                {"weight_decay": g["weight_decay"], "names": sorted(names[id(p)] for p in g["params"])}
                for g in groups
            ],
            "fsdp_units": sorted(unit_name(m) for m in pl_module.modules() if isinstance(m, FSDPModule)),
            # True when every matrix holds only its shard on this rank.
            "sharded": bool(matrices) and all(p.to_local().numel() < p.numel() for p in matrices),
            "checkpoint_wrapped": any(
                "_checkpoint_wrapped_module" in n for n, _ in pl_module.named_parameters()
            ),
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        out = Path(os.environ["GPTLAB_TEST_OUT"])
        samples = [c.samples for c in trainer.callbacks if isinstance(c, SampleGeneration)]
        record = {"rank": trainer.global_rank, "losses": self.losses, "samples": samples, **self.facts}
        (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _out() -> Path:
    return Path(os.environ["GPTLAB_TEST_OUT"])


class StepLog(L.Callback):
    """One JSON line per training batch: step, epoch, loss, learning rate and the samples' identities.

    A sample's identity is a hash of its token ids, so two runs can be compared batch by batch
    without the data loader's indices.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.file = (_out() / f"steps{trainer.global_rank}.jsonl").open("a")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        ids = [hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:16] for row in batch["input_ids"]]
        record = {
            "step": trainer.global_step,  # optimizer steps done, this batch's included
            "epoch": trainer.current_epoch,
            "loss": float(outputs["loss"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "ids": ids,
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # in the OS's hands: survives a SIGKILL of this process

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.file.close()


class PoisonLoss(L.Callback):
    """Makes the training loss NaN at one optimizer step on one rank (to test NonFiniteLoss)."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step = step  # 1-based: the step that global_step reaches once it is done
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            self.hook = pl_module.backbone.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if getattr(self, "hook", None) is not None:
            self.hook.remove()
            self.hook = None


class CrashAfterFit(L.Callback):
    """Rank `rank` dies a few seconds after training ended everywhere (rank 0 has finished by then)."""

    def __init__(self, rank: int = 1, delay: float = 3.0) -> None:
        self.rank = rank
        self.delay = delay

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_rank == self.rank:
            time.sleep(self.delay)
            os._exit(3)  # no Python cleanup, as a segfault or an OOM kill would end it


class Stall(L.Callback):
    """Rank `rank` stops making progress after optimizer step `step`, once per $GPTLAB_TEST_OUT folder.

    It writes `stalled<rank>` and sleeps, so that a test can kill its node at a known point; a
    resumed run (the marker exists) passes the same step.
    """

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        marker = _out().parent / f"stalled{self.rank}"
        if trainer.global_rank == self.rank and trainer.global_step == self.step and not marker.exists():
            marker.write_text(str(self.step))
            time.sleep(3600)


def count_builds() -> None:
    """Append one line to builds.txt (beside $GPTLAB_TEST_OUT) per tokenizer training or text tokenization."""
    from gptlab.data import TextDataModule, tokenizers

    def counted(what: str, function):
        def wrapper(*args, **kwargs):
            with (_out().parent / "builds.txt").open("a") as file:
                file.write(f"{what} {process_rank()}\n")
            return function(*args, **kwargs)

        return wrapper

    for recipe in (tokenizers.BPE, tokenizers.Char):
        recipe.train = counted("tokenizer", recipe.train)
    TextDataModule._build = counted("tokenize", TextDataModule._build)


def process_rank() -> str:
    """This process's global rank as its launcher set it (torchrun: RANK; srun: SLURM_PROCID;
    Lightning's own launcher: LOCAL_RANK on one node, nothing on rank 0)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if name in os.environ:
            return os.environ[name]
    return "0"


if __name__ == "__main__":
    count_builds()
    main()
    # Reached only when main() returned.
    (_out() / f"exit{process_rank()}").write_text("ok")
    sys.exit(0)
