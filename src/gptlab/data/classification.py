"""Text + label data for sequence classification: csv / tsv / jsonl / json / parquet or a `datasets` dataset.

    train.tsv      sentence<TAB>label          one example per row; text column(s) and label column
    dev.tsv        ...                         configurable; several text columns are joined
    test.tsv       ...
        |  read, check (empty text, unknown label: file + line), map labels to ids
        v
    {"input_ids": [...], "labels": 3}          truncated to block_size (counted warning)
        |  collate (DataModule)
        v
    input_ids (B, T), attention_mask (B, T), labels (B,)   or (B, C) multi-hot with multi_label

Label names are given (`label_names`) or inferred from the training labels: sorted, numerically
when every label is an integer. `label_names` is cheap (it reads the training label column only,
no tokenizer), so the CLI passes it to the model when both are built; the model saves it with
the checkpoint, and test / predict from that checkpoint reuse it. Integer labels index the names
when no name is itself an integer (SST-2's 0 / 1 with `label_names: [negative, positive]`).

Tokenizing these datasets takes seconds, so it happens in `setup` on each rank (no disk cache).
Roles, the held-out split and `setup` are the base DataModule's; reading tables is sources.py's
(docs/design.md §4.4).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from gptlab.data.base import IGNORE_INDEX, DataModule, Examples, encode_texts, warn_truncated
from gptlab.data.labels import (
    LabelMap,
    class_label_names,
    sort_labels,
    unknown_label_hint,
    warn_unused_labels,
)
from gptlab.data.sources import Files, Problems, expand_files, read_table
from gptlab.data.tokenizers import TokenizerRecipe
from gptlab.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- the DataModule
class ClassificationDataModule(DataModule):
    """Texts with one label (or several, `multi_label`) each, for `gptlab.tasks.SequenceClassification`."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        train_files: Files = None,
        val_files: Files = None,
        test_files: Files = None,
        predict_files: Files = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_column: str | int | list[str | int] = "text",
        label_column: str | int = "label",
        header: bool = True,
        column_names: list[str] | None = None,
        label_names: list[str | int] | None = None,
        val_fraction: float = 0.1,
        multi_label: bool = False,
        label_separator: str = ",",
        text_separator: str = "\n",
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
    ) -> None:
        """
        Args:
            tokenizer: a tokenizer directory / hub name, or a recipe trained on the training texts.
                When fine-tuning with `init_from`, the CLI uses the pretraining run's tokenizer.
            train_files: csv / tsv / jsonl / json / parquet file(s) or globs of training examples.
            val_files: validation examples (same format); default: the dataset's validation split.
            test_files: test examples for `test`; default: the dataset's test split.
            predict_files: examples to label with `predict` (the label column may be absent);
                default: the test examples.
            dataset: a Hugging Face dataset (save_to_disk directory or hub name) with train and
                optionally validation / test splits; files given for a role take precedence.
            dataset_config: the dataset's configuration name, if it has several.
            text_column: column with the text, or a list of columns joined with `text_separator`
                (sentence pairs); a position (0 = first) in csv / tsv files without a header.
            label_column: column with the label (a name or an integer; with `multi_label`, a
                list or a `label_separator`-separated string); a position without a header.
            header: csv / tsv files start with a header line naming the columns. false: every
                line is an example, and columns are named by position (0, 1, ...) or `column_names`.
            column_names: names of the columns of csv / tsv files that have no header line, in
                order (e.g. [text, label]); implies `header: false`.
            label_names: the labels, in id order. Default: inferred from the training labels
                (sorted). Test and predict from a checkpoint use the checkpoint's.
            val_fraction: share of the training examples held out (seeded by `seed`) for
                validation when there are no val_files and no validation split; 0: no validation
                (then `best.ckpt` is simply the latest weights).
            multi_label: each example has any number of labels (sigmoid + BCE in the task).
            label_separator: separates labels in one text field when `multi_label` is set.
            text_separator: joins several text columns into one input.
            block_size: the longest input in tokens; longer texts are truncated (with a counted
                warning). At most the model's block_size.
            batch_size: examples per training batch (per device).
            eval_batch_size: examples per validation / test / predict batch; default batch_size.
            num_workers: DataLoader worker processes.
            seed: seeds the training order (a function of seed and epoch).
            cache_dir: gptlab's cache (trained tokenizers).
        """
        super().__init__(
            tokenizer,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cache_dir,
            train_files=train_files,
            val_files=val_files,
            test_files=test_files,
            predict_files=predict_files,
            dataset=dataset,
            dataset_config=dataset_config,
            val_fraction=val_fraction,
        )
        if block_size < 1:
            raise ConfigError(f"block_size={block_size} must be at least 1")
        if train_files is None and dataset is None:
            raise ConfigError(
                "ClassificationDataModule needs train_files or a dataset (the label names come from it)"
            )
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction} must be in [0, 1)")
        # Positions are column names too: a headerless file's columns are named "0", "1", ...
        self.text_columns = [
            str(c) for c in ([text_column] if isinstance(text_column, str | int) else text_column)
        ]
        if not self.text_columns:
            raise ConfigError("text_column must name at least one column")
        self.label_column = str(label_column)
        # None: the first line of a csv / tsv file is its header; a list: the files have none.
        self.column_names = list(column_names) if column_names is not None else (None if header else [])
        twice = sorted({str(c) for c in self.column_names or [] if self.column_names.count(c) > 1})
        if twice:
            # A row becomes {name: field}: a repeated name keeps its last field only, e.g. the label
            # fed to the model as the text (a perfect-looking classifier on leaked labels).
            raise ConfigError(
                f"data.init_args.column_names={self.column_names}: {', '.join(map(repr, twice))} given "
                f"more than once; give each column of the files its own name, in order"
            )
        self.multi_label = multi_label
        self.label_separator = label_separator
        self.text_separator = text_separator
        self.block_size = block_size
        # Integer names (label_names: [0, 1, 2]) are the labels as the files write them.
        self._given_label_names = [str(n) for n in label_names] if label_names is not None else None
        self._label_names: list[str] | None = self._given_label_names
        self._label_map: LabelMap | None = None

    # ----------------------------------------------------------------- reading
    def records(self, role: str, with_labels: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, record) of every example of `role`; predict falls back to the test examples."""
        yield from self.role_examples(
            role, lambda r: self._source_records(r, with_labels), "training examples"
        )

    def _source_records(self, role: str, with_labels: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        files = self.role_files[role]
        columns = [*self.text_columns, self.label_column] if with_labels else list(self.text_columns)
        if files is not None:
            for path in expand_files(files, f"{role}_files"):
                # A file to predict may lack its label column (the last name).
                optional = [] if with_labels else [self.label_column]
                yield from read_table(path, columns, self.column_names, optional)
            return
        split = self.dataset_splits().get(role)
        if split is None:
            raise DataError(f"no {role} data: give {role}_files or a dataset with a {role} split")
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DataError(
                f"dataset={self.dataset!r} ({role} split) has no column {missing} "
                f"(columns: {split.column_names})"
            )
        for i, record in enumerate(split):
            yield f"dataset {self.dataset!r} {role} split row {i}", record

    def label_values(self, value: Any) -> list[Any]:
        """The labels in one label field (one, or several with multi_label)."""
        if not self.multi_label:
            return [value]
        if isinstance(value, list | tuple):
            return list(value)
        return [v for v in str(value).split(self.label_separator) if v.strip()]

    # ----------------------------------------------------------------- facts for the model
    @property
    def label_names(self) -> list[str]:
        """The label names in id order: given, a dataset's ClassLabel names, or the sorted training labels.

        Reads only the training label column (no tokenizer): cheap enough to link to the model.
        """
        if self._label_names is None:
            split = self.dataset_splits().get("train") if self.role_files["train"] is None else None
            names = class_label_names(split.features.get(self.label_column)) if split is not None else None
            if names is None:
                if split is not None:
                    if self.label_column not in split.column_names:
                        raise DataError(
                            f"dataset={self.dataset!r} (train split) has no column {self.label_column!r} "
                            f"(columns: {split.column_names}); set label_column"
                        )
                    rows = (
                        (f"row {i}", {self.label_column: v}) for i, v in enumerate(split[self.label_column])
                    )
                else:
                    rows = self._label_rows("train")
                spellings: dict[str, set[str]] = {}
                for _, record in rows:
                    for v in self.label_values(record[self.label_column]):
                        spellings.setdefault(str(v).strip(), set()).add(str(v))
                values = set(spellings)
                values.discard("")
                merged = {k: sorted(v) for k, v in spellings.items() if k and len(v) > 1}
                if merged:  # one class, as LabelMap.get strips: said, since they could be meant apart
                    shown = "; ".join(
                        f"{' and '.join(map(repr, v))} as {k!r}" for k, v in list(merged.items())[:3]
                    )
                    rank_zero_warn(
                        f"gptlab: training labels that differ only by surrounding whitespace are one label: "
                        f"{shown}; if they are different classes, name them apart"
                    )
                if not values:
                    raise DataError("the training data has no labels: check label_column")
                names = sort_labels(values)
            self._label_names = names
        return self._label_names

    def _label_rows(self, role: str) -> Iterator[tuple[str, dict[str, Any]]]:
        files = self.role_files[role]
        for path in expand_files(files, f"{role}_files"):
            yield from read_table(path, [self.label_column], self.column_names)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    # ----------------------------------------------------------------- DataModule hooks
    def corpus_fingerprint(self) -> str:
        return self.train_fingerprint({"columns": self.text_columns})

    def tokenizer_corpus(self) -> Iterator[str]:
        # All training texts, the held-out ones included: the vocabulary does not depend on the split.
        for _, record in self._source_records("train", with_labels=False):
            yield self._text(record)

    def _text(self, record: dict[str, Any]) -> str:
        return self.text_separator.join(
            "" if record[c] is None else str(record[c]) for c in self.text_columns
        )

    def check_source(self, role: str) -> None:
        next(self._source_records(role, with_labels=role == "test"), None)

    def build(self, role: str) -> Examples:
        """Read, check and tokenize the examples of `role`."""
        # Predict files may come without labels; everywhere else they are required.
        with_labels = role != "predict" or self._predict_has_labels()
        problems = Problems(f"{role} data")
        texts, targets, wheres = [], [], []
        for where, record in self.records(role, with_labels):
            text = self._text(record)
            if not text.strip():
                problems.add(f"{where}: empty text in column(s) {', '.join(self.text_columns)}")
                continue
            target = self.encode_label(record[self.label_column], where, problems) if with_labels else None
            texts.append(text)
            targets.append(target)
            wheres.append(where)
        problems.raise_if_any(unknown_label_hint(self._given_label_names is not None))
        if role == "train" and self._given_label_names is not None and self._label_map is not None:
            used = {t for t in targets if isinstance(t, int)} | {
                i for t in targets if isinstance(t, list) for i, hot in enumerate(t) if hot
            }
            warn_unused_labels(self.label_names, used, self.role_files[role] or "the dataset's train split")
        if not texts:
            source = self.role_files[role] or f"the dataset's {role} split"
            raise DataError(
                f"{role} data: no examples in {source}; give data.init_args.{role}_files with at least one "
                f"labelled row" + ("" if role == "train" else f" (or leave {role}_files out)")
            )
        ids = encode_texts(self.tokenizer, texts, wheres, f"{role} data")["input_ids"]
        empty = [w for w, seq in zip(wheres, ids, strict=True) if not seq]
        if empty:
            raise DataError(f"{role} data: {len(empty)} text(s) give no tokens, e.g. {empty[0]}")
        lengths = [len(seq) for seq in ids]
        warn_truncated(
            f"{role} data",
            sum(n > self.block_size for n in lengths),
            len(ids),
            max(lengths),
            self.block_size,
            "the model sees only that part",
        )
        items = []
        for text, seq, target in zip(texts, ids, targets, strict=True):
            item: dict[str, Any] = {"input_ids": seq[: self.block_size], "labels": target}
            if target is None:
                item["labels"] = [IGNORE_INDEX] * self.num_labels if self.multi_label else IGNORE_INDEX
            if role == "predict":
                item["text"] = text
            items.append(item)
        return Examples(items)

    def _predict_has_labels(self) -> bool:
        try:
            next(self.records("predict", with_labels=True), None)
        except DataError:
            return False
        return True

    def encode_label(self, value: Any, where: str, problems: Problems) -> Any:
        """The training target of one label field: a class id, or a multi-hot list with multi_label.

        Override it for other targets (e.g. a float for regression). A bad value is added to
        `problems` (with `where`, the file and line) and gives None.
        """
        if self._label_map is None:
            self._label_map = LabelMap(self.label_names)
        labels = self._label_map
        values = self.label_values(value)
        ids = [labels.get(v) for v in values]
        unknown = [v for v, i in zip(values, ids, strict=True) if i is None]
        if unknown or (not values and not self.multi_label):
            shown = ", ".join(repr(v) for v in unknown) or repr(value)
            problems.add(f"{where}: unknown label {shown} (labels: {labels.describe()})")
            return None
        if not self.multi_label:
            return ids[0]
        hot = [0] * len(labels.names)
        for i in ids:
            hot[i] = 1
        return hot

    # ----------------------------------------------------------------- batches
    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = super().collate(features)
        if self.multi_label:
            # (B, C) multi-hot rows, not token sequences: no padding to the input length.
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        if "text" in features[0]:
            # Predict batches carry their texts through, for the predictions file.
            batch["text"] = [f["text"] for f in features]
        return batch
