"""Optimizer parameter groups and the default learning-rate schedule.

Weight decay applies to matrices (linear and embedding weights) only, never to biases and norm
gains (GPT-2/nanoGPT practice). The groups are decided from parameter *names* recorded before any
strategy wraps the model: FSDP may flatten parameters to 1-D, which would make a "decay if
p.dim() >= 2" rule silently decay nothing (docs/design.md §8).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# Prefixes that wrappers (FSDP1, activation checkpointing, torch.compile) insert into parameter names.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """The parameter name as in the unwrapped model."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_decay_names(module: nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: everything with fewer than 2 dimensions."""
    return {canonical_name(n) for n, p in module.named_parameters() if p.dim() < 2}


def param_groups(
    module: nn.Module, no_decay: set[str], lr_scales: dict[str, float] | None = None
) -> list[dict]:
    """AdamW groups: decay / no decay, times one learning-rate scale per name prefix.

    The decay groups inherit the optimizer's configured weight_decay. `lr_scales` maps a parameter
    name prefix to a learning-rate multiplier (e.g. {"backbone.": 0.1} when fine-tuning: the
    pretrained body moves slower than the fresh head); such groups carry `"lr_scale"`, which
    `apply_lr_scales` multiplies into their lr once the optimizer has filled in its default.
    """
    scales = {prefix: s for prefix, s in (lr_scales or {}).items() if s != 1.0}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = canonical_name(name)
        scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
        groups.setdefault((scale, name in no_decay), []).append(param)
    result = []
    # Unscaled groups first, decay before no decay; one empty group when nothing trains (an
    # optimizer needs at least one).
    for scale, keep in sorted(groups, key=lambda k: (k[0] != 1.0, k[0], k[1])) or [(1.0, False)]:
        # Labels the group's learning rate in the logs (`train/lr/no_decay`, gptlab.callbacks.LearningRate).
        name = ("no_decay" if keep else "decay") + (f"_lr_x{scale:g}" if scale != 1.0 else "")
        group: dict = {"params": groups.get((scale, keep), []), "name": name}
        if keep:
            group["weight_decay"] = 0.0
        if scale != 1.0:
            group["lr_scale"] = scale
        result.append(group)
    return result


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Multiply each group's lr by its `lr_scale` (before a scheduler records the base lrs)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)


class WarmupCosine(LambdaLR):
    """Linear warmup, then cosine decay to `min_lr_ratio` x the base learning rate.

    The same curve as nanoGPT's `get_lr`: lr * (step + 1) / (warmup + 1) during warmup, then a
    half cosine from lr to min_lr over the remaining steps, constant min_lr afterwards. Stepped
    every optimizer step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 100,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ) -> None:
        """
        Args:
            optimizer: the optimizer whose learning rates are scheduled.
            warmup_steps: linear warmup length in optimizer steps.
            max_steps: step at which the cosine reaches its minimum; None takes the Trainer's total
                number of optimizer steps (filled in by the task before training starts).
            min_lr_ratio: final learning rate as a fraction of the peak one.
        """
        if warmup_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(
                f"WarmupCosine: need warmup_steps >= 0 and 0 <= min_lr_ratio <= 1, "
                f"got warmup_steps={warmup_steps}, min_lr_ratio={min_lr_ratio}"
            )
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_lr_ratio = min_lr_ratio
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.max_steps is None or step >= self.max_steps:
            return self.min_lr_ratio if self.max_steps is not None else 1.0
        progress = (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + cosine * (1.0 - self.min_lr_ratio)

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; our state is plain numbers.
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
