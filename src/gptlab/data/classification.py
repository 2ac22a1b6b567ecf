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
The helpers at the top (file reading, label maps) are shared with token classification.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset

from gptlab.data.base import (
    IGNORE_INDEX,
    DataError,
    DataModule,
    Examples,
    encode_texts,
    list_problems,
    shorten_problem,
)
from gptlab.data.labels import (
    LabelMap,
    class_label_names,
    sort_labels,
    unknown_label_hint,
    warn_unused_labels,
)
from gptlab.data.sources import expand_files, load_dataset_splits
from gptlab.data.tokenizers import TokenizerRecipe
from gptlab.errors import ConfigError

if TYPE_CHECKING:
    # `datasets` (with pandas) costs a second at start-up: imported where a dataset is read.
    import datasets

ROLES = ("train", "val", "test", "predict")
MAX_PROBLEM_CHARS = 240  # one problem's text at most
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")

Files = str | list[str] | None


# ----------------------------------------------------------------------------- shared helpers
class Problems:
    """Collects what is wrong with the input data, then raises one DataError listing it."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, hint: str = "") -> None:
        if not self.items:
            return
        raise DataError(
            f"{self.what}: {len(self.items)} problem(s):\n  "
            + list_problems(self.items, more="more")
            + (f"\n{hint}" if hint else "")
        )


def shorten(text: str, limit: int = MAX_PROBLEM_CHARS) -> str:
    """`text` cut to `limit` characters, marking the cut."""
    return shorten_problem(text, limit)


def held_out(count: int, fraction: float, seed: int, what: str) -> set[int]:
    """Indices of a seeded `fraction` of `count` training examples (at least one), held out for validation."""
    held = max(1, round(count * fraction))
    if held >= count:
        raise DataError(
            f"val_fraction={fraction} of {count} training examples leaves none to train on: lower "
            f"data.init_args.val_fraction (0: no validation), add {what}, or give val_files"
        )
    return set(np.random.default_rng(seed).permutation(count)[:held].tolist())


def read_table(
    path: Path, columns: Sequence[str], names: Sequence[str] | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for every row of a csv / tsv / jsonl / json / parquet file.

    `where` is "<path> line N" (text formats) or "<path> row N" (parquet), for error messages.
    A csv / tsv file's first line is its header, which must hold every name in `columns`; with
    `names`, the file has no header and `names` name its columns in order (an empty list: by
    position, "0", "1", ...). `.tsv` is read without quoting (GLUE's convention: sentences contain
    quote characters), `.csv` with standard quoting.
    """
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
    try:
        if suffix == ".parquet":
            yield from _read_parquet(path, columns)
        elif suffix in (".csv", ".tsv"):
            yield from _read_delimited(path, columns, suffix, names)
        else:
            yield from _read_json(path, columns)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 ({err.reason} at byte {err.start}); re-encode it as UTF-8"
        ) from None


def _missing(path: Path, columns: Sequence[str], present: Sequence[str], header: bool = False) -> DataError:
    missing = [c for c in columns if c not in present]
    shown = ", ".join(shorten(repr(c), 60) for c in present[:20])
    hint = "set text_column / label_column to the file's column names"
    if header and looks_like_data(present):
        # Two columns are almost always text and label: the module's default column names.
        example = (
            "[text, label]" if len(present) == 2 else f"[{', '.join(f'col{i}' for i in range(len(present)))}]"
        )
        hint = (
            f"its first line looks like data, not a header: if the file has no header line, set "
            f"data.init_args.column_names to one name per column (e.g. column_names: {example}) "
            f"or header: false and text_column / label_column by position (0, 1, ...)"
        )
    return DataError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {shown}); {hint}")


def looks_like_data(header: Sequence[str]) -> bool:
    """A header row that is probably the first example: a field with spaces, a number or a long text."""
    return any(
        " " in field.strip() or len(field) > 40 or field.strip().lstrip("-").replace(".", "", 1).isdigit()
        for field in header
    )


def _read_delimited(
    path: Path, columns: Sequence[str], suffix: str, names: Sequence[str] | None
) -> Iterator[tuple[str, dict]]:
    options = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if suffix == ".tsv" else {"delimiter": ","}
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, **options)
        line = 0
        if names is None:
            header = next(reader, None)
            if header is None:
                raise DataError(
                    f"{path}: empty file (expected a header row naming the columns, or set "
                    f"data.init_args.column_names for a file without one)"
                )
            header = [h.strip() for h in header]
            line = reader.line_num
            what = "the header has"
        else:
            header, what = None, "data.init_args.column_names names"
        checked = False
        for row in reader:
            start, line = line + 1, reader.line_num  # a quoted field may span lines: report the first
            if not row:
                continue
            if header is None:
                # Without a header, the first row decides how many columns there are; fewer
                # than `names` (a predict file without its label column) drops the last names.
                header = list(names)[: len(row)] if names else [str(i) for i in range(len(row))]
                if len(row) > len(header):
                    raise DataError(
                        f"{path} line {start}: {len(row)} fields, but {what} {len(header)}: give one "
                        f"name per column"
                    )
            if not checked:
                if any(c not in header for c in columns):
                    raise _missing(path, columns, header, header=names is None)
                checked = True
            if len(row) != len(header):
                raise DataError(
                    f"{path} line {start}: {len(row)} fields, but {what} {len(header)}"
                    + ("; a tab inside a text field?" if suffix == ".tsv" else "")
                )
            yield f"{path} line {start}", dict(zip(header, row, strict=True))
        if header is not None and any(c not in header for c in columns):
            raise _missing(path, columns, header, header=names is None)


def _read_json(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        records = ((f"{path} item {i}", r) for i, r in enumerate(items))
    else:
        records = (
            (f"{path} line {n}", _json_line(path, n, line))
            for n, line in enumerate(text.splitlines(), 1)
            if line.strip()
        )
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if any(c not in record for c in columns):
            raise DataError(
                f"{where}: missing key(s) {[c for c in columns if c not in record]} (keys: {list(record)})"
            )
        yield where, record


def _json_line(path: Path, number: int, line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno})") from None


def _read_parquet(path: Path, columns: Sequence[str]) -> Iterator[tuple[str, dict]]:
    try:
        names = pq.read_schema(path).names
        if any(c not in names for c in columns):
            raise _missing(path, columns, names)
        table = pq.read_table(path, columns=list(columns))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    for i, record in enumerate(table.to_pylist()):
        yield f"{path} row {i}", record


def warn_truncated(what: str, truncated: int, total: int, longest: int, block_size: int, lost: str) -> None:
    """One counted warning per split instead of a crash (or silence) on overlong inputs."""
    if truncated:
        rank_zero_warn(
            f"gptlab: {what}: {truncated} of {total} examples are longer than block_size={block_size} "
            f"tokens (longest: {longest}) and were truncated to their first {block_size} tokens; {lost}. "
            f"Raise data.init_args.block_size (up to the model's block_size) to keep more."
        )


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
        super().__init__(tokenizer, batch_size, eval_batch_size, num_workers, seed, cache_dir)
        if block_size < 1:
            raise ConfigError(f"block_size={block_size} must be at least 1")
        if train_files is None and dataset is None:
            raise ConfigError(
                "ClassificationDataModule needs train_files or a dataset (the label names come from it)"
            )
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction} must be in [0, 1)")
        self.role_files = {
            "train": train_files,
            "val": val_files,
            "test": test_files,
            "predict": predict_files,
        }
        self.dataset = dataset
        self.dataset_config = dataset_config
        # Positions are column names too: a headerless file's columns are named "0", "1", ...
        self.text_columns = [
            str(c) for c in ([text_column] if isinstance(text_column, str | int) else text_column)
        ]
        if not self.text_columns:
            raise ConfigError("text_column must name at least one column")
        self.label_column = str(label_column)
        # None: the first line of a csv / tsv file is its header; a list: the files have none.
        self.column_names = list(column_names) if column_names is not None else (None if header else [])
        self.val_fraction = val_fraction
        self.multi_label = multi_label
        self.label_separator = label_separator
        self.text_separator = text_separator
        self.block_size = block_size
        # Integer names (label_names: [0, 1, 2]) are the labels as the files write them.
        self._given_label_names = [str(n) for n in label_names] if label_names is not None else None
        self._label_names: list[str] | None = self._given_label_names
        self._label_map: LabelMap | None = None
        self._held_out: set[int] | None = None
        self._splits: dict[str, datasets.Dataset] | None = None
        self.predict_dataset: Dataset | None = None

    # ----------------------------------------------------------------- reading
    def dataset_splits(self) -> dict[str, datasets.Dataset]:
        if self._splits is None:
            self._splits = load_dataset_splits(self.dataset, self.dataset_config) if self.dataset else {}
        return self._splits

    def has_role(self, role: str) -> bool:
        if role == "predict":
            return self.role_files["predict"] is not None or self.has_role("test")
        if role == "val" and self.holds_out():
            return True
        return self.role_files[role] is not None or role in self.dataset_splits()

    def holds_out(self) -> bool:
        """Validation is a seeded `val_fraction` of the training examples (no val files, no split)."""
        return self.val_fraction > 0 and self.role_files["val"] is None and "val" not in self.dataset_splits()

    def held_out_indices(self) -> set[int]:
        """Positions (in file order) of the training examples held out for validation."""
        if self._held_out is None:
            count = sum(1 for _ in self._source_records("train", with_labels=False))
            self._held_out = held_out(count, self.val_fraction, self.seed, "training examples")
        return self._held_out

    def records(self, role: str, with_labels: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
        """(where, record) of every example of `role`; predict falls back to the test examples."""
        if role in ("train", "val") and self.holds_out():
            held = self.held_out_indices()
            for i, item in enumerate(self._source_records("train", with_labels)):
                if (i in held) == (role == "val"):
                    yield item
            return
        yield from self._source_records(role, with_labels)

    def _source_records(self, role: str, with_labels: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        if role == "predict" and self.role_files["predict"] is None:
            role = "test"
        files = self.role_files[role]
        columns = [*self.text_columns, self.label_column] if with_labels else list(self.text_columns)
        if files is not None:
            for path in expand_files(files, f"{role}_files"):
                yield from read_table(path, columns, self.column_names)
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
                values: set[str] = set()
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
                for _, record in rows:
                    values.update(str(v).strip() for v in self.label_values(record[self.label_column]))
                values.discard("")
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
        files = self.role_files["train"]
        if files is not None:
            paths = expand_files(files, "train_files")
            return json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths])
        return json.dumps(
            {"dataset": self.dataset, "config": self.dataset_config, "columns": self.text_columns}
        )

    def tokenizer_corpus(self) -> Iterator[str]:
        # All training texts, the held-out ones included: the vocabulary does not depend on the split.
        for _, record in self._source_records("train", with_labels=False):
            yield self._text(record)

    def _text(self, record: dict[str, Any]) -> str:
        return self.text_separator.join(
            "" if record[c] is None else str(record[c]) for c in self.text_columns
        )

    def setup_datasets(self, stage: str) -> None:
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[
            stage
        ]
        for role in roles:
            if role == "train" or self.has_role(role):
                setattr(self, f"{role}_dataset", self.build(role))
            elif role != "val":
                raise DataError(f"no {role} data: give {role}_files or a dataset with a {role} split")
        if stage == "fit":
            announce_validation(self, len(self.train_dataset), self.val_dataset)
            # The files `test` / `predict` will read are checked now, not after the whole run.
            for role in ("test", "predict"):
                if self.role_files[role] is not None:
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

    def predict_dataloader(self):
        if self.predict_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no predict set; call setup('predict') first")
        return self._loader(self.predict_dataset, self.eval_batch_size, None)


def announce_validation(data: Any, train_size: int, val: Any) -> None:
    """Say at the start of `fit` which training examples were held out for validation.

    (A run with no validation at all is announced by the checkpoint callback, for every data module.)
    """
    if val is not None and data.holds_out():
        rank_zero_info(
            f"gptlab: validation: {len(val)} training examples held out (val_fraction={data.val_fraction}, "
            f"seed={data.seed}); training on the other {train_size}"
        )
