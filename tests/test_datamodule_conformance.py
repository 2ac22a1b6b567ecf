"""`gptlab.testing.check_datamodule` passes on every shipped data shape and on the example shape
(examples/sentence_pair.py), and fails with a clear message on a broken one."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import REPO
from finetune_data import finetune_config, write_ner, write_sentiment
from gptlab.data import BPE, Char, ClassificationDataModule, SFTDataModule, TextDataModule
from gptlab.testing import check_datamodule, check_task

TOKENIZER = {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}}


def test_text_conforms(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(12)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.txt").write_text("the lazy dog sleeps\n")
    (tmp_path / "prompts.txt").write_text("the quick\nover the\n")
    data = TextDataModule(
        tokenizer=Char(),
        train_files=str(tmp_path / "train.txt"),
        test_files=str(tmp_path / "test.txt"),
        predict_files=str(tmp_path / "prompts.txt"),
        block_size=16,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    result = check_datamodule(data, tmp_path)
    assert result["batches"]["train"]["input_ids"].shape == (4, 17)  # block_size + 1 per window


def test_classification_conforms_from_a_config(tmp_path):
    files = write_sentiment(tmp_path)
    config = {
        "class_path": "gptlab.data.ClassificationDataModule",
        "init_args": {
            "tokenizer": TOKENIZER,
            "train_files": str(files["train"]),
            "test_files": str(files["test"]),
            "text_column": "sentence",
            "block_size": 16,
            "batch_size": 16,
        },
    }
    result = check_datamodule(config, tmp_path)  # validation: a held-out val_fraction of train
    assert result["batches"]["train"]["labels"].shape == (16,)


def test_token_classification_conforms_from_a_config(tmp_path):
    files = write_ner(tmp_path)
    config = {
        "class_path": "gptlab.data.TokenClassificationDataModule",
        "init_args": {
            "tokenizer": TOKENIZER,
            "train_files": str(files["train"]),
            "val_files": str(files["dev"]),
            "test_files": str(files["test"]),
            "batch_size": 8,
        },
    }
    batch = check_datamodule(config, tmp_path)["batches"]["test"]
    assert batch["labels"].shape == batch["input_ids"].shape


def test_sft_conforms(tmp_path):
    records = [{"prompt": f"What is {a} plus {a}? ", "completion": f"{a + a}"} for a in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "predict.txt").write_text("What is 2 plus 3? \n")
    data = SFTDataModule(
        tokenizer=BPE(vocab_size=300),
        train_files=str(tmp_path / "train.jsonl"),
        predict_files=str(tmp_path / "predict.txt"),
        val_fraction=0.25,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    batch = check_datamodule(data, tmp_path)["batches"]["test"]  # test: the validation examples
    assert {"prompt_length", "prompt", "reference"} <= set(batch)


def write_pairs(tmp_path):
    rows = [
        ("a man plays a guitar", "a person makes music", "entailment"),
        ("a man plays a guitar", "nobody is playing", "contradiction"),
        ("a dog runs in the park", "an animal is outside", "entailment"),
        ("a dog runs in the park", "the dog is asleep", "contradiction"),
        ("two kids read a long book " * 8, "children are reading", "entailment"),
    ] * 4
    for name, part in (("train", rows), ("test", rows[:5])):
        body = "".join(f"{p}\t{h}\t{label}\n" for p, h, label in part)
        (tmp_path / f"{name}.tsv").write_text("premise\thypothesis\tlabel\n" + body)
    return {"train": tmp_path / "train.tsv", "dev": tmp_path / "test.tsv", "test": tmp_path / "test.tsv"}


def test_sentence_pair_example_conforms(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # as `python main.py` does, so YAML can name examples.*
    write_pairs(tmp_path)
    config = {
        "class_path": "examples.sentence_pair.SentencePairDataModule",
        "init_args": {
            "tokenizer": TOKENIZER,
            "train_files": str(tmp_path / "train.tsv"),
            "test_files": str(tmp_path / "test.tsv"),
            "block_size": 24,
            "eval_batch_size": 8,
            "batch_size": 4,
        },
    }
    with pytest.warns(UserWarning, match="longer than block_size=24"):
        result = check_datamodule(config, tmp_path)
    data, batch = result["datamodule"], result["batches"]["test"]
    assert data.label_names == ["contradiction", "entailment"]
    eos, long_premises = data.tokenizer.eos_token_id, 0
    for row, mask, text in zip(batch["input_ids"], batch["attention_mask"], batch["text"], strict=True):
        premise, hypothesis = text.split("\n")
        ids = row[mask.bool()].tolist()  # premise <eos> hypothesis
        assert ids.count(eos) == 1 and len(ids) <= 24
        if len(premise) > 100:  # the long premise is cut, not the short hypothesis after it
            long_premises += 1
            assert len(ids) == 24 and data.tokenizer.decode(ids[ids.index(eos) + 1 :]) == hypothesis
    assert long_premises == 1


def test_sentence_pair_example_fine_tunes_with_the_stock_task(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    files = write_pairs(tmp_path)
    config = finetune_config(tmp_path, "classification", files)
    config["data"]["class_path"] = "examples.sentence_pair.SentencePairDataModule"
    for name in ("text_column", "label_names"):  # ClassificationDataModule's, not this shape's
        del config["data"]["init_args"][name]
    result = check_task(config, tmp_path)
    assert result["model"].label_names == ["contradiction", "entailment"]  # linked from the data


class LeftPadded(ClassificationDataModule):
    def collate(self, features):
        batch = super().collate(features)
        return {
            **batch,
            "input_ids": batch["input_ids"].flip(1),
            "attention_mask": batch["attention_mask"].flip(1),
        }


class GlobalShuffle(ClassificationDataModule):
    def train_dataloader(self):  # torch's global generator: another order on every call
        return DataLoader(
            self.train_dataset, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate
        )


class FixedFingerprint(ClassificationDataModule):
    def corpus_fingerprint(self):
        return "always the same"  # a changed training file would reuse a stale tokenizer


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (LeftPadded, "right-padded"),
        (GlobalShuffle, "same seed give other training batches"),
        (FixedFingerprint, "corpus_fingerprint does not change"),
    ],
)
def test_a_broken_data_module_fails_with_a_clear_message(tmp_path, broken, message):
    files = write_sentiment(tmp_path, rows=40)
    torch.manual_seed(0)
    data = broken(
        tokenizer=BPE(vocab_size=300),
        train_files=str(files["train"]),
        val_files=str(files["dev"]),
        test_files=str(files["test"]),
        text_column="sentence",
        batch_size=8,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(AssertionError, match=f"data conformance: {broken.__name__}: .*{message}"):
        check_datamodule(data, tmp_path)
