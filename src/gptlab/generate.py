"""Decoding: sample continuations from any gptlab backbone.

Our GPT decodes incrementally with its KV cache (one token of compute per step); other backbones
recompute the whole sequence each step.
"""

from __future__ import annotations

import torch

from gptlab.models import Backbone


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompt_ids: list[int],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; returns the new token ids (without the prompt).

    temperature 0 is greedy. The prompt is truncated from the left to leave room for the new
    tokens inside the model's context.
    """
    device = next(backbone.parameters()).device
    limit = getattr(backbone, "block_size", None)
    if limit is not None:
        max_new_tokens = min(max_new_tokens, limit - 1)
        prompt_ids = prompt_ids[-(limit - max_new_tokens) :]
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = (
        backbone.new_cache(1, ids.shape[1] + max_new_tokens, device=device)
        if hasattr(backbone, "new_cache")
        else None
    )
    was_training = backbone.training
    backbone.eval()
    new: list[int] = []
    step_input = ids
    try:
        for _ in range(max_new_tokens):
            hidden = backbone(step_input, cache=cache) if cache is not None else backbone(ids)
            logits = backbone.logits(hidden[:, -1:])[:, -1].float()  # (1, V)
            next_id = _sample(logits, temperature, top_k, generator)  # (1, 1)
            token = int(next_id.item())
            new.append(token)
            if token == eos_token_id:
                break
            ids = torch.cat([ids, next_id], dim=1)
            step_input = next_id
    finally:
        backbone.train(was_training)
    return new


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None):
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)
