"""Every use of Lightning's private API in gptlab, in one place.

Names with a leading underscore and the loops' internal counters can change in any Lightning
release without notice. gptlab touches them only here: private names are imported through
`_private` (a missing one stops with one line naming it), private attributes are read and written
by the small functions below, and the private methods that gptlab's subclasses override are
listed in `OVERRIDDEN`. tests/test_lightning_private.py checks each use on the installed
Lightning; pyproject.toml pins Lightning to the versions where those tests pass.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import lightning
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy


def _private(module: str, name: str) -> Any:
    """`module.name`, or an ImportError that says which private name this Lightning lacks."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise ImportError(
            f"gptlab uses {module}.{name}, which lightning {lightning.__version__} does not have: "
            f"install a lightning version within the range in gptlab's pyproject.toml"
        ) from None


# (module, name) of every private Lightning name gptlab imports; the test checks each.
NAMES = (
    ("lightning.fabric.utilities.load", "_METADATA_FILENAME"),
    ("lightning.fabric.utilities.load", "_load_distributed_checkpoint"),
    ("lightning.fabric.strategies.fsdp", "_distributed_checkpoint_load"),
    ("lightning.fabric.strategies.fsdp", "_distributed_checkpoint_save"),
    ("lightning.pytorch.plugins.io.wrapper", "_WrappingCheckpointIO"),
    ("lightning.pytorch.core.mixins.hparams_mixin", "_given_hyperparameters"),
)
# The file inside a sharded checkpoint folder that Lightning writes last ("meta.pt").
METADATA_FILENAME: str = _private(*NAMES[0])
# A sharded folder consolidated into one checkpoint dict (torch.distributed.checkpoint).
load_distributed_checkpoint = _private(*NAMES[1])
# Lightning's DCP save / in-place load of a state dict (used by gptlab.strategies).
distributed_checkpoint_load = _private(*NAMES[2])
distributed_checkpoint_save = _private(*NAMES[3])
# The base of CheckpointIO wrappers such as AsyncCheckpointIO.
WrappingCheckpointIO: type = _private(*NAMES[4])
# A ContextVar LightningCLI sets to the parsed init arguments while it instantiates a module.
given_hyperparameters = _private(*NAMES[5])


# Private methods that gptlab's subclasses override or call: (Lightning class, method, its
# parameters). Overriding a method that was renamed would silently do nothing.
OVERRIDDEN: tuple[tuple[type, str, tuple[str, ...]], ...] = (
    (LightningCLI, "_add_subcommands", ("self", "parser", "kwargs")),
    (LightningCLI, "_parse_ckpt_path", ("self",)),
    (LightningCLI, "_run_subcommand", ("self", "subcommand")),
    (RichProgressBar, "_update_metrics", ("self", "trainer", "pl_module")),
    (ModelCheckpoint, "_save_checkpoint", ("self", "trainer", "filepath")),
    (
        LearningRateMonitor,
        "_find_names_from_optimizers",
        ("self", "optimizers", "seen_optimizers", "seen_optimizer_types"),
    ),
)


# --------------------------------------------------------------------------- private attributes
def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's trainer, or None when it has none (`module.trainer` raises then)."""
    return module._trainer


def add_subcommand(parser: LightningArgumentParser, name: str, subparser: Any, help: str) -> None:
    """Register one more subcommand on LightningCLI's top-level parser (listed by `--help`)."""
    parser._subcommands_action.add_subcommand(name, subparser, help=help)


def subcommand_parser(cli: LightningCLI, subcommand: str) -> LightningArgumentParser:
    """The parser LightningCLI built for `subcommand` (it dumps that subcommand's config)."""
    return cli._subcommand_parsers[subcommand]


def should_update_logs(trainer: Trainer) -> bool:
    """Whether this training batch's metrics get logged (`log_every_n_steps`)."""
    return trainer._logger_connector.should_update_logs


def progress_bar_settings(bar: RichProgressBar) -> tuple[int, bool, Any, dict[str, Any]]:
    """(refresh_rate, leave, theme, console_kwargs): what a RichProgressBar was built with."""
    return bar.refresh_rate, bar._leave, bar.theme, bar._console_kwargs


def save_final_checkpoint(callback: ModelCheckpoint, trainer: Trainer) -> None:
    """Make `callback` save as it does without a monitored metric (its `last`/top-k names)."""
    callback._save_none_monitor_checkpoint(trainer, callback._monitor_candidates(trainer))


def configured_checkpoint_io(strategy: Strategy) -> CheckpointIO | None:
    """The CheckpointIO a config gave, or None (the public property creates a default one)."""
    return strategy._checkpoint_io


def set_wrapped_checkpoint_io(wrapper: Any, io: CheckpointIO) -> None:
    """Put `io` under a CheckpointIO wrapper (e.g. AsyncCheckpointIO) as if it had been configured."""
    wrapper._checkpoint_io = io
    wrapper._base_checkpoint_io_configured = True


def saves_sharded(strategy: ModelParallelStrategy) -> bool:
    """A ModelParallelStrategy's `save_distributed_checkpoint` setting."""
    return strategy._save_distributed_checkpoint


def fill_auto_data_parallel_size(strategy: ModelParallelStrategy, size: int) -> None:
    """Replace a ModelParallelStrategy's `data_parallel_size="auto"` by `size` (before its setup)."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = size


# --------------------------------------------------------------------------- loop counters
# Where a checkpoint keeps the training epoch loop's batch counters.
def batch_progress_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's saved batch progress of the fit loop (None in a weights-only checkpoint)."""
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")


@dataclass(frozen=True)
class LoopPosition:
    """Where the fit loop stands, read from its progress counters."""

    restarted_mid_epoch: bool
    """The loop resumed from a checkpoint saved inside an epoch."""
    restarted_on_train_batch_end: bool
    """... saved by an `on_train_batch_end` hook."""
    is_last_batch: bool
    """The batch just run (or restored) is the epoch's last."""
    batches_ready: int
    """Batches fetched in the current epoch."""
    batches_completed: int
    """Batches finished in the current epoch."""
    epoch_started: bool
    """The current epoch has started and not finished."""


def loop_position(trainer: Trainer) -> LoopPosition:
    """The fit loop's position (lightning/pytorch/loops/fit_loop.py, training_epoch_loop.py)."""
    loop = trainer.fit_loop
    batches, epochs = loop.epoch_loop.batch_progress, loop.epoch_progress.current
    return LoopPosition(
        restarted_mid_epoch=bool(loop.restarted_mid_epoch),
        restarted_on_train_batch_end=bool(loop.epoch_loop.restarted_on_train_batch_end),
        is_last_batch=bool(batches.is_last_batch),
        batches_ready=batches.current.ready,
        batches_completed=batches.current.completed,
        epoch_started=epochs.completed != epochs.started,
    )


def close_restarted_epoch(trainer: Trainer) -> None:
    """Let the fit loop treat its restored epoch as over: the next one starts normally."""
    trainer.fit_loop.reset_restart_stage()
