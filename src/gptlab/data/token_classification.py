"""Tagged words for token classification (NER): CoNLL column files, jsonl {tokens, tags}, or a dataset.

    EU       NNP B-NP B-ORG        one word per line, columns split on whitespace (or a
    rejects  VBZ B-VP O            separator); token and tag columns configurable;
    ...                            a blank line ends a sentence; -DOCSTART- lines are skipped
                  |
                  v  words joined with spaces, tokenized once with character offsets
    "EU rejects German call ..."   ->  EU | Ġre | jects | ĠGerman | Ġcall ...
    word_ids                           0     1      1        2        3
    labels   (first sub-token)     B-ORG    O   -100   B-MISC       O      (label_all: I- for the rest)

Items carry, besides the batch contract's `input_ids` and token-level `labels`, `word_ids` (the
word each token belongs to, -1 for none) and `word_labels` (the gold tag of every word, also of
words cut off by truncation). The task predicts each word's tag from its first sub-token and
scores at word level, so a truncated word still counts: it is predicted `O` (the fill tag).
Predict batches also carry the words themselves, for the CoNLL predictions file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gptlab.data.base import IGNORE_INDEX, DataModule, Examples, encode_texts, warn_truncated
from gptlab.data.labels import LabelMap, class_label_names, sort_tags, unknown_label_hint, warn_unused_labels
from gptlab.data.sources import Files, Problems, expand_files, read_table
from gptlab.data.tokenizers import TokenizerRecipe
from gptlab.errors import ConfigError, DataError
from gptlab.metrics.ner import OUTSIDE, PREFIXES, is_entity_tagset

DOCSTART = "-DOCSTART-"
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")

# One sentence as read: where it starts, its words, their tags (None without tags), and the
# "where" of each word (file and line) for messages about a single tag.
Sentence = tuple[str, list[str], list[Any] | None, list[str]]


def read_conll(
    path: Path, token_column: int, tag_column: int | None, separator: str | None
) -> Iterator[Sentence]:
    """Sentences of a CoNLL column file; every token line must have as many columns as the first."""
    words: list[str] = []
    tags: list[str] = []
    wheres: list[str] = []
    expected: tuple[int, int] | None = None  # (columns, line where that was seen)

    def sentence() -> Iterator[Sentence]:
        if words:
            yield wheres[0], list(words), (list(tags) if tag_column is not None else None), list(wheres)
            words.clear(), tags.clear(), wheres.clear()

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 ({err.reason} at byte {err.start}); re-encode it as UTF-8"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            yield from sentence()
            continue
        columns = line.split(separator) if separator else line.split()
        if columns[0] == DOCSTART:
            yield from sentence()  # a document boundary is a sentence boundary
            continue
        if expected is None:
            expected = (len(columns), number)
            n = len(columns)
            used = [token_column] + ([] if tag_column is None else [tag_column])
            if any(not -n <= c < n for c in used) or len({c % n for c in used}) != len(used):
                raise DataError(
                    f"{path} line {number}: {n} column(s) do not hold token_column={token_column}"
                    f"{'' if tag_column is None else f' and a different tag_column={tag_column}'}: check "
                    f"the file's columns (and column_separator)"
                )
        elif len(columns) != expected[0]:
            raise DataError(
                f"{path} line {number}: {len(columns)} column(s), expected {expected[0]} as on line "
                f"{expected[1]}; fix the line (a space inside a token? set column_separator)"
            )
        words.append(columns[token_column])
        if tag_column is not None:
            tags.append(columns[tag_column])
        wheres.append(f"{path} line {number}")
    yield from sentence()


def conll_columns(path: Path, separator: str | None) -> int:
    """Columns of the first token line of a CoNLL file (0 if none)."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            columns = line.split(separator) if separator else line.split()
            if columns and columns[0] != DOCSTART:
                return len(columns)
    return 0


class TokenClassificationDataModule(DataModule):
    """Sentences of tagged words for `gptlab.tasks.TokenClassification` (NER, chunking, POS)."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        train_files: Files = None,
        val_files: Files = None,
        test_files: Files = None,
        predict_files: Files = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        token_column: int = 0,
        tag_column: int = -1,
        column_separator: str | None = None,
        tokens_field: str = "tokens",
        tags_field: str = "tags",
        label_names: list[str | int] | None = None,
        val_fraction: float = 0.1,
        label_all_subtokens: bool = False,
        block_size: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
    ) -> None:
        """
        Args:
            tokenizer: a tokenizer directory / hub name, or a recipe trained on the training words.
                When fine-tuning with `init_from`, the CLI uses the pretraining run's tokenizer.
            train_files: training sentences: CoNLL column files (any name, e.g. `eng.train`), or
                jsonl / json / parquet records with `tokens_field` and `tags_field`.
            val_files: validation sentences; default: the dataset's validation split.
            test_files: test sentences for `test`; default: the dataset's test split.
            predict_files: sentences to tag with `predict` (CoNLL files may hold the tokens only);
                default: the test sentences.
            dataset: a Hugging Face dataset (save_to_disk directory or hub name) with list columns
                `tokens_field` and `tags_field` (tag names, or ids of a ClassLabel sequence).
            dataset_config: the dataset's configuration name, if it has several.
            token_column: column of the word in CoNLL files (0 = first).
            tag_column: column of the tag in CoNLL files (-1 = last).
            column_separator: splits CoNLL columns; None splits on any whitespace.
            tokens_field: key / column of the word list in jsonl, json, parquet or a dataset.
            tags_field: key / column of the tag list.
            label_names: the tags, in id order. Default: inferred from the training tags (O
                first, then by entity type). Test and predict from a checkpoint use the checkpoint's.
            val_fraction: share of the training sentences held out (seeded by `seed`) for
                validation when there are no val_files and no validation split; 0: no validation
                (then `best.ckpt` is simply the latest weights).
            label_all_subtokens: train on every sub-token of a word (continuations of a B- tag get
                the I- tag) instead of the first sub-token only. Evaluation always reads the first.
            block_size: the longest sentence in tokens; longer ones are truncated (counted warning)
                and their cut-off words are predicted O. At most the model's block_size.
            batch_size: sentences per training batch (per device).
            eval_batch_size: sentences per validation / test / predict batch; default batch_size.
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
                "TokenClassificationDataModule needs train_files or a dataset (the tags come from it)"
            )
        if not 0 <= val_fraction < 1:
            raise ConfigError(f"data.init_args.val_fraction={val_fraction} must be in [0, 1)")
        self.token_column = token_column
        self.tag_column = tag_column
        self.column_separator = column_separator
        self.tokens_field = tokens_field
        self.tags_field = tags_field
        self.label_all_subtokens = label_all_subtokens
        self.block_size = block_size
        # Integer names (label_names: [0, 1, 2]) are the tags as the files write them.
        self._given_label_names = [str(n) for n in label_names] if label_names is not None else None
        self._label_names: list[str] | None = self._given_label_names

    # ----------------------------------------------------------------- reading
    def sentences(self, role: str) -> Iterator[Sentence]:
        """Every sentence of `role`; tags are None for a predict file without a tag column."""
        yield from self.role_examples(role, self._source_sentences, "training sentences")

    def _source_sentences(self, role: str) -> Iterator[Sentence]:
        files = self.role_files[role]
        if files is None:
            yield from self._dataset_sentences(role)
            return
        for path in expand_files(files, f"{role}_files"):
            if path.suffix.lower() in RECORD_SUFFIXES:
                yield from self._record_sentences(path, role)
                continue
            # A predict file may hold the words only (one column).
            tagged = not (role == "predict" and conll_columns(path, self.column_separator) == 1)
            yield from read_conll(
                path, self.token_column, self.tag_column if tagged else None, self.column_separator
            )

    def _record_sentences(self, path: Path, role: str) -> Iterator[Sentence]:
        with_tags = role != "predict" or self._records_have_tags(path)
        fields = [self.tokens_field, self.tags_field] if with_tags else [self.tokens_field]
        for where, record in read_table(path, fields):
            yield self._check_record(where, record, with_tags)

    def _records_have_tags(self, path: Path) -> bool:
        for _, record in read_table(path, [self.tokens_field]):
            return self.tags_field in record
        return False

    def _dataset_sentences(self, role: str) -> Iterator[Sentence]:
        split = self.dataset_splits().get(role)
        if split is None:
            raise DataError(f"no {role} data: give {role}_files or a dataset with a {role} split")
        with_tags = self.tags_field in split.column_names
        if self.tokens_field not in split.column_names or (role != "predict" and not with_tags):
            raise DataError(
                f"dataset={self.dataset!r} ({role} split) needs columns {self.tokens_field!r} and "
                f"{self.tags_field!r} (columns: {split.column_names}); set tokens_field / tags_field"
            )
        for i, record in enumerate(split):
            yield self._check_record(f"dataset {self.dataset!r} {role} split row {i}", record, with_tags)

    def _check_record(self, where: str, record: dict[str, Any], with_tags: bool) -> Sentence:
        words = record[self.tokens_field]
        tags = record.get(self.tags_field) if with_tags else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{where}: {self.tokens_field!r} must be a list of strings")
        if tags is not None and (not isinstance(tags, list) or len(tags) != len(words)):
            count = len(tags) if isinstance(tags, list) else type(tags).__name__
            raise DataError(f"{where}: {len(words)} tokens but {count} tags; give one tag per token")
        return where, words, tags, [f"{where} token {i}" for i in range(len(words))]

    # ----------------------------------------------------------------- facts for the model
    @property
    def label_names(self) -> list[str]:
        """The tags in id order: given, a dataset's ClassLabel names, or the training tags (O first).

        Reads only the training files (no tokenizer): cheap enough to link to the model.
        """
        if self._label_names is None:
            split = self.dataset_splits().get("train") if self.role_files["train"] is None else None
            names = class_label_names(split.features.get(self.tags_field)) if split is not None else None
            if names is None:
                tags: set[str] = set()
                words: set[str] = set()
                for _, sentence_words, sentence_tags, _ in self._source_sentences("train"):
                    tags.update(str(t) for t in sentence_tags or ())
                    if len(words) < 1000:
                        words.update(sentence_words)
                if not tags:
                    raise DataError("the training data has no tags: check tag_column / tags_field")
                self._check_not_swapped(tags, words)
                names = sort_tags(tags)
            self._label_names = names
        return self._label_names

    def _check_not_swapped(self, tags: set[str], words: set[str]) -> None:
        """Refuse tags that are words while the words are tags: the two columns are swapped."""
        if is_entity_tagset(list(tags)) or len(tags) <= 2 * len(PREFIXES) + 1:
            return
        tag_like = [w for w in words if is_entity_tagset([w]) or w == OUTSIDE]
        if len(tag_like) < 0.8 * len(words):
            return
        where = (
            f"tag_column={self.tag_column} and token_column={self.token_column}"
            if self.role_files["train"] is not None
            else f"tags_field={self.tags_field!r} and tokens_field={self.tokens_field!r}"
        )
        raise DataError(
            f"train data: the tags look like words ({len(tags)} different ones, e.g. "
            f"{', '.join(map(repr, sorted(tags)[:4]))}) and the tokens look like tags (e.g. "
            f"{', '.join(map(repr, sorted(tag_like)[:4]))}): {where} are probably swapped; swap them"
        )

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    # ----------------------------------------------------------------- DataModule hooks
    def corpus_fingerprint(self) -> str:
        return self.train_fingerprint({"field": self.tokens_field})

    def tokenizer_corpus(self) -> Iterator[str]:
        # All training sentences, the held-out ones included: the vocabulary does not depend on the split.
        for _, words, _, _ in self._source_sentences("train"):
            yield " ".join(words)

    def check_source(self, role: str) -> None:
        next(self._source_sentences(role), None)

    def build(self, role: str) -> Examples:
        """Read, check, tokenize and align the sentences of `role`."""
        tags = LabelMap(self.label_names)
        problems = Problems(f"{role} data")
        sentences, wheres = [], []
        unknown_words = 0  # unknown tags that are words of the sentence's own tag set: columns swapped?
        for where, words, sentence_tags, word_wheres in self.sentences(role):
            empty = [w for w, word in zip(word_wheres, words, strict=True) if not word.strip()]
            if not words or empty:
                problems.add(f"{(empty or [where])[0]}: empty {'token' if empty else 'sentence'}")
                continue
            ids = None
            if sentence_tags is not None:
                ids = [tags.get(t) for t in sentence_tags]
                for w, word, t, i in zip(word_wheres, words, sentence_tags, ids, strict=True):
                    if i is None:
                        problems.add(f"{w}: unknown tag {t!r} (tags: {tags.describe()})")
                        unknown_words += tags.get(word) is not None
            sentences.append((words, ids))
            wheres.append(where)
        hint = unknown_label_hint(self._given_label_names is not None)
        if problems.items and unknown_words >= 0.5 * len(problems.items):
            hint = (
                f"The tokens of these lines are tag names and their tags are words: token_column="
                f"{self.token_column} and tag_column={self.tag_column} (or tokens_field / tags_field) are "
                f"probably swapped; swap them. " + hint
            )
        problems.raise_if_any(hint)
        if not sentences:
            raise DataError(f"{role} data: no sentences")
        if role == "train" and self._given_label_names is not None:
            used = {i for _, ids in sentences if ids is not None for i in ids}
            warn_unused_labels(self.label_names, used, self.role_files[role] or "the dataset's train split")
        items, truncated, lost, longest = [], 0, 0, 0
        texts, starts = [], []
        for words, _ in sentences:
            # Words joined by single spaces: each word after the first is seen as " word", as in
            # running text (a byte-level BPE encodes the space into the word's first token).
            offsets, position = [], 0
            for word in words:
                offsets.append(position)
                position += len(word) + 1
            texts.append(" ".join(words))
            starts.append(offsets)
        encoded = encode_texts(self.tokenizer, texts, wheres, f"{role} data", return_offsets_mapping=True)
        continuation = self._continuation_ids()
        for (words, ids), start, input_ids, spans in zip(
            sentences, starts, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            word_ids = token_word_ids(spans, start, [len(w) for w in words])
            longest = max(longest, len(input_ids))
            if len(input_ids) > self.block_size:
                truncated += 1
                input_ids, word_ids = input_ids[: self.block_size], word_ids[: self.block_size]
                lost += len(words) - len({w for w in word_ids if w >= 0})
            labels = [IGNORE_INDEX] * len(input_ids)
            if ids is not None:
                previous = -1
                for k, w in enumerate(word_ids):
                    if w >= 0 and w != previous:
                        labels[k] = ids[w]  # the first sub-token carries the word's tag
                    elif w >= 0 and self.label_all_subtokens:
                        labels[k] = continuation[ids[w]]
                    previous = w
            item: dict[str, Any] = {
                "input_ids": input_ids,
                "labels": labels,
                "word_ids": word_ids,
                "word_labels": ids if ids is not None else [IGNORE_INDEX] * len(words),
            }
            if role == "predict":
                item["words"] = words
            items.append(item)
        warn_truncated(
            f"{role} data",
            truncated,
            len(items),
            longest,
            self.block_size,
            f"their {lost} cut-off words are predicted as the fill tag (O)",
        )
        return Examples(items)

    def _continuation_ids(self) -> list[int]:
        """For label_all_subtokens: the tag of a word's later sub-tokens (B-X -> I-X if it exists)."""
        names = self.label_names
        index = {n: i for i, n in enumerate(names)}
        return [index.get("I-" + n[2:], i) if n.startswith("B-") else i for i, n in enumerate(names)]

    # ----------------------------------------------------------------- batches
    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch contract plus `word_ids` (B, T) padded with -1 and `word_labels` (B, W) with -100."""
        batch: dict[str, Any] = super().collate(features)
        length = batch["input_ids"].shape[1]
        words = max(len(f["word_labels"]) for f in features)
        word_ids = torch.full((len(features), length), -1, dtype=torch.long)  # (B, T)
        word_labels = torch.full((len(features), words), IGNORE_INDEX, dtype=torch.long)  # (B, W)
        for i, feature in enumerate(features):
            word_ids[i, : len(feature["word_ids"])] = torch.as_tensor(feature["word_ids"], dtype=torch.long)
            word_labels[i, : len(feature["word_labels"])] = torch.as_tensor(
                feature["word_labels"], dtype=torch.long
            )
        batch["word_ids"] = word_ids
        batch["word_labels"] = word_labels
        if "words" in features[0]:
            batch["words"] = [f["words"] for f in features]
        return batch


def token_word_ids(spans: list[tuple[int, int]], starts: list[int], lengths: list[int]) -> list[int]:
    """The word each token belongs to (-1 for none), from the tokens' character spans.

    A token belongs to the word of its first character that lies inside a word; a leading space
    (byte-level BPE's "Ġword") is skipped, and special tokens (empty spans) belong to no word.
    """
    owner = [-1] * (starts[-1] + lengths[-1] if starts else 0)  # character -> word
    for w, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        owner[start : start + length] = [w] * length
    result = []
    for a, b in spans:
        result.append(next((owner[c] for c in range(a, min(b, len(owner))) if owner[c] >= 0), -1))
    return result
