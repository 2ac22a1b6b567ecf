"""Every shipped experiment YAML parses and instantiates (data paths swapped for tiny files)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import REPO
from gptlab.cli import GPTLabCLI
from gptlab.models import GPT
from gptlab.tasks import CausalLM

PRETRAIN = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))


@pytest.mark.parametrize("config", PRETRAIN, ids=lambda p: p.stem)
def test_pretrain_config_instantiates(config: Path, tiny_corpus: Path, tmp_path: Path):
    cli = GPTLabCLI(
        args=[
            "--config",
            str(config),
            "--data.init_args.train_files",
            str(tiny_corpus / "*.txt"),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--logs",
            str(tmp_path / "logs"),
        ],
        run=False,
    )
    assert isinstance(cli.model, CausalLM) and isinstance(cli.model.backbone, GPT)
    assert cli.trainer.max_steps > 0
    # block_size is stated once, in the backbone: the data takes the model's.
    assert "block_size" not in yaml.safe_load(config.read_text())["data"]["init_args"]
    assert cli.datamodule.block_size == cli.model.backbone.block_size
    # The experiment name decides where runs land.
    assert Path(cli.trainer.logger.log_dir).parent.name == config.stem


def test_data_block_size_given_wins_over_the_model(tiny_corpus: Path, tmp_path: Path):
    args = ["--config", str(REPO / "configs/pretrain/shakespeare_char.yaml")]
    args += ["--data.init_args.train_files", str(tiny_corpus / "*.txt"), "--logs", str(tmp_path / "logs")]
    cli = GPTLabCLI(args=[*args, "--data.init_args.block_size", "16"], run=False)
    assert (cli.datamodule.block_size, cli.model.backbone.block_size) == (16, 64)


def test_shakespeare_char_is_the_nanogpt_recipe():
    cli = GPTLabCLI(args=["--config", str(REPO / "configs/pretrain/shakespeare_char.yaml")], run=False)
    c = cli.model.backbone.config
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.dropout, c.bias) == (4, 4, 128, 64, 0.0, False)
    assert cli.datamodule.batch_size == 12 and cli.trainer.max_steps == 2000
    optimizer = cli.model.optimizer_factory([{"params": [cli.model.backbone.lm_head.weight]}])
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-3, (0.9, 0.99), 0.1)
    scheduler = cli.model.scheduler_factory(optimizer)
    assert (scheduler.warmup_steps, scheduler.max_steps, scheduler.min_lr_ratio) == (100, 2000, 0.1)
    assert cli.trainer.gradient_clip_val == 1.0


def nanogpt_lr(
    it: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100, decay: int = 2000
) -> float:
    """nanoGPT train.py's get_lr."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    ratio = (min(it, decay) - warmup) / (decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@pytest.mark.slow
def test_shakespeare_char_steps_equal_nanogpts_training_procedure(tmp_path: Path):
    """gptlab's fit on the parity config takes exactly the steps nanoGPT's train.py would take.

    Same initial weights and the same batches (recorded from gptlab's loader) through nanoGPT's
    loop: lr from get_lr, AdamW with decay on dim >= 2 only (foreach, its CPU default), clipping
    at 1.0. Losses and final weights agree to float32 rounding (fused vs foreach AdamW); the
    schedule is compressed to 15 steps so that a missing weight decay (~3e-5) would show.
    """

    class Record(L.Callback):
        def __init__(self) -> None:
            self.init, self.batches, self.losses, self.lrs = None, [], [], []

        def on_train_start(self, trainer, pl_module) -> None:
            self.init = copy.deepcopy(pl_module.backbone.state_dict())

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batches.append(batch["input_ids"].clone())
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].item())

    text = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:50_000]
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    cli = GPTLabCLI(
        args=[
            "--config", str(REPO / "configs/pretrain/shakespeare_char.yaml"),
            "--data.init_args.train_files", str(tmp_path / "input.txt"),
            "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--logs", str(tmp_path / "logs"),
            "--model.init_args.backbone.init_args.n_layer", "2",
            "--model.init_args.backbone.init_args.n_embd", "32",
            # nanoGPT's schedule shape over 15 steps, so the lr (and with it weight decay) is large.
            "--model.init_args.scheduler.init_args.warmup_steps", "5",
            "--model.init_args.scheduler.init_args.max_steps", "15",
            "--trainer.max_steps", "15", "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        ],
        run=False,
    )  # fmt: skip
    record = Record()
    cli.trainer.callbacks.append(record)
    cli.trainer.fit(cli.model, cli.datamodule)

    ours = cli.model.backbone
    ref = copy.deepcopy(ours)
    ref.load_state_dict(record.init)
    params = list(ref.parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=1e-3,
        betas=(0.9, 0.99),
    )
    assert len(record.batches) == 15
    assert record.batches[0].shape == (12, 65)  # nanoGPT's batch: 64 inputs, 64 targets
    for it, x in enumerate(record.batches):
        lr = nanogpt_lr(it, warmup=5, decay=15)
        assert record.lrs[it] == pytest.approx(lr, rel=1e-6)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # nanoGPT's x = data[i:i+T], y = data[i+1:i+T+1] from a window of T + 1 tokens
        logits = ref.logits(ref(x[:, :-1]))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert loss.item() == pytest.approx(record.losses[it], abs=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=0, msg=name)


BACKBONES = sorted((REPO / "configs" / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("overlay", BACKBONES, ids=lambda p: p.stem)
def test_backbone_overlay_swaps_the_model_and_trains(
    overlay: Path, tiny_corpus: Path, tmp_path: Path, request
):
    from gptlab.models import HFBackbone

    if overlay.stem.startswith("smollm2"):
        request.getfixturevalue("fake_smollm2")  # a tiny Llama where the converted model lives

    cli = GPTLabCLI(
        args=[
            "fit",
            "--config",
            str(REPO / "configs/pretrain/quickstart.yaml"),
            "--config",
            str(overlay),
            "--data.init_args.train_files",
            str(tiny_corpus / "*.txt"),
            "--data.init_args.cache_dir",
            str(tmp_path / "cache"),
            "--data.init_args.block_size",
            "32",
            "--logs",
            str(tmp_path / "logs"),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.num_sanity_val_steps",
            "0",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.callbacks",
            "[]",
        ],
    )
    assert isinstance(cli.model.backbone, HFBackbone)
    assert cli.trainer.global_step == 2
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
