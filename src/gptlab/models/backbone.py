"""The Backbone interface: what every task may rely on, whichever model sits underneath.

A backbone maps token ids to final hidden states and hidden states to vocabulary logits. It holds
architecture only: no loss, no optimizer, no logging (those live in tasks/). Task heads (sequence
or token classification) read ``forward``'s hidden states; language modeling calls ``logits`` on
them. Keeping the two calls apart lets a classification task skip the (B, T, V) projection, which
for GPT-2's 50k vocabulary is the largest activation in the model.

Implementations: ``gptlab.models.GPT`` (ours, nanoGPT-like) and ``gptlab.models.HFBackbone`` (any
Hugging Face causal LM). Swapping one for the other is a YAML edit.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn


class Backbone(nn.Module, ABC):
    """Abstract base class of all backbones; subclasses implement every abstract member.

    Contract:

    - ``forward(input_ids (B, T) int64, attention_mask (B, T) int64 | None = None,
      bidirectional: range | None = None) -> (B, T, H)``: hidden states after the final norm.
      ``attention_mask`` is 1 on real tokens, 0 on padding. ``None`` means "no padding that
      matters": training batches are right-padded, so with causal attention no real token ever
      sees a pad, and implementations may take a faster path. ``bidirectional``: the layers (indices
      into the block stack) whose attention has no causal mask; padding stays masked there, so
      callers pass the mask whenever a batch is padded (tasks/context.py probes this at start).
    - ``logits(hidden (B, T, H)) -> (B, T, V)``: the output projection (LM head).
    - ``hidden_size``: H. ``vocab_size``: V (rows of the output projection).
    - ``block_size``: the longest context the model accepts, or None if it is not known.
    - ``num_layers``: how many transformer blocks (the range ``bidirectional`` indexes).
    - ``block_class``: the repeated transformer block class; FSDP wraps each instance as one unit
      and activation checkpointing recomputes it.
    - ``num_flops_per_token(seq_len)``: training FLOPs per token (forward + backward), for MFU.
    - ``padding_free``: True when ``forward`` given the ``attention_mask`` computes real tokens
      only (faster than the unmasked path on padded batches), so tasks pass the mask to it.
    """

    padding_free: bool = False

    @abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        bidirectional: range | None = None,
    ) -> torch.Tensor:
        """Return final-normed hidden states (B, T, H) for ``input_ids`` (B, T)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (B, T, H) to vocabulary logits (B, T, V)."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width H of the hidden states returned by ``forward``."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number V of logits per position returned by ``logits``."""

    @property
    @abstractmethod
    def block_size(self) -> int | None:
        """Maximum context length in tokens, or None if the model does not state one."""

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks: the instances of ``block_class``."""
        return sum(isinstance(m, self.block_class) for m in self.modules())

    @property
    @abstractmethod
    def block_class(self) -> type[nn.Module]:
        """The transformer block class (the FSDP wrapping / activation checkpointing unit)."""

    @abstractmethod
    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token at sequence length ``seq_len`` (see ``transformer_flops_per_token``)."""


def transformer_flops_per_token(n_params: int, n_layer: int, hidden_size: int, seq_len: int) -> int:
    """Training FLOPs per token of a decoder-only transformer: ``6 N + 12 L H T``.

    The PaLM paper (Chowdhery et al. 2022, appendix B) and nanoGPT's ``estimate_mfu`` use this
    count. ``6 N``: every parameter that takes part in a matrix product costs 2 FLOPs per token
    forward and 4 backward. ``12 L H T``: the attention scores and the weighted sum of values, two
    (T x H) products per layer, again x 3 for forward + backward. Causal masking would halve the
    second term, but the convention counts it in full, so MFU numbers compare across codebases.

    Args:
        n_params: parameters used in matrix products (exclude lookup-only embeddings such as the
            position table; include the output projection, even when tied to the token embedding).
        n_layer: number of transformer blocks L.
        hidden_size: model width H (= heads x head size).
        seq_len: sequence length T the model is trained at.
    """
    return 6 * n_params + 12 * n_layer * hidden_size * seq_len
