"""`main.py` plus a recorder callback, for the distributed tests (run as a script, relaunched per rank).

    python tests/dist_run.py fit --config ... --trainer.callbacks+=dist_run.Recorder

Lightning's launcher re-runs this same script for every extra rank, so `dist_run` is importable
on all of them (a script's directory is on sys.path). Each rank writes `rank<N>.json` into
$GPTLAB_TEST_OUT when training ends: its per-step losses, what the optimizer groups hold and how
the model is wrapped. The json is also the rank's success marker: a rank that crashes or hangs
writes none.
"""

from __future__ import annotations

import json
import os
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
        self.facts = {
            "world_size": trainer.world_size,
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


if __name__ == "__main__":
    main()
