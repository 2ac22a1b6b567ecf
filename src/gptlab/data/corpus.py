"""Streaming a text corpus through a tokenizer in bounded memory.

    document        a text file (read in blocks of BLOCK_CHARS) or one record of a dataset
      -> pieces     at most MAX_CHARS characters, cut where tokenizers start a new word (`cut_text`)
      -> batches    about BATCH_CHARS characters of pieces per `encode_batch_fast` call, which
                    spreads them over the `tokenizers` thread pool (RAYON_NUM_THREADS threads,
                    all cores by default; TOKENIZERS_PARALLELISM=false makes it one)
      -> TokenWriter  ids appended to a .npy file as they come, <eos> after every document

What is in memory at once is a block, a batch and its encodings, whatever the size of the corpus
or of one document. Pieces are not only a memory bound: `tokenizers` keeps alignment tables of
about a hundred bytes per character while it encodes a string, and one string of megabytes
encodes several times slower per character than pieces of tens of thousands of characters
(benchmarks/tokenize_corpus.py measures the whole path).

What equality holds. A document longer than MAX_CHARS is cut, in this order of preference,
    1. after a newline that has a non-space character on each side,
    2. before a space that has a non-space character on each side,
    3. after exactly MAX_CHARS characters,
looking back at most half a piece for 1 and 2. Tokenizers that split text into words first and
never join a word across a newline, or a space to the word before it, give the same ids for the
pieces as for the whole document at cuts 1 and 2: byte-level BPE with the GPT-2 or Llama 3 split
pattern (gptlab's `BPE`, GPT-2, Llama 3, Qwen), `Char`, and whitespace pre-tokenizers (BERT).
Every cut is checked where it is made: with l and r the PROBE_CHARS characters on either side,
encode(l + r) must equal encode(l) + encode(r). A tokenizer that adds something to the start of
every text (SentencePiece's prefix space), or a cut of kind 3 inside a word, fails the check;
such cuts are counted and reported (`CutReport`), and only the tokens near them differ from
encoding the whole document. Documents up to MAX_CHARS characters are never cut.
"""

from __future__ import annotations

import itertools
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from gptlab.errors import DataError

MAX_CHARS = 1 << 15  # characters per piece
BATCH_CHARS = 1 << 22  # characters per encode_batch_fast call
BLOCK_CHARS = 1 << 20  # characters read from a file at a time
PROBE_CHARS = 128  # context on each side of a cut when checking it
COPY_TOKENS = 1 << 22  # tokens per copy when splitting a stream into files


# ----------------------------------------------------------------------------- reading and cutting
def read_blocks(path: Path) -> Iterator[str]:
    """The text of a UTF-8 file in blocks of BLOCK_CHARS characters."""
    # Universal newlines, as datasets' "text" loader: "\r\n" and "\r" read as "\n" (a "\r\n" cut
    # by a block boundary too: the reader holds back a trailing "\r").
    with path.open(encoding="utf-8") as f:
        while block := f.read(BLOCK_CHARS):
            yield block


def _cut_point(text: str, lo: int, hi: int) -> int:
    """Where to cut `text` in [lo, hi]: see the module docstring; text[hi] exists."""
    for separator, after in (("\n", 1), (" ", 0)):
        i = text.rfind(separator, lo, hi)
        while i > lo:
            if not text[i - 1].isspace() and not text[i + 1].isspace():
                return i + after
            i = text.rfind(separator, lo, i)
    return hi


def cut_text(blocks: Iterable[str], max_chars: int | None = None) -> Iterator[str]:
    """The text that `blocks` concatenate to, in pieces of at most `max_chars` (MAX_CHARS) characters.

    Pieces concatenate back to the text exactly; a text of at most `max_chars` is one piece.
    """
    max_chars = max_chars or MAX_CHARS
    buffer, start = "", 0
    for block in blocks:
        buffer, start = buffer[start:] + block, 0
        # Cut only while more than max_chars remain: a cut looks at the character after it.
        while len(buffer) - start > max_chars:
            cut = _cut_point(buffer, start + max_chars // 2, start + max_chars)
            yield buffer[start:cut]
            start = cut
    if len(buffer) > start:
        yield buffer[start:]


# ----------------------------------------------------------------------------- writing
class TokenWriter:
    """A 1-D .npy file written by appending; `close` puts the final length in its header.

    numpy leaves room in a .npy header for the length to grow in place
    (`numpy.lib.format.GROWTH_AXIS_MAX_DIGITS`), so the header written first for 0 tokens is
    rewritten with the count, and no token is held in memory or copied.
    """

    def __init__(self, path: Path, dtype: np.dtype | type) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.count = 0
        self.file = path.open("wb")
        self.offset = self._write_header()

    def _write_header(self) -> int:
        self.file.seek(0)
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.count,),
        }
        np.lib.format.write_array_header_1_0(self.file, header)
        return self.file.tell()

    def write(self, tokens: np.ndarray) -> None:
        """Append `tokens` (cast to the file's dtype)."""
        # A contiguous slice of a memory-mapped stream of the same dtype is written without a copy.
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self.count += len(tokens)

    def close(self) -> None:
        """Write the header with the final length and close the file."""
        if self.file.closed:
            return
        offset = self._write_header()
        self.file.close()
        if offset != self.offset:  # numpy changed its header padding: the file would be misread
            raise RuntimeError(f"{self.path}: .npy header grew from {self.offset} to {offset} bytes")

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def copy_ranges(source: np.ndarray, ranges: Iterable[tuple[int, int]], out: TokenWriter) -> None:
    """Append `source[start:stop]` for each range to `out`, COPY_TOKENS at a time."""
    for start, stop in ranges:
        for begin in range(start, stop, COPY_TOKENS):
            out.write(source[begin : min(stop, begin + COPY_TOKENS)])


def shorten(path: Path, count: int) -> None:
    """Keep the first `count` tokens of the .npy file at `path` (truncated in place)."""
    with path.open("r+b") as f:
        np.lib.format.read_magic(f)  # TokenWriter writes version 1.0 headers
        _, _, dtype = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        f.truncate(offset + count * dtype.itemsize)
        f.seek(0)
        np.lib.format.write_array_header_1_0(
            f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
        )
        if f.tell() != offset:
            raise RuntimeError(f"{path}: .npy header changed size while shortening it")


# ----------------------------------------------------------------------------- encoding
@dataclass
class CutReport:
    """Cuts made inside long documents, and those where the pieces' tokens differ from the whole's."""

    made: int = 0
    changed: int = 0
    example: str = ""  # the text around the first changed cut, for the warning


@dataclass
class UnknownReport:
    """Documents with text the tokenizer encodes as its unknown token, and a few examples of it."""

    documents: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class Batch:
    """Pieces for one encode call, where their documents end, and the cuts to check."""

    pieces: list[str] = field(default_factory=list)
    ends: list[bool] = field(default_factory=list)  # whether pieces[i] is the last of its document
    probes: list[tuple[str, str]] = field(default_factory=list)  # (left, right) of each cut
    chars: int = 0

    def add(self, piece: str, end: bool) -> None:
        self.pieces.append(piece)
        self.ends.append(end)
        self.chars += len(piece)


class CorpusEncoder:
    """Encodes documents into one token stream with <eos> after each, in bounded memory.

    As `tokenizer(text, add_special_tokens=False, split_special_tokens=True)`: no BOS/EOS added
    by the tokenizer's template, and a literal "<|endoftext|>" in the text is text, not a separator.

        main thread    read + cut batch k+1  |  ids of batch k -> .npy   |  read + cut batch k+2 ...
        encode thread  encode batch k (Rust, GIL released, Rayon pool)  |  encode batch k+1 ...
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.backend: Tokenizer | None = None
        if getattr(tokenizer, "backend_tokenizer", None) is not None:
            # A private copy of the Rust tokenizer: its settings change here, the caller's stay.
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.encode_special_tokens = True  # transformers' split_special_tokens=True
            # A saved tokenizer.json may carry truncation or padding; transformers turns them off per call.
            self.backend.no_truncation()
            self.backend.no_padding()
        self.cuts = CutReport()
        self.unknown = UnknownReport()

    def _encode(self, texts: list[str]) -> list[list[int]]:
        try:
            if self.backend is None:  # a tokenizer without a Rust backend (e.g. SentencePiece's own)
                return self.tokenizer(
                    texts, add_special_tokens=False, split_special_tokens=True, return_attention_mask=False
                )["input_ids"]
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]
        except Exception as err:  # the Rust tokenizers raise a bare Exception
            chars = set().union(*map(set, texts))
            unknown = sorted(chars - set(self.tokenizer.get_vocab()))
            hint = (
                f"; characters missing from its vocabulary: {''.join(unknown[:40])!r} (a Char tokenizer "
                f"knows only the characters of the training files: add them there, or use BPE)"
                if unknown and len(unknown) < len(chars)
                else ""
            )
            raise DataError(f"the tokenizer cannot encode this text ({err}){hint}") from None

    def _unknown_text(self, piece: str, unk: int) -> str:
        """The characters of `piece` that became the unknown token, for a warning."""
        try:
            spans = self.tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        except (NotImplementedError, ValueError):  # no offsets without a Rust backend
            return "?"
        pairs = zip(spans["input_ids"], spans["offset_mapping"], strict=True)
        return ", ".join(sorted({repr(piece[a:b]) for token, (a, b) in pairs if token == unk}))

    def _encode_batch(self, batch: Batch) -> list[list[int]]:
        # The cuts' checks ride in the same call: (l + r, l, r) after the pieces.
        return self._encode(
            batch.pieces + [t for left, right in batch.probes for t in (left + right, left, right)]
        )

    def _batches(self, documents: Iterable[Iterable[str]]) -> Iterator[Batch]:
        batch = Batch()
        for document in documents:
            previous = None
            for piece in cut_text(document):
                if previous is not None:
                    # One piece behind, so that the last piece of a document is known as such.
                    batch.add(previous, end=False)
                    batch.probes.append((previous[-PROBE_CHARS:], piece[:PROBE_CHARS]))
                    if batch.chars >= BATCH_CHARS:
                        yield batch
                        batch = Batch()
                previous = piece
            if previous is not None:
                batch.add(previous, end=True)
                if batch.chars >= BATCH_CHARS:
                    yield batch
                    batch = Batch()
        if batch.pieces:
            yield batch

    def encode(
        self, documents: Iterable[Iterable[str]], write: Callable[[np.ndarray], None], dtype: np.dtype
    ) -> np.ndarray:
        """Write the tokens of `documents` (each given as blocks of text) through `write`, in batches.

        Returns the number of tokens of each document, its <eos> included (int64); documents
        with no text are left out (they would add a lone <eos>). `self.unknown` then counts the
        documents with text encoded as the unknown token.
        """
        lengths = array("q")
        current = 0  # tokens of the document being written, across batches

        self.unknown = UnknownReport()
        unk = self.tokenizer.unk_token_id
        has_unk = False  # the document being written holds text encoded as the unknown token

        def finish(batch: Batch, encoded: Future[list[list[int]]]) -> None:
            nonlocal current, has_unk
            ids = encoded.result()
            parts: list[Iterable[int]] = []
            for piece, piece_ids, end in zip(batch.pieces, ids, batch.ends, strict=False):  # probes follow
                parts.append(piece_ids)
                current += len(piece_ids)
                if unk is not None and unk in piece_ids:
                    has_unk = True
                    if len(self.unknown.examples) < 3:
                        self.unknown.examples.append(self._unknown_text(piece, unk))
                if end:
                    parts.append((self.eos_id,))
                    lengths.append(current + 1)
                    self.unknown.documents += has_unk
                    current, has_unk = 0, False
            write(np.fromiter(itertools.chain.from_iterable(parts), dtype=dtype))
            for i, (left, right) in enumerate(batch.probes):
                # encode(l + r) == encode(l) + encode(r): the cut changed nothing near it.
                whole, *halves = ids[len(batch.pieces) + 3 * i : len(batch.pieces) + 3 * i + 3]
                self.cuts.made += 1
                if whole != halves[0] + halves[1]:
                    self.cuts.changed += 1
                    self.cuts.example = self.cuts.example or f"{left[-20:]!r} | {right[:20]!r}"

        # One batch encodes while the one before it is written and the next one read.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptlab-encode") as pool:
            pending: deque[tuple[Batch, Future[list[list[int]]]]] = deque()
            for batch in self._batches(documents):
                pending.append((batch, pool.submit(self._encode_batch, batch)))
                if len(pending) > 1:
                    finish(*pending.popleft())
            while pending:
                finish(*pending.popleft())
        return np.array(lengths, dtype=np.int64)
