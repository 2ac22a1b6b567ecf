"""Streaming tokenization in bounded memory (gptlab.data.corpus) and its use by TextDataModule.

Chunk sizes are shrunk to a few hundred characters, so small files take the paths that a corpus
larger than memory takes: many pieces per document, many batches, many blocks per file.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import gptlab.data.corpus as corpus
from gptlab.data import BPE, Char, TextDataModule
from gptlab.data.corpus import Batch, CorpusEncoder, TokenWriter, cut_text, read_blocks, shorten

WORDS = "the quick brown fox jumps over a lazy dog while 42 cats, 7 owls and 1999 ants (mostly) watch".split()


def prose(n_words: int, seed: int, newline_every: int = 12) -> str:
    """Words, numbers and punctuation with lines, blank lines and runs of spaces: every cut kind occurs."""
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(n_words):
        parts.append(WORDS[rng.integers(len(WORDS))])
        r = rng.random()
        parts.append("\n" if i % newline_every == newline_every - 1 else "  " if r < 0.05 else " ")
        if r > 0.97:
            parts.append("\n\n")
    return "".join(parts)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pieces of at most 64 characters, batches of ~256, blocks of 100 (an odd size)."""
    monkeypatch.setattr(corpus, "MAX_CHARS", 64)
    monkeypatch.setattr(corpus, "BATCH_CHARS", 256)
    monkeypatch.setattr(corpus, "BLOCK_CHARS", 100)
    monkeypatch.setattr(corpus, "PROBE_CHARS", 16)
    monkeypatch.setattr(corpus, "COPY_TOKENS", 7)


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    return BPE(vocab_size=400).train([prose(3000, seed=0)])


def whole(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> list[int]:
    """The reference: each document encoded whole, then <eos>."""
    eos = tokenizer.eos_token_id
    return [
        t
        for text in documents
        if text
        for t in [*tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], eos]
    ]


def encode(tokenizer: PreTrainedTokenizerFast, documents: list[list[str]]) -> tuple[list[int], CorpusEncoder]:
    chunks = []
    encoder = CorpusEncoder(tokenizer)
    lengths = encoder.encode(documents, chunks.append, np.dtype(np.uint32))
    stream = np.concatenate(chunks).tolist() if chunks else []
    assert lengths.sum() == len(stream)
    return stream, encoder


# ----------------------------------------------------------------------------- cutting
@pytest.mark.parametrize("max_chars", [2, 7, 64])
def test_pieces_concatenate_to_the_text_and_respect_the_limit(max_chars):
    text = prose(400, seed=1) + "x" * 300 + " " * 50 + "\u00e9t\u00e9 \U0001f600\n"
    for block in (1, 13, 1000):
        blocks = [text[i : i + block] for i in range(0, len(text), block)]
        pieces = list(cut_text(blocks, max_chars))
        assert "".join(pieces) == text
        assert all(0 < len(p) <= max_chars for p in pieces)
    assert list(cut_text(["short"], 64)) == ["short"] and list(cut_text([], 64)) == []


def test_cuts_prefer_a_line_break_then_a_space_between_words():
    assert list(cut_text(["aaaa bbbb\ncccc dddd\neeee"], 16)) == ["aaaa bbbb\n", "cccc dddd\neeee"]
    assert list(cut_text(["aaaa bbbb cccc dddd"], 12)) == ["aaaa bbbb", " cccc dddd"]
    # Not inside a run of whitespace ("\n\n", "  "): tokenizers treat a run as one word.
    assert list(cut_text(["aaaa bbbb\n\n cccc dddd"], 16)) == ["aaaa bbbb\n\n cccc", " dddd"]
    assert list(cut_text(["x" * 20], 8)) == ["x" * 8, "x" * 8, "x" * 4]  # no break: cut at the limit


def test_text_files_read_in_blocks_with_universal_newlines(tmp_path, small_chunks):
    path = tmp_path / "crlf.txt"
    path.write_bytes(("line one\r\nline two\rthree\n" * 40).encode())  # 100-char blocks split "\r\n"
    blocks = list(read_blocks(path))
    assert len(blocks) > 5 and all(len(b) <= 100 for b in blocks)
    assert "".join(blocks) == "line one\nline two\nthree\n" * 40


# ----------------------------------------------------------------------------- equality of token streams
def test_chunked_stream_equals_whole_document_tokenization(bpe, small_chunks):
    texts = [
        prose(600, seed=2),  # many lines
        prose(600, seed=3, newline_every=10**9),  # one long line: cut at spaces
        "",  # no text: no lone <eos>
        "short <|endoftext|> one\n",  # a literal eos string is text
        prose(30, seed=4),
    ]
    for tokenizer in (bpe, Char().train(texts)):
        stream, encoder = encode(tokenizer, [[t[i : i + 100] for i in range(0, len(t), 100)] for t in texts])
        assert stream == whole(tokenizer, texts)
        assert encoder.cuts.made > 50 and encoder.cuts.changed == 0


def test_a_tokenizer_without_a_rust_backend_is_called_itself(bpe, small_chunks):
    text = prose(300, seed=8)
    encoder = CorpusEncoder(bpe)
    encoder.backend = None  # as for a tokenizer with no backend_tokenizer
    chunks: list[np.ndarray] = []
    encoder.encode([[text]], chunks.append, np.dtype(np.uint32))
    assert np.concatenate(chunks).tolist() == whole(bpe, [text]) and encoder.cuts.made > 20


def llama3_style() -> PreTrainedTokenizerFast:
    """Byte-level with Llama 3's split pattern (letters take one leading non-letter, digits in threes)."""
    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([prose(3000, seed=0)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def test_llama3_style_split_pattern_is_cut_safely_too(small_chunks):
    tokenizer = llama3_style()
    texts = [prose(600, seed=5), prose(600, seed=6, newline_every=10**9)]
    stream, encoder = encode(tokenizer, [[t] for t in texts])
    assert stream == whole(tokenizer, texts) and encoder.cuts.changed == 0


def test_cuts_that_change_tokens_are_counted(bpe, small_chunks):
    # No space or line break: cut at the limit, inside words; BPE's merges there differ.
    text = "thequickbrownfoxjumpsoverthelazydog" * 20
    stream, encoder = encode(bpe, [[text]])
    assert encoder.cuts.made == len(list(cut_text([text]))) - 1
    assert encoder.cuts.changed > 0 and stream != whole(bpe, [text])
    # A tokenizer that prepends "▁" to every text (SentencePiece style) changes every cut.
    metaspace = Tokenizer(models.WordLevel({c: i for i, c in enumerate("▁abcdefghijklmnopqrstuvwxyz\n")}))
    metaspace.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    metaspace.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    metaspace.add_special_tokens(["<|endoftext|>"])
    prepending = PreTrainedTokenizerFast(tokenizer_object=metaspace, eos_token="<|endoftext|>")
    _, encoder = encode(prepending, [["abc def\n" * 200]])
    assert encoder.cuts.made > 10 and encoder.cuts.changed == encoder.cuts.made


# ----------------------------------------------------------------------------- the DataModule
def prepare(tmp_path: Path, name: str, **kwargs) -> TextDataModule:
    dm = TextDataModule(**{"block_size": 8, "cache_dir": str(tmp_path / name), **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("split", ["tail", "documents"])
def test_datamodule_streams_equal_the_unchunked_path(tmp_path, monkeypatch, split):
    files = tmp_path / "files"
    files.mkdir()
    texts = [prose(500, seed=10), prose(500, seed=11, newline_every=10**9), "tiny\n", prose(80, seed=12)]
    for i, text in enumerate(texts):
        (files / f"{i}.txt").write_text(text, encoding="utf-8")
    records = tmp_path / "val.jsonl"  # a record longer than a piece is cut as well
    records.write_text(json.dumps({"text": prose(300, seed=13)}) + "\n", encoding="utf-8")
    kwargs = {"train_files": str(files / "*.txt"), "tokenizer": BPE(vocab_size=300), "val_split": split}
    reference = prepare(tmp_path, "whole", **kwargs)
    with monkeypatch.context() as patch:
        for name, value in [
            ("MAX_CHARS", 64),
            ("BATCH_CHARS", 256),
            ("BLOCK_CHARS", 100),
            ("COPY_TOKENS", 7),
        ]:
            patch.setattr(corpus, name, value)
        chunked = prepare(tmp_path, "chunked", **kwargs)
        with_val = prepare(tmp_path, "val", **kwargs, val_files=str(records))
    assert chunked.tokenizer.backend_tokenizer.to_str() == reference.tokenizer.backend_tokenizer.to_str()
    for attr in ("train_dataset", "val_dataset"):
        assert getattr(chunked, attr).tokens.tolist() == getattr(reference, attr).tokens.tolist()
    meta = json.loads((chunked.train_dataset.path.parent / "meta.json").read_text())
    assert (
        meta["splits"]
        == json.loads((reference.train_dataset.path.parent / "meta.json").read_text())["splits"]
    )
    assert meta["cuts"]["made"] > 50 and meta["cuts"]["changed"] == 0
    assert with_val.val_dataset.tokens.tolist() == whole(with_val.tokenizer, [prose(300, seed=13)])
    assert with_val.train_dataset.tokens.tolist() == whole(with_val.tokenizer, texts)


def test_unseen_characters_are_counted_in_one_warning_per_split(tmp_path, small_chunks):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text(prose(200, seed=15), encoding="utf-8")
    val.write_text(prose(200, seed=16) + " caf\u00e9 \U0001f600\n", encoding="utf-8")
    expected = "val_files .*: 1 of 1 documents hold text .* '<unk>' \\(e.g. '\u00e9', '\U0001f600'\\)"
    with pytest.warns(UserWarning, match=expected):
        dm = prepare(tmp_path, "c", tokenizer=Char(), train_files=str(train), val_files=str(val))
    unk = dm.tokenizer.unk_token_id
    assert dm.val_dataset.tokens.tolist().count(unk) == 2 and unk not in dm.train_dataset.tokens.tolist()


def test_python_memory_stays_bounded_on_a_long_line(tmp_path, monkeypatch):
    # One 1 MB line, read, cut and encoded in small pieces: Python holds a few batches of it.
    path = tmp_path / "line.txt"
    text = " ".join(WORDS * 11000)
    path.write_text(text, encoding="utf-8")
    for name, value in [
        ("MAX_CHARS", 1024),
        ("BATCH_CHARS", 4096),
        ("BLOCK_CHARS", 8192),
        ("PROBE_CHARS", 64),
    ]:
        monkeypatch.setattr(corpus, name, value)
    sizes: list[tuple[int, int]] = []
    original = CorpusEncoder._encode_batch

    def spy(self: CorpusEncoder, batch: Batch) -> list[list[int]]:
        sizes.append((max(map(len, batch.pieces)), sum(map(len, batch.pieces))))
        return original(self, batch)

    monkeypatch.setattr(CorpusEncoder, "_encode_batch", spy)
    dm = TextDataModule(tokenizer=Char(), train_files=str(path), block_size=8, cache_dir=str(tmp_path / "c"))
    tokenizer = Char().train(cut_text(read_blocks(path)))
    next(dm.documents("train"))  # the files' checks (UTF-8, not empty) run once, before tracing
    tracemalloc.start()
    dm.prepare_datasets(tokenizer)  # the tokenizing alone
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # The text alone would take 1 MB as a str, its ids 8 MB as a list; a batch takes ~100 kB.
    assert len(text) > 1_000_000 and peak < 250_000, peak
    # Every string the tokenizer sees is at most a piece, every batch at most BATCH_CHARS + a piece.
    assert max(s[0] for s in sizes) <= 1024 and max(s[1] for s in sizes) <= 4096 + 1024
    tokens = np.concatenate(
        [np.load(p) for p in (dm.cache_path(tokenizer) / f"{s}.npy" for s in ("train", "val"))]
    )
    vocab = tokenizer.get_vocab()  # Char: one id per character
    assert tokens.tolist() == [vocab[c] for c in text] + [tokenizer.eos_token_id]


def test_an_interrupted_preparation_leaves_no_cache_entry(tmp_path, monkeypatch, small_chunks):
    path = tmp_path / "a.txt"
    path.write_text(prose(400, seed=14), encoding="utf-8")
    kwargs = {
        "tokenizer": Char(),
        "train_files": str(path),
        "block_size": 8,
        "cache_dir": str(tmp_path / "c"),
    }
    original = TokenWriter.write

    def write_then_die(self, tokens):
        original(self, tokens)
        if self.count > 500:  # part of the stream is on disk
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TokenWriter, "write", write_then_die)
        with pytest.raises(KeyboardInterrupt):
            TextDataModule(**kwargs).prepare_data()
    assert not list((tmp_path / "c" / "text").iterdir())  # no entry, no leftover build directory
    # A build killed outright (SIGKILL) leaves its directory; the next build of the entry removes it.
    dm = TextDataModule(**kwargs)
    killed = tmp_path / "c" / "text" / f".tmp-{dm.cache_path(dm._load_tokenizer()).name[:16]}-x1y2"
    (killed / "part").mkdir(parents=True)
    other = tmp_path / "c" / "text" / ".tmp-0123456789abcdef-x1y2"  # another entry's build: kept
    other.mkdir()
    dm = prepare(tmp_path, "c", **{k: v for k, v in kwargs.items() if k != "cache_dir"})
    assert not killed.exists() and other.exists()
    assert dm.train_dataset.tokens.tolist() + dm.val_dataset.tokens.tolist() == whole(
        dm.tokenizer, [path.read_text()]
    )


def test_token_writer_fills_in_the_length_and_shortens_in_place(tmp_path):
    path = tmp_path / "t.npy"
    with TokenWriter(path, np.uint16) as out:
        for start in range(0, 70000, 9999):
            out.write(np.arange(start, min(start + 9999, 70000)) % 65536)
    assert np.array_equal(np.load(path, mmap_mode="r"), np.arange(70000) % 65536)
    shorten(path, 12345)
    assert np.array_equal(np.load(path), np.arange(12345))
    with TokenWriter(tmp_path / "empty.npy", np.uint32):
        pass
    assert np.load(tmp_path / "empty.npy").shape == (0,)
