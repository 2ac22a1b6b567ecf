"""Callbacks that any task can use: sample generation, throughput and MFU, torch.compile, checkpoints."""

from __future__ import annotations

import errno
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FSDPModule

from gptlab._lightning import progress_bar_settings, save_final_checkpoint, should_update_logs
from gptlab.checkpointing import repoint_checkpoint_state
from gptlab.decoding import generate
from gptlab.errors import CheckpointError, ConfigError


class SampleGeneration(L.Callback):
    """After each validation, continue a few prompts and log them (TensorBoard text + console).

    A cheap qualitative check that pretraining learns language, next to the loss curve.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_k: int | None = 50,
        seed: int = 0,
    ) -> None:
        """
        Args:
            prompts: texts to continue; default one prompt, the end-of-text token (unconditional).
            max_new_tokens: tokens generated per prompt.
            temperature: sampling temperature (0 = greedy).
            top_k: sample among the k most likely tokens (None = all).
            seed: sampling seed, so samples from successive validations are comparable.
        """
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.seed = seed
        self.samples: list[tuple[str, str]] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tokenizer = getattr(pl_module, "tokenizer", None)
        # A sharded model (FSDP) gathers each block's weights from every rank at every forward:
        # all ranks must then generate together (same seed, same tokens, same number of steps),
        # or rank 0 waits forever for the others. Otherwise rank 0 generates alone.
        sharded = isinstance(pl_module, FSDPModule)
        if trainer.sanity_checking or tokenizer is None or not (trainer.is_global_zero or sharded):
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        self.samples = []
        if sharded:
            # The root unit (embeddings, final norm, tied head) is gathered by the task's forward
            # hook; generation calls the backbone directly, so gather it explicitly.
            pl_module.unshard()
        try:
            for prompt in self.prompts or [tokenizer.eos_token]:
                ids = tokenizer(prompt)["input_ids"] or [tokenizer.eos_token_id]
                new = generate(
                    pl_module.backbone,
                    ids,
                    self.max_new_tokens,
                    self.temperature,
                    self.top_k,
                    eos_token_id=None,
                    generator=generator,
                )
                self.samples.append((prompt, tokenizer.decode(new)))
        finally:
            if sharded:
                pl_module.reshard()
        if not trainer.is_global_zero:
            return
        text = "\n\n".join(f"[{p!r}] {c}" for p, c in self.samples)
        rank_zero_info(f"\nSamples at step {trainer.global_step}:\n{text}\n")
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                # Markdown code block keeps the newlines and indentation of the samples.
                logger.experiment.add_text("samples", f"```\n{text}\n```", trainer.global_step)


# ----------------------------------------------------------------------------- throughput and MFU
# Dense (no sparsity) peak FLOP/s of one device from the vendors' datasheets, by the dtype the
# matmuls run in. Matched against torch.cuda.get_device_name() in order (first substring wins).
# Lightning's own table (used as a fallback) lists some chips with their 2:4-sparsity figures,
# which would halve every MFU.
GPU_PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("h200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("h100 pcie", {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51.2e12}),
    ("h100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494.7e12, "fp32": 66.9e12}),
    ("a100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("l40s", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("l4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("rtx 4090", {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("v100", {"fp16": 125e12, "fp32": 15.7e12}),
]


def compute_dtype(precision: str, device: torch.device) -> str:
    """The dtype matmuls run in under a Trainer `precision` flag: "bf16", "fp16", "tf32" or "fp32"."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    tf32 = device.type == "cuda" and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "fp32"


def measure_matmul_flops(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    seconds: float = 0.3,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Best FLOP/s of a square `size` x `size` matmul on `device`, timed for about `seconds`.

    The best single product rather than the mean: on a shared machine other processes only ever
    slow a measurement down, so the fastest one is the closest to what the hardware can do.
    `clock=time.process_time` gives FLOPs per CPU-second instead (per busy core, on a CPU).
    """
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):  # warm up kernels, thread pools and caches
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        a @ b
        sync()
        elapsed = clock() - start
        if elapsed > 0:
            best = max(best, 2 * size**3 / elapsed)
    return best


def peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one `device` for matmuls in `dtype` ("bf16", "fp16", "tf32", "fp32").

    CUDA: the datasheet figure of a known GPU (GPU_PEAK_FLOPS, then Lightning's table); None if
    unknown. CPU: measured now (`measure_matmul_flops`) in fp32; lower precisions have no
    meaningful datasheet peak on CPUs, so their MFU is also reported against the fp32 peak.
    """
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, table in GPU_PEAK_FLOPS:
            if key in name:
                return table.get(dtype)
        from lightning.fabric.utilities.throughput import get_available_flops

        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        return get_available_flops(device, torch_dtype)
    if device.type == "cpu":
        return measure_matmul_flops(device, torch.float32)
    return None


class Throughput(L.Callback):
    """Logs training throughput and model FLOPs utilisation, for any task on any backbone.

    Every `log_every_n_steps` optimizer steps (the Trainer's setting), to the loggers and the
    progress bar, for the whole job (all ranks together):

    - `train/tokens_per_sec`: token positions processed per second (B x T per batch, T as the
      task feeds it to the backbone, `TaskModule.positions_fed`; padding included, since the
      hardware computes it; `train/tokens` counts real tokens);
    - `train/samples_per_sec`: sequences per second;
    - `train/mfu`: model FLOPs per second over the peak of all devices, with model FLOPs per
      token from `backbone.num_flops_per_token(T)` (6 N + attention, PaLM appendix B).

    Time runs from one training batch to the next, data loading included; validation and
    checkpoint saving are left out. Nothing here waits for the device: timestamps are taken on
    the host and token counts come from tensor shapes, so no host-device sync is added to the
    training loop. On an asynchronous device the figure is exact over windows that contain a
    sync (the loss logging that Lightning already does); the longer the window, the closer.
    """

    def __init__(self, peak_flops: float | None = None, prog_bar: bool = True) -> None:
        """
        Args:
            peak_flops: peak FLOP/s of ONE device for MFU. None: the datasheet value of common
                GPUs for the run's precision (H100/H200, A100, L4, L40S, RTX 4090, V100...), or on
                CPU an fp32 matmul peak measured when training starts. 0 disables MFU.
            prog_bar: also show tokens/s and MFU in the progress bar.
        """
        if peak_flops is not None and peak_flops < 0:
            raise ValueError(f"Throughput: peak_flops={peak_flops} must be >= 0 (0 disables MFU)")
        self.peak_flops = peak_flops
        self.prog_bar = prog_bar
        self.device_peak: float | None = None
        self._flops_per_token: dict[int, int] = {}
        self._logged_step = 0
        self._reset_window()
        self.last: dict[str, float] = {}

    def _reset_window(self) -> None:
        self._start: float | None = None  # host time the current window began
        self._tokens = 0
        self._samples = 0
        self._flops = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        parameters = getattr(pl_module.backbone, "parameters", None)
        if parameters is not None and any(not p.requires_grad for p in parameters()):
            # 6 N FLOPs per token count the weight gradients of every weight; a frozen backbone
            # (peft adapters, freeze_backbone) skips most of them, so that MFU would be overstated.
            self.device_peak = None
            if self.peak_flops != 0:
                rank_zero_info(
                    "Throughput: train/mfu is not logged for this fit: its FLOP count (6 N per token) "
                    "assumes every backbone weight trains, and some are frozen (peft, freeze_backbone)"
                )
        elif self.peak_flops is not None:
            self.device_peak = self.peak_flops or None
        else:
            dtype = compute_dtype(trainer.precision, device)
            self.device_peak = peak_flops(device, dtype)
            if self.device_peak is None:
                rank_zero_warn(
                    f"Throughput: no peak FLOP/s known for {device} in {dtype}; set "
                    f"throughput.peak_flops to log train/mfu"
                )
            elif device.type == "cpu":
                rank_zero_info(f"Throughput: measured fp32 matmul peak {self.device_peak / 1e9:.1f} GFLOP/s")
        self._reset_window()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._start is None:
            # The first batch of a window (fit start, after validation, after a checkpoint): its
            # loading time is unknown, so the window starts once it is in hand.
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is None:
            return
        samples, seq_len = batch["input_ids"].shape  # host-side shape: no device sync
        seq_len = pl_module.positions_fed(seq_len)
        if seq_len not in self._flops_per_token:
            self._flops_per_token[seq_len] = pl_module.backbone.num_flops_per_token(seq_len)
        self._samples += samples
        self._tokens += samples * seq_len
        self._flops += samples * seq_len * self._flops_per_token[seq_len]
        step = trainer.global_step
        # Optimizer steps, as Lightning logs; with gradient accumulation several batches share one.
        if trainer.log_every_n_steps <= 0 or step % trainer.log_every_n_steps or step == self._logged_step:
            return
        self._logged_step = step
        now = time.perf_counter()
        elapsed = now - self._start
        world = trainer.world_size
        # Every rank processes the same shapes (data parallel), so the job's rate is world x ours.
        metrics = {
            "train/tokens_per_sec": world * self._tokens / elapsed,
            "train/samples_per_sec": world * self._samples / elapsed,
        }
        if self.device_peak:
            metrics["train/mfu"] = self._flops / elapsed / self.device_peak
        self.last = metrics
        for name, value in metrics.items():
            # Python floats, logged at Lightning's logging steps only (on_step, never reduced).
            pl_module.log(
                name,
                value,
                on_step=True,
                on_epoch=False,
                prog_bar=self.prog_bar and name != "train/samples_per_sec",
                batch_size=samples,
            )
        self._reset_window()
        self._start = now  # the next window starts where this one ended: no gap, no overlap

    def on_validation_start(self, trainer, pl_module) -> None:
        # Validation time is not training time: close the window without logging it.
        self._reset_window()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._reset_window()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last:
            text = ", ".join(
                f"{k.split('/')[-1]} {v:.1%}" if k.endswith("mfu") else f"{k.split('/')[-1]} {v:,.0f}"
                for k, v in self.last.items()
            )
            rank_zero_info(f"Throughput (last window): {text}")


# ----------------------------------------------------------------------------- torch.compile
class Compile(L.Callback):
    """`torch.compile` every transformer block of the backbone, in place, before training starts.

    Regional compilation: the backbone's `block_class` instances are compiled one by one (all
    share one compiled graph), which compiles in seconds rather than minutes and composes with
    FSDP (blocks are compiled first, then sharded, as torchtitan does). In place (`module.compile`)
    so parameter and state-dict names do not change: checkpoints load with or without compile.
    """

    def __init__(
        self,
        mode: str | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = None,
        backend: str = "inductor",
    ) -> None:
        """
        Args:
            mode: torch.compile mode: None (default), "reduce-overhead" (CUDA graphs),
                "max-autotune" (slow to compile, tunes matmul kernels).
            fullgraph: fail on graph breaks instead of falling back to eager for those parts.
            dynamic: compile for varying sequence lengths (None: decide after a recompile).
            backend: torch.compile backend; "eager" only traces (to debug compile problems).
        """
        self.mode = mode
        self.fullgraph = fullgraph
        self.dynamic = dynamic
        self.backend = backend
        self.compiled = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Callback.setup runs before the strategy wraps the model (configure_model), i.e. before
        # FSDP shards the blocks: compile first, then shard.
        block_class = pl_module.backbone.block_class
        for module in pl_module.backbone.modules():
            if isinstance(module, block_class) and getattr(module, "_compiled_call_impl", None) is None:
                module.compile(
                    mode=self.mode, fullgraph=self.fullgraph, dynamic=self.dynamic, backend=self.backend
                )
                self.compiled += 1


# errno values meaning "no room to write": a full disk, a full quota, a file-size limit (ulimit -f).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ----------------------------------------------------------------------------- progress bar
class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tips at start ("💡 Tip: ... litlogger", "... litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Install `_QuietLightning` on the logger that emits the tips (once per process)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _QuietLightning) for f in logger.filters):
        logger.addFilter(_QuietLightning())


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, whose numbers are refreshed when they change, not every batch.

    What the bar shows beside the batch counter (train/loss, tokens/s, MFU, ...) is logged every
    `trainer.log_every_n_steps` steps; Lightning's bar recollects all of it from the logger
    connector after every batch, a visible share of a small model's step (benchmarks/train_throughput.py).
    Here the counter moves every batch and the numbers at logging steps and epoch ends.
    gptlab's CLI uses it in place of Lightning's default `RichProgressBar` (with its settings).
    """

    _skip_metrics = False

    @classmethod
    def like(cls, bar: RichProgressBar) -> ProgressBar:
        """This bar with the settings of `bar` (Lightning's default, or one a config chose)."""
        return cls(*progress_bar_settings(bar))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # The same test Lightning's logger connector applies right after this hook.
        self._skip_metrics = not (should_update_logs(trainer) or trainer.fast_dev_run)
        try:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        finally:
            self._skip_metrics = False

    def _update_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._skip_metrics:
            super()._update_metrics(trainer, pl_module)


def _clock(seconds: float) -> str:
    """`seconds` as H:MM:SS (hours unbounded), the form nanoGPT-style logs and `time` use."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class ProgressLog(L.Callback):
    """Plain progress lines for a log file: what a batch job, `nohup` or `> run.log` shows.

    Lightning's rich bar redraws one terminal line in place; written to a file it shows nothing
    until the end. Where there is no terminal to draw on, this callback prints (rank 0, to
    stderr like Lightning's own messages) one line at a steady cadence, every `every_n_steps`
    optimizer steps or every `every_n_seconds`, whichever comes later:

        step 120/400 (30%) | loss 2.3456 | 14,203 tok/s | elapsed 0:12:34 | ETA 0:29:20

    and after each validation one line with its metrics, `validation at step 120: val/loss=...`.
    `loss` is the mean training loss over the steps since the previous line (rank 0's batches);
    tokens/s counts the positions fed to the model by all ranks over that interval, everything
    included (validations, saves), which is also the rate the ETA assumes. gptlab's CLI always
    adds it (`progress.*`).
    """

    def __init__(
        self,
        every_n_steps: int = 10,
        every_n_seconds: float = 30.0,
        when: Literal["auto", "always", "never"] = "auto",
    ) -> None:
        """
        Args:
            every_n_steps: at least this many optimizer steps between two lines.
            every_n_seconds: at least this many seconds between two lines (a fast run would
                otherwise print thousands of lines).
            when: "auto" prints lines when stdout or stderr is not a terminal, or no progress bar
                is shown; "always" prints them beside the bar too; "never" turns them off.
        """
        problems = []
        if every_n_steps < 1:
            problems.append(f"progress.every_n_steps={every_n_steps} must be >= 1")
        if every_n_seconds < 0:
            problems.append(f"progress.every_n_seconds={every_n_seconds} must be >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.when = when
        self.active = False

    def _wanted(self, trainer: L.Trainer) -> bool:
        if self.when != "auto":
            return self.when == "always"
        terminal = all(stream is not None and stream.isatty() for stream in (sys.stdout, sys.stderr))
        return not (terminal and trainer.progress_bar_callback is not None)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.active = trainer.is_global_zero and self._wanted(trainer)
        # A resumed run starts its clock and counts here: rates and the ETA are this process's.
        self._start = self._last_time = time.monotonic()
        self._first_step = self._last_step = trainer.global_step
        self._tokens = 0
        self._loss_sum: torch.Tensor | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not self.active:
            return
        seq_len = pl_module.positions_fed(batch["input_ids"].shape[1])  # host-side shape: no sync
        self._tokens += batch["input_ids"].shape[0] * seq_len * trainer.world_size
        loss = outputs.get("loss") if isinstance(outputs, dict) else None
        if isinstance(loss, torch.Tensor):
            # Lightning divides each micro-batch's loss by accumulate_grad_batches: the sum over a
            # step is the step's mean. Added on the device, read only when a line is printed.
            loss = loss.detach().float()
            self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        step, now = trainer.global_step, time.monotonic()
        if step - self._last_step >= self.every_n_steps and now - self._last_time >= self.every_n_seconds:
            self._print_line(trainer, step, now)

    def _print_line(self, trainer: L.Trainer, step: int, now: float) -> None:
        total = trainer.estimated_stepping_batches  # max_steps, or what max_epochs amounts to
        known = isinstance(total, int) or math.isfinite(total)
        parts = [f"step {step}/{int(total)} ({step / total:.0%})" if known and total else f"step {step}"]
        if self._loss_sum is not None:
            parts.append(f"loss {self._loss_sum.item() / (step - self._last_step):.4f}")
        parts.append(f"{self._tokens / max(now - self._last_time, 1e-9):,.0f} tok/s")
        elapsed = now - self._start
        parts.append(f"elapsed {_clock(elapsed)}")
        if known and step > self._first_step:
            parts.append(f"ETA {_clock(elapsed / (step - self._first_step) * max(total - step, 0))}")
        rank_zero_info(" | ".join(parts))
        self._last_time, self._last_step = now, step
        self._tokens, self._loss_sum = 0, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.active or trainer.sanity_checking:  # the task prints the validation at step 0
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            text = ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items()))
            rank_zero_info(f"validation at step {trainer.global_step}: {text}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last steps since the previous line, so that a finished log ends at its final step.
        if self.active and trainer.global_step > self._last_step:
            self._print_line(trainer, trainer.global_step, time.monotonic())


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (`checkpoint.*` in the CLI) that reports a full disk as one line.

    Saving into a full filesystem raises a bare OSError from deep inside torch.save, often with no
    file name. Here it becomes a CheckpointError naming the checkpoint and its directory; the
    checkpoints saved before stay as they were (the save writes a new file and only then replaces
    the old one, see the trainer's CheckpointIO).
    """

    @property
    def state_key(self) -> str:
        # Lightning formats it for every callback hook it calls (its profiler's action name), and
        # ModelCheckpoint builds it from its settings each time: several times per step. The
        # settings it depends on are fixed once the callback is constructed.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = super().state_key
        return key

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The validation at step 0 logs every validation metric of the run: a monitored one that
        # is not among them would only fail at the first validation after training, with every
        # step before it lost. (Training metrics appear later and are not checked here.)
        monitor = self.monitor
        if (
            monitor is None
            or getattr(self, "_without_validation", False)  # announced in `setup`; best.ckpt at the end
            or not monitor.startswith(("val/", "test/"))
            or monitor in trainer.callback_metrics
        ):
            return
        logged = sorted(k for k in trainer.callback_metrics if k.startswith("val/"))
        raise ConfigError(
            f"checkpoint.monitor={monitor!r} is never logged by this run (its validation logs "
            f"{', '.join(logged) or 'nothing'}); set --checkpoint.monitor to one of those (with "
            f"--checkpoint.mode max for accuracy-like metrics)"
        )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # The data module's setup ran before this hook: whether there is validation is known.
        data = trainer.datamodule
        self._without_validation = (
            stage == "fit"
            and self.monitor is not None
            and self.save_top_k != 0
            and (trainer.limit_val_batches == 0 or getattr(data, "val_dataset", True) is None)
        )
        if self._without_validation:
            rank_zero_warn(
                f"gptlab: this run has no validation data (no val_files, no validation split, "
                f"val_fraction=0): nothing computes checkpoint.monitor={self.monitor!r}, so "
                f"{self.filename or 'best'}.ckpt is written at the end of training with the final "
                f"weights, like last.ckpt; give data.init_args.val_files or a val_fraction > 0 to "
                f"select by validation"
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if getattr(self, "_without_validation", False):
            # The README's next commands read best.ckpt: without a monitored metric it is the
            # final state (Lightning would write none at all).
            save_final_checkpoint(self, trainer)

    def load_state_dict(self, state_dict: dict) -> None:
        # A resume of the run's own files under another spelling of its folder (relative vs
        # absolute, moved, copied) continues last.ckpt / best.ckpt instead of writing -v1 files.
        super().load_state_dict(repoint_checkpoint_state(state_dict, self.dirpath))

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        try:
            super()._save_checkpoint(trainer, filepath)
        except OSError as err:
            if err.errno not in _NO_ROOM:
                raise
            raise CheckpointError(
                f"disk full while writing checkpoint {filepath} ({err.strerror}); the checkpoints saved "
                f"before are unchanged: free space in {Path(filepath).parent} (or set --logs_root to another "
                f"disk) and resume with --ckpt_path last"
            ) from None


class LearningRate(LearningRateMonitor):
    """Lightning's ``LearningRateMonitor``, on in every run (`lr_monitor.*`): the learning rate of
    every parameter group, as ``train/lr/decay``, ``train/lr/no_decay`` (and ``..._lr_x<scale>``
    groups with a backbone_lr_scale), with or without a scheduler.

    With no logger (``trainer.logger: false``) there is nowhere to write: it does nothing, where
    Lightning's would stop the run.
    """

    def _find_names_from_optimizers(self, optimizers, seen_optimizers, seen_optimizer_types):
        # Lightning names an optimizer without a scheduler "lr-<Class>"; gptlab's keys follow the
        # "{stage}/{name}" scheme either way: "train/lr/<group>" (the task names its scheduler so).
        names, rest = super()._find_names_from_optimizers(optimizers, seen_optimizers, seen_optimizer_types)
        renamed = [
            [name.replace(f"lr-{type(opt).__name__}", "train/lr", 1) for name in group]
            for group, opt in zip(names, rest, strict=True)
        ]
        return renamed, rest

    def on_train_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args, **kwargs) -> None:
        if trainer.loggers:
            super().on_train_epoch_start(trainer, *args, **kwargs)
