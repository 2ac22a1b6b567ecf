"""What every gptlab DataModule shares: tokenizer, sources and roles, loaders, the batch contract.

    prepare_data()  rank 0 only   train + cache the tokenizer  ->  prepare_datasets(tokenizer)
    setup(stage)    every rank    load the tokenizer           ->  setup_datasets(stage)
                                  STAGE_ROLES[stage]           ->  build(role) for each role it has
    *_dataloader()                SeededShuffleSampler (train) ->  collate() -> batch

A subclass reads one data shape (plain text, text + label, ...). It provides the texts a tokenizer
recipe trains on (`tokenizer_corpus`, `corpus_fingerprint`) and turns the examples of a role into
items (`build`); expensive one-time work goes in `prepare_datasets` (cached on disk), and a shape
with its own splitting overrides `setup_datasets`. The base knows where examples come from
(`role_files`, else `dataset`'s splits), which roles there are (`has_role`: validation may be a
held-out share of training, predict falls back to test) and reads files through sources.py.
Items are dicts with `input_ids` and optionally `attention_mask` and `labels`; `collate` turns a
list of them into the batch contract (docs/design.md §4.1, docs/data-shapes.md):

    input_ids       int64 (B, T)  right-padded with the pad id
    attention_mask  int64 (B, T)  1 on real tokens
    labels          int64 (B, T)  -100 on padding (aligned, not shifted)  or (B,) scalar labels
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerFast

from gptlab.data.cache import claim
from gptlab.data.sources import (
    Files,
    expand_files,
    files_fingerprint,
    held_out,
    load_dataset_dict,
    splits_by_role,
)
from gptlab.data.tokenizers import BPE, TokenizerRecipe, load_tokenizer, prepare_tokenizer, save_tokenizer
from gptlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read (start-up time)

IGNORE_INDEX = -100  # PyTorch's cross_entropy default ignore_index, and Hugging Face's convention
ROLES = ("train", "val", "test", "predict")
# The roles whose datasets `setup(stage)` builds.
STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
T = TypeVar("T")


class Examples(Dataset):
    """A list of tokenized examples (dicts in the batch contract's shape); SFT evaluation and
    prediction items also carry `prompt_length`, `prompt` and `reference`."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


ENCODE_CHUNK = 1024  # texts per tokenizer call in `encode_texts`


def encode_texts(
    tokenizer: PreTrainedTokenizerFast,
    texts: list[str],
    wheres: list[str],
    what: str,
    add_special_tokens: bool = True,
    split_special_tokens: bool = False,
    return_offsets_mapping: bool = False,
) -> dict[str, list]:
    """`tokenizer(texts, ...)` for a split of examples, with errors and warnings a user can act on.

    Returns {"input_ids": [...], and with return_offsets_mapping "offset_mapping": [...]}, a list per
    text. `wheres[i]` says where `texts[i]` came from ("<file> line N"). Text the tokenizer knows no
    token for becomes its unknown token, counted in one warning per split (`what`) that names a few
    examples; a tokenizer without an unknown token fails instead, and the error names the file,
    line and character (the Rust tokenizers raise a bare Exception with neither).
    """
    keys = ["input_ids", "offset_mapping"] if return_offsets_mapping else ["input_ids"]
    encoded: dict[str, list] = {key: [] for key in keys}
    # In chunks: one call over a whole split makes the Rust encoder allocate for every text at
    # once, and the C allocator keeps most of that from the OS (the fit's peak RSS, docs/pretrained.md).
    for start in range(0, len(texts), ENCODE_CHUNK):
        chunk = texts[start : start + ENCODE_CHUNK]
        try:
            part = tokenizer(
                chunk,
                add_special_tokens=add_special_tokens,
                split_special_tokens=split_special_tokens,
                return_offsets_mapping=return_offsets_mapping,
                return_attention_mask=False,
            )
        except Exception as err:  # noqa: BLE001 - any failure of the Rust encoder
            where = wheres[start : start + ENCODE_CHUNK]
            raise DataError(_unencodable(tokenizer, chunk, where, what, err)) from None
        for key in keys:
            encoded[key] += part[key]
    unk = tokenizer.unk_token_id
    if unk is None:
        return encoded
    hits = [i for i, ids in enumerate(encoded["input_ids"]) if unk in ids]
    if hits:
        # Counted per example (`wheres`): an SFT record gives several texts.
        examples = []
        for i in hits[:3]:
            spans = tokenizer(texts[i], add_special_tokens=False, return_offsets_mapping=True)
            unknown = {
                texts[i][a:b]
                for token, (a, b) in zip(spans["input_ids"], spans["offset_mapping"], strict=True)
                if token == unk
            }
            examples.append(f"{wheres[i]}: {', '.join(sorted(map(repr, unknown)))}")
        rank_zero_warn(
            f"gptlab: {what}: {len(dict.fromkeys(wheres[i] for i in hits))} of {len(set(wheres))} examples "
            f"hold text the tokenizer has no token "
            f"for, encoded as {tokenizer.unk_token!r} (e.g. {'; '.join(examples)}); a tokenizer trained "
            f"on text that contains it (or a byte-level BPE) would keep it"
        )
    return encoded


def _unencodable(
    tokenizer: PreTrainedTokenizerFast, texts: list[str], wheres: list[str], what: str, err: Exception
) -> str:
    """The first text and character that `tokenizer` cannot encode, as one line."""
    for text, where in zip(texts, wheres, strict=True):
        try:
            tokenizer(text, add_special_tokens=False)
        except Exception:  # noqa: BLE001
            for char in dict.fromkeys(text):
                try:
                    tokenizer(char, add_special_tokens=False)
                except Exception:  # noqa: BLE001
                    return (
                        f"{where}: the tokenizer cannot encode the character {char!r} (U+{ord(char):04X}): "
                        f"it has no token for it and no unknown token; use a tokenizer that covers it (a "
                        f"BPE recipe is byte-level; Char() trained now maps unseen characters to <unk>) or "
                        f"remove the character"
                    )
            return f"{where}: the tokenizer cannot encode this text ({err})"
    return f"{what}: the tokenizer cannot encode the text ({err})"


def warn_truncated(what: str, truncated: int, total: int, longest: int, block_size: int, lost: str) -> None:
    """One counted warning per split instead of a crash (or silence) on overlong inputs."""
    if truncated:
        rank_zero_warn(
            f"gptlab: {what}: {truncated} of {total} examples are longer than block_size={block_size} "
            f"tokens (longest: {longest}) and were truncated to their first {block_size} tokens; {lost}. "
            f"Raise data.init_args.block_size (up to the model's block_size) to keep more."
        )


class SeededShuffleSampler(DistributedSampler):
    """A permutation of `range(num_samples)` that depends only on (seed, epoch), split across ranks.

    A plain shuffled DataLoader draws from a generator whose state depends on how many epochs
    this process has run, so a restarted job replays other samples (docs/design.md §6.1). With
    `num_replicas` ranks, rank r takes every `num_replicas`-th index of the same permutation from
    position r, so the ranks' batches together are the single-process batch of the same global
    size (the permutation is padded with its own start to a multiple of `num_replicas`, as
    DistributedSampler does).

    Where training is in the data: without `position`, the epoch is the one Lightning sets with
    `set_epoch` and every pass starts at the beginning. With `position` (a callable returning how
    many training batches of `batch_size` this rank has consumed since the run began, restored
    from the checkpoint on resume), each pass starts exactly where training is: epoch
    `consumed // batches_per_epoch`, skipping the `consumed % batches_per_epoch` batches already
    trained on. The position is read when a pass starts, not taken from `set_epoch`: Lightning
    creates the first iterator of a resumed fit (and with workers, fetches from it) before it sets
    the epoch, and after a checkpoint written at the last batch of an epoch its epoch counter can
    point at the finished epoch (lightning/pytorch/loops/fit_loop.py `setup_data`, `on_advance_start`).

    A DistributedSampler subclass on purpose: Lightning then leaves it alone, instead of wrapping
    it in its own distributed sampler, which would shuffle the order a second time with another seed.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        batch_size: int = 1,
        position: Callable[[], int] | None = None,
    ) -> None:
        # `range` stands in for the dataset: DistributedSampler only needs its length.
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.dataset_size = num_samples
        self.batch_size = batch_size
        self.position = position

    @property
    def batches_per_epoch(self) -> int:
        """Batches of `batch_size` in one epoch on this rank (the last one may be short)."""
        return math.ceil(len(self) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for `epoch`, in order."""
        # SeedSequence mixes (seed, epoch) properly: seed + epoch would give seed 1 / epoch 1 the
        # same order as seed 2 / epoch 0.
        generator = torch.Generator()
        generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]))
        order = torch.randperm(self.dataset_size, generator=generator).tolist()
        order += order[: self.total_size - len(order)]  # pad: every rank gets len(self) indices
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        if self.position is None:
            yield from self.order(self.epoch)
            return
        epoch, done = divmod(self.position(), self.batches_per_epoch)
        self.epoch = epoch
        yield from self.order(epoch)[done * self.batch_size :]


class DataModule(L.LightningDataModule):
    """Base of gptlab's DataModules; subclass it for a new data shape."""

    def __init__(
        self,
        tokenizer: TokenizerRecipe | str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 1337,
        cache_dir: str = "~/.cache/gptlab",
        train_files: Files = None,
        val_files: Files = None,
        test_files: Files = None,
        predict_files: Files = None,
        dataset: str | None = None,
        dataset_config: str | None = None,
        val_fraction: float = 0.0,
    ) -> None:
        """
        Args:
            tokenizer: A recipe trained on this data's corpus and cached (`BPE`, `Char`), or a
                tokenizer directory / hub name loaded with `AutoTokenizer.from_pretrained`. None:
                `BPE()` (a default that `--print_config` can write and read back, as null).
            batch_size: Sequences per training batch (per device).
            eval_batch_size: Sequences per validation / test batch; defaults to `batch_size`.
            num_workers: DataLoader worker processes; 0 loads in the main process.
            seed: Seeds the training order (a function of seed and epoch) and any seeded split.
            cache_dir: Root of gptlab's on-disk cache (trained tokenizers, tokenized data).
            train_files: Training examples: paths or globs (`**` recurses).
            val_files: Validation examples; default: the dataset's validation split, else a
                held-out `val_fraction` of the training examples.
            test_files: Test examples; default: the dataset's test split.
            predict_files: Inputs of `predict`.
            dataset: A Hugging Face hub dataset name or a `save_to_disk` directory; files given
                for a role win over its split of that role.
            dataset_config: The hub dataset's configuration (subset) name.
            val_fraction: Share of the training examples held out (seeded by `seed`) for
                validation when there are no validation files or split; 0: no validation.
        """
        super().__init__()
        problems = [
            f"data.init_args.{name}={value} must be at least {low}"
            for name, value, low in [
                ("batch_size", batch_size, 1),
                ("eval_batch_size", eval_batch_size, 1),
                ("num_workers", num_workers, 0),
            ]
            if value is not None and value < low
        ]
        if problems:
            raise ConfigError("; ".join(problems) + ": fix the data config")
        self.tokenizer_source = tokenizer if tokenizer is not None else BPE()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser()
        self._tokenizer: PreTrainedTokenizerFast | None = None
        # Set by `setup_datasets`; a None validation / test set means "no such loader".
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        # Training batches this rank has consumed since the run began (the training loop's count,
        # not the loader's: workers and Lightning's fetcher read ahead). Saved in checkpoints and
        # restored on resume, it tells the sampler where to continue (exact resume, docs/design.md §6.1).
        self.train_batches_consumed = 0
        # Where the examples come from (docs/design.md §4.4): files per role, else the dataset's split.
        self.role_files: dict[str, Files] = {
            "train": train_files,
            "val": val_files,
            "test": test_files,
            "predict": predict_files,
        }
        self.dataset = dataset
        self.dataset_config = dataset_config
        self.val_fraction = val_fraction
        self.predict_dataset: Dataset | None = None
        # Memoized: the expanded files, the dataset's splits, the held-out training positions.
        self._files: dict[str, list[Path]] | None = None
        self._splits: dict[str, datasets.Dataset] | None = None
        self._held_out: set[int] | None = None

    # ----------------------------------------------------------------- subclass hooks
    def tokenizer_corpus(self) -> Iterator[str]:
        """Texts a tokenizer recipe trains on; iterated only when the tokenizer is not cached."""
        raise NotImplementedError(f"{type(self).__name__} must implement tokenizer_corpus()")

    def corpus_fingerprint(self) -> str:
        """A cheap identity of `tokenizer_corpus()` (paths, sizes, mtimes...): the tokenizer cache key."""
        raise NotImplementedError(f"{type(self).__name__} must implement corpus_fingerprint()")

    def prepare_datasets(self, tokenizer: PreTrainedTokenizerFast) -> None:
        """Expensive one-time preprocessing (rank 0), cached on disk for `setup_datasets`."""

    def build(self, role: str) -> Dataset:
        """Read, check and tokenize the examples of `role` (train, val, test, predict) into items."""
        raise NotImplementedError(f"{type(self).__name__} must implement build() or setup_datasets()")

    def check_source(self, role: str) -> None:
        """Read the start of `role`'s files (test, predict) at `fit`, so a bad one fails before training."""

    def file_problems(self, role: str, files: list[Path]) -> list[str]:
        """What is wrong with `role`'s expanded files as a whole (e.g. a file type this shape cannot read)."""
        return []

    def check_dataset(self, loaded: datasets.DatasetDict) -> None:
        """Raise DataError when `dataset` lacks a split or a column this shape needs."""

    def setup_datasets(self, stage: str) -> None:
        """Set the datasets of `stage`'s roles (every rank; tokenizer loaded).

        The default builds each role with `build`: validation when there is any (`has_role`), test
        and predict or an error naming what to give; at `fit` it checks the test / predict files too.
        """
        for role in STAGE_ROLES[stage]:
            if role == "train" or self.has_role(role):
                setattr(self, f"{role}_dataset", self.build(role))
            elif role != "val":
                raise DataError(f"no {role} data: give {role}_files or a dataset with a {role} split")
        if stage == "fit":
            self.announce_validation()
            # The files `test` / `predict` will read are checked now, not after the whole run.
            for role in ("test", "predict"):
                if self.role_files[role] is not None:
                    self.check_source(role)

    # ----------------------------------------------------------------- sources and roles
    def files(self) -> dict[str, list[Path]]:
        """The files of each role that has files (globs expanded; every bad pattern in one error)."""
        if self._files is None:
            found, problems = {}, []
            for role, patterns in self.role_files.items():
                if patterns is None:
                    continue
                try:
                    found[role] = expand_files(patterns, f"{role}_files")
                except DataError as err:
                    problems.append(str(err))
                    continue
                problems += self.file_problems(role, found[role])
            if problems:
                raise DataError("\n".join(problems))
            self._files = found
        return self._files

    def dataset_splits(self) -> dict[str, datasets.Dataset]:
        """`dataset`'s splits by role (train, and val / test when it has them); {} without a dataset."""
        if self._splits is None:
            splits = {}
            if self.dataset is not None:
                loaded = load_dataset_dict(self.dataset, self.dataset_config)
                self.check_dataset(loaded)
                splits = splits_by_role(loaded)
            self._splits = splits
        return self._splits

    def has_source(self, role: str) -> bool:
        """`role` has examples of its own: files, or a split of `dataset`."""
        if self.role_files[role] is not None:
            return True
        return self.dataset is not None and role in self.dataset_splits()

    def holds_out(self) -> bool:
        """Validation is a seeded `val_fraction` of the training examples (no val files, no split)."""
        return self.val_fraction > 0 and not self.has_source("val")

    def has_role(self, role: str) -> bool:
        """`role` has examples: its own, a held-out share of training (val), or the test ones (predict)."""
        if self.has_source(role):
            return True
        if role == "val":
            return self.holds_out()
        return role == "predict" and self.has_role("test")

    def role_examples(self, role: str, read: Callable[[str], Iterable[T]], what: str) -> Iterator[T]:
        """The examples of `role`, given `read(r)`, the examples of r's own source.

        Validation held out of training (`holds_out`) is a seeded `val_fraction` of `read("train")`
        (`held_out`: the same on every rank and run), and training is the rest; predict without
        predict_files is the test examples. `what` names the examples in errors ("training sentences").
        """
        if role in ("train", "val") and self.holds_out():
            if self._held_out is None:
                advice = (
                    f"lower data.init_args.val_fraction (0: no validation), add {what}, or give val_files"
                )
                self._held_out = held_out(sum(1 for _ in read("train")), self.val_fraction, self.seed, advice)
            for i, item in enumerate(read("train")):
                if (i in self._held_out) == (role == "val"):
                    yield item
            return
        yield from read("test" if role == "predict" and self.role_files["predict"] is None else role)

    def announce_validation(self) -> None:
        """Say at the start of `fit` which training examples were held out for validation.

        (A run with no validation at all is announced by the checkpoint callback, for every data module.)
        """
        if self.val_dataset is not None and self.holds_out():
            rank_zero_info(
                f"gptlab: validation: {len(self.val_dataset)} training examples held out (val_fraction="
                f"{self.val_fraction}, seed={self.seed}); training on the other {len(self.train_dataset)}"
            )

    def train_fingerprint(self, settings: dict[str, Any]) -> str:
        """A cheap identity of the training source (a `corpus_fingerprint`): the files' paths, sizes
        and mtimes, else the dataset's name and config with `settings` (what is read from it)."""
        files = self.role_files["train"]
        if files is not None:
            return json.dumps(files_fingerprint(expand_files(files, "train_files")))
        return json.dumps({"dataset": self.dataset, "config": self.dataset_config, **settings})

    # ----------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        # Lightning runs this on one process per node (local rank 0) before setup on every rank.
        # Nodes sharing cache_dir take turns (gptlab.data.cache.claim): the first builds the
        # tokenizer and the tokenized data, the others find them cached.
        try:
            fingerprint = self.corpus_fingerprint()
        except NotImplementedError:
            if isinstance(self.tokenizer_source, TokenizerRecipe):
                raise
            fingerprint = ""  # a subclass that never trains a tokenizer need not define it
        key = hashlib.sha256(f"{type(self).__qualname__}\n{fingerprint}".encode()).hexdigest()[:32]
        with claim(self.cache_dir / "claims" / f"{key}.claim", what=f"the data of {type(self).__name__}"):
            if isinstance(self.tokenizer_source, TokenizerRecipe):
                prepare_tokenizer(self.tokenizer_source, self.cache_dir, self.tokenizer_corpus(), fingerprint)
            else:
                prepare_tokenizer(self.tokenizer_source, self.cache_dir, (), "")
            self.prepare_datasets(self._load_tokenizer())

    def setup(self, stage: str) -> None:
        if self._tokenizer is None:
            self._tokenizer = self._load_tokenizer()
        self.setup_datasets(stage)

    def _load_tokenizer(self) -> PreTrainedTokenizerFast:
        # No corpus: on the ranks that did not run prepare_data, a missing entry is an error.
        if isinstance(self.tokenizer_source, TokenizerRecipe):
            return load_tokenizer(
                self.tokenizer_source, self.cache_dir, corpus_fingerprint=self.corpus_fingerprint()
            )
        return load_tokenizer(self.tokenizer_source)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for each batch the training loop is about to train on, after its
        # fetcher's read-ahead: counting here counts consumed batches. A checkpoint is written at
        # the end of a step or later, so it always includes the batch being trained.
        if self.trainer is not None and self.trainer.training:
            self.train_batches_consumed += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        # Lightning stores this in every checkpoint and hands it back on resume, before the
        # training loader is built (lightning/pytorch/trainer/connectors/checkpoint_connector.py).
        return {"train_batches_consumed": self.train_batches_consumed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_batches_consumed = int(state_dict.get("train_batches_consumed", 0))

    # ----------------------------------------------------------------- facts for the model
    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The tokenizer (after `setup`)."""
        if self._tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__}.tokenizer is available after setup(): call prepare_data() then "
                f"setup('fit') (the Trainer does both)"
            )
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed, added tokens included (after `setup`)."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        # Any id would do (padding is masked); fall back to eos, then 0, for tokenizers without pad.
        tokenizer = self.tokenizer
        for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if token_id is not None:
                return token_id
        return 0

    def save_tokenizer(self, directory: str | Path) -> None:
        """Save the tokenizer where `AutoTokenizer.from_pretrained(directory)` loads it back (any
        transformers version gptlab allows)."""
        save_tokenizer(self.tokenizer, directory)

    # ----------------------------------------------------------------- batches
    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of items into the batch contract.

        Items hold `input_ids` (a sequence) and optionally `attention_mask` (same length) and
        `labels`: a sequence (padded with -100) or a scalar (stacked to (B,)). Without `labels`,
        labels are the input ids (causal language modeling), -100 where the mask is 0.
        """
        if not features:
            raise ValueError("collate() needs at least one item")
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        batch_size, length = len(rows), max(len(r) for r in rows)
        if all(len(r) == length and f.keys() == {"input_ids"} for r, f in zip(rows, features, strict=True)):
            # Packed pretraining blocks: nothing to pad or mask. One stack instead of a Python loop
            # over rows, which shows once a training step takes milliseconds.
            input_ids = torch.stack(rows)  # (B, T)
            return {
                "input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "labels": input_ids.clone(),
            }
        pad_id = self.pad_token_id
        input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((batch_size, length), dtype=torch.long)  # (B, T)
        for i, (row, feature) in enumerate(zip(rows, features, strict=True)):
            input_ids[i, : len(row)] = row
            mask = feature.get("attention_mask")
            attention_mask[i, : len(row)] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)

        if "labels" not in features[0]:
            labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        elif torch.as_tensor(features[0]["labels"]).dim() == 0:
            # (B,) int64 class ids; float targets (regression) keep their float dtype.
            labels = torch.tensor([f["labels"] for f in features])  # (B,)
        else:
            labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            for i, feature in enumerate(features):
                row_labels = torch.as_tensor(feature["labels"], dtype=torch.long)
                labels[i, : len(row_labels)] = row_labels
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler[int] | None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            # Workers outlive epochs instead of re-forking (and re-opening memmaps) every epoch.
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Seeds the workers' base seed, so any randomness inside them follows `seed` too.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no training set; call setup('fit') first")
        # Under DDP / FSDP: {"num_replicas": data-parallel size, "rank": data-parallel rank}.
        shard = self.trainer.distributed_sampler_kwargs if self.trainer is not None else None
        sampler = SeededShuffleSampler(
            len(self.train_dataset),
            self.seed,
            **(shard or {}),
            batch_size=self.batch_size,
            position=self._train_position,
        )
        if self.batch_size > len(sampler):
            # Not an error: drop_last is off, so each epoch is one smaller batch of everything this
            # rank has (steps still count; the learning-rate schedule still runs). But it is rarely
            # what was meant, and it changes the effective batch size silently.
            rank_zero_warn(
                f"data.init_args.batch_size={self.batch_size} is larger than the {len(sampler)} training "
                f"examples per device: every step trains on all of them (one batch of {len(sampler)} per "
                f"epoch); lower batch_size for several steps per epoch"
            )
        return self._loader(self.train_dataset, self.batch_size, sampler)

    def _train_position(self) -> int:
        return self.train_batches_consumed

    def val_dataloader(self) -> DataLoader | list:
        # An empty list tells Lightning there is nothing to validate (e.g. val_fraction=0).
        if self.val_dataset is None:
            return []
        return self._loader(self.val_dataset, self.eval_batch_size, None)

    def test_dataloader(self) -> DataLoader | list:
        if self.test_dataset is None:
            return []
        return self._loader(self.test_dataset, self.eval_batch_size, None)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no predict set; call setup('predict') first")
        return self._loader(self.predict_dataset, self.eval_batch_size, None)

    def __getstate__(self) -> dict[str, Any]:
        # Worker processes started by spawn/forkserver pickle `collate_fn`, i.e. this object:
        # they need the tokenizer's pad id, not the Trainer it is attached to.
        state = self.__dict__.copy()
        state["trainer"] = None
        return state
