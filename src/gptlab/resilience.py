"""Keeping a run correct through preemption and numerical blow-ups (docs/design.md §6.2).

    every optimizer step ── Preemption: save last.ckpt every 30 minutes (and / or every N steps);
                          │             on SIGTERM / SIGUSR1 save it at the end of the step, then
                          │             exit REQUEUE_EXIT_CODE
                          └ NonFiniteLoss: a NaN / inf loss stops the run before it touches the
                                           weights (default), or every rank skips that step

Both are always on under gptlab's CLI (`--preemption.*`, `--nonfinite_loss.*`). Under DDP every
decision is reduced over the ranks first, so all ranks save the same step, skip the same step
and stop together.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from types import FrameType
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from gptlab._lightning import batch_progress_state, close_restarted_epoch, loop_position
from gptlab.errors import ConfigError, GPTLabError

# sysexits.h EX_TEMPFAIL, "a temporary failure; the user is invited to retry": the run saved its
# state and wants to be started again with the same command (and `--ckpt_path last`). Distinct
# from 0 (finished), 1 (a crash: a traceback) and 2 (a gptlab error: fix the input first), so a job
# script can requeue on exactly this code.
REQUEUE_EXIT_CODE = 75


class NonFiniteLossError(GPTLabError):
    """The training loss was NaN or infinite and the policy is to stop."""


class Preempted(SystemExit):
    """Raised on every rank after the preemption checkpoint is written; exits REQUEUE_EXIT_CODE."""


def _reduce_any(trainer: L.Trainer, device: torch.device, *flags: bool | torch.Tensor) -> list[bool]:
    """For each flag, whether it holds on any rank. One host sync; one collective with several ranks."""
    if trainer.world_size == 1:
        return [bool(flag) for flag in flags]
    value = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
    return (trainer.strategy.reduce(value, reduce_op="sum") > 0).tolist()


class Preemption(L.Callback):
    """Periodic `last.ckpt` and a graceful stop on SIGTERM / SIGUSR1 (preemption, SLURM time limit).

    - `<run>/checkpoints/last.ckpt` (the file `fit --ckpt_path last` resumes from) is written once
      `every_n_minutes` of training passed since the last save of any kind (default 30), and
      every `every_n_steps` optimizer steps if asked: whether or when the run validates, a crash
      or kill loses at most that much (a run that validates only at its end would otherwise save
      nothing before it);
    - a signal in `signals` only sets a flag; at the end of the optimizer step in progress
      (after the weights change, so within one step) every rank saves `last.ckpt` and the process
      exits with `exit_code`. Resuming from it continues exactly (same batches, dropout, LR).

    Lightning installs its own SIGTERM handler (and, under SLURMEnvironment with auto_requeue,
    a SIGUSR1 handler that saves `hpc_ckpt_*.ckpt` from inside the signal handler, mid-step, and
    calls `scontrol requeue`; lightning/pytorch/trainer/connectors/signal_connector.py). While
    training runs, this callback replaces both handlers for the signals it watches; Lightning
    restores the original handlers at teardown. Requeueing is the job script's business: see
    the README, "Resume and preemption".
    """

    # The clock of `every_n_minutes`: monotonic, so that a changed system time moves no save.
    _clock = staticmethod(time.monotonic)

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_minutes: float | None = 30.0,
        signals: list[str] | None = None,
        exit_code: int = REQUEUE_EXIT_CODE,
    ) -> None:
        """
        Args:
            every_n_steps: also save `last.ckpt` every N optimizer steps (None or 0: no
                step-based save).
            every_n_minutes: save `last.ckpt` at the end of the first step that ends this many
                minutes of training after the previous save (validation saves included); None or 0:
                no time-based save. Under DDP a save is due when it is due on any rank.
            signals: signal names that save and stop at the end of the current step; default
                ["SIGTERM", "SIGUSR1"] (what SLURM sends on preemption and with `--signal`).
                An empty list leaves the signal handlers to Lightning.
            exit_code: the process exit status after a signal-triggered save (default 75,
                EX_TEMPFAIL: "retry me"; 0 would look like a finished run).
        """
        problems = []
        if every_n_steps is not None and every_n_steps < 0:
            problems.append(f"preemption.every_n_steps={every_n_steps} must be >= 0 (0: no periodic save)")
        if every_n_minutes is not None and not every_n_minutes >= 0:  # NaN too
            problems.append(
                f"preemption.every_n_minutes={every_n_minutes} must be >= 0 (0: no time-based save)"
            )
        names = ["SIGTERM", "SIGUSR1"] if signals is None else list(signals)
        unknown = [n for n in names if not isinstance(getattr(signal, n, None), signal.Signals)]
        if unknown:
            problems.append(f"preemption.signals: unknown signal names {unknown}; use e.g. SIGTERM, SIGUSR1")
        # The kernel never lets a process handle these two (signal(7)): nothing could be saved.
        uncatchable = [n for n in names if n in ("SIGKILL", "SIGSTOP")]
        if uncatchable:
            problems.append(
                f"preemption.signals: {uncatchable} cannot be caught by any process, so no checkpoint "
                f"could be saved on them; use signals the scheduler sends first, e.g. SIGTERM, SIGUSR1"
            )
        if not 0 <= exit_code <= 255:
            problems.append(f"preemption.exit_code={exit_code} must be an exit status in 0..255")
        if problems:
            raise ConfigError("; ".join(problems))
        self.every_n_steps = every_n_steps or 0
        self.every_n_minutes = every_n_minutes or 0.0
        self.signals = [getattr(signal, n) for n in names]
        self.exit_code = exit_code
        self.received: int | None = None
        self._last_step = -1
        self._saved_step = -1
        self._saved_time = self._clock()  # of the last save, or of the start of training
        self._tokens_at_step: torch.Tensor | None = None  # the task's tokens_seen at the last step

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: saving here would interrupt the step at an arbitrary point.
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's own registration (Trainer._run registers before training starts).
        for signum in self.signals:
            signal.signal(signum, self._on_signal)
        position = loop_position(trainer)
        if position.restarted_mid_epoch and position.restarted_on_train_batch_end and position.is_last_batch:
            # Resumed from a save at an epoch's last batch (on_train_batch_end: ours, periodic or on a
            # signal): Lightning's `FitLoop.reset` has counted that epoch finished, but the loop stays
            # "restarted mid-epoch" until the next epoch is over, so `on_advance_start` neither
            # counts the next epoch as started nor calls `on_train_epoch_start`. Every save during
            # that epoch would then record it as not begun, and a run resumed from one of those
            # labels its batches one epoch lower (lightning/pytorch/loops/fit_loop.py, `reset` and
            # `on_advance_start`). The epoch is closed: the next one starts normally.
            close_restarted_epoch(trainer)
        self._last_step = trainer.global_step
        self._saved_time = self._clock()
        self._tokens_at_step = self._tokens_seen(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating: the optimizer has not stepped yet
            return
        self._last_step = step
        if trainer.accumulate_grad_batches > 1:  # only a save between micro-batches needs it
            self._tokens_at_step = self._tokens_seen(pl_module)
        # Every rank takes part in the reduction at every step, so all see the same answer (each
        # rank's clock is its own: a save is due when it is due on any of them).
        late = self.every_n_minutes > 0 and self._clock() - self._saved_time >= 60 * self.every_n_minutes
        stop, late = _reduce_any(trainer, pl_module.device, self.received is not None, late)
        periodic = late or (self.every_n_steps > 0 and step % self.every_n_steps == 0)
        if not (stop or periodic):
            return
        path = self.save_last(trainer)
        if stop:
            name = (
                signal.Signals(self.received).name if self.received is not None else "another rank's signal"
            )
            rank_zero_info(
                f"gptlab: {name}: saved {path} at step {step}; exiting {self.exit_code} to be requeued"
            )
            raise Preempted(self.exit_code)
        if late:  # rare (every_n_minutes), and a batch job's log should show that it is safe
            rank_zero_info(f"gptlab: saved {path} at step {step} (preemption.every_n_minutes)")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._saved_step = trainer.global_step
        self._saved_time = self._clock()
        progress = batch_progress_state(checkpoint)
        if progress is None:  # a weights-only checkpoint: no loop state to put right
            return
        position = loop_position(trainer)
        if (
            position.is_last_batch
            and position.batches_completed == position.batches_ready
            and not position.epoch_started
        ):
            # Saved after an epoch's last batch and after the fit loop counted that epoch as
            # finished, before the next one started: the state of a run that stopped at max_steps
            # exactly at an epoch's end (saved by on_train_end hooks, ours and ModelCheckpoint's).
            # The epoch loop still holds the finished epoch's batch counts; Lightning resumes them
            # into the next epoch, ends that epoch after one batch, and from then on its epoch
            # ends (accumulation flush, epoch-end validation and schedulers, current_epoch) are
            # one batch early (lightning/pytorch/loops/training_epoch_loop.py `reset`,
            # `on_run_start`). The next epoch has not started: record it so.
            progress["current"] = {key: 0 for key in progress["current"]}
            progress["is_last_batch"] = False
        partial = 0 if position.is_last_batch else position.batches_ready % trainer.accumulate_grad_batches
        datamodule = trainer.datamodule
        state = checkpoint.get(type(datamodule).__qualname__) if datamodule is not None else None
        if partial and isinstance(state, dict) and "train_batches_consumed" in state:
            # Saved between two micro-batches of an accumulated step (the checkpoint callback
            # saves after a validation, which Lightning runs every `val_check_interval` batches,
            # not steps). The gradients accumulated so far are not in checkpoints: record the
            # position at the last optimizer step instead, so that a resumed run trains those
            # micro-batches again (same batches, same dropout seeds) and steps where an
            # uninterrupted run steps. The counters move back together, so Lightning sees the
            # same kind of save, `partial` batches earlier.
            for counts in (progress["current"], progress["total"]):
                for key in counts:
                    counts[key] -= partial
            state["train_batches_consumed"] -= partial
            # The task's token counter (gptlab.tasks.base) counted them too.
            weights = checkpoint.get("state_dict", {})
            if self._tokens_at_step is not None and "tokens_seen" in weights:
                weights["tokens_seen"] = self._tokens_at_step.clone()

    @staticmethod
    def _tokens_seen(pl_module: L.LightningModule) -> torch.Tensor | None:
        tokens = getattr(pl_module, "tokens_seen", None)
        # A copy on the device: `.cpu()` here would wait for the GPU at every optimizer step.
        return tokens.detach().clone() if isinstance(tokens, torch.Tensor) else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The checkpoint callback saves last.ckpt after validations (and at epoch ends without
        # validation), so a run that stops at max_steps between two of them would leave a
        # last.ckpt from before its final steps: save the final state unless it is saved already.
        if self._saved_step != trainer.global_step:
            self.save_last(trainer)

    def save_last(self, trainer: L.Trainer) -> Path:
        """Write `last.ckpt` (every rank calls this); return its path."""
        path = self.last_checkpoint_path(trainer)
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last:
            # Claim the file for the checkpoint callback, before the save so that the checkpoint
            # records it too: a ModelCheckpoint finding a last.ckpt it did not write itself takes
            # it for another run's and writes last-v1.ckpt instead (`enable_version_counter`), which
            # `--ckpt_path last` would never see (lightning/pytorch/callbacks/model_checkpoint.py,
            # `_save_last_checkpoint`).
            callback.last_model_path = str(path)
        # A full checkpoint (optimizer, loops, callbacks) to resume from; said explicitly, since
        # Lightning logs "`weights_only` was not set" when it is left to its default.
        trainer.save_checkpoint(path, weights_only=False)
        return path

    @staticmethod
    def last_checkpoint_path(trainer: L.Trainer) -> Path:
        """`<run>/checkpoints/last.ckpt`, where the `checkpoint.*` callback keeps it too."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None)
        # log_dir is broadcast from rank 0 under DDP: every rank calls this.
        base = (
            Path(directory)
            if directory
            else Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        )
        name = getattr(callback, "CHECKPOINT_NAME_LAST", "last") + getattr(
            callback, "FILE_EXTENSION", ".ckpt"
        )
        return base / name


class NonFiniteLoss(L.Callback):
    """Detects a NaN / infinite training loss at the step it happens, on every rank.

    `policy: stop` (default) raises `NonFiniteLossError` before that loss is back-propagated:
    the weights and every checkpoint on disk are those of the last good step, and the CLI exits 2
    naming the step. `policy: skip` lets every rank skip that optimizer step (gradients dropped,
    weights and optimizer moments unchanged; the step counter and LR schedule move on), counted
    and warned; `max_skips` bounds how many before stopping anyway.

    Cost: one `isfinite` and one host sync per micro-batch (plus a one-number all-reduce under
    DDP), the price of knowing at the step (README, "Resume and preemption").
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop", max_skips: int | None = None) -> None:
        """
        Args:
            policy: "stop" the run at a non-finite loss, or "skip" that optimizer step on every rank.
            max_skips: with "skip", stop once more than this many steps were skipped (None: never).
        """
        self.policy = policy
        self.max_skips = max_skips
        self.skipped = 0
        self._skip_this_step = False

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        (bad,) = _reduce_any(trainer, loss.device, ~torch.isfinite(loss.detach()))
        if not bad:
            return
        # global_step counts completed optimizer steps: this is step global_step + 1.
        step = trainer.global_step + 1
        where = f"step {step} (epoch {trainer.current_epoch})"
        if self.policy == "stop" or (self.max_skips is not None and self.skipped >= self.max_skips):
            why = "" if self.policy == "stop" else f" after {self.skipped} skipped steps (max_skips)"
            raise NonFiniteLossError(
                f"the training loss is not finite at {where}{why}; stopped before it changed any weight, "
                f"the run's checkpoints are from earlier steps. Lower the learning rate, enable "
                f"trainer.gradient_clip_val, check the data, or "
                + (
                    "set --nonfinite_loss.policy skip"
                    if self.policy == "stop"
                    else f"raise --nonfinite_loss.max_skips (now {self.max_skips})"
                )
            )
        if not self._skip_this_step:
            self.skipped += 1
            rank_zero_warn(
                f"gptlab: non-finite training loss at {where}: skipping this step ({self.skipped} so far)"
            )
        self._skip_this_step = True

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if not self._skip_this_step:
            return
        self._skip_this_step = False
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            # fp16 loss scaling: the scaler finds the non-finite gradients and skips the step itself
            # (torch.amp.GradScaler.step); an optimizer with no gradients would trip its inf check.
            return
        # Parameters without a gradient are left alone by every torch optimizer: no update, no
        # change to the moments or the per-parameter step count.
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
