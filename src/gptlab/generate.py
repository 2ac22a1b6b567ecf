"""Decoding: continue prompts with any gptlab backbone, one prompt or a batch of any lengths.

    prompts (token ids, any lengths)
      -> truncate from the left to fit the context (warning)       see `fit_to_context`
      -> left-pad into (B, P) + attention mask                      pads never attended; positions
                                                                    count real tokens only
      -> prefill: one forward over (B, P)                           our GPT: into its KVCache
      -> repeat: logits (B, V) -> repetition penalty -> temperature -> top-k -> top-p
                 -> argmax (temperature 0) or sample
                 -> a row finishes on EOS or a stop string
                 -> forward the new token only (KV cache)
      -> the new ids of each row, without the EOS that ended it

Three ways to run the model, chosen by `_stepper`, all feeding the same sampling loop:

- our `GPT`: incremental decoding with its preallocated `KVCache` (one token of compute per step);
- `HFBackbone`: the Hugging Face model's own `past_key_values` cache, with the same position ids;
- anything else, or `use_cache=False`: the whole sequence is recomputed at every step (the
  reference the cached paths are tested against).

The logits processors follow Hugging Face's `generate` (same order, same definitions), so
greedy decoding gives the same tokens as `model.generate(do_sample=False)` on exported weights.
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

__all__ = ["decode_completion", "fit_to_context", "generate", "generate_batch", "generate_text"]


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
) -> list[list[int]]:
    """Continue a batch of prompts of any lengths; returns the new ids of each row.

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
    """
    _check_options(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, tokenizer)
    block_size = getattr(backbone, "block_size", None)
    prompts, max_new_tokens = fit_to_context(prompts, max_new_tokens, block_size)
    device = next(backbone.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos_ids = _as_id_list(eos_token_id)

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

    was_training = backbone.training
    backbone.eval()
    new: list[list[int]] = [[] for _ in range(B)]
    finished = [False] * B
    # Only the cached paths run long enough for a weight-layout change to pay off.
    layout = _decoding_layout(backbone) if use_cache else contextlib.nullcontext()
    try:
        with layout:
            logits = stepper.prefill(ids, None if full_mask is None else full_mask[:, :P])  # (B, V)
            for step in range(max_new_tokens):
                next_ids = _next_token(
                    logits.float(), seen, temperature, top_k, top_p, repetition_penalty, generator
                )  # (B,)
                if seen is not None:
                    seen[torch.arange(B, device=device), next_ids] = True
                done_now = torch.isin(next_ids, eos) if eos is not None else None
                # One host sync per step: the rows' ids are needed on the host to stop and to return.
                tokens = next_ids.tolist()
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
) -> torch.Tensor:
    """(B, V) float logits -> (B,) next ids; Hugging Face's processor order and definitions."""
    if seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
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


@contextlib.contextmanager
def _decoding_layout(backbone: Backbone) -> Iterator[None]:
    """On CPU, hold our GPT's Linear weights in (in, out) memory order while decoding.

    `nn.Linear` stores (out, in) and multiplies by its transpose. For the few rows of a decoding
    step (batch x 1 token), MKL's GEMM is much faster when that operand is contiguous, i.e. stored
    (in, out) as GPT-2's Conv1D does: measured 1.3-2.6x per matmul at 8 rows on our 2-core AVX2
    CPU, and the whole gap to transformers at batch 8 (benchmarks/generation.py --profile). The
    weights are swapped for contiguous transposed copies seen through a transposed view (same
    shape and values, only the strides differ) and restored afterwards. GPUs (cuBLAS) do not
    care; sharded or wrapped parameters (DTensor under FSDP) are left alone.
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


def _check_options(prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, tokenizer):
    problems = []
    if not prompts:
        problems.append("no prompts given")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        problems.append(f"prompts {empty[:5]} are empty: every prompt needs at least one token")
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
    if stop and tokenizer is None:
        problems.append("stop strings need a tokenizer to decode the generated text")
    if problems:
        raise ConfigError("generate: " + "; ".join(problems))
