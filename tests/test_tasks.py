"""CausalLM and the TaskModule base: loss, optimisation groups, schedule, overfitting."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from gptlab.models import GPT
from gptlab.optim import WarmupCosine, no_decay_names, param_groups
from gptlab.tasks import CausalLM


def tiny_gpt(**overrides) -> GPT:
    return GPT(**{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **overrides})


def lm_batch(
    batch_size: int = 4, length: int = 16, vocab: int = 64, seed: int = 0
) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch_size, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_loss_is_shifted_next_token_cross_entropy():
    model = CausalLM(backbone=tiny_gpt())
    batch = lm_batch()
    full = model.backbone.logits(model.backbone(batch["input_ids"]))  # (B, T, V)
    expected = torch.nn.functional.cross_entropy(
        full[:, :-1].reshape(-1, 64), batch["input_ids"][:, 1:].reshape(-1)
    )
    # The task never feeds the last token (it is only a target): T-1 positions, same logits.
    logits = model(batch)
    assert logits.shape[1] == batch["input_ids"].shape[1] - 1
    torch.testing.assert_close(logits, full[:, :-1], atol=1e-6, rtol=0)
    assert torch.allclose(model.loss(logits, batch), expected, atol=1e-6)


def test_padding_is_ignored_and_all_ignored_batch_is_not_nan():
    model = CausalLM(backbone=tiny_gpt())
    batch = lm_batch()
    batch["labels"][:, 8:] = -100
    logits = model(batch)
    expected = torch.nn.functional.cross_entropy(
        logits[:, :7].reshape(-1, 64), batch["input_ids"][:, 1:8].reshape(-1)
    )
    assert torch.allclose(model.loss(logits, batch), expected, atol=1e-6)
    batch["labels"][:] = -100
    assert model.loss(model(batch), batch).item() == 0.0


def test_weight_decay_only_on_matrices():
    model = CausalLM(backbone=tiny_gpt())
    no_decay = no_decay_names(model)
    assert no_decay and all(n.endswith(("bias", "weight")) for n in no_decay)
    assert not any(".wte." in n or "c_attn.weight" in n for n in no_decay)
    groups = param_groups(model, no_decay)
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    # Tied embeddings are one parameter, counted once.
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_weight_decay_groups_survive_flattened_parameters():
    # FSDP may present parameters flattened to 1-D; the groups were decided by name before wrapping.
    model = CausalLM(backbone=tiny_gpt())
    no_decay = no_decay_names(model)
    for _, p in model.named_parameters():
        p.data = p.data.reshape(-1)
    groups = param_groups(model, no_decay)
    assert len(groups[0]["params"]) == len(list(model.parameters())) - len(no_decay)


def test_warmup_cosine_matches_nanogpt():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = WarmupCosine(opt, warmup_steps=100, max_steps=2000, min_lr_ratio=0.1)

    def nanogpt_lr(it, lr=1e-3, min_lr=1e-4, warmup=100, decay=2000):
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    for step in range(2100):
        assert opt.param_groups[0]["lr"] == pytest.approx(nanogpt_lr(step), rel=1e-9, abs=1e-12), step
        opt.step()
        sched.step()
    restored = WarmupCosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3))
    restored.load_state_dict(sched.state_dict())
    assert restored.max_steps == 2000 and restored.last_epoch == sched.last_epoch


def test_overfits_one_batch():
    L.seed_everything(0)
    model = CausalLM(
        backbone=tiny_gpt(),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        scheduler=None,
    )
    batch = lm_batch(batch_size=2)
    loader = DataLoader([batch], batch_size=None)
    trainer = L.Trainer(
        max_steps=150,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=loader)
    model.eval()
    with torch.no_grad():
        final = model.loss(model(batch), batch).item()
    assert final < 0.05, final
    assert int(model.tokens_seen) == 150 * batch["input_ids"].numel()


class _ModeProbe(L.Callback):
    """Records, during each training step, which modules are not in train mode."""

    def __init__(self) -> None:
        self.in_eval: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.in_eval.append([name for name, m in pl_module.named_modules() if not m.training])


@pytest.mark.parametrize("route", ["gpt", "model_type", "name_or_path", "init_from"])
def test_every_backbone_trains_in_train_mode(route, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptlab.models import HFBackbone

    overrides = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.1)
    saved = tmp_path / "hf"
    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", **overrides)).save_pretrained(saved)
    backbone = {
        "gpt": lambda: tiny_gpt(dropout=0.1),
        "model_type": lambda: HFBackbone(model_type="gpt2", config_overrides=overrides),
        # from_pretrained returns its model in eval mode: dropout would be off for the whole run
        "name_or_path": lambda: HFBackbone(name_or_path=str(saved)),
        "init_from": lambda: HFBackbone(model_type="gpt2", config_overrides=overrides),
    }[route]()
    init_from = str(saved) if route == "init_from" else None
    model = CausalLM(backbone=backbone, scheduler=None, init_from=init_from)
    probe = _ModeProbe()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(model, train_dataloaders=DataLoader([lm_batch(batch_size=2)] * 2, batch_size=None))
    assert probe.in_eval == [[], []]


def test_learning_rate_of_every_group_is_logged_and_no_logger_is_fine(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from gptlab.callbacks import LearningRate

    batch = lm_batch(batch_size=2)
    for logger, scheduler in (
        (False, None),
        (CSVLogger(tmp_path, name="lr", version=0), lambda opt: WarmupCosine(opt, warmup_steps=2)),
        (CSVLogger(tmp_path, name="lr", version=1), None),  # constant lr: the same keys
    ):
        model = CausalLM(backbone=tiny_gpt(), scheduler=scheduler)
        trainer = L.Trainer(
            max_steps=3,
            accelerator="cpu",
            logger=logger,
            log_every_n_steps=1,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[LearningRate(logging_interval="step")],
        )
        trainer.fit(model, train_dataloaders=DataLoader([batch] * 3, batch_size=None))  # no logger: no error
    header, *rows = (tmp_path / "lr" / "version_0" / "metrics.csv").read_text().splitlines()
    assert {"train/lr/decay", "train/lr/no_decay"} <= set(header.split(","))
    column = header.split(",").index("train/lr/decay")
    lrs = [float(row.split(",")[column]) for row in rows if row.split(",")[column]]
    assert lrs[:2] == pytest.approx([1e-3 / 3, 2e-3 / 3])  # AdamW's lr 1e-3, warmup (step + 1) / 3
    header = (tmp_path / "lr" / "version_1" / "metrics.csv").read_text().splitlines()[0]
    assert {"train/lr/decay", "train/lr/no_decay"} <= set(header.split(","))
    assert trainer.callback_metrics.keys() >= {"train/lr/decay", "train/lr/no_decay"}
