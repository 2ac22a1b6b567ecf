"""Decoding: continue prompts with any gptlab backbone, one prompt or a batch of any lengths.

    prompts (token ids, any lengths)
      -> truncate from the left to fit the context (warning)       see `fit_to_context`
      -> left-pad into (B, P) + attention mask                      pads never attended; positions
                                                                    count real tokens only
      -> prefill: one forward over (B, P)                           our GPT: into its KVCache
      -> repeat: logits (B, V) -> repetition penalty -> no repeated n-grams -> no EOS before
                 min_new_tokens -> temperature -> top-k -> top-p
                 -> argmax (temperature 0) or sample
                 -> a row finishes on EOS or a stop string
                 -> forward the new token only (KV cache)
      -> the new ids of each row, without the EOS that ended it

Beam search (`num_beams > 1`) follows transformers' `_beam_search` step for step (log-softmax,
the same processors, top 2 x num_beams candidates, length-normalised finished hypotheses, the
same early-stopping heuristic), reordering the KV cache to each beam's parent after every step.
`num_return_sequences` returns that many rows per prompt (the best beams, or independent samples),
prompt by prompt, as transformers does.

Three ways to run the model, chosen by `_stepper`, all feeding the same sampling loop:

- our `GPT`: incremental decoding with its preallocated `KVCache` (one token of compute per step);
- `HFBackbone`: the Hugging Face model's own `past_key_values` cache, with the same position ids;
- anything else, or `use_cache=False`: the whole sequence is recomputed at every step (the
  reference the cached paths are tested against).

The logits processors follow Hugging Face's `generate` (same order, same definitions), so
greedy decoding and beam search give the same tokens as `model.generate(do_sample=False)` on
exported weights. One difference: the repetition penalty and the n-gram ban look at a row's real
tokens only, where transformers also counts the left padding of a batch.
Sampling is deterministic for a seed (`generator` or `seed`); in a batch every row draws from
one generator, so a sampled row depends on its batch-mates, while greedy rows never do.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

from gptlab.errors import ConfigError
from gptlab.models import GPT, Backbone, HFBackbone

__all__ = [
    "decode_completion",
    "decoding_problems",
    "fit_to_context",
    "generate",
    "generate_batch",
    "generate_text",
    "unused_sampling_options",
]


# ----------------------------------------------------------------------------- public API
def generate(
    backbone: Backbone,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    *,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    use_cache: bool = True,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[int]:
    """Continue one prompt; returns the new token ids (without the prompt and the final EOS).

    See `generate_batch` for every argument.
    """
    return generate_batch(
        backbone,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id,
        stop=stop,
        tokenizer=tokenizer,
        generator=generator,
        use_cache=use_cache,
        min_new_tokens=min_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
        num_beams=num_beams,
        length_penalty=length_penalty,
    )[0]


@torch.inference_mode()
def generate_batch(
    backbone: Backbone,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[str] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    pad_token_id: int = 0,
    num_return_sequences: int = 1,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Continue a batch of prompts of any lengths; returns the new ids of each row
    (`num_return_sequences` rows per prompt, prompt by prompt).

    Args:
        backbone: the model (our `GPT`, an `HFBackbone`, or any `Backbone`); put in eval mode while
            decoding and restored afterwards.
        prompts: token ids of each prompt (at least one token each).
        max_new_tokens: tokens generated per row at most. Prompts longer than the context left
            for them are truncated from the left, with a warning (`fit_to_context`).
        temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
        top_k: sample among the k most likely tokens only (None: all).
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches p (None: all).
        repetition_penalty: > 1 discourages tokens already in the row (prompt or generated):
            positive logits are divided by it, negative ones multiplied (CTRL, Keskar et al. 2019;
            Hugging Face's definition). Applied in greedy decoding too. Padding is not counted.
        eos_token_id: a row finishes when it produces this id (or one of these ids); the id is
            not part of the returned row.
        stop: a row also finishes once its decoded new text contains one of these strings (needs
            `tokenizer`). The returned ids end with the token that completed it; use
            `decode_completion` to get the text cut before the stop string.
        tokenizer: decodes rows to look for `stop` strings.
        generator: the random generator of sampling (on the model's device).
        seed: seeds a fresh generator when `generator` is not given. Neither: torch's global RNG.
        use_cache: incremental decoding with a KV cache (our GPT, HFBackbone); False recomputes
            the whole sequence at every step (slower; the same tokens).
        pad_token_id: id written into padded positions (never attended, so any id works).
        num_return_sequences: rows returned per prompt: the best beams (at most num_beams), or
            independent samples (temperature > 0).
        min_new_tokens: EOS is forbidden until a row has this many new tokens.
        no_repeat_ngram_size: > 0 forbids any token that would repeat an n-gram of this size
            already in the row (prompt included).
        num_beams: > 1 decodes by beam search (deterministic: needs temperature 0); stop strings
            then only cut the decoded text (`decode_completion`), they do not end beams early.
        length_penalty: beam search ranks finished beams by sum of log-probabilities / length **
            length_penalty (transformers' definition; > 0 favours longer ones).
    """
    problems = decoding_problems(
        max_new_tokens, temperature, top_k, top_p, repetition_penalty,
        num_return_sequences, min_new_tokens, no_repeat_ngram_size, num_beams,
    )  # fmt: skip
    _check_options(prompts, stop, tokenizer, problems)
    block_size = getattr(backbone, "block_size", None)
    prompts, max_new_tokens = fit_to_context(prompts, max_new_tokens, block_size)
    device = next(backbone.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos_ids = _as_id_list(eos_token_id)
    rules = _Rules(min_new_tokens, no_repeat_ngram_size, eos_ids, backbone.vocab_size)
    if num_beams > 1:
        return _beam_search(
            backbone, prompts, max_new_tokens, num_beams, num_return_sequences, length_penalty,
            repetition_penalty, rules, eos_ids, pad_token_id, use_cache,
        )  # fmt: skip
    # Independent samples: each prompt n times in a row, as transformers expands its input.
    prompts = [p for p in prompts for _ in range(num_return_sequences)]

    ids, mask = _left_pad(prompts, pad_token_id, device)  # (B, P) each
    B, P = ids.shape
    stepper = _stepper(backbone, B, P + max_new_tokens, use_cache)
    # One mask for every position the batch will ever hold: new tokens are always real. None
    # when no row is padded: the model then takes its fast, mask-free attention path.
    full_mask = None
    if not bool(mask.all()):
        full_mask = torch.cat([mask, mask.new_ones(B, max_new_tokens)], dim=1)  # (B, P + N)
    # Tokens seen by each row, for the repetition penalty: real prompt tokens, then generated ones.
    seen = None
    if repetition_penalty != 1.0:
        # scatter_add, not scatter: a pad id may also occur as a real token of the same row.
        counts = torch.zeros(B, backbone.vocab_size, dtype=torch.long, device=device)  # (B, V)
        seen = counts.scatter_add_(1, ids, mask) > 0  # (B, V)
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    history = [list(p) for p in prompts] if rules.ngram else None  # real tokens of each row

    was_training = backbone.training
    backbone.eval()
    new: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    # A weight-layout change pays off only for several rows per matmul (see _decoding_layout).
    layout = _decoding_layout(backbone) if use_cache and B > 1 else contextlib.nullcontext()
    try:
        with layout:
            logits = stepper.prefill(ids, None if full_mask is None else full_mask[:, :P])  # (B, V)
            for step in range(max_new_tokens):
                ban = rules.ban(history, step, B, device) if rules.active else None
                next_ids = _next_token(
                    logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator, ban
                )  # (B,)
                if seen is not None:
                    seen[torch.arange(B, device=device), next_ids] = True
                done_now = torch.isin(next_ids, eos) if eos is not None else None
                # One host sync per step: the rows' ids are needed on the host to stop and to return.
                tokens = next_ids.tolist()
                if history is not None:
                    for row, token in zip(history, tokens, strict=True):
                        row.append(token)
                done_list = done_now.tolist() if done_now is not None else [False] * B
                for row in range(B):
                    if finished[row]:
                        continue
                    if done_list[row]:
                        finished[row] = True
                        continue
                    new[row].append(tokens[row])
                    if stop and any(s in tokenizer.decode(new[row]) for s in stop):
                        finished[row] = True
                if all(finished) or step == max_new_tokens - 1:
                    break
                length = P + step + 1  # positions held after feeding this token
                step_mask = None if full_mask is None else full_mask[:, :length]
                logits = stepper.step(next_ids[:, None], step_mask)  # (B, V)
    finally:
        backbone.train(was_training)
    return new


def generate_text(
    backbone: Backbone,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> list[str]:
    """Continue text prompts: tokenize (no special tokens added), generate, decode, cut at `stop`.

    Rows finish at the tokenizer's EOS. See `generate_batch` for the other arguments.
    """
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    empty = [i for i, p in enumerate(prompt_ids) if not p]
    if empty:
        raise ConfigError(f"prompts {empty[:5]} encode to no token; give each prompt some text")
    rows = generate_batch(
        backbone,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=tokenizer.eos_token_id,
        stop=stop,
        tokenizer=tokenizer,
        generator=generator,
        seed=seed,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
    )
    return [decode_completion(tokenizer, row, stop) for row in rows]


def decode_completion(
    tokenizer: PreTrainedTokenizerBase, new_ids: Sequence[int], stop: Sequence[str] | None = None
) -> str:
    """The text of generated ids, cut before the first stop string (which is not included)."""
    text = tokenizer.decode(list(new_ids), skip_special_tokens=True)
    cuts = [text.find(s) for s in stop or () if s in text]
    return text[: min(cuts)] if cuts else text


def fit_to_context(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, block_size: int | None
) -> tuple[list[list[int]], int]:
    """Make prompt + new tokens fit in `block_size` positions: the documented truncation policy.

    `max_new_tokens` is capped at block_size - 1 (a prompt keeps at least one token); a prompt
    longer than block_size - max_new_tokens loses its oldest tokens (truncated from the left, the
    end of a prompt being what the continuation depends on most). Both cases warn.
    """
    prompts = [list(p) for p in prompts]
    if block_size is None:
        return prompts, max_new_tokens
    if max_new_tokens > block_size - 1:
        rank_zero_warn(
            f"max_new_tokens={max_new_tokens} does not fit in the model's context of {block_size} "
            f"tokens: generating at most {block_size - 1}"
        )
        max_new_tokens = block_size - 1
    keep = block_size - max_new_tokens
    long = [i for i, p in enumerate(prompts) if len(p) > keep]
    if long:
        rank_zero_warn(
            f"{len(long)} prompt(s) (e.g. row {long[0]}, {len(prompts[long[0]])} tokens) are longer than "
            f"the {keep} tokens the context of {block_size} leaves beside max_new_tokens={max_new_tokens}: "
            f"truncated from the left (their oldest tokens are dropped)"
        )
        prompts = [p[-keep:] if len(p) > keep else p for p in prompts]
    return prompts, max_new_tokens


# ----------------------------------------------------------------------------- logits -> token
def _next_token(
    logits: torch.Tensor,
    seen: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    generator: torch.Generator | None,
    ban: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) float logits -> (B,) next ids; Hugging Face's processor order and definitions.

    `ban` (B, V) bool: tokens forbidden at this step (repeated n-grams, EOS before min_new_tokens).
    """
    logits = _penalise(logits, seen, repetition_penalty, ban)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # HF's TopPLogitsWarper: drop the least likely tokens whose total probability is <= 1 - p,
        # always keeping the most likely one.
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        drop_sorted = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _penalise(
    scores: torch.Tensor, seen: torch.Tensor | None, repetition_penalty: float, ban: torch.Tensor | None
) -> torch.Tensor:
    """Repetition penalty on the tokens `seen`, then -inf on the `ban`ned ones: (B, V) -> (B, V)."""
    if seen is not None:
        penalised = torch.where(scores > 0, scores / repetition_penalty, scores * repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if ban is not None:
        scores = scores.masked_fill(ban, float("-inf"))
    return scores


class _Rules:
    """The token bans of `min_new_tokens` and `no_repeat_ngram_size` (transformers'
    MinNewTokensLengthLogitsProcessor and NoRepeatNGramLogitsProcessor)."""

    def __init__(self, min_new_tokens: int, ngram: int, eos_ids: list[int], vocab_size: int) -> None:
        self.min_new_tokens = min_new_tokens if eos_ids else 0
        self.ngram = ngram
        self.eos_ids = eos_ids
        self.vocab_size = vocab_size
        self.active = bool(self.min_new_tokens or ngram)

    def ban(
        self, history: list[list[int]] | None, step: int, rows: int, device: torch.device
    ) -> torch.Tensor:
        """(rows, V) bool: what no row may produce as its `step`-th new token (0-based)."""
        ban = torch.zeros(rows, self.vocab_size, dtype=torch.bool)
        if step < self.min_new_tokens:
            ban[:, self.eos_ids] = True
        if self.ngram and history is not None:
            n = self.ngram
            for row, tokens in enumerate(history):
                # The tokens that followed each earlier occurrence of the last n - 1 tokens.
                prefix = tokens[len(tokens) - n + 1 :] if n > 1 else []
                if len(tokens) < n - 1:
                    continue
                banned = [
                    tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == prefix
                ]
                ban[row, banned] = True
        return ban.to(device)


# ----------------------------------------------------------------------------- beam search
def _beam_search(
    backbone: Backbone,
    prompts: list[list[int]],
    max_new_tokens: int,
    num_beams: int,
    num_return_sequences: int,
    length_penalty: float,
    repetition_penalty: float,
    rules: _Rules,
    eos_ids: list[int],
    pad_token_id: int,
    use_cache: bool,
) -> list[list[int]]:
    """transformers' `_beam_search` (early_stopping=False) on a gptlab backbone; see generate_batch.

    Shapes: B prompts, K = num_beams, C = max(2, 1 + #eos) x K candidates per prompt, N new tokens.
    """
    device = next(backbone.parameters()).device
    B, K, V, N = len(prompts), num_beams, backbone.vocab_size, max_new_tokens
    C = max(2, 1 + len(eos_ids)) * K
    beam_prompts = [p for p in prompts for _ in range(K)]  # row b * K + k: beam k of prompt b
    ids, mask = _left_pad(beam_prompts, pad_token_id, device)  # (B K, P)
    P = ids.size(1)
    full_mask = None
    if not bool(mask.all()):
        full_mask = torch.cat([mask, mask.new_ones(B * K, N)], dim=1)  # (B K, P + N)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B * K, V, dtype=torch.long, device=device).scatter_add_(1, ids, mask) > 0
    eos = torch.tensor(eos_ids, device=device) if eos_ids else None
    history = [list(p) for p in beam_prompts] if rules.ngram else None
    # Only the first K candidates may become finished hypotheses (the rest keep K beams running).
    first_k = torch.arange(C, device=device) < K  # (C,)
    offsets = torch.arange(B, device=device)[:, None] * K  # (B, 1): row of beam 0 of each prompt

    running = torch.full((B, K, N), pad_token_id, dtype=torch.long, device=device)  # new tokens
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # all beams start equal: only the first one may expand at step 0
    done_seqs = running.clone()
    done_scores = torch.full((B, K), -1e9, device=device)
    done_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
    is_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)

    stepper = _stepper(backbone, B * K, P + N, use_cache)
    was_training = backbone.training
    backbone.eval()
    try:
        logits = stepper.prefill(ids, None if full_mask is None else full_mask[:, :P])  # (B K, V)
        for step in range(N):
            ban = rules.ban(history, step, B * K, device) if rules.active else None
            log_probs = _penalise(torch.log_softmax(logits.float(), dim=-1), seen, repetition_penalty, ban)
            total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
            top_scores, top_index = torch.topk(total, C)  # (B, C)
            parent, token = top_index // V, top_index % V  # (B, C) each
            candidates = torch.take_along_dim(running, parent[:, :, None], dim=1)  # (B, C, N)
            candidates[:, :, step] = token
            hits = torch.zeros_like(token, dtype=torch.bool) if eos is None else torch.isin(token, eos)
            if step == N - 1:
                hits = torch.ones_like(hits)  # max length: every candidate ends here
            # The K best candidates that go on (a finished one cannot).
            go_on_scores = top_scores + hits.float() * -1.0e9
            keep = torch.topk(go_on_scores, K).indices  # (B, K)
            running = torch.take_along_dim(candidates, keep[:, :, None], dim=1)
            running_scores = torch.take_along_dim(go_on_scores, keep, dim=1)
            parents = torch.take_along_dim(parent, keep, dim=1)  # (B, K)
            # Finished hypotheses: the best K of those kept so far and the ones ending now.
            finished = hits & first_k[None, :]
            scores = top_scores / ((step + 1) ** length_penalty)
            scores += (~improvable).float() * -1.0e9
            scores += (~finished) * -1.0e9
            merged_scores = torch.cat([done_scores, scores], dim=1)  # (B, K + C)
            best = torch.topk(merged_scores, K).indices  # (B, K)
            done_scores = torch.take_along_dim(merged_scores, best, dim=1)
            done_seqs = torch.take_along_dim(
                torch.cat([done_seqs, candidates], dim=1), best[:, :, None], dim=1
            )
            lengths = torch.full_like(token, step + 1)
            done_lengths = torch.take_along_dim(torch.cat([done_lengths, lengths], dim=1), best, dim=1)
            is_done = torch.take_along_dim(torch.cat([is_done, finished], dim=1), best, dim=1)
            # transformers' heuristic (early_stopping=False): stop once no running beam, at its
            # current length, beats the worst of K finished hypotheses.
            best_running = running_scores[:, :1] / ((step + 1) ** length_penalty)
            worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, -1.0e9)
            improvable = improvable & (best_running > worst_done).any(dim=-1, keepdim=True)
            if not bool(improvable.any()) or bool(hits.all()):
                break
            rows = (parents + offsets).view(-1)  # (B K,): the row each new beam continues
            new_tokens = running[:, :, step].reshape(-1)  # (B K,)
            if seen is not None:
                seen = seen[rows]
                seen[torch.arange(B * K, device=device), new_tokens] = True
            if history is not None:
                history = [[*history[r], t] for r, t in zip(rows.tolist(), new_tokens.tolist(), strict=True)]
            stepper.reorder(rows)
            step_mask = None if full_mask is None else full_mask[:, : P + step + 1]
            logits = stepper.step(new_tokens[:, None], step_mask)
    finally:
        backbone.train(was_training)
    out = []
    for b in range(B):
        for k in range(num_return_sequences):
            row = done_seqs[b, k, : int(done_lengths[b, k])].tolist()
            if row and row[-1] in eos_ids:
                row = row[:-1]  # the EOS that ended it is not returned, as in greedy decoding
            out.append(row)
    return out


# ----------------------------------------------------------------------------- running the model
class _Recompute:
    """Reference path: the whole (left-padded) sequence through the backbone at every step."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self.ids: torch.Tensor | None = None

    def _last_logits(self, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.backbone(self.ids, attention_mask=mask)  # (B, S, H)
        return self.backbone.logits(hidden[:, -1:])[:, -1]  # (B, V)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.ids = ids
        return self._last_logits(mask)

    def step(self, next_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        self.ids = torch.cat([self.ids, next_ids], dim=1)  # (B, S + 1)
        return self._last_logits(mask)

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids = self.ids[rows]


@contextlib.contextmanager
def _decoding_layout(backbone: Backbone) -> Iterator[None]:
    """On CPU, hold our GPT's Linear weights in (in, out) memory order while decoding.

    `nn.Linear` stores (out, in) and multiplies by its transpose. For the few rows of a decoding
    step (batch x 1 token), MKL's GEMM is much faster when that operand is contiguous, i.e. stored
    (in, out) as GPT-2's Conv1D does: measured 1.3-2.6x per matmul at 8 rows on our 2-core AVX2
    CPU, and the whole gap to transformers at batch 8 (benchmarks/generation.py --profile). The
    weights are swapped for contiguous transposed copies seen through a transposed view (same
    shape and values, only the strides differ) and restored afterwards. The copy costs about
    0.75 s for GPT-2 small (124M) on that CPU, more than it saves at batch 1, where every matmul
    is a matrix-vector product that both layouts run alike: generate_batch uses it for B > 1.
    GPUs (cuBLAS) do not care; sharded or wrapped parameters (DTensor under FSDP) are left alone.
    """
    linears = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
    swap = (
        isinstance(backbone, GPT)
        and bool(linears)
        and all(type(m.weight.data) is torch.Tensor and m.weight.device.type == "cpu" for m in linears)
    )
    if not swap:
        yield
        return
    originals = {}
    try:
        for module in linears:
            weight = module.weight
            if id(weight) not in originals:  # the tied lm_head / wte matrix is one parameter
                originals[id(weight)] = (weight, weight.data)
                weight.data = weight.data.t().contiguous().t()
        yield
    finally:
        for weight, data in originals.values():
            weight.data = data


class _GPTCache:
    """Our GPT with its preallocated KVCache: the prompt once, then one token per step."""

    def __init__(self, gpt: GPT, batch_size: int, max_len: int) -> None:
        self.gpt = gpt
        self.cache = gpt.new_cache(batch_size, max_len)

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        hidden = self.gpt(ids, attention_mask=mask, cache=self.cache)  # (B, T, H)
        return self.gpt.logits(hidden[:, -1:])[:, -1]  # (B, V): only the last position is needed

    prefill = _forward
    step = _forward

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows)


class _HFCache:
    """A Hugging Face model with its own `past_key_values`, positions counting real tokens only."""

    def __init__(self, backbone: HFBackbone) -> None:
        self.model = backbone.model
        params = inspect.signature(self.model.forward).parameters
        self.takes_positions = "position_ids" in params
        self.takes_logits_to_keep = "logits_to_keep" in params  # skip (B, P, V) logits at prefill
        # transformers 5.x renamed `past_key_values` to `cache` (argument and output field).
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self.past = None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": ids, self.cache_key: self.past, "use_cache": True}
        if mask is not None:
            kwargs["attention_mask"] = mask
            if self.takes_positions:
                kwargs["position_ids"] = positions
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = self.model(**kwargs)
        self.past = getattr(out, self.cache_key)
        return out.logits[:, -1]  # (B, V)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)  # (B, P)
        return self._forward(ids, mask, positions)

    def step(self, next_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        positions = None if mask is None else mask.sum(-1, keepdim=True) - 1  # (B, 1)
        return self._forward(next_ids, mask, positions)

    def reorder(self, rows: torch.Tensor) -> None:
        self.past.reorder_cache(rows)  # transformers' Cache API, as its beam search calls it


def _stepper(backbone: Backbone, batch_size: int, max_len: int, use_cache: bool):
    if use_cache and isinstance(backbone, GPT):
        return _GPTCache(backbone, batch_size, max_len)
    if use_cache and isinstance(backbone, HFBackbone):
        return _HFCache(backbone)
    return _Recompute(backbone)


# ----------------------------------------------------------------------------- helpers
def _left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, length - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _as_id_list(token_ids: int | Sequence[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [int(token_ids)] if isinstance(token_ids, int) else [int(t) for t in token_ids]


def decoding_problems(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    num_return_sequences: int = 1,
    min_new_tokens: int = 0,
    no_repeat_ngram_size: int = 0,
    num_beams: int = 1,
) -> list[str]:
    """What is wrong with a set of decoding settings (empty: nothing); one line per problem.

    The one check of decoding options: `generate_batch` raises on them, and tasks that decode
    (`CausalLM`, `Generation`) call it at construction. Arguments as in `generate_batch`.
    """
    problems = []
    if max_new_tokens < 1:
        problems.append(f"max_new_tokens={max_new_tokens} must be at least 1")
    if temperature < 0:
        problems.append(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        problems.append(f"top_k={top_k} must be at least 1 (or None for all tokens)")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"top_p={top_p} must be in (0, 1] (or None)")
    if repetition_penalty <= 0:
        problems.append(f"repetition_penalty={repetition_penalty} must be > 0 (1 = no penalty)")
    if num_beams < 1:
        problems.append(f"num_beams={num_beams} must be at least 1 (1 = no beam search)")
    elif num_beams > 1 and temperature != 0:
        problems.append(f"num_beams={num_beams} is beam search, which is deterministic: set temperature 0")
    if num_return_sequences < 1:
        problems.append(f"num_return_sequences={num_return_sequences} must be at least 1")
    elif num_return_sequences > 1 and temperature == 0 and num_return_sequences > num_beams:
        problems.append(
            f"num_return_sequences={num_return_sequences} needs num_beams >= {num_return_sequences} or "
            f"sampling (temperature > 0): greedy decoding gives one sequence per prompt"
        )
    if min_new_tokens < 0:
        problems.append(f"min_new_tokens={min_new_tokens} must be >= 0")
    elif min_new_tokens > max_new_tokens >= 1:
        problems.append(
            f"min_new_tokens={min_new_tokens} exceeds max_new_tokens={max_new_tokens}: no completion could "
            f"reach it; set min_new_tokens <= max_new_tokens"
        )
    if no_repeat_ngram_size < 0:
        problems.append(f"no_repeat_ngram_size={no_repeat_ngram_size} must be >= 0 (0 = off)")
    return problems


def unused_sampling_options(temperature: float, top_k: int | None, top_p: float | None) -> list[str]:
    """The options given that only sampling reads (`top_k=5`), where temperature 0 decodes greedily
    (or by beam search): they change nothing, which the caller says in one warning."""
    if temperature != 0:
        return []
    return [f"{name}={value}" for name, value in (("top_k", top_k), ("top_p", top_p)) if value is not None]


def _check_options(prompts, stop, tokenizer, problems: list[str]) -> None:
    """Raise the prompt problems and `problems` (from `decoding_problems`) as one ConfigError."""
    problems = list(problems)
    if not prompts:
        problems.insert(0, "no prompts given")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        problems.insert(0, f"prompts {empty[:5]} are empty: every prompt needs at least one token")
    if stop and tokenizer is None:
        problems.append("stop strings need a tokenizer to decode the generated text")
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))
