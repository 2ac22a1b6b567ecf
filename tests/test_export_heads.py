"""`main.py export` of fine-tuned classifiers: transformers' *ForSequenceClassification /
*ForTokenClassification with gptlab's logits, labels and a working `transformers.pipeline`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from gptlab.data import BPE
from gptlab.errors import CheckpointError
from gptlab.export import check_classifier_export, ensure_pad_token, to_hf_classifier
from gptlab.models import GPT, HFBackbone
from gptlab.tasks import SequenceClassification, TokenClassification
from test_bad_inputs import one_line_error
from tiny_runs import run_cli

TEXTS = ["the movie was good great", "bad awful plot", "a"]
LLAMA = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
GPT2 = dict(vocab_size=320, n_embd=32, n_layer=2, n_head=4, n_positions=64)


@pytest.fixture(scope="module")
def tokenizer():
    tok = BPE(vocab_size=300).train(TEXTS * 20)
    ensure_pad_token(tok)
    return tok


def gptlab_logits(task, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's logits on `texts`, right-padded as gptlab's data modules pad; and the mask."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    length = max(map(len, rows))
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
    with torch.no_grad():
        return task.eval()({"input_ids": ids, "attention_mask": mask}), mask


def export_run(run: Path, out: Path, capsys) -> None:
    code, err = run_cli(
        capsys, "export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--out", str(out)
    )
    assert code == 0, err


def test_exported_sequence_classifier_runs_in_the_pipeline(tiny_runs, tmp_path, capsys):
    """gptlab's GPT + a head with a trained bias -> GPT2ForSequenceClassification, same logits."""
    run, out = tiny_runs.runs["classification"], tmp_path / "sst"
    export_run(run, out, capsys)
    task = SequenceClassification.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    assert task.head[1].bias.abs().max() > 0  # the bias is really moved into ln_f, not zero
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2ForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    tok = AutoTokenizer.from_pretrained(out)
    ours, mask = gptlab_logits(task, tok, TEXTS)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(enc["attention_mask"], mask)
    with torch.no_grad():
        theirs = model(**enc).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    classify = pipeline("text-classification", model=str(out), device="cpu")
    results = classify(TEXTS, top_k=None)
    for result, row in zip(results, ours.softmax(-1), strict=True):
        scores = {r["label"]: r["score"] for r in result}
        assert scores == pytest.approx({"negative": row[0].item(), "positive": row[1].item()}, abs=1e-5)


def test_exported_token_classifier_runs_in_the_pipeline(tiny_runs, tmp_path, capsys):
    run, out = tiny_runs.runs["ner"], tmp_path / "ner"
    export_run(run, out, capsys)
    task = TokenClassification.load_from_checkpoint(run / "checkpoints" / "last.ckpt").eval()
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    assert type(model).__name__ == "GPT2ForTokenClassification"
    assert list(model.config.id2label.values()) == task.label_names
    assert model.config.classifier_dropout == task.head[0].p
    tok = AutoTokenizer.from_pretrained(out)
    texts = ["John Smith went to Paris", "Mary"]
    ours, mask = gptlab_logits(task, tok, texts)
    with torch.no_grad():
        theirs = model(**tok(texts, padding=True, return_tensors="pt")).logits
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], atol=1e-5, rtol=0)
    tagged = pipeline("token-classification", model=str(out), device="cpu")(texts[0])
    expected = [task.label_names[i] for i in ours[0, : mask[0].sum()].argmax(-1).tolist()]
    assert [t["entity"] for t in tagged] == [e for e in expected if e != "O"]


def llama(**overrides) -> HFBackbone:
    torch.manual_seed(0)
    return HFBackbone(model_type="llama", config_overrides=dict(LLAMA, **overrides))


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_hugging_face_backbone_exports_as_its_own_classifier(kind, tokenizer, tmp_path):
    """A Llama HFBackbone -> LlamaFor{Sequence,Token}Classification; GPT-2 -> GPT2For*, bias carried."""
    for name, backbone, head_bias in (
        ("Llama", llama(), False),
        ("GPT2", HFBackbone(model_type="gpt2", config_overrides=GPT2), True),
    ):
        if kind == "sequence":
            task = SequenceClassification(backbone, ["neg", "pos", "mixed"], head_bias=head_bias)
        else:
            task = TokenClassification(backbone, ["O", "B-PER", "I-PER"])
        with torch.no_grad():
            task.head[1].weight.normal_()
            if task.head[1].bias is not None:
                task.head[1].bias.uniform_(-1, 1)
        model = to_hf_classifier(task.eval(), tokenizer)
        suffix = "SequenceClassification" if kind == "sequence" else "TokenClassification"
        assert type(model).__name__ == f"{name}For{suffix}"
        out = tmp_path / f"{name}-{kind}"
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        assert check_classifier_export(task, out, tokenizer) <= 1e-5
        task_name = "text-classification" if kind == "sequence" else "token-classification"
        assert pipeline(task_name, model=str(out), device="cpu")(TEXTS[0]) is not None


def test_llama_head_with_a_bias_or_mean_pooling_is_refused(tokenizer):
    task = SequenceClassification(llama(), ["neg", "pos"], head_bias=True)
    with torch.no_grad():
        task.head[1].bias.fill_(0.5)
    with pytest.raises(CheckpointError, match="head_bias: false"):
        to_hf_classifier(task.eval(), tokenizer)
    # a zero bias (e.g. never trained) computes what bias-free score does: exported
    with torch.no_grad():
        task.head[1].bias.zero_()
    assert type(to_hf_classifier(task, tokenizer)).__name__ == "LlamaForSequenceClassification"
    mean = SequenceClassification(
        GPT(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32), ["a", "b"], pooling="mean"
    )
    with pytest.raises(CheckpointError, match="pooling='mean'"):
        to_hf_classifier(mean.eval(), tokenizer)


def test_a_head_bias_with_more_labels_than_hidden_units_names_the_cause(tokenizer):
    """Was only 'logits differ by ...': the bias cannot move into a final norm of n_embd values."""
    gpt = GPT(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
    task = SequenceClassification(gpt, [f"c{i}" for i in range(40)], head_bias=True)
    with torch.no_grad():
        task.head[1].bias.uniform_(-1, 1)
    with pytest.raises(
        CheckpointError, match=r"a bias and 40 labels on 32 hidden units: .*model.init_args.head_bias: false"
    ):
        to_hf_classifier(task.eval(), tokenizer)


def test_export_of_a_mean_pooled_classifier_is_refused(tiny_runs, tmp_path, capsys):
    """Mean pooling has no transformers counterpart: one line, exit 2, nothing written."""
    run = tmp_path / "run"
    shutil.copytree(tiny_runs.runs["classification"], run)
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["pooling"] = "mean"
    torch.save(checkpoint, ckpt)
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out"))
    one_line_error(code, err, "pooling='mean'", "model.init_args.pooling: last")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no out, no temporary directory


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_lora_classifier_exports_merged(kind, tokenizer, tmp_path):
    """Under peft the classifier exports with its adapters merged: a plain transformers classifier."""
    from peft import LoraConfig

    torch.manual_seed(0)
    backbone = (
        GPT(vocab_size=320, block_size=32, n_layer=2, n_head=2, n_embd=32) if kind == "gpt" else llama()
    )
    lora = LoraConfig(r=4, lora_alpha=8)
    # init_from: where the base weights would come from in `setup` (not called here)
    task = SequenceClassification(backbone, ["neg", "pos"], head_bias=False, peft=lora, init_from="base")
    with torch.no_grad():
        for name, p in task.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # B starts at zero: make the adapters change the logits
    model = to_hf_classifier(task.eval(), tokenizer)
    assert not any("lora" in k for k in model.state_dict())
    model.save_pretrained(tmp_path)
    assert check_classifier_export(task, tmp_path, tokenizer) <= 1e-5
    # ... and the adapters matter: without them the logits are others
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        adapted = task({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        for module in backbone.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)
        assert not torch.allclose(task({"input_ids": ids, "attention_mask": ids > 0}), adapted, atol=1e-3)
        torch.testing.assert_close(model(ids).logits, adapted, atol=1e-5, rtol=0)


def test_exported_classifier_truncates_at_the_block_size_it_was_trained_at(tmp_path, capsys):
    """Data block_size 8 on a model of 32: `pipeline(truncation=True)` reads the first 8 tokens of a
    long text, as gptlab's own test / predict do, not 32."""
    import yaml

    from finetune_data import finetune_config, write_sentiment

    config = finetune_config(tmp_path, "classification", write_sentiment(tmp_path))
    config["data"]["init_args"]["block_size"] = 8
    config["trainer"].update(max_steps=2, val_check_interval=1)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(tmp_path / "c.yaml"))
    assert code == 0, err
    ckpt = tmp_path / "logs" / "classification" / "version_0" / "checkpoints" / "last.ckpt"
    out = tmp_path / "out"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out))
    assert code == 0, err
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 8
    text = " ".join(["great movie, awful plot, good acting"] * 4)
    ids = tok(text)["input_ids"]
    assert len(ids) > 8  # longer than the block_size: truncation decides the answer
    task = SequenceClassification.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        ours = task(
            {"input_ids": torch.tensor([ids[:8]]), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
        ).softmax(-1)[0]
    result = pipeline("text-classification", model=str(out), device="cpu")(text, top_k=None, truncation=True)
    scores = {r["label"]: r["score"] for r in result}
    assert scores == pytest.approx({"negative": ours[0].item(), "positive": ours[1].item()}, abs=1e-5)


def test_export_with_a_tokenizer_of_another_vocabulary_is_refused(tiny_runs, tmp_path, capsys):
    """--tokenizer whose vocabulary differs from the run's own: one line, nothing written."""
    ckpt = tiny_runs.runs["classification"] / "checkpoints" / "last.ckpt"
    other = tiny_runs.runs["ner"] / "tokenizer"  # a BPE of the same size, trained on other texts
    out = tmp_path / "out"
    code, err = run_cli(
        capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out), "--tokenizer", str(other)
    )
    one_line_error(code, err, f"--tokenizer {other} is not the tokenizer the model was trained with")
    assert not out.exists()
    own = tiny_runs.runs["classification"] / "tokenizer"
    code, err = run_cli(
        capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out), "--tokenizer", str(own)
    )
    assert code == 0, err
