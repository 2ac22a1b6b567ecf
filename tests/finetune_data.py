"""Tiny labelled data and experiment configs for the fine-tuning tests (no download, seconds to train)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

POSITIVE = "good great fine lovely superb".split()
NEGATIVE = "bad awful poor dull boring".split()
FILLER = "the movie was plot acting and a very".split()
PEOPLE = ["John", "Mary", "Peter", "Anna"]
PLACES = ["Paris", "London", "Berlin", "Rome"]


def write_sentiment(directory: Path, rows: int = 120, seed: int = 0) -> dict[str, Path]:
    """train / dev / test TSV files (`sentence<TAB>label`, 0 / 1) that a tiny model learns in steps."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        label = i % 2
        words = rng.choices(FILLER, k=3) + rng.choices(POSITIVE if label else NEGATIVE, k=2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)} \t{label}")
    cut = int(rows * 0.7), int(rows * 0.85)
    files = {}
    for name, part in (
        ("train", lines[: cut[0]]),
        ("dev", lines[cut[0] : cut[1]]),
        ("test", lines[cut[1] :]),
    ):
        files[name] = directory / f"{name}.tsv"
        files[name].write_text("sentence\tlabel\n" + "\n".join(part) + "\n")
    return files


def ner_sentences(count: int, seed: int = 0) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    sentences = []
    for _ in range(count):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        sentences.append(
            [(person, "B-PER"), ("Smith", "I-PER"), ("went", "O"), ("to", "O"), (place, "B-LOC")]
        )
    return sentences


def write_conll(path: Path, sentences: list[list[tuple[str, str]]], docstart: bool = True) -> Path:
    """A CoNLL-2003 style file: `word POS CHUNK TAG`, blank lines between sentences."""
    blocks = ["\n".join(f"{w} NNP B-NP {t}" for w, t in s) for s in sentences]
    path.write_text(("-DOCSTART- -X- -X- O\n\n" if docstart else "") + "\n\n".join(blocks) + "\n")
    return path


def write_ner(directory: Path, seed: int = 0) -> dict[str, Path]:
    sentences = ner_sentences(60, seed)
    return {
        "train": write_conll(directory / "ner.train", sentences[:40]),
        "dev": write_conll(directory / "ner.testa", sentences[40:50]),
        "test": write_conll(directory / "ner.testb", sentences[50:]),
    }


def write_corpus(directory: Path) -> Path:
    """Unlabelled text for a tiny pretraining: the words of both tasks, as running text."""
    rng = random.Random(1)
    text = [" ".join(rng.choices(FILLER + POSITIVE + NEGATIVE, k=8)) for _ in range(150)]
    text += [" ".join(w for w, _ in s) + " ." for s in ner_sentences(150, seed=2)]
    path = directory / "corpus.txt"
    path.write_text("\n".join(text) + "\n")
    return path


TRAINER = {
    "accelerator": "cpu",
    "devices": 1,
    "max_steps": 6,
    "val_check_interval": 3,
    "check_val_every_n_epoch": None,
    "log_every_n_steps": 1,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
GPT = {"vocab_size": 320, "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32}


def pretrain_config(tmp: Path, corpus: Path) -> dict[str, Any]:
    return {
        "experiment": "pretrain",
        "logs": str(tmp / "logs"),
        "model": {
            "class_path": "gptlab.tasks.CausalLM",
            "init_args": {"backbone": {"class_path": "gptlab.models.GPT", "init_args": GPT}},
        },
        "data": {
            "class_path": "gptlab.data.TextDataModule",
            "init_args": {
                "train_files": str(corpus),
                "tokenizer": {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}},
                "block_size": 32,
                "val_fraction": 0.1,
                "batch_size": 4,
                "cache_dir": str(tmp / "cache"),
            },
        },
        "trainer": dict(TRAINER, max_steps=4, val_check_interval=2),
    }


def finetune_config(
    tmp: Path, task: str, files: dict[str, Path], init_from: str | None = None, **model_args: Any
) -> dict[str, Any]:
    """A fine-tuning experiment: `task` is "classification", "ner" or "regression".

    With `init_from`, the backbone and tokenizer are left to the CLI (taken from the pretraining
    run); without it, a tiny GPT and a BPE tokenizer trained on the task data.
    """
    model_class, data_class, data_args = {
        "classification": (
            "gptlab.tasks.SequenceClassification",
            "gptlab.data.ClassificationDataModule",
            {"text_column": "sentence", "label_names": ["negative", "positive"]},
        ),
        "regression": (
            "examples.regression.SequenceRegression",
            "examples.regression.RegressionDataModule",
            {"text_column": "sentence"},
        ),
        "ner": ("gptlab.tasks.TokenClassification", "gptlab.data.TokenClassificationDataModule", {}),
    }[task]
    model = {"optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}}, "scheduler": None}
    model.update(model_args)
    data = {
        "train_files": str(files["train"]),
        "val_files": str(files["dev"]),
        "test_files": str(files["test"]),
        "block_size": 32,
        "batch_size": 8,
        "cache_dir": str(tmp / "cache"),
        **data_args,
    }
    if init_from is None:
        model["backbone"] = {"class_path": "gptlab.models.GPT", "init_args": GPT}
        data["tokenizer"] = {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}}
    else:
        model["init_from"] = init_from
    return {
        "experiment": task,
        "logs": str(tmp / "logs"),
        "model": {"class_path": model_class, "init_args": model},
        "data": {"class_path": data_class, "init_args": data},
        "trainer": dict(TRAINER),
    }
