"""Plain text for causal-LM pretraining: files or a dataset -> token streams -> fixed-size blocks.

    documents   d0            d1            d2   ...   a .txt file, or a row of .jsonl/.json/.parquet
    tokens      d0 <eos>      d1 <eos>      d2 <eos>   one stream per split, saved as .npy
    train       [0, B] [S, S+B] [2S, 2S+B] ...         B = block_size, S = stride (default B)
    val / test  [0, B] [B, 2B] ...                     every token after the first a target once

A window holds B + 1 tokens: B inputs, each with its next token as target, so the model trains at
all B positions (nanoGPT's x = data[i:i+B], y = data[i+1:i+B+1]). The last window of a split may
be shorter; `collate` pads it, so no token is lost. Labels are the input ids (the task shifts
them). Validation comes from `val_files`, a dataset's validation split, or `val_fraction` of the
training documents: `tail` keeps the first (1 - f) of the token stream for training and the last
f for validation (nanoGPT's shakespeare_char split), `documents` holds out a seeded random f of
the documents.

The token streams are cached in `cache_dir/text/<key>/`, the key hashing the sources (paths, sizes,
mtimes, or dataset fingerprints), the tokenizer and the split settings; a second run memory-maps
them and reads no text. Block size and stride are not in the key: windows are cut at load time.
Text is streamed in pieces and the tokens written as they come (corpus.py), so a corpus, or a
single line, larger than memory tokenizes in bounded memory.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from gptlab.data.base import DataModule, Examples, encode_texts
from gptlab.data.corpus import (
    MAX_CHARS,
    CorpusEncoder,
    TokenWriter,
    copy_ranges,
    cut_text,
    read_blocks,
    shorten,
)
from gptlab.data.sources import (
    check_text_files,
    expand_files,
    file_kind,
    files_fingerprint,
    is_saved_dataset,
    read_records,
    splits_by_role,
)
from gptlab.data.tokenizers import TokenizerRecipe, tokenizer_fingerprint
from gptlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read (start-up time)

# Bump when the cached layout or the way streams are built changes: old entries are then ignored.
CACHE_FORMAT = 2
TEXT = "text"  # the one column every loaded source is reduced to
DEFAULT_BLOCK_SIZE = 256  # data.init_args.block_size when neither it nor the model's is given


def load_files(files: list[Path], text_column: str, cache_dir: Path) -> datasets.Dataset:
    """The records of checked .jsonl / .json / .parquet `files` as a Dataset with one `text` column."""
    import datasets  # here, not at module import: a second of start-up time

    parts = []
    # Consecutive files of one kind load together (datasets needs one builder per call). Text
    # files are not loaded here: `read_blocks` streams them (datasets would read each whole).
    for kind, group in itertools.groupby(files, key=file_kind):
        data_files = [str(p) for p in group]
        if kind == "json":
            part = datasets.load_dataset(
                "json", data_files=data_files, split="train", cache_dir=str(cache_dir)
            )
        else:
            part = datasets.load_dataset(
                "parquet",
                data_files=data_files,
                columns=[text_column],
                split="train",
                cache_dir=str(cache_dir),
            )
        part = part.select_columns([text_column])
        if text_column != TEXT:
            part = part.rename_column(text_column, TEXT)
        # concatenate_datasets needs one type; JSON may give large_string (cast only then: a full pass).
        if part.features[TEXT] != datasets.Value("string"):
            part = part.cast_column(TEXT, datasets.Value("string"))
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _records(documents: datasets.Dataset) -> Iterator[tuple[str, ...]]:
    """Each row's text as a one-block document (no blocks for an empty or missing text)."""
    for batch in documents.iter(batch_size=1024):
        yield from ((text,) if text else () for text in batch[TEXT])


def _runs(chosen: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Iterator[tuple[int, int]]:
    """Token ranges of the sorted documents `chosen`, consecutive documents merged into one range."""
    # A run breaks where the next chosen document is not the next document.
    breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
    for run in np.split(chosen, breaks):
        if len(run):
            yield int(starts[run[0]]), int(ends[run[-1]])


# ----------------------------------------------------------------------------- blocks
class TokenBlocks(Dataset):
    """Windows of `block_size + 1` tokens every `stride` tokens over a 1-D token stream in a .npy file.

    A window holds `block_size` inputs and their next-token targets (the task feeds all but the
    last token): the model trains at every one of its positions, as nanoGPT's and litgpt's
    batches do. With the default stride `block_size`, consecutive windows share one token (the
    last target of one is the first input of the next), so every token after the first is a
    target exactly once. Windows cover the whole stream: the last one ends at its last token and
    may be shorter. The file is memory-mapped lazily in each process (workers open their own map).
    """

    def __init__(self, path: str | Path, block_size: int, stride: int | None = None) -> None:
        self.path = Path(path)
        self.block_size = block_size
        self.window = block_size + 1
        self.stride = stride or block_size
        self._tokens: np.ndarray | None = None
        self.num_tokens = int(self.tokens.shape[0])

    @property
    def tokens(self) -> np.ndarray:
        """The token stream (memory-mapped, read-only)."""
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")
        return self._tokens

    def __len__(self) -> int:
        if self.num_tokens <= self.window:
            return 1 if self.num_tokens else 0
        # Enough windows that the last one reaches the end of the stream.
        return -(-(self.num_tokens - self.window) // self.stride) + 1

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.stride
        window = self.tokens[start : start + self.window]  # (<= block_size + 1,)
        # No "labels": collate copies input_ids, with -100 on padding.
        return {"input_ids": torch.from_numpy(window.astype(np.int64))}

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch of windows in one gather (the DataLoader calls this instead of `__getitem__` per item)."""
        starts = np.asarray(indices, dtype=np.int64) * self.stride
        if len(starts) == 0 or starts.min() < 0 or starts.max() + self.window > self.num_tokens:
            # Out of range, or the last (possibly short) window: one at a time, with their checks.
            return [self[i] for i in indices]
        windows = torch.from_numpy(self.tokens[starts[:, None] + np.arange(self.window)].astype(np.int64))
        return [{"input_ids": row} for row in windows]  # (block_size + 1,) views of one array

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the path, not the mapped array (which would copy the whole stream).
        return {**self.__dict__, "_tokens": None}


# ----------------------------------------------------------------------------- the DataModule
class TextDataModule(DataModule):
    """Causal-LM pretraining on plain text from local files or a Hugging Face dataset."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        train_files: str | list[str] | None = None,
        val_files: str | list[str] | None = None,
        test_files: str | list[str] | None = None,
        predict_files: str | list[str] | None = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        val_fraction: float = 0.1,
        val_split: Literal["tail", "documents"] = "tail",
        block_size: int | None = None,
        stride: int | None = None,
        max_examples: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
    ) -> None:
        """
        Args:
            tokenizer: A recipe trained on the training documents and cached (`BPE`, `Char`), or a
                tokenizer directory / hub name.
            train_files: Training text: paths or globs (`**` recurses), sorted. A .txt (or any
                other) file is one document; .jsonl / .json / .parquet hold one document per
                record, in `text_column`. `{stdlib}/*.py` is the Python standard library's source.
            val_files: Validation text, as `train_files`; then `val_fraction` is not used.
            test_files: Test text, as `train_files`; by default the test set is the validation set.
            predict_files: Prompts that `predict` continues (CausalLM): a .txt file holds one prompt
                per line; .jsonl / .json / .parquet one prompt per record, in `text_column`.
            dataset: Instead of `train_files`: a Hugging Face hub dataset name, or a directory
                written by `save_to_disk`. Its "train" split trains; its "validation" and "test"
                splits, if any, validate and test.
            dataset_config: The hub dataset's configuration (subset) name.
            text_column: Key / column holding the text in .jsonl, .json, .parquet and datasets.
            val_fraction: Share of the training documents held out for validation when there are
                no validation files or split; 0 disables validation.
            val_split: How `val_fraction` is held out: "tail" = the last fraction of the token
                stream (nanoGPT's shakespeare_char split), "documents" = a seeded random fraction
                of the documents.
            block_size: Tokens the model sees per sequence; at most the model's block_size. Each
                window carries one token more, the last position's target. Default: the model's
                (`main.py` takes model.init_args.backbone's block_size), else 256.
            stride: Step between training windows; defaults to `block_size` (each token a target
                once). Smaller values give overlapping windows (1 = every offset, like nanoGPT's
                random batches). Validation and test windows always step by `block_size`.
            max_examples: Use only the first N examples (documents) of each source (quick experiments).
            batch_size: Sequences per training batch (per device).
            eval_batch_size: Sequences per validation / test batch; defaults to `batch_size`.
            num_workers: DataLoader worker processes; 0 loads in the main process.
            seed: Seeds the training order and the "documents" split.
            cache_dir: Root of gptlab's cache (trained tokenizers, tokenized text, datasets' files).
        """
        super().__init__(
            tokenizer,
            batch_size,
            eval_batch_size,
            num_workers,
            seed,
            cache_dir,
            # Not predict_files: prompts, not documents (not tokenized into the cache nor in its key).
            train_files=train_files,
            val_files=val_files,
            test_files=test_files,
            dataset=dataset,
            dataset_config=dataset_config,
            val_fraction=val_fraction,
        )
        # None: the CLI did not fill it in from the model (Python use, or a backbone without one).
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        problems = []
        if (train_files is None) == (dataset is None):
            problems.append(
                "give exactly one of train_files (paths or globs) and dataset (hub name or saved dir)"
            )
        if not 0 <= val_fraction < 1:
            problems.append(f"val_fraction={val_fraction} must be in [0, 1)")
        if val_split not in ("tail", "documents"):
            problems.append(f"val_split={val_split!r} must be 'tail' or 'documents'")
        if block_size < 2:
            problems.append(f"block_size={block_size} must be at least 2 (one input and one target)")
        if stride is not None and not 1 <= stride <= block_size:
            problems.append(f"stride={stride} must be between 1 and block_size={block_size}")
        if max_examples is not None and max_examples < 1:
            problems.append(f"max_examples={max_examples} must be at least 1")
        if problems:
            raise ConfigError("TextDataModule: " + "; ".join(problems))
        self.predict_files = predict_files
        self.text_column = text_column
        self.val_split = val_split
        self.block_size = block_size
        self.stride = stride or block_size
        self.max_examples = max_examples
        # The subset of `files()` (what the patterns match, hashed by the cache keys) that holds
        # text, known once the files are checked (rank 0 only).
        self._texts: dict[str, list[Path]] | None = None

    # ----------------------------------------------------------------- sources
    def _dataset_fingerprint(self) -> str | dict[str, str] | None:
        if self.dataset is None:
            return None
        path = Path(self.dataset).expanduser()
        if is_saved_dataset(path):
            import datasets

            # Saved datasets carry a content fingerprint; reading it maps the files, nothing more.
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return {split: ds._fingerprint for split, ds in loaded.items()}
            return loaded._fingerprint
        # A hub dataset is named by (name, config); clear cache_dir/text to pick up a new revision.
        return f"hub:{self.dataset}:{self.dataset_config}"

    def _sources_fingerprint(self) -> dict[str, Any]:
        return {
            "files": {role: files_fingerprint(files) for role, files in self.files().items()},
            "dataset": self._dataset_fingerprint(),
            "text_column": self.text_column,
            "max_documents": self.max_examples,  # the cache key keeps its name: caches stay valid
        }

    def check_dataset(self, loaded: datasets.DatasetDict) -> None:
        if "train" not in loaded:
            raise DataError(f"dataset={self.dataset!r} has no 'train' split (splits: {', '.join(loaded)})")
        for role, ds in splits_by_role(loaded).items():
            if self.text_column not in ds.column_names:
                raise DataError(
                    f"dataset={self.dataset!r} ({role} split) has no column {self.text_column!r} "
                    f"(columns: {', '.join(ds.column_names)}); set text_column"
                )

    def _roles(self) -> dict[str, str]:
        """role -> where its documents come from ("files" or "dataset"), for roles with their own."""
        # Files win over a dataset's split of the same role (e.g. val_files with a hub dataset).
        roles = {role: "files" for role in self.files()}
        if self.dataset is not None:
            roles.update({role: "dataset" for role in self.dataset_splits() if role not in roles})
        return roles

    def documents(self, role: str) -> Iterator[Iterable[str]]:
        """The documents of `role` ("train", "val" or "test") in order, each as blocks of its text.

        A text file is one document, read block by block only while its blocks are consumed (so
        consume each document before asking for the next); a record is a document of one block.
        """
        if self._texts is None:
            # Check every role's files before any slow work (tokenizer training), in one error.
            texts, problems = {}, []
            for name, files in self.files().items():
                try:
                    texts[name] = check_text_files(files, self.text_column, f"{name}_files")
                except DataError as err:
                    problems.append(str(err))
            if problems:
                raise DataError("\n".join(problems))
            self._texts = texts
        if role in self._texts:
            docs = self._file_documents(self._texts[role])
        else:
            rows = self.dataset_splits()[role].select_columns([self.text_column])
            docs = _records(rows.rename_column(self.text_column, TEXT) if self.text_column != TEXT else rows)
        # The first N, not a sample: the same N documents on every run, and cheap on big corpora.
        return itertools.islice(docs, self.max_examples)

    def _file_documents(self, files: list[Path]) -> Iterator[Iterable[str]]:
        for kind, group in itertools.groupby(files, key=file_kind):
            if kind == "text":
                yield from map(read_blocks, group)
            else:
                yield from _records(load_files(list(group), self.text_column, self.cache_dir / "datasets"))

    def _describe(self, role: str) -> str:
        if role in self.files():
            files = self.files()[role]
            return f"{role}_files ({files[0]}{f' and {len(files) - 1} more' if len(files) > 1 else ''})"
        return f"dataset={self.dataset!r}, {role} split"

    # ----------------------------------------------------------------- DataModule hooks
    def corpus_fingerprint(self) -> str:
        # The tokenizer trains on the training documents only: other roles' files are left out.
        sources = self._sources_fingerprint()
        sources["files"] = sources["files"].get("train")
        return json.dumps(sources, sort_keys=True)

    def tokenizer_corpus(self) -> Iterator[str]:
        # The whole training source, before any validation split: the split is made in tokens.
        # Long documents in pieces, cut as for encoding (corpus.py): the same words are counted.
        for document in self.documents("train"):
            yield from cut_text(document)

    def cache_path(self, tokenizer: PreTrainedTokenizerFast) -> Path:
        """Directory of the cached token streams for these settings and this tokenizer."""
        key = {
            "format": CACHE_FORMAT,
            "sources": self._sources_fingerprint(),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "val_fraction": self.val_fraction,
            "val_split": self.val_split,
            # The seed only matters where it chooses documents.
            "seed": self.seed if self.val_split == "documents" else None,
        }
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / "text" / digest

    def _predicting(self) -> bool:
        # `predict` reads its prompts only: no training text needs to be there or be tokenized.
        trainer = self.trainer
        return trainer is not None and trainer.state.fn == "predict"

    def prepare_datasets(self, tokenizer: PreTrainedTokenizerFast) -> None:
        if self._predicting():
            return
        path = self.cache_path(tokenizer)
        if (path / "meta.json").is_file():
            rank_zero_info(f"gptlab: tokenized text cached at {path}; reading no text")
            return
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                f"tokenizer {self.tokenizer_source!r} has no eos token, which separates documents"
            )
        start = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        # A build of this entry killed midway left its directory: prepare_data holds the entry's
        # claim (gptlab.data.cache), so no live build owns one, and a large corpus's is large.
        for stale in path.parent.glob(f".tmp-{path.name[:16]}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        # Build in a private directory and rename it into place: no half-written cache entry.
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name[:16]}-", dir=path.parent))
        encoder = CorpusEncoder(tokenizer)
        try:
            dtype, splits = self._build(encoder, tmp)
            # meta.json is written last: its presence marks a complete entry (checked by setup).
            meta = {
                "format": CACHE_FORMAT,
                "dtype": dtype,
                "splits": splits,
                "sources": {role: self._describe(role) for role in self._roles()},
                "tokenizer": repr(self.tokenizer_source),
                "cuts": {"made": encoder.cuts.made, "changed": encoder.cuts.changed},
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            try:
                os.replace(tmp, path)
            except OSError:
                if not path.is_dir():  # else another process finished the same entry first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            self._splits = None  # release the loaded documents
        counts = ", ".join(
            f"{role} {s['tokens']:,} tokens / {s['documents']:,} docs" for role, s in splits.items()
        )
        rank_zero_info(f"gptlab: tokenized {counts} in {time.perf_counter() - start:.1f}s; cached at {path}")
        if encoder.cuts.changed:
            rank_zero_warn(
                f"gptlab: documents longer than {MAX_CHARS} characters are tokenized in pieces, and at "
                f"{encoder.cuts.changed} of {encoder.cuts.made} cuts the tokenizer {self.tokenizer_source!r} "
                f"gives other tokens than for the whole text (e.g. at {encoder.cuts.example}): it joins "
                f"text across a line break or a space, or the text has no such break within a piece; "
                f"only tokens next to those cuts differ"
            )

    def _build(self, encoder: CorpusEncoder, tmp: Path) -> tuple[str, dict[str, dict[str, int]]]:
        """Tokenize every source and write each split's stream to tmp/<split>.npy as it goes.

        Returns the dtype's name and, per split, its number of tokens and documents.
        """
        # uint16 halves the cache for vocabularies up to 65536 ids (nanoGPT does the same).
        dtype = np.dtype(np.uint16 if len(encoder.tokenizer) <= 1 << 16 else np.uint32)
        roles = self._roles()
        counts: dict[str, dict[str, int]] = {}
        for role in roles:
            whole = role != "train" or "val" in roles or self.val_fraction == 0
            # The training stream goes to train.npy, and the validation tail is moved out of it
            # afterwards; a documents split picks documents out of a stream written beside.
            stream = tmp / ("stream.npy" if not whole and self.val_split == "documents" else f"{role}.npy")
            with TokenWriter(stream, dtype) as out:
                try:
                    lengths = encoder.encode(self.documents(role), out.write, dtype)
                except DataError as err:
                    raise DataError(f"{self._describe(role)}: {err}") from None
            if encoder.unknown.documents:
                # As the other data modules do (gptlab.data.base.encode_texts): one warning per split.
                rank_zero_warn(
                    f"gptlab: {self._describe(role)}: {encoder.unknown.documents} of {len(lengths)} "
                    f"documents hold text the tokenizer has no token for, encoded as "
                    f"{encoder.tokenizer.unk_token!r} (e.g. {'; '.join(encoder.unknown.examples)}); a "
                    f"tokenizer trained on text that contains it (or a byte-level BPE) would keep it"
                )
            total = int(lengths.sum())
            if whole:
                counts[role] = {"tokens": total, "documents": len(lengths)}
            elif self.val_split == "tail":
                # nanoGPT: train on data[:int(n * 0.9)], validate on the rest; n counted in tokens.
                cut = int(total * (1 - self.val_fraction))
                with TokenWriter(tmp / "val.npy", dtype) as val:
                    copy_ranges(np.load(stream, mmap_mode="r"), [(cut, total)], val)
                shorten(stream, cut)
                # Documents with a token on each side of the cut count in both splits.
                ends = np.cumsum(lengths)
                counts["train"] = {"tokens": cut, "documents": int((ends - lengths < cut).sum())}
                counts["val"] = {"tokens": total - cut, "documents": int((ends > cut).sum())}
            else:
                n = len(lengths)
                if n < 2:
                    raise DataError(
                        f"val_split='documents' needs at least 2 documents, {self._describe('train')} has "
                        f"{n}: use val_split='tail' or give val_files"
                    )
                n_val = min(n - 1, max(1, round(n * self.val_fraction)))
                order = np.random.default_rng(self.seed).permutation(n)
                ends = np.cumsum(lengths)
                tokens = np.load(stream, mmap_mode="r")
                # Sorted back into corpus order: neighbouring documents stay neighbours on disk.
                for split, chosen in (("train", order[: n - n_val]), ("val", order[n - n_val :])):
                    chosen = np.sort(chosen)
                    with TokenWriter(tmp / f"{split}.npy", dtype) as out:
                        copy_ranges(tokens, _runs(chosen, ends - lengths, ends), out)
                    counts[split] = {"tokens": int(lengths[chosen].sum()), "documents": len(chosen)}
                del tokens
                stream.unlink()
        return dtype.name, counts

    def setup_datasets(self, stage: str) -> None:
        if stage == "predict":
            self.predict_dataset = self._prompts()
            return
        path = self.cache_path(self.tokenizer)
        if not (path / "meta.json").is_file():
            raise DataError(
                f"no tokenized text in {path}: prepare_data() builds it on rank 0 before setup() (the "
                f"Trainer calls both); under multi-node training, cache_dir must be on a filesystem every "
                f"node sees"
            )
        splits = json.loads((path / "meta.json").read_text())["splits"]
        problems = []
        train_tokens = splits["train"]["tokens"]
        if train_tokens < self.block_size:
            problems.append(
                f"the training split has {train_tokens} tokens, fewer than block_size={self.block_size}: "
                f"lower block_size (e.g. --data.init_args.block_size {max(2, train_tokens // 2)}), "
                f"lower val_fraction, or add training text"
            )
        for role in ("val", "test"):
            if role in splits and splits[role]["tokens"] < 2:
                problems.append(
                    f"the {role} split has {splits[role]['tokens']} token(s); it needs at least 2 (an input "
                    f"and a target): raise val_fraction or give more {role} text"
                )
        if problems:
            raise DataError("TextDataModule: " + "; ".join(problems))
        # Checked here rather than when caching: the cache does not depend on block_size, so a
        # cache hit with a larger block_size must still be refused.
        self.train_dataset = TokenBlocks(path / "train.npy", self.block_size, self.stride)
        # Evaluation windows step by block_size: each token is scored once.
        self.val_dataset = TokenBlocks(path / "val.npy", self.block_size) if "val" in splits else None
        self.test_dataset = (
            TokenBlocks(path / "test.npy", self.block_size) if "test" in splits else self.val_dataset
        )
        sizes = ", ".join(
            f"{role} {len(ds):,} blocks"
            for role, ds in [("train", self.train_dataset), ("val", self.val_dataset)]
            if ds is not None
        )
        rank_zero_info(
            f"gptlab: {sizes} of {self.block_size} + 1 tokens (train stride {self.stride}) from {path}"
        )

    # ----------------------------------------------------------------- predict: prompts
    def _prompts(self) -> Dataset:
        """The prompts of `predict_files`, tokenized without special tokens, with their text."""
        if not self.predict_files:
            raise DataError(
                "no prompts to predict: set data.init_args.predict_files (a .txt file with one prompt per "
                f"line, or .jsonl / .json / .parquet records with the prompt in {self.text_column!r})"
            )
        texts, wheres, problems = [], [], []
        for path in expand_files(self.predict_files, "predict_files"):
            for where, record in read_records(path):
                text = record.get(self.text_column) if isinstance(record, dict) else record
                if not isinstance(text, str):
                    problems.append(
                        f"{where}: no text in {self.text_column!r} (see data.init_args.text_column)"
                    )
                    continue
                texts.append(text)
                wheres.append(where)
        # As training text is encoded: characters without a token are counted in one warning.
        encoded = encode_texts(self.tokenizer, texts, wheres, "predict data", add_special_tokens=False)
        items = []
        for text, where, ids in zip(texts, wheres, encoded["input_ids"], strict=True):
            if not ids:
                problems.append(f"{where}: the prompt is empty; every prompt needs some text")
                continue
            # The batch contract plus what generation reads (as SFTDataModule's prompts).
            items.append({"input_ids": torch.tensor(ids), "prompt_length": len(ids), "prompt": text})
        if problems:
            more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
            raise DataError("predict_files: " + "; ".join(problems[:5]) + more)
        if not items:
            raise DataError(f"predict_files {self.predict_files!r}: no prompts in the files")
        return Examples([{**item, "reference": ""} for item in items])

    def collate(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch contract; prompts also carry `prompt_length` and `prompt` (and `reference`)."""
        if "prompt_length" not in features[0]:
            return super().collate(features)
        batch = super().collate([{"input_ids": f["input_ids"]} for f in features])
        batch["prompt_length"] = torch.tensor([f["prompt_length"] for f in features], dtype=torch.long)
        batch["prompt"] = [f["prompt"] for f in features]
        batch["reference"] = [f["reference"] for f in features]
        return batch

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            self.predict_dataset = self._prompts()
        return super().predict_dataloader()
