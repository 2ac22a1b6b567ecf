"""Sharded data parallelism (FSDP2) for any gptlab task.

    TaskModule ──configure_model()──> parallelize(task, strategy)
                                         │  for every backbone.block_class instance:
                                         │      [checkpoint_wrapper]  (activation checkpointing)
                                         │      fully_shard(block)    (one all-gather unit)
                                         └─ fully_shard(task)         (embeddings, final norm, head)

The unit FSDP wraps is whatever the backbone declares as its `block_class` (our GPT's `Block`, a
Hugging Face model's decoder layer), so one strategy config serves every backbone. Parallelism
lives here and in Lightning's strategy, never in model files (torchtitan keeps `parallelize.py`
apart from `model.py` for the same reason).

FSDP2 (`torch.distributed.fsdp.fully_shard`) rather than Lightning's `FSDPStrategy` (FSDP1):
FSDP2 keeps every parameter a DTensor with its original name and shape (no flattening, so
`TaskModule`'s weight-decay groups, decided by name, stay exact), and it runs on CPU over gloo,
so the same code path that trains on GPUs is tested in CI (`FSDPStrategy` refuses CPUs).

Checkpoints: `save_distributed_checkpoint=True` writes a folder of shards (every rank writes its
own, fast and memory-flat); False gathers a full single-file checkpoint on rank 0. Both load on
any number of devices: `gptlab.loading.consolidate_checkpoint` turns a folder into the single-file
layout that `main.py test/predict` on one device, `load_from_checkpoint` and `init_from` read.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from gptlab._lightning import (
    METADATA_FILENAME,
    distributed_checkpoint_load,
    distributed_checkpoint_save,
    fill_auto_data_parallel_size,
    saves_sharded,
)
from gptlab.checkpointing import atomic_write, mark_complete, new_step_folder, point_to, remove_sharded
from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import is_sharded_checkpoint

__all__ = ["FSDP", "parallelize", "shard"]


class FSDP(ModelParallelStrategy):
    """Fully sharded data parallel over every process (FSDP2), wrapping the backbone's blocks.

    Parameters, gradients and optimizer states are sharded across all `devices x num_nodes`
    processes; each transformer block is all-gathered just before it runs and freed after.
    Works on GPUs (NCCL) and on CPUs (gloo), e.g. `--trainer.accelerator cpu --trainer.devices 2`.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        data_parallel_size: Literal["auto"] | int = "auto",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        hybrid_sharding: bool = False,
    ) -> None:
        """
        Args:
            activation_checkpointing: recompute each block's activations in the backward pass
                instead of storing them: about a third more compute for much less activation
                memory (lets a larger batch or model fit).
            reshard_after_forward: free each block's gathered weights after its forward and gather
                them again for backward (ZeRO-3, least memory); False keeps them until backward
                (ZeRO-2 like, one all-gather fewer per block and step).
            save_distributed_checkpoint: True writes checkpoints as a folder of per-rank shards
                (`last.ckpt/`, a link to a complete step folder, see `save_checkpoint`); False
                gathers one full `.ckpt` file on rank 0 (needs the whole model and optimizer
                state in rank 0's CPU memory).
            data_parallel_size: processes that shard the model; "auto" = all of them. Lower it
                only to combine with tensor parallelism in a custom strategy.
            process_group_backend: "nccl" / "gloo"; default: nccl on GPUs, gloo on CPUs.
            timeout: how long collectives wait for a slow rank before failing (a lost node is
                noticed at once when its connections close, after this when they just go silent).
            hybrid_sharding: HSDP: shard within each node and replicate across nodes (a
                `num_nodes x devices` mesh). Gradients cross the slower inter-node links once per
                step as an all-reduce of each node's shards, instead of every block's all-gathers
                and reduce-scatters; each device holds `1 / devices` of the model instead of
                `1 / (num_nodes x devices)`. Checkpoints are the same as with plain FSDP.
        """
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward
        self.hybrid_sharding = hybrid_sharding
        self.shard_mesh: Any = None  # the mesh fully_shard uses (set in setup_environment)

    def setup_environment(self) -> None:
        # Lightning's "auto" is one data-parallel group per node (meant for 2-D parallelism with
        # tensor parallel inside a node); plain FSDP shards over every process. Both sizes are known
        # here: the accelerator connector set the devices and nodes before launching.
        fill_auto_data_parallel_size(self, self.num_nodes * self.num_processes)
        super().setup_environment()
        self.shard_mesh = self.device_mesh["data_parallel"]
        if self.hybrid_sharding:
            from torch.distributed.device_mesh import init_device_mesh

            # Global rank = node * devices + local rank (every cluster environment numbers ranks
            # so): a row of the mesh is one node. fully_shard over a 2-D mesh is HSDP: replicate
            # over dim 0, shard over dim 1 (torch.distributed.fsdp.fully_shard docs).
            self.shard_mesh = init_device_mesh(
                self.root_device.type,
                (self.num_nodes, self.num_processes),
                mesh_dim_names=("replicate", "shard"),
            )

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Sharded: write a new step folder, mark it complete, then point `filepath` at it.

        Lightning's ModelParallelStrategy rewrites the shards of `last.ckpt/` in place, so a kill
        during a save leaves a folder that mixes two steps and still looks valid. Here every save
        goes to `<name>.step-<N>-<hex>/`; after all ranks wrote their shards (barrier) rank 0
        writes `COMPLETE` (atomically) and replaces the link `<name>` -> that folder in one rename,
        then removes the older step folders of `<name>`. `<name>` therefore always resolves to a
        complete checkpoint, and `--ckpt_path <run>/checkpoints/last.ckpt`, `is_sharded_checkpoint`
        and consolidation read it through the link like a folder (gptlab.checkpointing).
        """
        path = Path(self.broadcast(str(filepath)))
        if storage_options is not None or not saves_sharded(self):
            if self.is_global_zero and path.is_symlink():
                remove_sharded(path)  # Lightning would rmtree the link and fail
            self.barrier("gptlab_full_save")
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        step = int(checkpoint.get("global_step", 0))
        folder = new_step_folder(path, step, self.broadcast(secrets.token_hex(4)))
        folder.mkdir(parents=True, exist_ok=True)
        # The same split as ModelParallelStrategy.save_checkpoint: tensors through DCP (fsynced
        # by its FileSystemWriter), the rest into meta.pt by rank 0.
        converted = {"state_dict": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        distributed_checkpoint_save(converted, folder)
        if self.is_global_zero:
            atomic_write(folder / METADATA_FILENAME, lambda file: torch.save(checkpoint, file))
        self.barrier("gptlab_shards_written")
        if self.is_global_zero:
            mark_complete(folder, step, self.world_size)
            point_to(path, folder)
        self.barrier("gptlab_checkpoint_linked")

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's loading, except for the sharded checkpoint of a peft fine-tune.

        That folder holds the adapters and heads only (gptlab.adapters), while Lightning asks DCP
        for every tensor of the model and DCP refuses missing ones; here DCP reads exactly the
        saved part, and the frozen base keeps the weights it was set up with.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        path = Path(self.broadcast(str(checkpoint_path)))
        module = self.lightning_module
        if getattr(module, "peft_config", None) is None or not is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        full = get_model_state_dict(self.model)
        keep = set(module.saved_keys(full))
        state = {"state_dict": {k: v for k, v in full.items() if k in keep}}
        distributed_checkpoint_load(state, path)
        missing, unexpected = self.model.load_state_dict(state["state_dict"], strict=False)
        if unexpected or keep & set(missing):
            raise CheckpointError(f"sharded checkpoint {path} does not match the model's adapters and heads")
        for i, optimizer in enumerate(self.optimizers):
            optimizer_state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            distributed_checkpoint_load(optimizer_state, path)
            set_optimizer_state_dict(
                self.model,
                optimizer,
                optim_state_dict=optimizer_state[f"optimizer_{i}"],
                options=StateDictOptions(cpu_offload=True),
            )
        safe = True if weights_only is None else weights_only
        return torch.load(path / METADATA_FILENAME, map_location="cpu", weights_only=safe)

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero and Path(filepath).is_symlink():
            remove_sharded(Path(filepath))
            return
        super().remove_checkpoint(filepath)


def parallelize(task: nn.Module, strategy: Any) -> None:
    """Apply FSDP2 to `task` when `strategy` is a ModelParallelStrategy (ours or Lightning's).

    Called from `TaskModule.configure_model`, i.e. on every rank after the model is built and
    before the optimizer is created, so the optimizer sees the sharded parameters. Idempotent:
    Lightning calls the hook again for each `trainer.fit/validate/test` in one process.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(strategy, ModelParallelStrategy) or isinstance(task, FSDPModule):
        return
    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ConfigError(
            f"trainer.strategy: tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported by "
            f"gptlab's tasks (they shard with FSDP only): use gptlab.strategies.FSDP, or set "
            f"tensor_parallel_size: 1 and data_parallel_size to the number of processes"
        )
    shard(
        task,
        block_class=task.backbone.block_class,
        # gptlab's FSDP may shard over a 2-D (replicate, shard) mesh (HSDP); Lightning's strategy
        # shards over its data-parallel dimension.
        mesh=getattr(strategy, "shard_mesh", None) or mesh["data_parallel"],
        activation_checkpointing=getattr(strategy, "activation_checkpointing", False),
        reshard_after_forward=getattr(strategy, "reshard_after_forward", True),
    )


def shard(
    root: nn.Module,
    block_class: type[nn.Module],
    mesh: Any,
    activation_checkpointing: bool = False,
    reshard_after_forward: bool = True,
) -> int:
    """`fully_shard` every `block_class` instance in `root`, then `root` itself; return the block count.

    Each block becomes one FSDP unit (its parameters are gathered together, just in time); the
    root unit holds what is left (embeddings, final norm, tied head, task heads). Blocks are
    wrapped for activation checkpointing first, so the recomputation happens inside the unit.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    # Collect (parent, child name) first: replacing children while iterating modules() is unsafe.
    slots = [
        (parent, name)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, block_class)
    ]
    if not slots:
        raise ConfigError(
            f"FSDP: the backbone declares block_class={block_class.__name__} but no such module is in "
            f"{type(root).__name__}; fix the backbone's block_class"
        )
    for parent, name in slots:
        block = getattr(parent, name)
        if activation_checkpointing:
            # The wrapper adds "_checkpoint_wrapped_module." to parameter names; optimizer groups
            # strip it (gptlab.optim.canonical_name) and state dicts never contain it.
            block = checkpoint_wrapper(block)
            setattr(parent, name, block)
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root keeps FSDP2's default for roots: not resharded after forward, since its parameters
    # (embeddings, tied head) are needed again at the very start of backward.
    fully_shard(root, mesh=mesh)
    return len(slots)
