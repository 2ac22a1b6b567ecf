"""Tokenizer recipes and their cache: round trips through a saved directory, nanoGPT's char vocab."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from packaging.version import Version
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import REPO, shared_data
from gptlab.data import BPE, EOS_TOKEN, Char, load_tokenizer, prepare_tokenizer, tokenizer_cache_path
from gptlab.data.tokenizers import save_tokenizer
from gptlab.errors import ConfigError

CORPUS = [
    "def add(a, b):\n    return a + b\n\n",
    "The quick brown fox jumps over the lazy dog . Again , and again !\n",
    "Tabs\tand  double  spaces, unicode: héllo wörld — 世界 🙂\r\n",
] * 5
# Spacing that naive decoders change: " ." and " ," (transformers' clean-up), leading spaces,
# several newlines, and characters absent from the training corpus (BPE must still encode them).
PROBE = "  leading . and , spacing !\n\n\ttab  ünïcödé 世界 🙂 <|endoftext|> end"


def assert_same_after_reload(tokenizer: PreTrainedTokenizerFast, directory: Path, text: str) -> None:
    tokenizer.save_pretrained(str(directory))
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    assert len(reloaded) == len(tokenizer)
    assert reloaded.eos_token == reloaded.pad_token == EOS_TOKEN
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.decode(ids) == tokenizer.decode(ids) == text


def test_bpe_round_trip_through_a_saved_directory(tmp_path):
    tokenizer = BPE(vocab_size=300, min_frequency=2).train(CORPUS)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    # 256 bytes + eos + merges; a corpus this small may stop short of 300.
    assert 257 < len(tokenizer) <= 300
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert_same_after_reload(tokenizer, tmp_path / "bpe", PROBE)
    # Merges were learned: frequent words take fewer tokens than bytes.
    assert len(tokenizer("return a + b")["input_ids"]) < len("return a + b")


def test_char_round_trip_and_nanogpt_ids(tmp_path):
    tokenizer = Char().train(CORPUS)
    chars = sorted(set("".join(CORPUS)))
    assert len(tokenizer) == len(chars) + 2  # + <|endoftext|> + <unk>
    # nanoGPT: stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}; eos comes last.
    assert tokenizer("".join(chars), add_special_tokens=False)["input_ids"] == list(range(len(chars)))
    assert tokenizer.eos_token_id == len(chars)
    text = "".join(CORPUS[:3]) + " . , !"
    assert_same_after_reload(tokenizer, tmp_path / "char", text)


def test_char_refuses_characters_it_never_saw_without_an_unk_token():
    tokenizer = Char(unk_token=None).train(["abc"])
    with pytest.raises(Exception, match="UNK"):
        tokenizer("abz")


def test_char_maps_unseen_characters_to_its_unknown_token(tmp_path):
    tokenizer = Char().train(["abc"])
    # ids: a b c, then <|endoftext|>, then <unk>: the characters keep nanoGPT's ids.
    assert tokenizer.unk_token == "<unk>" and tokenizer.unk_token_id == 4 == len(tokenizer) - 1
    assert tokenizer("ab\U0001f600z", add_special_tokens=False)["input_ids"] == [0, 1, 4, 4]
    tokenizer.save_pretrained(str(tmp_path))
    assert load_tokenizer(str(tmp_path))("z")["input_ids"] == [4]


def test_char_on_tiny_shakespeare_has_66_tokens_and_round_trips():
    text = shared_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")
    assert len(Char().train([text])) == 67  # with <unk>
    tokenizer = Char(unk_token=None).train([text])
    assert len(tokenizer) == 66  # 65 characters + <|endoftext|>, as nanoGPT's meta.pkl (65)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert ids[:1000] == [stoi[c] for c in text[:1000]]
    assert tokenizer.decode(ids) == text


def test_recipes_compare_by_parameters():
    assert BPE(vocab_size=300) == BPE(vocab_size=300)
    assert BPE(vocab_size=300) != BPE(vocab_size=512)
    assert BPE(vocab_size=300).fingerprint() != BPE(vocab_size=512).fingerprint()
    assert BPE().fingerprint() != Char().fingerprint()
    assert repr(BPE(vocab_size=300)) == "BPE(vocab_size=300, min_frequency=2)"
    with pytest.raises(ConfigError, match="257"):
        BPE(vocab_size=100)


def test_recipe_is_trained_once_then_loaded_from_the_cache(tmp_path):
    recipe = BPE(vocab_size=300)
    first = load_tokenizer(recipe, tmp_path, corpus=iter(CORPUS), corpus_fingerprint="corpus-a")
    path = tokenizer_cache_path(recipe, "corpus-a", tmp_path)
    assert (path / "tokenizer.json").is_file()
    mtime = (path / "tokenizer.json").stat().st_mtime_ns

    def must_not_be_read():
        raise AssertionError("the corpus was read although the tokenizer is cached")
        yield  # a generator: nothing runs until it is iterated

    second = load_tokenizer(recipe, tmp_path, corpus=must_not_be_read(), corpus_fingerprint="corpus-a")
    assert (path / "tokenizer.json").stat().st_mtime_ns == mtime
    assert second(PROBE)["input_ids"] == first(PROBE)["input_ids"]
    # Another corpus or other parameters are other cache entries.
    assert tokenizer_cache_path(recipe, "corpus-b", tmp_path) != path
    assert tokenizer_cache_path(BPE(vocab_size=301), "corpus-a", tmp_path) != path
    # Nothing half-written is left next to the entry.
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [path.name]


def test_loading_an_untrained_recipe_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="prepare_data"):
        load_tokenizer(Char(), tmp_path, corpus_fingerprint="never-trained")


def test_a_concurrent_writer_wins_without_corrupting_the_cache(tmp_path):
    class RacedChar(Char):
        """Another process renames its copy into place while this one is still training."""

        def train(self, texts):
            tokenizer = super().train(texts)
            tokenizer.save_pretrained(str(tokenizer_cache_path(self, "corpus", tmp_path)))
            return tokenizer

    path = prepare_tokenizer(RacedChar(), tmp_path, ["abc"], "corpus")
    assert AutoTokenizer.from_pretrained(str(path)).decode([0, 1, 2]) == "abc"
    assert [p.name for p in (tmp_path / "tokenizers").iterdir()] == [path.name]


def test_a_directory_source_gets_a_pad_token(tmp_path):
    tokenizer = Char().train(["abc"])
    tokenizer.pad_token = None  # like GPT-2 on the hub
    tokenizer.save_pretrained(str(tmp_path / "tok"))
    loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.pad_token == loaded.eos_token == EOS_TOKEN
    with pytest.raises(ConfigError, match="missing"):
        load_tokenizer(str(tmp_path / "missing"))


# A python whose transformers is the oldest pyproject.toml allows (.ci/run makes one in a venv).
OLDEST_PYTHON_ENV = "GPTLAB_OLDEST_TRANSFORMERS_PYTHON"
OLDEST_LOAD = """
import json, sys
import transformers
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok(sys.argv[2], add_special_tokens=False)["input_ids"]
print(json.dumps({"version": transformers.__version__, "ids": ids, "text": tok.decode(ids),
                  "model_max_length": tok.model_max_length, "eos": tok.eos_token, "pad": tok.pad_token}))
"""


def _saved(recipe: str, directory: Path) -> PreTrainedTokenizerFast:
    tokenizer = (BPE(vocab_size=300, min_frequency=2) if recipe == "bpe" else Char()).train(CORPUS)
    save_tokenizer(tokenizer, directory, model_max_length=64)
    return tokenizer


@pytest.mark.parametrize("recipe", ["bpe", "char"])
def test_saved_tokenizers_record_the_context_and_a_portable_class(recipe, tmp_path):
    tokenizer = _saved(recipe, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    # transformers 5 writes "TokenizersBackend", a class transformers 4.x does not have
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 64
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.model_max_length == 64
    text = "".join(CORPUS[:2])
    assert len(reloaded(text * 20, truncation=True)["input_ids"]) == 64  # a pipeline truncates
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids


@pytest.mark.parametrize("recipe", ["bpe", "char"])
def test_saved_tokenizers_load_on_the_oldest_transformers_allowed(recipe, tmp_path):
    floor = re.search(r'"transformers>=([0-9.]+)', (REPO / "pyproject.toml").read_text())[1]
    python = os.environ.get(OLDEST_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {OLDEST_PYTHON_ENV} to a python with transformers=={floor} (.ci/run does)")
    tokenizer = _saved(recipe, tmp_path)
    text = "".join(CORPUS[:2])
    result = subprocess.run(
        [python, "-c", OLDEST_LOAD, str(tmp_path), text], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert Version(loaded["version"]) == Version(floor)
    assert loaded["ids"] == tokenizer(text, add_special_tokens=False)["input_ids"] and loaded["text"] == text
    assert loaded["model_max_length"] == 64 and loaded["eos"] == loaded["pad"] == EOS_TOKEN
