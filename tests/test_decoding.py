"""gptlab.decoding: cached == uncached, batch == one at a time, == transformers' generate, options."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from gptlab.data import Char
from gptlab.decoding import decode_completion, fit_to_context, generate, generate_batch, generate_text
from gptlab.errors import ConfigError
from gptlab.models import GPT, Backbone, HFBackbone
from gptlab.models.convert import gpt2_config, gpt_to_gpt2_state_dict

VOCAB = 96


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models decode one token at a time: on a busy shared CPU, a second OpenMP thread only
    # adds synchronisation (40x slower here). The results do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=4, n_embd=32).eval()


def prompts_of_lengths(*lengths: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def hf_twin(gpt: GPT) -> GPT2LMHeadModel:
    """GPT2LMHeadModel with our GPT's weights (what `main.py export` writes)."""
    hf = GPT2LMHeadModel(gpt2_config(gpt))
    hf.load_state_dict(gpt_to_gpt2_state_dict(gpt))
    return hf.eval()


class Successor(Backbone):
    """A scripted model: the next token is always (last token + 1) mod V. No parameters to learn."""

    def __init__(self, vocab: int, block_size: int | None = None) -> None:
        super().__init__()
        self.vocab = vocab
        self._block = block_size
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives generate a device

    def forward(self, input_ids, attention_mask=None):
        return torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float() * 10

    def logits(self, hidden):
        return hidden

    hidden_size = property(lambda self: self.vocab)
    vocab_size = property(lambda self: self.vocab)
    block_size = property(lambda self: self._block)
    block_class = property(lambda self: torch.nn.Module)

    def num_flops_per_token(self, seq_len: int) -> int:
        return 0


SAMPLING = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)


def test_cached_and_uncached_decoding_give_identical_tokens():
    gpt = tiny_gpt()
    prompts = prompts_of_lengths(9, 3, 6, 1)
    greedy = generate_batch(gpt, prompts, max_new_tokens=20, temperature=0)
    assert greedy == generate_batch(gpt, prompts, max_new_tokens=20, temperature=0, use_cache=False)
    sampled = generate_batch(gpt, prompts, max_new_tokens=20, seed=3, **SAMPLING)
    assert sampled == generate_batch(gpt, prompts, max_new_tokens=20, seed=3, use_cache=False, **SAMPLING)
    assert all(len(row) == 20 for row in greedy + sampled)


@pytest.mark.parametrize("backbone", ["gpt", "hf"])
def test_a_batch_gives_the_same_tokens_as_one_prompt_at_a_time(backbone: str):
    gpt = tiny_gpt()
    model = gpt if backbone == "gpt" else _hf_backbone(hf_twin(gpt))
    prompts = prompts_of_lengths(12, 2, 7, 5)
    batch = generate_batch(model, prompts, max_new_tokens=16, temperature=0, repetition_penalty=1.2)
    alone = [generate(model, p, 16, 0, repetition_penalty=1.2) for p in prompts]
    assert batch == alone
    if backbone == "hf":  # the HF cache path decodes exactly like our GPT's
        assert batch == generate_batch(gpt, prompts, max_new_tokens=16, temperature=0, repetition_penalty=1.2)


def _hf_backbone(model: GPT2LMHeadModel) -> HFBackbone:
    backbone = HFBackbone(model_type="gpt2", config_overrides={"n_layer": 1, "n_embd": 8, "n_head": 2})
    backbone.model = model  # same weights as our GPT, without writing a directory
    return backbone.eval()


def test_greedy_matches_transformers_generate_on_the_same_weights():
    gpt = tiny_gpt()
    hf = hf_twin(gpt)
    prompts = prompts_of_lengths(8, 3, 5)
    ids = torch.zeros(3, 8, dtype=torch.long)
    mask = torch.zeros(3, 8, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding, as generate expects for decoder-only models
        ids[i, 8 - len(p) :], mask[i, 8 - len(p) :] = torch.tensor(p), 1
    for penalty in (1.0, 1.5):
        expected = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=0,
            eos_token_id=None,
        )[:, 8:]
        ours = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, repetition_penalty=penalty)
        if penalty == 1.0:
            assert ours == expected.tolist()
        else:  # HF counts pad ids as "seen" in left-padded rows; compare the unpadded row
            assert ours[0] == expected[0].tolist()


def test_sampling_is_deterministic_for_a_seed():
    gpt = tiny_gpt()
    prompts = prompts_of_lengths(4, 6)
    first = generate_batch(gpt, prompts, max_new_tokens=24, seed=7, **SAMPLING)
    assert first == generate_batch(gpt, prompts, max_new_tokens=24, seed=7, **SAMPLING)
    assert first != generate_batch(gpt, prompts, max_new_tokens=24, seed=8, **SAMPLING)
    # top_k=1 and a tiny top_p both leave only the most likely token: sampling becomes greedy
    greedy = generate_batch(gpt, prompts, max_new_tokens=24, temperature=0)
    assert generate_batch(gpt, prompts, max_new_tokens=24, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate_batch(gpt, prompts, max_new_tokens=24, temperature=1.0, top_p=1e-6, seed=0) == greedy


def test_eos_and_stop_strings_end_rows_independently():
    tokenizer = Char().train(["abcdefghij"])  # ids 0..9 = a..j, 10 = <|endoftext|>
    model = Successor(vocab=11)
    a, c, e = (tokenizer.convert_tokens_to_ids(x) for x in "ace")
    rows = generate_batch(model, [[a], [e]], max_new_tokens=12, temperature=0, eos_token_id=10)
    assert [tokenizer.decode(r) for r in rows] == ["bcdefghij", "fghij"]  # EOS ends a row, not kept
    rows = generate_batch(
        model, [[a], [c]], max_new_tokens=8, temperature=0, stop=["de"], tokenizer=tokenizer, eos_token_id=10
    )
    assert [tokenizer.decode(r) for r in rows] == ["bcde", "de"]  # ends with the completing token
    assert [decode_completion(tokenizer, r, ["de"]) for r in rows] == ["bc", ""]
    assert generate_text(model, tokenizer, ["a", "gh"], max_new_tokens=5, temperature=0, stop=["e"]) == [
        "bcd",
        "ij",
    ]


def test_prompt_longer_than_the_context_is_truncated_from_the_left_with_a_warning():
    with pytest.warns(UserWarning, match=r"1 prompt\(s\) .* truncated from the left"):
        prompts, new = fit_to_context([list(range(30)), [1, 2]], max_new_tokens=8, block_size=32)
    assert new == 8 and prompts == [list(range(6, 30)), [1, 2]]
    with pytest.warns(UserWarning, match="generating at most 31"):
        assert fit_to_context([[1]], max_new_tokens=100, block_size=32)[1] == 31
    gpt = tiny_gpt(block_size=32)
    long_prompt = prompts_of_lengths(40)[0]
    with pytest.warns(UserWarning, match="truncated from the left"):
        row = generate(gpt, long_prompt, 10, 0)
    # exactly what the last 22 tokens give on their own: the oldest ones were dropped
    assert row == generate(gpt, long_prompt[-22:], 10, 0)


def test_bad_options_are_refused_in_one_message():
    gpt = tiny_gpt()
    with pytest.raises(ConfigError, match=r"top_p=1.5.*repetition_penalty=0") as err:
        generate_batch(gpt, [[1]], top_p=1.5, repetition_penalty=0)
    assert "generate:" in str(err.value)
    with pytest.raises(ConfigError, match=r"prompts \[1\] are empty"):
        generate_batch(gpt, [[1], []])
    with pytest.raises(ConfigError, match="need a tokenizer"):
        generate_batch(gpt, [[1]], stop=["x"])


def test_sample_generation_callback_call_still_works():
    # gptlab.callbacks.SampleGeneration calls the single-prompt form positionally.
    gpt = tiny_gpt().train()
    generator = torch.Generator().manual_seed(0)
    row = generate(gpt, [1, 2, 3], 12, 0.8, 50, eos_token_id=None, generator=generator)
    assert len(row) == 12 and gpt.training  # the mode is restored


# ----------------------------------------------------------------- search options against transformers
def _hf_new_tokens(hf, prompts, eos, **options) -> list[list[int]]:
    """transformers' `generate` on left-padded prompts: the new ids of each row, up to its EOS."""
    length = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), 1
    out = hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=eos, **options
    )
    rows = out[:, length:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@pytest.mark.parametrize("backbone", ["gpt", "hf"])
@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=4),
        dict(num_beams=4, num_return_sequences=2, length_penalty=0.5),
        dict(num_beams=3, min_new_tokens=4, no_repeat_ngram_size=2),
    ],
    ids=["beams", "two_best_beams", "beams_with_bans"],
)
def test_beam_search_matches_transformers(backbone: str, options: dict):
    gpt = tiny_gpt()
    hf = hf_twin(gpt)
    model = gpt if backbone == "gpt" else _hf_backbone(hf)
    prompts = prompts_of_lengths(8, 3, 5)  # left padding exercised
    # An EOS the model does produce, so that beams finish at different lengths.
    produced = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, **options)
    for eos in sorted({t for row in produced for t in row}):
        rows = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos, **options)
        if any(len(row) < 12 for row in rows):
            break
    for eos_id in (None, eos):
        expected = _hf_new_tokens(hf, prompts, eos_id, max_new_tokens=12, **options)
        ours = generate_batch(
            model, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos_id, **options
        )
        assert ours == expected
    assert any(len(row) < 12 for row in ours)  # some beams ended on EOS
    uncached = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, use_cache=False, **options)
    assert uncached == generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, **options)


def test_min_new_tokens_and_no_repeat_ngrams_match_transformers_greedy():
    gpt = tiny_gpt()
    hf = hf_twin(gpt)
    prompts = prompts_of_lengths(7, 7)
    plain = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0)
    eos = plain[0][2]  # the model's own third token: EOS would end row 0 at once
    for options in (dict(min_new_tokens=6), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1)):
        expected = _hf_new_tokens(hf, prompts, eos, max_new_tokens=12, **options)
        ours = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos, **options)
        assert ours == expected, options
    banned = generate_batch(gpt, prompts, max_new_tokens=12, temperature=0, no_repeat_ngram_size=2)
    for prompt, row in zip(prompts, banned, strict=True):
        pairs = list(zip(prompt + row, (prompt + row)[1:], strict=False))
        assert len(pairs) == len(set(pairs))  # no bigram twice
    assert plain != banned


def test_num_return_sequences_samples_each_prompt_that_many_times():
    gpt = tiny_gpt()
    prompts = prompts_of_lengths(5, 9)
    rows = generate_batch(gpt, prompts, max_new_tokens=10, seed=4, num_return_sequences=3, **SAMPLING)
    assert len(rows) == 6 and rows[0] != rows[1]  # prompt 0's three samples differ
    again = generate_batch(gpt, prompts, max_new_tokens=10, seed=4, num_return_sequences=3, **SAMPLING)
    assert rows == again


def test_bad_search_options_are_refused_in_one_message():
    gpt = tiny_gpt()
    with pytest.raises(ConfigError, match=r"num_beams=2 is beam search.*set temperature 0"):
        generate_batch(gpt, [[1, 2]], temperature=0.7, num_beams=2)
    with pytest.raises(ConfigError, match=r"num_return_sequences=3 needs num_beams >= 3"):
        generate_batch(gpt, [[1, 2]], temperature=0, num_beams=2, num_return_sequences=3)
    with pytest.raises(ConfigError, match=r"min_new_tokens=-1.*no_repeat_ngram_size=-2"):
        generate_batch(gpt, [[1, 2]], min_new_tokens=-1, no_repeat_ngram_size=-2)
