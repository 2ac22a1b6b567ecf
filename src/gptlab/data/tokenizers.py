"""Tokenizers: recipes that train one on a corpus, and a loader that caches what they train.

Every tokenizer in gptlab is a `transformers.PreTrainedTokenizerFast` saved as a standard
directory, so `AutoTokenizer.from_pretrained(directory)` (and any Hugging Face tool) loads it back
with the same ids. `<|endoftext|>` (GPT-2's document separator) is the end-of-sequence token and
doubles as padding: padded positions are masked, so their id never matters.

    source: str              --> AutoTokenizer.from_pretrained(source)     (local dir or hub name)
    source: TokenizerRecipe  --> cache_dir/tokenizers/<sha256(recipe + corpus)>/
                                   missing?  prepare_tokenizer trains it   (rank 0, prepare_data)
                                   present?  load_tokenizer loads it       (every rank, setup)

A recipe is a small object with typed parameters (`BPE(vocab_size=8192)`, `Char()`), so YAML
selects one with `class_path`, and the cache key is a function of those parameters and the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gptlab.errors import ConfigError

EOS_TOKEN = "<|endoftext|>"
# Written beside the tokenizer files: which recipe and corpus produced them (for humans; ignored
# by AutoTokenizer).
RECIPE_FILE = "gptlab_recipe.json"


class TokenizerRecipe(ABC):
    """How to train a tokenizer from text. Subclasses keep their parameters as plain attributes."""

    # Bump when a subclass's `train` changes what it produces, so old cache entries are not reused.
    version: int = 1

    @abstractmethod
    def train(self, texts: Iterable[str]) -> PreTrainedTokenizerFast:
        """Train on `texts` (consumed once) and return the tokenizer."""

    def fingerprint(self) -> str:
        """The recipe's class, version and parameters: equal fingerprints train equal tokenizers."""
        params = json.dumps(vars(self), sort_keys=True)
        return f"{type(self).__module__}.{type(self).__qualname__}/v{self.version}/{params}"

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash(self.fingerprint())


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The `transformers` face of a `tokenizers` object, with our special tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # transformers' clean-up deletes the space in "word ." on decode, breaking round trips.
        clean_up_tokenization_spaces=False,
    )


class BPE(TokenizerRecipe):
    """Byte-level BPE, as GPT-2: any string encodes (no unknown token) and decodes back exactly."""

    def __init__(self, vocab_size: int = 8192, min_frequency: int = 2) -> None:
        """
        Args:
            vocab_size: Size of the vocabulary, including the 256 byte symbols and `<|endoftext|>`.
                Round it to a multiple of 64 for faster embedding matmuls on GPUs.
            min_frequency: A pair of symbols is merged only if it occurs at least this often.
        """
        # 256 byte symbols + eos are always in the vocabulary; below that the trainer ignores us.
        if vocab_size < 257:
            raise ConfigError(
                f"BPE vocab_size={vocab_size} is too small: it must be at least 257 (256 bytes + eos)"
            )
        if min_frequency < 1:
            raise ConfigError(f"BPE min_frequency={min_frequency} must be at least 1")
        self.vocab_size = vocab_size
        self.min_frequency = min_frequency

    def train(self, texts: Iterable[str]) -> PreTrainedTokenizerFast:
        tokenizer = Tokenizer(models.BPE())
        # GPT-2's pre-tokenizer regex (words, numbers, punctuation, spaces kept with the next word);
        # no prefix space, so encode(decode(ids)) == ids.
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        # Only fixes character offsets (used by token classification); ids are unchanged.
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=self.vocab_size,
            min_frequency=self.min_frequency,
            special_tokens=[EOS_TOKEN],
            # All 256 bytes from the start, even those absent from the corpus: nothing is unknown.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return _wrap(tokenizer)


class Char(TokenizerRecipe):
    """Character-level, as nanoGPT's shakespeare_char: one token per character of the corpus.

    Ids follow the sorted characters (nanoGPT's `stoi`), then `<|endoftext|>`, then the unknown
    token that stands for any character the corpus lacks (emoji in fine-tuning data, say);
    Tiny Shakespeare gives 65 + 2 = 67 tokens. With `unk_token: null` the vocabulary is exactly
    nanoGPT's (65 + 1) and an unseen character is an error instead.
    """

    version = 2  # v2: the unknown token

    def __init__(self, unk_token: str | None = "<unk>") -> None:
        """
        Args:
            unk_token: Token that encodes characters absent from the training corpus (data modules
                count them in one warning per split); None: such characters cannot be encoded and
                the data modules stop with the file, line and character.
        """
        self.unk_token = unk_token

    def train(self, texts: Iterable[str]) -> PreTrainedTokenizerFast:
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise ValueError("Char tokenizer: the training corpus contains no characters")
        vocab = {c: i for i, c in enumerate(sorted(chars))}
        vocab[EOS_TOKEN] = len(vocab)
        if self.unk_token is not None:
            vocab[self.unk_token] = len(vocab)
        # WordLevel over single characters; without an unk token an unknown character is an error,
        # where a merge-less BPE model would drop it without a word.
        tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=self.unk_token))
        # Every character, newlines included, is its own piece ("." would skip "\n").
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        # Join pieces with nothing in between (the default decoder inserts spaces).
        tokenizer.decoder = decoders.Fuse()
        tokenizer.add_special_tokens([EOS_TOKEN] + ([self.unk_token] if self.unk_token is not None else []))
        wrapped = _wrap(tokenizer)
        if self.unk_token is not None:
            wrapped.unk_token = self.unk_token
        return wrapped


# ----------------------------------------------------------------------------- cache and loading
def tokenizer_cache_path(recipe: TokenizerRecipe, corpus_fingerprint: str, cache_dir: str | Path) -> Path:
    """Where `recipe` trained on the corpus identified by `corpus_fingerprint` is cached."""
    key = hashlib.sha256(f"{recipe.fingerprint()}\n{corpus_fingerprint}".encode()).hexdigest()
    return Path(cache_dir).expanduser() / "tokenizers" / key


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A hash of everything that decides the ids a tokenizer produces (for data cache keys)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    # The serialized `tokenizers` pipeline covers vocab, merges, normalizer and pre-tokenizer.
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(tokenizer.get_vocab()).encode()
    )
    digest.update(repr((type(tokenizer).__name__, tokenizer.eos_token, tokenizer.pad_token)).encode())
    return digest.hexdigest()


def _from_pretrained(source: str | Path) -> PreTrainedTokenizerFast:
    try:
        # trust_remote_code=False, explicitly: transformers' default (None) asks on a terminal
        # and would run a tokenizer's own Python code on "y"; gptlab only loads plain tokenizers.
        # "~/.cache/gptlab/models/..." in YAML: expanded like HFBackbone's name_or_path
        source = os.path.expanduser(str(source))
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "custom code" in str(err):
            raise ConfigError(
                f"tokenizer {str(source)!r} ships its own Python code (auto_map in its config), which "
                f"gptlab does not run; use a tokenizer without custom code (or re-save it as a plain "
                f"tokenizer.json)"
            ) from None
        raise ConfigError(
            f"cannot load tokenizer {str(source)!r}: it is neither a tokenizer directory (one holding "
            f"tokenizer.json / tokenizer_config.json) nor a reachable hub name ({err}); to train one "
            f"instead, give a recipe: `tokenizer: {{class_path: gptlab.data.BPE}}` (or Char)"
        ) from None
    # Hub tokenizers such as GPT-2 have no pad token; padding is masked, so eos serves.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_tokenizer(
    source: str | TokenizerRecipe,
    cache_dir: str | Path,
    corpus: Iterable[str],
    corpus_fingerprint: str,
) -> Path | None:
    """Train `source` on `corpus` into the cache unless it is there; call it on one process only.

    For a str source this only checks that it loads (and fills the hub cache on rank 0). `corpus`
    is consumed only when training is needed, so a lazy generator costs nothing on a cache hit.
    Returns the cached tokenizer directory for a recipe, None for a str.
    """
    if isinstance(source, str):
        _from_pretrained(source)
        return None
    path = tokenizer_cache_path(source, corpus_fingerprint, cache_dir)
    if path.is_dir():
        rank_zero_info(f"gptlab: tokenizer {source!r} cached at {path}")
        return path
    rank_zero_info(f"gptlab: training tokenizer {source!r} ...")
    tokenizer = source.train(corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write everything into a private directory, then rename it into place in one step: readers
    # never see a half-written tokenizer, and a crash leaves only a `.tmp-*` directory behind.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        meta = {"recipe": source.fingerprint(), "corpus": corpus_fingerprint, "vocab_size": len(tokenizer)}
        (tmp / RECIPE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.replace(tmp, path)
        except OSError:
            # Another process renamed its copy first (the target is a non-empty directory): both
            # trained the same recipe on the same corpus, so keep theirs.
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rank_zero_info(f"gptlab: tokenizer {source!r} ({len(tokenizer)} tokens) saved to {path}")
    return path


def load_tokenizer(
    source: str | TokenizerRecipe,
    cache_dir: str | Path = "~/.cache/gptlab",
    corpus: Iterable[str] | None = None,
    corpus_fingerprint: str | None = None,
) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a directory or hub name, or a recipe's from the cache.

    Args:
        source: A tokenizer directory, a hub name, or a recipe such as `BPE()` or `Char()`.
        cache_dir: Root of gptlab's cache; recipes live in `cache_dir/tokenizers/<hash>/`.
        corpus: Texts to train a recipe on if it is not cached yet. Without it (as in `setup` on
            every rank) a missing cache entry is an error.
        corpus_fingerprint: Identifies the corpus (required for a recipe): part of the cache key.
    """
    if isinstance(source, str):
        return _from_pretrained(source)
    if corpus_fingerprint is None:
        raise TypeError("load_tokenizer: a recipe needs corpus_fingerprint to find its cache entry")
    if corpus is not None:
        prepare_tokenizer(source, cache_dir, corpus, corpus_fingerprint)
    path = tokenizer_cache_path(source, corpus_fingerprint, cache_dir)
    if not path.is_dir():
        raise ConfigError(
            f"tokenizer {source!r} has not been trained on this corpus yet (expected it in {path}): "
            f"prepare_data() trains it on rank 0 before setup(); under multi-node training, cache_dir "
            f"must be on a filesystem every node sees"
        )
    return _from_pretrained(path)


# transformers 5 names the class of a plain tokenizer.json tokenizer "TokenizersBackend" in
# tokenizer_config.json, which transformers 4.x does not know; both read "PreTrainedTokenizerFast".
_V5_ONLY_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def save_tokenizer(
    tokenizer: PreTrainedTokenizerFast, directory: str | Path, model_max_length: int | None = None
) -> None:
    """`save_pretrained`, loadable by `AutoTokenizer` on every transformers version gptlab allows.

    Args:
        tokenizer: the tokenizer to write (not modified).
        directory: where to write tokenizer.json and tokenizer_config.json.
        model_max_length: the model's context length, recorded so that pipelines truncate to it
            (None: keep the tokenizer's own value).
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") in _V5_ONLY_CLASSES:
        config["tokenizer_class"] = _V5_ONLY_CLASSES[config["tokenizer_class"]]
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
