"""Non-finite losses (docs/design.md §6.2).

A batch with nothing to learn from gives loss 0 (never NaN) in every task, with finite gradients;
a NaN loss in a real `fit` stops the run at its step (exit 2, the last good checkpoint intact),
or with `--nonfinite_loss.policy skip` skips that one optimizer step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY_CORPUS, tiny_config
from gptlab.cli import main
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


# ----------------------------------------------------------------- a NaN loss in a real `fit`
# In this process (gptlab.cli.main, as `main.py` runs it): dist_run.PoisonLoss makes the loss NaN
# at one optimizer step, dist_run.StepLog records every trained batch.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nonfinite")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text[:220])
    return tiny_config(tmp, corpus, **{"data.init_args.tokenizer": {"class_path": "gptlab.data.Char"}})


def fit_poisoned(config: Path, name: str, *args: str) -> list[dict]:
    out = config.parent / f"{name}_out"
    out.mkdir()
    os.environ["GPTLAB_TEST_OUT"] = str(out)
    try:
        main(
            ["fit", "--config", str(config), "--experiment", name, "--trainer.max_steps", "10"]
            + ["--trainer.num_sanity_val_steps", "0", "--trainer.val_check_interval", "5"]
            + ["--trainer.limit_val_batches", "1", "--throughput.peak_flops", "0"]
            + ["--preemption.every_n_steps", "4", "--trainer.callbacks+=dist_run.StepLog"]
            + ["--trainer.callbacks+=dist_run.PoisonLoss", "--trainer.callbacks.init_args.step", "7", *args]
        )
    finally:
        del os.environ["GPTLAB_TEST_OUT"]
    lines = (out / "steps0.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def last_checkpoint(config: Path, name: str) -> dict:
    path = config.parent / "logs" / name / "version_0" / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)


def all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tiny_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit_poisoned(tiny_run, "stop")
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "gptlab: error: the training loss is not finite at step 7 (epoch " in err
    assert "Traceback" not in err
    done = [
        json.loads(line) for line in (tiny_run.parent / "stop_out" / "steps0.jsonl").read_text().splitlines()
    ]
    assert done[-1]["step"] == 6  # step 7 never finished
    saved = last_checkpoint(tiny_run, "stop")
    # The newest checkpoint before it (the validation's at step 5, after the periodic one at 4), untouched.
    assert saved["global_step"] == 5 and all_finite(saved)


@pytest.mark.slow
def test_nonfinite_loss_skip_policy_skips_that_step(tiny_run, recwarn):
    done = fit_poisoned(tiny_run, "skip", "--nonfinite_loss.policy", "skip")
    assert [r["step"] for r in done] == list(range(1, 11))  # the step counter and schedule move on
    assert math.isnan(done[6]["loss"]) and all(math.isfinite(r["loss"]) for i, r in enumerate(done) if i != 6)
    assert any("non-finite training loss at step 7 (epoch " in str(w.message)
               for w in recwarn)  # fmt: skip
    saved = last_checkpoint(tiny_run, "skip")
    assert saved["global_step"] == 10 and all_finite(saved)
    # The periodic last.ckpt and the checkpoint callback's are one file (no last-v1.ckpt).
    files = (tiny_run.parent / "logs" / "skip" / "version_0" / "checkpoints").iterdir()
    assert sorted(f.name for f in files) == ["best.ckpt", "last.ckpt"]
    # AdamW counts the updates each parameter received: one fewer than the optimizer steps.
    assert {int(s["step"]) for s in saved["optimizer_states"][0]["state"].values()} == {9}
    assert saved["callbacks"]["NonFiniteLoss"]["skipped"] == 1


def test_stop_message_suggests_what_is_not_set_yet():
    # With policy "skip" already set, the message (max_skips exceeded) must not suggest it again.
    from types import SimpleNamespace

    from gptlab.resilience import NonFiniteLoss, NonFiniteLossError

    trainer = SimpleNamespace(world_size=1, global_step=6, current_epoch=0)
    nan = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteLossError, match="set --nonfinite_loss.policy skip"):
        NonFiniteLoss(policy="stop").on_before_backward(trainer, None, nan)
    with pytest.raises(NonFiniteLossError, match=r"raise --nonfinite_loss.max_skips \(now 0\)") as caught:
        NonFiniteLoss(policy="skip", max_skips=0).on_before_backward(trainer, None, nan)
    assert "policy skip" not in str(caught.value)
