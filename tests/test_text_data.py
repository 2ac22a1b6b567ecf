"""TextDataModule: packing, splits, the on-disk cache, input formats, clear errors, determinism."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import shared_data
from gptlab.data import BPE, Char, DataError, TextDataModule, expand_files
from gptlab.data.text import TokenBlocks
from gptlab.errors import ConfigError

DOCS = {
    "a.txt": "First Citizen:\nBefore we proceed any further, hear me speak.\n",
    "b.txt": "All:\nSpeak, speak.\n\n",
    "c.txt": "First Citizen:\nYou are all resolved rather to die than to famish?\n",
    "d.txt": "All:\nresolved. resolved.\n",
}


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four small .txt documents (each file is one document)."""
    directory = tmp_path / "corpus"
    directory.mkdir()
    for name, text in DOCS.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def ready(**kwargs) -> TextDataModule:
    """A TextDataModule after prepare_data and setup, as the Trainer leaves it."""
    dm = TextDataModule(**{"tokenizer": Char(), "block_size": 16, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def stream(dm: TextDataModule, texts: list[str]) -> list[int]:
    """The expected token stream: every document followed by <eos>."""
    eos = dm.tokenizer.eos_token_id
    return [t for text in texts for t in [*dm.tokenizer(text, add_special_tokens=False)["input_ids"], eos]]


def blocks(dataset: TokenBlocks) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


# ----------------------------------------------------------------------------- packing and splits
def test_tail_split_and_packing_keep_every_token_exactly_once(corpus, tmp_path):
    dm = ready(train_files=str(corpus / "*.txt"), val_fraction=0.25, cache_dir=str(tmp_path / "cache"))
    expected = stream(dm, list(DOCS.values()))  # files are read in sorted order
    cut = int(len(expected) * 0.75)
    assert dm.train_dataset.tokens.tolist() == expected[:cut]
    assert dm.val_dataset.tokens.tolist() == expected[cut:]
    # Windows of 16 inputs + 1 target sharing one token: chained, they are the stream (the last
    # one is shorter), so every token after the first is a target exactly once.
    for dataset in (dm.train_dataset, dm.val_dataset):
        pieces = blocks(dataset)
        assert all(len(p) == 17 for p in pieces[:-1]) and 1 < len(pieces[-1]) <= 17
        assert all(a[-1] == b[0] for a, b in zip(pieces[:-1], pieces[1:], strict=True))
        assert pieces[0] + sum((p[1:] for p in pieces[1:]), []) == dataset.tokens.tolist()
    assert dm.test_dataset is dm.val_dataset
    assert dm.vocab_size == len(set("".join(DOCS.values()))) + 2  # + <|endoftext|> + <unk>


def test_overlapping_windows_cover_the_stream_to_its_end(corpus, tmp_path):
    dm = ready(train_files=str(corpus / "*.txt"), block_size=16, stride=5, cache_dir=str(tmp_path / "cache"))
    tokens = dm.train_dataset.tokens.tolist()
    pieces = blocks(dm.train_dataset)
    assert [p for p in pieces] == [tokens[i * 5 : i * 5 + 17] for i in range(len(pieces))]
    assert len(pieces) * 5 - 5 + len(pieces[-1]) == len(tokens)  # the last window ends at the end
    assert len(pieces[-2]) == 17 and (len(pieces) - 2) * 5 + 17 < len(tokens)  # no extra window
    # Evaluation windows step by block_size: each token is a target once.
    val = blocks(dm.val_dataset)
    assert val[0] + sum((p[1:] for p in val[1:]), []) == dm.val_dataset.tokens.tolist()


def test_batched_fetch_equals_one_window_at_a_time(corpus, tmp_path):
    # The DataLoader fetches a batch through __getitems__ (one gather); the last, shorter window
    # and out-of-range indices go through __getitem__.
    dm = ready(train_files=str(corpus / "*.txt"), block_size=16, stride=5, cache_dir=str(tmp_path / "cache"))
    dataset = dm.train_dataset
    last = len(dataset) - 1
    for indices in ([3, 0, 7], [last, 1], [0]):
        got = [item["input_ids"].tolist() for item in dataset.__getitems__(indices)]
        assert got == [dataset[i]["input_ids"].tolist() for i in indices]
    with pytest.raises(IndexError):
        dataset.__getitems__([0, last + 1])
    batch = next(iter(dm.train_dataloader()))
    order = list(dm.train_dataloader().sampler)[: dm.batch_size]
    assert batch["input_ids"].tolist() == [dataset[i]["input_ids"].tolist() for i in order]


def test_tiny_shakespeare_splits_like_nanogpt(tmp_path):
    path = shared_data("tinyshakespeare/input.txt")
    text = path.read_text(encoding="utf-8")
    dm = ready(
        train_files=str(path),
        block_size=64,
        val_fraction=0.1,
        cache_dir=str(tmp_path / "cache"),
        tokenizer=Char(unk_token=None),
    )
    assert dm.vocab_size == 66
    train, val = dm.train_dataset.tokens, dm.val_dataset.tokens
    n = len(text) + 1  # the characters and one <eos>
    assert (len(train), len(val)) == (int(n * 0.9), n - int(n * 0.9))
    assert dm.tokenizer.decode(train) == text[: int(n * 0.9)]
    assert dm.tokenizer.decode(val) == text[int(n * 0.9) :] + "<|endoftext|>"


def test_documents_split_is_a_seeded_partition(corpus, tmp_path):
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = ready(
            train_files=str(corpus / "*.txt"),
            val_split="documents",
            val_fraction=0.25,
            seed=seed,
            cache_dir=str(tmp_path / "cache"),
        )
        return dm.train_dataset.tokens.tolist(), dm.val_dataset.tokens.tolist()

    train, val = split(1)
    assert split(1) == (train, val)
    eos = train[-1]
    assert val.count(eos) == 1 and train.count(eos) == 3  # one of four documents validates
    assert sorted(train + val) == sorted(t for s in split(2) for t in s)  # same tokens, maybe another split


def test_separate_val_and_test_files(corpus, tmp_path):
    dm = ready(
        train_files=[str(corpus / "a.txt"), str(corpus / "b.txt")],
        val_files=str(corpus / "c.txt"),
        test_files=str(corpus / "d.txt"),
        # Byte-level: encodes characters the training files lack (a Char tokenizer would refuse).
        tokenizer=BPE(vocab_size=300),
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.train_dataset.tokens.tolist() == stream(dm, [DOCS["a.txt"], DOCS["b.txt"]])
    assert dm.tokenizer.decode(dm.val_dataset.tokens) == DOCS["c.txt"] + "<|endoftext|>"
    assert dm.tokenizer.decode(dm.test_dataset.tokens) == DOCS["d.txt"] + "<|endoftext|>"


def test_max_examples_and_no_validation(corpus, tmp_path):
    dm = ready(
        train_files=str(corpus / "*.txt"), max_examples=2, val_fraction=0, cache_dir=str(tmp_path / "c")
    )
    assert dm.train_dataset.tokens.tolist() == stream(dm, [DOCS["a.txt"], DOCS["b.txt"]])
    assert dm.val_dataset is None and dm.val_dataloader() == []


# ----------------------------------------------------------------------------- cache
def test_second_run_reads_no_text_and_trains_no_tokenizer(corpus, tmp_path, monkeypatch):
    kwargs = {"train_files": str(corpus / "*.txt"), "cache_dir": str(tmp_path / "cache")}
    first = ready(**kwargs)

    def fail(*args, **kwargs):
        raise AssertionError("a cached run read text or trained a tokenizer")

    with monkeypatch.context() as patch:
        patch.setattr(TextDataModule, "documents", fail)
        patch.setattr(Char, "train", fail)
        second = ready(**kwargs)
    assert second.train_dataset.path == first.train_dataset.path
    assert second.train_dataset.tokens.tolist() == first.train_dataset.tokens.tolist()
    # Only block settings changed: same cached streams, other windows.
    assert ready(**kwargs, block_size=8).train_dataset.path == first.train_dataset.path
    # An edited file is another corpus: new tokenizer and new streams.
    (corpus / "a.txt").write_text("Zounds!\n" + DOCS["a.txt"], encoding="utf-8")
    edited = ready(**kwargs)
    assert edited.train_dataset.path != first.train_dataset.path
    assert "Z" in edited.tokenizer.get_vocab()
    assert not list((tmp_path / "cache" / "text").glob(".tmp-*"))


# ----------------------------------------------------------------------------- input formats
def test_jsonl_json_and_parquet_inputs(tmp_path):
    records = [{"id": i, "body": text, "meta": {"n": i}} for i, text in enumerate(DOCS.values())]
    lines = tmp_path / "train.jsonl"
    lines.write_text(
        "\n".join(json.dumps(r) for r in records[:2]) + "\n\n", encoding="utf-8"
    )  # blank line ok
    array = tmp_path / "more.json"
    array.write_text(json.dumps(records[2:3]), encoding="utf-8")
    table = tmp_path / "val.parquet"
    pq.write_table(pa.table({"body": [records[3]["body"]], "other": [1]}), table)
    dm = ready(
        train_files=[str(lines), str(array)],
        val_files=str(table),
        text_column="body",
        cache_dir=str(tmp_path / "cache"),
    )
    texts = list(DOCS.values())
    assert dm.train_dataset.tokens.tolist() == stream(dm, texts[:3])
    assert dm.val_dataset.tokens.tolist() == stream(dm, texts[3:])


def test_saved_dataset_with_its_own_splits(tmp_path):
    texts = list(DOCS.values())
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": texts[:3]}),
            "validation": datasets.Dataset.from_dict({"content": texts[3:]}),
        }
    ).save_to_disk(str(saved))
    dm = ready(dataset=str(saved), text_column="content", cache_dir=str(tmp_path / "cache"))
    assert dm.train_dataset.tokens.tolist() == stream(dm, texts[:3])
    assert dm.val_dataset.tokens.tolist() == stream(dm, texts[3:])


def test_stdlib_placeholder_finds_the_standard_library():
    files = expand_files("{stdlib}/json/*.py", "train_files")
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    assert stdlib / "json" / "__init__.py" in files
    assert files == sorted(files) and all(f.is_relative_to(stdlib) for f in files)


def test_bpe_on_the_stdlib_corpus(tmp_path):
    dm = ready(
        train_files="{stdlib}/json/*.py",
        tokenizer=BPE(vocab_size=320),
        block_size=32,
        val_split="documents",
        val_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    assert dm.vocab_size == 320
    assert dm.train_dataset.tokens.dtype == np.uint16
    source = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text(encoding="utf-8")
    assert dm.tokenizer.decode(dm.tokenizer(source)["input_ids"]) == source


# ----------------------------------------------------------------------------- clear errors
def bad_input_cases(tmp_path: Path) -> dict[str, tuple[dict, list[str]]]:
    good = tmp_path / "good.txt"
    good.write_text("some text\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.txt").write_text(" \n\t\n", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes(b"caf" + "é au lait".encode("latin-1"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    (tmp_path / "unseen.txt").write_text("Zebra!", encoding="utf-8")
    (tmp_path / "keys.jsonl").write_text('{"body": "a", "id": 1}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["a"], "id": [1]}), tmp_path / "cols.parquet")
    return {
        "no match": ({"train_files": str(tmp_path / "nowhere" / "*.txt")}, ["nowhere", "train_files"]),
        "empty": ({"train_files": str(tmp_path / "empty.txt")}, ["empty.txt", "0 bytes", "no text"]),
        "whitespace": ({"train_files": str(tmp_path / "blank.txt")}, ["blank.txt", "whitespace"]),
        "not utf-8": ({"train_files": str(tmp_path / "latin1.txt")}, ["latin1.txt", "not UTF-8", "byte 3"]),
        "bad json line": (
            {"train_files": str(tmp_path / "broken.jsonl")},
            ["broken.jsonl", "line 3", "JSON"],
        ),
        "missing key": (
            {"train_files": str(tmp_path / "keys.jsonl")},
            ["keys.jsonl", "'text'", "'body'", "'id'"],
        ),
        "missing column": (
            {"train_files": str(tmp_path / "cols.parquet")},
            ["cols.parquet", "'text'", "'body'"],
        ),
        "bad val file": (
            {"train_files": str(good), "val_files": str(tmp_path / "latin1.txt")},
            ["val_files", "latin1.txt"],
        ),
        "unseen characters": (
            {
                "train_files": str(good),
                "val_files": str(tmp_path / "unseen.txt"),
                "tokenizer": Char(unk_token=None),
            },
            ["val_files", "unseen.txt", "cannot encode", "'!Zabr'"],
        ),
        "missing dataset": ({"dataset": str(tmp_path / "nope")}, ["nope", "no such directory"]),
        "too small": (
            {"train_files": str(good), "block_size": 64},
            ["tokens", "block_size=64", "lower block_size"],
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "no match",
        "empty",
        "whitespace",
        "not utf-8",
        "bad json line",
        "missing key",
        "missing column",
        "bad val file",
        "unseen characters",
        "missing dataset",
        "too small",
    ],
)
def test_bad_input_raises_one_clear_error(tmp_path, case):
    kwargs, fragments = bad_input_cases(tmp_path)[case]
    with pytest.raises(DataError) as error:
        ready(**kwargs, val_fraction=0, cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
    # A failed run leaves no half-written cache entry behind.
    text_cache = tmp_path / "cache" / "text"
    assert not text_cache.exists() or all(not p.name.startswith(".tmp") for p in text_cache.iterdir())


def test_every_bad_file_is_listed_and_empty_files_are_skipped(tmp_path):
    bad_input_cases(tmp_path)  # writes the files
    with pytest.raises(DataError) as error:
        ready(
            train_files=[str(tmp_path / "latin1.txt"), str(tmp_path / "broken.jsonl")],
            cache_dir=str(tmp_path),
        )
    assert "latin1.txt" in str(error.value) and "broken.jsonl line 3" in str(error.value)
    # An empty file next to real text is skipped, not an error (stdlib has many empty __init__.py).
    dm = ready(
        train_files=[str(tmp_path / "empty.txt"), str(tmp_path / "good.txt")],
        block_size=4,
        val_fraction=0,
        cache_dir=str(tmp_path),
    )
    assert dm.tokenizer.decode(dm.train_dataset.tokens) == "some text\n<|endoftext|>"


def test_contradictory_settings_are_refused():
    with pytest.raises(ConfigError, match="exactly one"):
        TextDataModule(train_files="a.txt", dataset="wikitext")
    with pytest.raises(ConfigError, match="stride"):
        TextDataModule(train_files="a.txt", block_size=8, stride=9)
    with pytest.raises(RuntimeError, match="setup"):
        TextDataModule(train_files="a.txt").tokenizer  # noqa: B018


# ----------------------------------------------------------------------------- batches
def test_collate_pads_right_and_masks_labels(corpus, tmp_path):
    dm = ready(train_files=str(corpus / "*.txt"), cache_dir=str(tmp_path / "cache"))
    pad = dm.tokenizer.pad_token_id
    batch = dm.collate([{"input_ids": [5, 6, 7]}, {"input_ids": torch.tensor([8])}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(v.dtype == torch.int64 and v.shape == (2, 3) for v in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    # Per-token labels are padded with -100; scalar labels stack to (B,).
    tagged = dm.collate([{"input_ids": [1, 2], "labels": [-100, 3]}, {"input_ids": [4], "labels": [5]}])
    assert tagged["labels"].tolist() == [[-100, 3], [5, -100]]
    classified = dm.collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [4], "labels": 0}])
    assert classified["labels"].tolist() == [1, 0] and classified["labels"].dtype == torch.int64
    # The short last window of a split comes out padded and masked (windows: 16 inputs + 1 target).
    last = dm.collate([dm.train_dataset[len(dm.train_dataset) - 1], dm.train_dataset[0]])
    assert last["input_ids"].shape == (2, 17) and (last["labels"] == -100).any()


def test_same_seed_same_batches_and_order_depends_on_epoch(corpus, tmp_path):
    def first_batches(seed: int, epoch: int = 0) -> list[torch.Tensor]:
        dm = ready(
            train_files=str(corpus / "*.txt"), block_size=8, batch_size=4, seed=seed, cache_dir=str(tmp_path)
        )
        loader = dm.train_dataloader()
        # Where training is in the data: `epoch` whole epochs consumed (restored on resume).
        dm.train_batches_consumed = epoch * loader.sampler.batches_per_epoch
        return [batch["input_ids"] for batch, _ in zip(loader, range(3), strict=False)]

    reference = first_batches(7)
    assert all(torch.equal(a, b) for a, b in zip(reference, first_batches(7), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(reference, first_batches(8), strict=True))
    next_epoch = first_batches(7, epoch=1)
    assert not all(torch.equal(a, b) for a, b in zip(reference, next_epoch, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(next_epoch, first_batches(7, epoch=1), strict=True))


def test_predict_prompts_with_unseen_characters_warn_as_training_text_does(corpus, tmp_path):
    """A prompt character the tokenizer never saw becomes <unk>: one counted warning naming it."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Speak, citizen\nSpeak \u00e9\u00e9 now\n")  # 'é' is in no document
    dm = ready(
        train_files=str(corpus / "*.txt"), cache_dir=str(tmp_path / "cache"), predict_files=str(prompts)
    )
    with pytest.warns(UserWarning, match=r"predict data: 1 of 2 examples hold text") as record:
        loader = dm.predict_dataloader()
    said = [str(w.message) for w in record if "no token for" in str(w.message)]
    assert len(said) == 1 and f"{prompts} line 2: '\u00e9'" in said[0], said
    ids = next(iter(loader))["input_ids"]
    assert (ids == dm.tokenizer.unk_token_id).sum() == 2
