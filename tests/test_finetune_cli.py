"""Fine-tuning through the CLI: pretrain -> init_from -> fit / test / predict, bad input, shipped configs.

Runs in-process (`gptlab.cli.main`, the function main.py calls) on tiny data, so the whole chain
costs seconds; tests/test_cli.py covers the subprocess path of main.py itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml

from conftest import REPO, shared_data
from finetune_data import finetune_config, pretrain_config, write_corpus, write_ner, write_sentiment
from gptlab.cli import GPTLabCLI
from gptlab.models import HFBackbone
from gptlab.testing import check_task
from tiny_runs import run_cli


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str, run: bool = True) -> GPTLabCLI:
    """gptlab's CLI on `args`, in-process (pytest's own argv hidden from it)."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return GPTLabCLI(args=list(args), run=run)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> SimpleNamespace:
    """Tiny task data and one tiny pretraining run, shared by this module's tests."""
    tmp = tmp_path_factory.mktemp("finetune")
    (tmp / "sentiment").mkdir()
    (tmp / "ner").mkdir()
    corpus = write_corpus(tmp)
    cli("fit", "--config", str(write_yaml(tmp / "pretrain.yaml", pretrain_config(tmp, corpus))))
    run = tmp / "logs" / "pretrain" / "version_0"
    return SimpleNamespace(
        tmp=tmp,
        pretrain_run=run,
        pretrained=str(run / "checkpoints" / "last.ckpt"),
        sentiment=write_sentiment(tmp / "sentiment"),
        ner=write_ner(tmp / "ner"),
        runs={},
    )


def test_classification_from_pretrained_checkpoint(work, tmp_path, capsys):
    # The YAML names no backbone and no tokenizer: both come from the pretraining run.
    config = finetune_config(work.tmp, "classification", work.sentiment, init_from=work.pretrained)
    result = check_task(config, tmp_path)
    run = result["run_dir"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    pretrain = yaml.safe_load((work.pretrain_run / "config.yaml").read_text())
    assert saved["model"]["init_args"]["backbone"] == pretrain["model"]["init_args"]["backbone"]
    assert saved["data"]["init_args"]["tokenizer"] == str(work.pretrain_run / "tokenizer")
    hparams = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["label_names"] == ["negative", "positive"]

    report = result["report"]
    assert {"accuracy", "macro_f1", "weighted_f1", "loss"} <= set(report["metrics"])
    per_class, confusion = report["tables"]
    assert [row[0] for row in per_class["rows"]] == [
        "negative", "positive", "accuracy", "macro avg", "weighted avg",
    ]  # fmt: skip
    assert per_class["columns"] == ["precision", "recall", "f1-score", "support"]
    assert confusion["columns"] == ["negative", "positive"]
    assert sum(sum(row[1:]) for row in confusion["rows"]) == report["metrics"]["examples"] == 18

    code, err = run_cli(capsys, "predict", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert code == 0, err
    lines = (run / "predictions" / "predictions.tsv").read_text().splitlines()
    assert lines[0] == "text\tlabel\tprediction\tprobability"
    test_rows = work.sentiment["test"].read_text().splitlines()[1:]
    assert len(lines) == 1 + len(test_rows)
    for line, source in zip(lines[1:], test_rows, strict=True):
        text, gold, predicted, probability = line.split("\t")
        assert text == source.split("\t")[0].strip()
        assert gold == ["negative", "positive"][int(source.split("\t")[1])]
        assert predicted in ("negative", "positive") and 0.5 <= float(probability) <= 1.0
    work.runs["classification"] = run


def test_ner_from_pretrained_checkpoint(work, tmp_path, capsys):
    config = finetune_config(work.tmp, "ner", work.ner, init_from=work.pretrained)
    config["checkpoint"] = {"monitor": "val/f1", "mode": "max"}
    result = check_task(config, tmp_path, max_steps=6)
    run, report = result["run_dir"], result["report"]
    assert result["model"].label_names == ["O", "B-LOC", "B-PER", "I-PER"]
    assert {"entity_precision", "entity_recall", "entity_f1", "token_accuracy"} <= set(report["metrics"])
    entities, tokens = report["tables"]
    assert [row[0] for row in entities["rows"]][-3:] == ["micro avg", "macro avg", "weighted avg"]
    assert entities["rows"][-3][-1] == 20  # 10 test sentences x (PER + LOC)
    assert [row[0] for row in tokens["rows"]][:4] == ["O", "B-LOC", "B-PER", "I-PER"]
    assert report["metrics"]["words"] == 50

    code, err = run_cli(capsys, "predict", "--ckpt_path", str(run / "checkpoints" / "best.ckpt"))
    assert code == 0, err
    predicted = (run / "predictions" / "predictions.conll").read_text().strip().split("\n\n")
    gold = work.ner["test"].read_text().strip().split("\n\n")[1:]  # after -DOCSTART-
    assert len(predicted) == len(gold) == 10
    for sentence, source in zip(predicted, gold, strict=True):
        for line, source_line in zip(sentence.splitlines(), source.splitlines(), strict=True):
            word, gold_tag, tag = line.split(" ")
            assert [word, gold_tag] == [source_line.split()[0], source_line.split()[-1]]
            assert tag in ("O", "B-LOC", "B-PER", "I-PER")
    work.runs["ner"] = run


def _no_traceback(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("gptlab: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_bad_input_gives_one_clear_message(work, tmp_path, capsys):
    if set(work.runs) != {"classification", "ner"}:
        pytest.skip("needs the fine-tuned runs of the tests above")
    cls_run, ner_run = work.runs["classification"], work.runs["ner"]
    reports = {run: (run / "reports" / "test_report.json").read_bytes() for run in (cls_run, ner_run)}

    # An unknown label in the test data: file and line, the known labels.
    bad = tmp_path / "test.tsv"
    bad.write_text("sentence\tlabel\ngood movie \t1\nbad plot \tneutral\n")
    code, err = run_cli(capsys, "test", "--ckpt_path", str(cls_run / "checkpoints" / "last.ckpt"),
                        "--data.init_args.test_files", str(bad))  # fmt: skip
    _no_traceback(code, err, f"{bad} line 3", "unknown label 'neutral'", "negative, positive")

    # Empty text.
    bad.write_text("sentence\tlabel\n \t1\n")
    code, err = run_cli(capsys, "test", "--ckpt_path", str(cls_run / "checkpoints" / "last.ckpt"),
                        "--data.init_args.test_files", str(bad))  # fmt: skip
    _no_traceback(code, err, f"{bad} line 2", "empty text")

    # A label set that differs from the checkpoint's.
    code, err = run_cli(capsys, "test", "--ckpt_path", str(cls_run / "checkpoints" / "last.ckpt"),
                        "--data.init_args.label_names", "[negative, neutral, positive]")  # fmt: skip
    _no_traceback(code, err, "trained with labels ['negative', 'positive']", "'neutral'")

    # A CoNLL line with the wrong number of columns: file and line.
    conll = tmp_path / "bad.testb"
    conll.write_text("John NNP B-NP B-PER\nSmith NNP I-PER\n")
    code, err = run_cli(capsys, "test", "--ckpt_path", str(ner_run / "checkpoints" / "last.ckpt"),
                        "--data.init_args.test_files", str(conll))  # fmt: skip
    _no_traceback(code, err, f"{conll} line 2", "3 column(s), expected 4")

    # Nothing that existed was overwritten by the failing runs.
    for run, before in reports.items():
        assert (run / "reports" / "test_report.json").read_bytes() == before
        assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]


def test_init_from_hugging_face_directory(work, tmp_path):
    # A HF model directory (here: a tiny GPT-2 with the pretraining tokenizer) brings its config
    # and tokenizer; the backbone is rebuilt from config.json, the weights load at fit start.
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    hf_dir = tmp_path / "hf"
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(hf_dir)
    AutoTokenizer.from_pretrained(work.pretrain_run / "tokenizer").save_pretrained(hf_dir)
    config = finetune_config(work.tmp, "classification", work.sentiment, init_from=str(hf_dir))
    config["logs"] = str(tmp_path / "logs")
    fitted = cli("fit", "--config", str(write_yaml(tmp_path / "hf.yaml", config)), "--trainer.max_steps", "1")
    assert isinstance(fitted.model.backbone, HFBackbone)
    assert fitted.model.backbone.model.config.n_embd == 32
    assert fitted.datamodule.tokenizer_source == str(hf_dir)
    # fit started from the directory's weights: the embeddings moved by one step only.
    reference = GPT2LMHeadModel.from_pretrained(hf_dir).transformer.wte.weight
    moved = (fitted.model.backbone.model.transformer.wte.weight - reference).abs().max().item()
    assert 0 < moved < 0.01


@pytest.mark.parametrize("name", ["sst2", "conll2003"])
def test_shipped_finetune_configs_instantiate(work, tmp_path, monkeypatch, name):
    """configs/finetune/*.yaml parse and build, on tiny copies of the data and on the shared data."""
    monkeypatch.chdir(REPO)  # the configs' data paths are relative to the project root
    files = work.sentiment if name == "sst2" else work.ner
    common = ["--model.init_args.init_from", work.pretrained, "--logs", str(tmp_path / "logs")]
    roles = {"train": "train", "val": "dev", "test": "test"}
    swapped = [f"--data.init_args.{key}_files={files[role]}" for key, role in roles.items()]
    config = str(REPO / "configs" / "finetune" / f"{name}.yaml")
    # run=False: the CLI parses and instantiates (model, data, trainer) without a subcommand.
    built = cli("--config", config, *common, *swapped, run=False)
    task = "SequenceClassification" if name == "sst2" else "TokenClassification"
    assert type(built.model).__name__ == task
    assert built.model.label_names == built.datamodule.label_names
    # The real data: label names as the benchmark and README use them.
    shared = shared_data("sst2/train.tsv" if name == "sst2" else "conll2003/eng.train")
    built = cli("--config", config, *common, run=False)
    assert Path(built.datamodule.role_files["train"]).resolve() == shared.resolve()
    expected = (
        ["negative", "positive"]
        if name == "sst2"
        else ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
    )
    assert built.model.label_names == expected


@pytest.mark.parametrize("name", ["sst2_smollm2", "conll2003_smollm2"])
def test_shipped_smollm2_configs_train_and_export(name, work, fake_smollm2, tmp_path, monkeypatch, capsys):
    """The SmolLM2 configs, unchanged but for the data files, on a tiny Llama where the converted
    model lives (fake_smollm2): they fit, and export as transformers' Llama classifiers."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    monkeypatch.chdir(REPO)
    files = work.sentiment if name.startswith("sst2") else work.ner
    roles = {"train": "train", "val": "dev", "test": "test"}
    swapped = [f"--data.init_args.{key}_files={files[role]}" for key, role in roles.items()]
    args = [
        "--config",
        str(REPO / "configs" / "finetune" / f"{name}.yaml"),
        "--logs",
        str(tmp_path),
        *swapped,
    ]
    small = [
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    fitted = cli("fit", *args, *small)
    assert isinstance(fitted.model.backbone, HFBackbone)
    assert type(fitted.model.peft_config).__name__ == "LoraConfig"  # the shipped configs use LoRA
    assert fitted.model.backbone.model.config.model_type == "llama"
    if name.startswith("sst2"):
        assert fitted.model.head[1].bias is None  # what LlamaForSequenceClassification can hold
    # the real data: the label names the README reports
    built = cli(*args[:4], run=False)
    assert Path(built.datamodule.role_files["train"]).resolve().parent.name in ("sst2", "conll2003")
    out = tmp_path / "hf"
    code, err = run_cli(
        capsys, "export", "--ckpt_path", f"{fitted.trainer.log_dir}/checkpoints/last.ckpt", "--out", str(out),
        "--merged", "true",
    )  # fmt: skip
    assert code == 0, err
    auto = AutoModelForSequenceClassification if name.startswith("sst2") else AutoModelForTokenClassification
    model = auto.from_pretrained(out)
    kind = "SequenceClassification" if name.startswith("sst2") else "TokenClassification"
    assert type(model).__name__ == f"LlamaFor{kind}"
    assert list(model.config.id2label.values()) == fitted.model.label_names


def test_causal_lm_checkpoints_ignore_the_label_link(work):
    # The data -> model.label_names link must not leak into tasks without label names.
    hparams = torch.load(work.pretrained, weights_only=True)["hyper_parameters"]
    assert "label_names" not in hparams
    json.dumps(hparams)  # plain values only


def test_init_from_without_its_tokenizer_is_refused(work, tmp_path, capsys):
    # A checkpoint copied away from its run has no tokenizer beside it; training a new one would
    # not match the pretrained embeddings.
    stray = tmp_path / "model.ckpt"
    stray.write_bytes(Path(work.pretrained).read_bytes())
    config = finetune_config(work.tmp, "classification", work.sentiment, init_from=str(stray))
    code, err = run_cli(capsys, "fit", "--config", str(write_yaml(tmp_path / "stray.yaml", config)))
    _no_traceback(code, err, f"init_from={stray}: no tokenizer found", "data.init_args.tokenizer")


def test_shipped_pretraining_config_instantiates(work, tmp_path, monkeypatch):
    """configs/pretrain/english_small.yaml (the fine-tuning configs' starting point) builds, on tiny text."""
    monkeypatch.chdir(REPO)
    config = str(REPO / "configs" / "pretrain" / "english_small.yaml")
    corpus = str(work.tmp / "corpus.txt")
    args = ["--data.init_args.train_files", corpus, "--logs", str(tmp_path)]
    built = cli("--config", config, *args, run=False)
    assert built.model.backbone.config.n_layer == 4 and built.model.backbone.config.n_embd == 256
    assert built.datamodule.block_size == built.model.backbone.block_size == 128


def test_a_pretrained_hf_backbone_uses_its_own_tokenizer_not_a_recipe(tiny_runs, tmp_path, capsys):
    # A recipe (BPE, Char) would train a new vocabulary whose ids the pretrained embeddings do not
    # know; as with init_from, the model's own tokenizer is used, and a directory without one is refused.
    from transformers import AutoTokenizer

    from test_peft import save_llama

    tokenizer = tiny_runs.runs["causal_lm"] / "tokenizer"
    model_dir = save_llama(tmp_path / "llama", tokenizer)
    config = finetune_config(tmp_path, "classification", tiny_runs.files["classification"])
    config["logs"] = str(tmp_path / "logs")
    config["model"]["init_args"]["backbone"] = {
        "class_path": "gptlab.models.HFBackbone",
        "init_args": {"name_or_path": str(model_dir)},
    }
    path = write_yaml(tmp_path / "c.yaml", config)
    built = cli("--config", str(path), run=False)
    built.datamodule.prepare_data()
    built.datamodule.setup("fit")
    assert built.datamodule.tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()
    bare = tmp_path / "bare"
    save_llama(bare)
    config["model"]["init_args"]["backbone"]["init_args"]["name_or_path"] = str(bare)
    code, err = run_cli(capsys, "fit", "--config", str(write_yaml(tmp_path / "b.yaml", config)))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"name_or_path={bare}: no tokenizer files in it" in err, err
