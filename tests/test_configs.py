"""Every shipped experiment YAML parses and instantiates (data paths swapped for tiny files)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert cli.datamodule.block_size <= cli.model.backbone.block_size
    # The experiment name decides where runs land.
    assert Path(cli.trainer.logger.log_dir).parent.name == config.stem


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


BACKBONES = sorted((REPO / "configs" / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("overlay", BACKBONES, ids=lambda p: p.stem)
def test_backbone_overlay_swaps_the_model_and_trains(overlay: Path, tiny_corpus: Path, tmp_path: Path):
    from gptlab.models import HFBackbone

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
