"""A new data shape made by subclassing gptlab's DataModule: labelled sentence pairs (MNLI, QQP, RTE).

    premise<TAB>hypothesis<TAB>label   ->   premise <eos> hypothesis, label id   ->   labels (B,)

Each text is tokenized alone and the longer one is cut first, so a long premise never pushes the
hypothesis out of block_size (ClassificationDataModule joins text columns and cuts at the end).
Roles, the held-out share, reading tables and collate are the base's (docs/data-shapes.md).

model: {class_path: gptlab.tasks.SequenceClassification}
data:  {class_path: examples.sentence_pair.SentencePairDataModule, init_args: {train_files: ...}}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from gptlab.data.base import IGNORE_INDEX, DataModule, Examples, encode_texts, warn_truncated
from gptlab.data.labels import LabelMap, sort_labels, unknown_label_hint
from gptlab.data.sources import Files, Problems, expand_files, read_table
from gptlab.data.tokenizers import TokenizerRecipe
from gptlab.errors import DataError


class SentencePairDataModule(DataModule):
    """Two texts and a label per example, for `gptlab.tasks.SequenceClassification`."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        train_files: Files = None,
        val_files: Files = None,
        test_files: Files = None,
        predict_files: Files = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        columns: tuple[str, str] = ("premise", "hypothesis"),
        label_column: str = "label",
        label_names: list[str] | None = None,
        val_fraction: float = 0.1,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
    ) -> None:
        """
        Args:
            tokenizer: a tokenizer directory / hub name, or a recipe trained on the training pairs.
            train_files: training pairs: csv / tsv (with a header) / jsonl / json / parquet.
            val_files: validation pairs; default: the dataset's split, else `val_fraction` of train.
            test_files: test pairs; default: the dataset's test split.
            predict_files: pairs to label with `predict` (no label column needed); default: test.
            dataset: a Hugging Face dataset (hub name or save_to_disk directory).
            dataset_config: the dataset's configuration name.
            columns: the two text columns, in the order the model reads them.
            label_column: the label column.
            label_names: the labels in id order; default: the sorted training labels.
            val_fraction: share of the training pairs held out for validation (seeded); 0: none.
            block_size: the longest input in tokens, both texts and the separator included.
            batch_size: pairs per training batch (per device).
            eval_batch_size: pairs per validation / test / predict batch; default batch_size.
            num_workers: DataLoader worker processes.
            seed: seeds the training order and the held-out share.
            cache_dir: gptlab's cache (trained tokenizers).
        """
        super().__init__(
            tokenizer, batch_size, eval_batch_size, num_workers, seed, cache_dir, train_files=train_files,
            val_files=val_files, test_files=test_files, predict_files=predict_files, dataset=dataset,
            dataset_config=dataset_config, val_fraction=val_fraction,
        )  # fmt: skip
        self.columns, self.label_column, self.block_size = list(columns), label_column, block_size
        self.names = label_names

    def records(self, role: str, labelled: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, row) of every pair of `role` (held out of train, predict from test: the base's)."""
        return self.role_examples(role, lambda r: self.source(r, labelled), "training pairs")

    def source(self, role: str, labelled: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        columns = self.columns + [self.label_column] * labelled
        if self.role_files[role] is not None:
            for path in expand_files(self.role_files[role], f"{role}_files"):
                yield from read_table(path, columns)
            return
        split = self.dataset_splits().get(role)
        if split is None or any(c not in split.column_names for c in columns):
            raise DataError(f"no {role} data with columns {columns}: give {role}_files or a dataset")
        yield from ((f"dataset {self.dataset!r} {role} row {i}", row) for i, row in enumerate(split))

    @property
    def label_names(self) -> list[str]:
        """The labels in id order: given, or the sorted training labels (the CLI links them to the model)."""
        if self.names is None:
            self.names = sort_labels({str(row[self.label_column]) for _, row in self.source("train")})
        return self.names

    def corpus_fingerprint(self) -> str:
        return self.train_fingerprint({"columns": self.columns})

    def tokenizer_corpus(self) -> Iterator[str]:
        yield from (str(row[c]) for _, row in self.source("train", labelled=False) for c in self.columns)

    def check_source(self, role: str) -> None:
        next(self.records(role, labelled=role == "test"), None)

    def build(self, role: str) -> Examples:
        labels, problems = LabelMap(self.label_names), Problems(f"{role} data")
        rows = list(self.records(role, labelled=role != "predict" or self.role_files["predict"] is None))
        targets = [
            labels.get(row[self.label_column]) if self.label_column in row else None for _, row in rows
        ]
        for (where, row), target in zip(rows, targets, strict=True):
            if target is None and self.label_column in row:
                problems.add(
                    f"{where}: unknown label {row[self.label_column]!r} (labels: {labels.describe()})"
                )
        problems.raise_if_any(unknown_label_hint(given=self.names is not None))
        wheres = [where for where, _ in rows]
        first, second = (
            encode_texts(self.tokenizer, [str(row[c]) for _, row in rows], wheres, f"{role} data")[
                "input_ids"
            ]
            for c in self.columns
        )
        eos = self.tokenizer.eos_token_id
        budget, items = self.block_size - 1, []  # the separator takes one position
        for a, b, target, (_, row) in zip(first, second, targets, rows, strict=True):
            keep = min(len(a), max(budget - len(b), budget - budget // 2))  # the longer text is cut first
            ids = a[:keep] + [self.pad_token_id if eos is None else eos] + b[: budget - keep]
            text = "\n".join(str(row[c]) for c in self.columns)  # for the predictions file
            items.append(
                {"input_ids": ids, "labels": IGNORE_INDEX if target is None else target, "text": text}
            )
        cut = sum(len(a) + len(b) > budget for a, b in zip(first, second, strict=True))
        longest = max(len(a) + len(b) + 1 for a, b in zip(first, second, strict=True))
        warn_truncated(
            f"{role} data", cut, len(items), longest, self.block_size, "the longer text was cut first"
        )
        return Examples(items)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().collate([{k: f[k] for k in ("input_ids", "labels")} for f in features])
        return {**batch, "text": [f["text"] for f in features]}  # predict_step writes the texts
