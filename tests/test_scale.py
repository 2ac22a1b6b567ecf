"""Trainer overlays, throughput / MFU, torch.compile and sharded-checkpoint handling, on CPU.

Every overlay in configs/trainer/ is stacked on every experiment, parsed and instantiated (GPU
overlays against a mocked CUDA device count: nothing touches a GPU before `fit`); the overlays a
CPU can run are run on a tiny experiment. The distributed ones run in test_distributed.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from conftest import REPO, TINY_CORPUS, shared_data, tiny_config
from gptlab import callbacks as gcallbacks
from gptlab.callbacks import (
    Compile,
    ProgressBar,
    ProgressLog,
    SampleGeneration,
    Throughput,
    measure_matmul_flops,
)
from gptlab.cli import GPTLabCLI, main
from gptlab.data import SeededShuffleSampler
from gptlab.errors import CheckpointError
from gptlab.loading import consolidate_checkpoint
from gptlab.runs import latest_checkpoint
from gptlab.strategies import FSDP

OVERLAYS = sorted(p.stem for p in (REPO / "configs" / "trainer").glob("*.yaml"))
GPU_ONLY = {"gpu", "16-mixed"}


def test_the_overlays_are_all_there():
    assert set(OVERLAYS) == {
        "cpu",
        "gpu",
        "ddp",
        "fsdp",
        "bf16-mixed",
        "16-mixed",
        "bf16-true",
        "compile",
        "debug",
    }


@pytest.fixture
def one_gpu(monkeypatch):
    """A machine that reports one CUDA device (Lightning checks the count, not the device, at init)."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pytorch_cuda

    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 1)
    monkeypatch.setattr(pytorch_cuda, "num_cuda_devices", lambda: 1)


def experiment_args(name: str, tmp_path: Path) -> list[str]:
    args = ["--config", str(REPO / "configs" / "pretrain" / f"{name}.yaml"), "--logs", str(tmp_path / "logs")]
    if name == "shakespeare_char":
        args += ["--data.init_args.train_files", str(shared_data("tinyshakespeare/input.txt"))]
    return args


EXPECTED = {
    "cpu": lambda t: (
        isinstance(t.accelerator, CPUAccelerator)
        and isinstance(t.strategy, SingleDeviceStrategy)
        and t.precision == "32-true"
    ),
    "gpu": lambda t: isinstance(t.accelerator, CUDAAccelerator) and t.num_devices == 1,
    "ddp": lambda t: type(t.strategy) is DDPStrategy,
    "fsdp": lambda t: isinstance(t.strategy, FSDP) and t.strategy._save_distributed_checkpoint,
    "bf16-mixed": lambda t: t.precision == "bf16-mixed",
    "16-mixed": lambda t: t.precision == "16-mixed" and isinstance(t.accelerator, CUDAAccelerator),
    "bf16-true": lambda t: t.precision == "bf16-true",
    # Appended: the experiment's own callbacks stay.
    "compile": lambda t: (
        any(isinstance(c, Compile) for c in t.callbacks)
        and any(isinstance(c, SampleGeneration) for c in t.callbacks)
    ),
    "debug": lambda t: t.max_steps == 20 and t.log_every_n_steps == 1 and t.limit_val_batches == 4,
}


@pytest.mark.parametrize("experiment", ["quickstart", "shakespeare_char"])
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_stacks_on_experiment(overlay: str, experiment: str, tmp_path: Path, request):
    args = experiment_args(experiment, tmp_path)
    if overlay in GPU_ONLY:
        request.getfixturevalue("one_gpu")
        # 16-mixed is a GPU precision: stack it on the gpu overlay, as its header says.
        args += ["--config", str(REPO / "configs" / "trainer" / "gpu.yaml")]
    cli = GPTLabCLI(
        args=[*args, "--config", str(REPO / "configs" / "trainer" / f"{overlay}.yaml")], run=False
    )
    trainer = cli.trainer
    assert EXPECTED[overlay](trainer), (overlay, trainer.strategy, trainer.precision, trainer.callbacks)
    # Every run measures throughput, whatever the overlay.
    assert any(isinstance(c, Throughput) for c in trainer.callbacks)
    assert cli.model.backbone.block_class.__name__ == "Block"


# ----------------------------------------------------------------------------- overlays that run on CPU
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("overlays")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    return tiny_config(tmp, corpus)


def fit(tiny: Path, name: str, *args: str) -> GPTLabCLI:
    return GPTLabCLI(args=["fit", "--config", str(tiny), "--experiment", name, *args])


@pytest.mark.parametrize("overlay", ["cpu", "bf16-mixed", "bf16-true"])
def test_overlay_trains_on_cpu(tiny: Path, overlay: str):
    # Fused AdamW with clipping, as the shipped experiments train.
    cli = fit(
        tiny, overlay, "--config", str(REPO / "configs" / "trainer" / f"{overlay}.yaml"),
        "--trainer.log_every_n_steps", "2", "--trainer.gradient_clip_val", "0.5",
        "--model.init_args.optimizer.init_args.fused", "true",
    )  # fmt: skip
    trainer = cli.trainer
    assert trainer.global_step == 6 and trainer.precision == {"cpu": "32-true"}.get(overlay, overlay)
    losses = [trainer.callback_metrics[k] for k in ("train/loss", "val/loss")]
    assert all(torch.isfinite(v) for v in losses)
    if overlay == "bf16-true":
        assert cli.model.backbone.transformer.wte.weight.dtype == torch.bfloat16
    run = tiny.parent / "logs" / overlay / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    # Throughput reaches the progress bar and TensorBoard, every log_every_n_steps steps.
    assert {"train/tokens_per_sec", "train/mfu"} <= set(trainer.progress_bar_metrics)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/tokens_per_sec", "train/samples_per_sec", "train/mfu", "train/loss"} <= tags
    assert [e.step for e in events.Scalars("train/tokens_per_sec")] == [1, 3, 5]  # steps 2, 4, 6
    assert all(e.value > 0 for e in events.Scalars("train/mfu"))


def test_progress_bar_numbers_refresh_at_logging_steps(tiny: Path, monkeypatch):
    """The CLI's bar (gptlab ProgressBar) moves every batch and recollects its numbers only when logged."""
    updates, refreshed = [0], []
    collect = RichProgressBar._update_metrics

    def counted(self, *args):
        updates[0] += 1
        collect(self, *args)

    monkeypatch.setattr(RichProgressBar, "_update_metrics", counted)
    batch_end = ProgressBar.on_train_batch_end

    def spy(self, trainer, *args):
        before = updates[0]
        batch_end(self, trainer, *args)
        refreshed.append((trainer.global_step, updates[0] > before))

    monkeypatch.setattr(ProgressBar, "on_train_batch_end", spy)
    cli = fit(tiny, "bar", "--trainer.enable_progress_bar", "true", "--trainer.log_every_n_steps", "2")
    bar = cli.trainer.progress_bar_callback
    assert type(bar) is ProgressBar
    assert refreshed == [(1, False), (2, True), (3, False), (4, True), (5, False), (6, True)]
    # What it shows: the values logged at the last logging step.
    assert {"train/loss", "train/tokens_per_sec"} <= set(bar.get_metrics(cli.trainer, cli.model))


def test_debug_overlay_runs(tiny: Path):
    # Its own 20 steps are checked above; 8 are enough to see it run (with anomaly detection on).
    cli = fit(
        tiny, "debug", "--config", str(REPO / "configs" / "trainer" / "debug.yaml"),
        "--trainer.max_steps", "8", "--trainer.val_check_interval", "4",
    )  # fmt: skip
    assert cli.trainer.global_step == 8 and torch.isfinite(cli.trainer.callback_metrics["val/loss"])


def test_compile_overlay_compiles_blocks_in_place(tiny: Path):
    # The "eager" backend traces with dynamo like inductor does, without minutes of C++ compilation.
    cli = fit(
        tiny, "compile", "--config", str(REPO / "configs" / "trainer" / "compile.yaml"),
        "--trainer.callbacks.init_args.backend", "eager", "--trainer.max_steps", "2",
    )  # fmt: skip
    compile_cb = next(c for c in cli.trainer.callbacks if isinstance(c, Compile))
    assert compile_cb.compiled == 1  # the tiny GPT has one block
    assert cli.model.backbone.transformer.h[0]._compiled_call_impl is not None
    # In place: checkpoints keep the plain parameter names and load without compile.
    state = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in k for k in state)


@pytest.mark.parametrize("loss_scale", [None, 1024.0])
def test_fused_optimizer_is_clipped_under_mixed_precision(loss_scale):
    # Lightning refuses to clip fused optimizers under AMP; the task unscales (fp16) and clips itself.
    from gptlab.models import GPT
    from gptlab.tasks import CausalLM

    model = CausalLM(backbone=GPT(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=loss_scale) if loss_scale else None
    if scaler is not None:
        scaler.scale(torch.ones(()))  # what backward does first: the scaler holds its scale from here
    model._trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0 * (loss_scale or 1.0))  # scaled gradients, as backward leaves them
    model.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm == pytest.approx(1.0, rel=1e-4)
    if scaler is not None:
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)  # must not unscale a second time: the update is AdamW's ~lr per element
        step = max((p - b).abs().max().item() for p, b in zip(model.parameters(), before, strict=True))
        assert 1e-4 < step < 2e-3


# ----------------------------------------------------------------------------- Throughput
class FakeModule:
    """What Throughput reads from a LightningModule: positions fed, the backbone's FLOPs and `log`."""

    def __init__(self, flops_per_token: int) -> None:
        self.backbone = SimpleNamespace(num_flops_per_token=lambda seq_len: flops_per_token * seq_len)
        self.logged: dict[str, float] = {}
        self.device = torch.device("cpu")

    def positions_fed(self, seq_len: int) -> int:
        return seq_len

    def log(self, name, value, **kwargs) -> None:
        assert isinstance(value, float)  # a host number: logging it needs no device sync
        self.logged[name] = value


def test_throughput_counts_from_shapes_only(monkeypatch):
    clock = iter([100.0, 102.0, 104.0])  # window start, then the two logging points
    monkeypatch.setattr(gcallbacks.time, "perf_counter", lambda: next(clock))
    callback = Throughput(peak_flops=1e9)
    trainer = SimpleNamespace(
        precision="32-true", world_size=2, log_every_n_steps=2, global_step=0, sanity_checking=False
    )
    module = FakeModule(flops_per_token=10)
    callback.on_train_start(trainer, module)
    # Meta tensors have shapes but no data: any read of the values (a sync on a GPU) would fail.
    batch = {"input_ids": torch.empty(4, 8, dtype=torch.long, device="meta")}
    for step in (1, 2):
        callback.on_train_batch_start(trainer, module, batch, step - 1)
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, batch, step - 1)
    # 2 steps x 4 sequences x 8 tokens on each of 2 ranks in 2 s; 80 FLOPs per token per rank.
    assert module.logged["train/tokens_per_sec"] == pytest.approx(2 * 2 * 4 * 8 / 2.0)
    assert module.logged["train/samples_per_sec"] == pytest.approx(2 * 2 * 4 / 2.0)
    assert module.logged["train/mfu"] == pytest.approx(2 * 4 * 8 * 80 / 2.0 / 1e9)


def test_throughput_reports_no_mfu_for_a_frozen_backbone(monkeypatch):
    """A LoRA fit's FLOPs are not 6 N per token (frozen weights get no gradient): was 220 % MFU."""
    lines: list[str] = []
    monkeypatch.setattr(gcallbacks, "rank_zero_info", lines.append)
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(gcallbacks.time, "perf_counter", lambda: next(clock))
    callback = Throughput(peak_flops=1e9)
    trainer = SimpleNamespace(precision="32-true", world_size=1, log_every_n_steps=1, global_step=0)
    module = FakeModule(flops_per_token=10)
    module.backbone = torch.nn.Linear(2, 2).requires_grad_(False)  # the frozen base under adapters
    module.backbone.num_flops_per_token = lambda seq_len: 10 * seq_len
    callback.on_train_start(trainer, module)
    batch = {"input_ids": torch.empty(4, 8, dtype=torch.long, device="meta")}
    callback.on_train_batch_start(trainer, module, batch, 0)
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    assert "train/mfu" not in module.logged and module.logged["train/tokens_per_sec"] == 16.0
    assert any("train/mfu is not logged for this fit" in line for line in lines), lines


def test_throughput_leaves_validation_out(monkeypatch):
    clock = iter([0.0, 50.0, 51.0, 99.0])
    monkeypatch.setattr(gcallbacks.time, "perf_counter", lambda: next(clock))
    callback = Throughput(peak_flops=0)  # 0: no MFU
    trainer = SimpleNamespace(precision="32-true", world_size=1, log_every_n_steps=1, global_step=0)
    module = FakeModule(flops_per_token=1)
    callback.on_train_start(trainer, module)
    batch = {"input_ids": torch.empty(2, 5, dtype=torch.long, device="meta")}
    callback.on_train_batch_start(trainer, module, batch, 0)  # t=0
    callback.on_validation_start(trainer, module)  # a long validation: the window is dropped
    callback.on_train_batch_start(trainer, module, batch, 1)  # t=50, a new window
    trainer.global_step = 1
    callback.on_train_batch_end(trainer, module, None, batch, 1)  # t=51
    assert module.logged == {"train/tokens_per_sec": 10.0, "train/samples_per_sec": 2.0}


class Terminal:
    """A stream that is (or is not) a terminal, for ProgressLog's `when: auto`."""

    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_lines_come_every_n_steps_or_seconds_whichever_is_later(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(gcallbacks, "rank_zero_info", lines.append)
    now = [0.0]
    monkeypatch.setattr(gcallbacks.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(gcallbacks.sys, "stdout", Terminal(False))  # `> run.log`
    callback = ProgressLog(every_n_steps=2, every_n_seconds=10)
    trainer = SimpleNamespace(
        is_global_zero=True, progress_bar_callback=object(), world_size=2, global_step=0,
        estimated_stepping_batches=100,
    )  # fmt: skip
    callback.on_train_start(trainer, FakeModule(flops_per_token=1))
    batch = {"input_ids": torch.empty(4, 8, dtype=torch.long, device="meta")}
    printed = []
    for step in range(1, 9):  # 3 s per step: 2 steps are too soon, 4 steps (12 s) are enough
        now[0] += 3.0
        trainer.global_step = step
        loss = {"loss": torch.tensor(float(step))}
        callback.on_train_batch_end(trainer, FakeModule(flops_per_token=1), loss, batch, step - 1)
        printed.append(len(lines))
    assert printed == [0, 0, 0, 1, 1, 1, 1, 2]
    # Steps 1-4 in 12 s: the mean loss of those steps, 4 x 4 x 8 positions x 2 ranks / 12 s.
    assert lines[0] == "step 4/100 (4%) | loss 2.5000 | 21 tok/s | elapsed 0:00:12 | ETA 0:04:48"
    assert lines[1].startswith("step 8/100 (8%) | loss 6.5000 |")
    # Both streams a terminal and a bar shown: no lines (unless asked for).
    monkeypatch.setattr(gcallbacks.sys, "stdout", Terminal(True))
    monkeypatch.setattr(gcallbacks.sys, "stderr", Terminal(True))
    callback.on_train_start(trainer, FakeModule(flops_per_token=1))
    assert not callback.active
    callback.when = "always"
    callback.on_train_start(trainer, FakeModule(flops_per_token=1))
    assert callback.active


def test_peak_flops_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert gcallbacks.peak_flops(torch.device("cuda", 0), "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert gcallbacks.peak_flops(torch.device("cuda", 0), "bf16") == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert gcallbacks.peak_flops(torch.device("cuda", 0), "tf32") == 156e12
    assert gcallbacks.compute_dtype("bf16-mixed", torch.device("cuda")) == "bf16"
    assert gcallbacks.compute_dtype("16-mixed", torch.device("cuda")) == "fp16"
    assert gcallbacks.compute_dtype("32-true", torch.device("cpu")) == "fp32"


def test_cpu_matmul_peak_is_measured():
    flops = measure_matmul_flops("cpu", size=256, seconds=0.05)
    assert 1e8 < flops < 1e14


# ----------------------------------------------------------------------------- sharded checkpoints
def fake_sharded(path: Path) -> Path:
    """A folder that looks like a sharded checkpoint (meta.pt) but holds no shards."""
    path.mkdir(parents=True)
    torch.save({"global_step": 3}, path / "meta.pt")
    return path


def test_broken_sharded_checkpoint_is_named(tmp_path: Path):
    broken = fake_sharded(tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match="last.ckpt"):
        consolidate_checkpoint(broken)
    with pytest.raises(CheckpointError, match="not a sharded checkpoint"):
        consolidate_checkpoint(tmp_path)


def test_resuming_a_sharded_checkpoint_needs_fsdp(tiny: Path, tmp_path: Path, capsys):
    ckpt = fake_sharded(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(tiny), "--ckpt_path", str(ckpt), "--experiment", "resume"])
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "sharded FSDP checkpoint" in message and "fsdp.yaml" in message and "Traceback" not in message


def test_latest_checkpoint_finds_sharded_folders(tmp_path: Path):
    fake_sharded(tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt")
    (tmp_path / "exp" / "version_1" / "checkpoints").mkdir(parents=True)
    assert latest_checkpoint(tmp_path, "exp") == tmp_path / "exp" / "version_0" / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------- data order under DDP
@pytest.mark.parametrize("num_samples", [10, 11])
def test_ranks_split_the_single_process_order(num_samples: int):
    single = SeededShuffleSampler(num_samples, seed=3)
    ranks = [SeededShuffleSampler(num_samples, seed=3, num_replicas=2, rank=r) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == -(-num_samples // 2)
    for epoch in (0, 1):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        # Rank r takes positions r, r + 2, ... of the single-process permutation (padded with its
        # start), so the ranks' batches together are the single-process batch.
        interleaved = [i for pair in zip(*(list(r) for r in ranks), strict=True) for i in pair]
        assert interleaved[:num_samples] == list(single)
    assert list(single) != list(SeededShuffleSampler(num_samples, seed=3))  # epoch 1 is a new order
