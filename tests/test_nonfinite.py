"""A batch with nothing to learn from gives loss 0 (never NaN) in every task, with finite gradients."""

from __future__ import annotations

import pytest
import torch

from gptlab.models import GPT
from gptlab.tasks import CausalLM, Generation, SequenceClassification, TokenClassification


def tiny_gpt() -> GPT:
    return GPT(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)


def batch(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


CASES = {
    "causal_lm": (lambda: CausalLM(backbone=tiny_gpt()), torch.full((3, 8), -100)),
    "generation": (lambda: Generation(backbone=tiny_gpt()), torch.full((3, 8), -100)),
    "classification": (
        lambda: SequenceClassification(backbone=tiny_gpt(), label_names=["a", "b"]),
        torch.full((3,), -100),
    ),
    "multi_label": (
        lambda: SequenceClassification(backbone=tiny_gpt(), label_names=["a", "b", "c"], multi_label=True),
        torch.full((3, 3), -100),
    ),
    "token_classification": (
        lambda: TokenClassification(backbone=tiny_gpt(), label_names=["O", "B-X", "I-X"]),
        torch.full((3, 8), -100),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_all_ignored_labels_give_zero_loss(name):
    build, labels = CASES[name]
    model = build()
    data = batch(labels)
    loss = model.loss(model(data), data)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
