"""Our GPT: a GPT-2 style decoder-only transformer in one file, read top to bottom.

Follows nanoGPT's ``model.py`` (Karpathy) and GPT-2 (Radford et al. 2019): learned position
embeddings, pre-LayerNorm blocks, GELU (tanh approximation), input and output embeddings tied.
Parameter names are those of nanoGPT and of Hugging Face's ``GPT2LMHeadModel``, so converting
weights either way (``gptlab.models.convert``) is a rename-free transpose of the linear layers.

Contents, in dependency order: ``GPTConfig``, ``KVCache``, ``CausalSelfAttention``, ``MLP``,
``Block``, ``GPT``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptlab.errors import ConfigError
from gptlab.models.backbone import Backbone, transformer_flops_per_token


@dataclass
class GPTConfig:
    """The seven numbers that define a GPT; ``GPT.config`` holds one."""

    vocab_size: int = 50304
    """Token vocabulary size. 50304 is GPT-2's 50257 padded to a multiple of 64 (faster matmuls)."""
    block_size: int = 1024
    """Maximum context length in tokens (rows of the position-embedding table)."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 768
    """Model width (hidden size)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2. False is slightly faster and no worse."""


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Each layer owns ``k[i]`` and ``v[i]`` of shape (B, nh, max_len, hs), allocated once so decoding
    never concatenates (which would copy the whole cache at every step). ``pos`` counts the
    positions already written; ``GPT.forward(..., cache=cache)`` writes the new tokens at
    ``pos .. pos + T`` and then advances ``pos``. Create one with ``GPT.new_cache``.
    """

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        max_len: int,
        head_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.pos = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].size(0)

    @property
    def max_len(self) -> int:
        return self.k[0].size(2)

    def reorder(self, index: torch.Tensor) -> None:
        """Make row ``index[b]`` the new row b of every layer (beam search: a beam continues from
        the state of the beam it extends)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` (B, nh, T, hs) at ``pos`` for ``layer``; return all keys/values so far.

        Does not advance ``pos``: every layer writes at the same offset, GPT.forward advances once.
        """
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos + T, hs)

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused, not zeroed: masks never read past pos)."""
        self.pos = 0


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``.

    SDPA picks a fused kernel (FlashAttention / memory-efficient on GPU) when it can; the fast
    path needs ``is_causal=True`` and no explicit mask, which is why GPT.forward only builds a mask
    when padding or a cache makes one necessary.
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.layer_idx = layer_idx  # which slot of a KVCache this layer reads and writes
        self.dropout = config.dropout
        # q, k and v projections for all heads in one matmul (GPT-2's c_attn)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, T, C = x.shape  # batch, new tokens, n_embd
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        # split heads: (B, T, C) -> (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), S = pos + T
            # a cache allocated in fp32 under autocast would otherwise hand SDPA mixed dtypes
            k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=attn_mask,  # bool (B or 1, 1, T, S), True = may attend; or None
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward network, 4x wide as in GPT-2."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2 used the tanh approximation of GELU ("gelu_new" in transformers); using it too
        # keeps logits identical to GPT2LMHeadModel rather than merely close.
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """One pre-LN transformer block (GPT-2 moved LayerNorm to the input of each sub-block).

    ::

        x ------------------+
        |                   |
        ln_1 -> attn        |   attention: tokens exchange information
        |                   |
        + <-----------------+
        |-------------------+
        ln_2 -> mlp         |   MLP: each token computes on its own
        |                   |
        + <-----------------+
        |
        out

    The residual stream is never normalised, so gradients reach early layers unchanged; the
    final LayerNorm (GPT.ln_f) normalises it once at the end.
    """

    def __init__(self, config: GPTConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal, cache)
        x = x + self.mlp(self.ln_2(x))
        return x  # (B, T, C)


def _check_shape(
    vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float
) -> None:
    """Every problem with GPT's arguments in one ConfigError, before any tensor is allocated."""
    key = "model.init_args.backbone.init_args"
    problems = [
        f"{key}.{name}={value} must be at least 1"
        for name, value in (
            ("vocab_size", vocab_size),
            ("block_size", block_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("n_embd", n_embd),
        )
        if value < 1
    ]
    if n_head >= 1 and n_embd >= 1 and n_embd % n_head:
        problems.append(
            f"{key}.n_embd={n_embd} is not divisible by n_head={n_head} (each head gets n_embd / n_head "
            f"dimensions): change n_embd or n_head"
        )
    if not 0.0 <= dropout <= 1.0:
        problems.append(f"{key}.dropout={dropout} is not a probability: give a value in [0, 1]")
    if problems:
        raise ConfigError("GPT: " + "; ".join(problems))


class GPT(Backbone):
    """GPT-2 style decoder-only transformer (nanoGPT-like): pre-LN blocks, learned positions,
    tied embeddings, GPT-2 initialisation.

    Args:
        vocab_size: Token vocabulary size. 50304 is GPT-2's 50257 padded to a multiple of 64, which
            makes the output projection faster; the extra rows are never targets.
        block_size: Maximum context length in tokens (rows of the position-embedding table).
        n_layer: Number of transformer blocks.
        n_head: Attention heads per block; must divide n_embd.
        n_embd: Model width (hidden size).
        dropout: Dropout probability on embeddings, attention probabilities and residual branches.
            0 for pretraining (nanoGPT); 0.1 can help when fine-tuning on small data.
        bias: Use biases in Linear and LayerNorm layers, as GPT-2 does. False is slightly faster
            and no worse (nanoGPT).
        gradient_checkpointing: Activation checkpointing: keep only each block's input during
            training and recompute the block in the backward pass. Activation memory drops from
            every block's intermediates to one block's; a step costs about one extra forward
            (~1.3x). Not an architecture setting: weights and outputs are unchanged. (FSDP's
            `activation_checkpointing` does the same per sharded block: use one or the other.)
    """

    def __init__(
        self,
        vocab_size: int = 50304,
        block_size: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        bias: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        _check_shape(vocab_size, block_size, n_layer, n_head, n_embd, dropout)
        self.config = GPTConfig(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias)
        self.gradient_checkpointing = gradient_checkpointing
        config = self.config
        # nanoGPT's layout, which is also GPT2LMHeadModel's: transformer.{wte,wpe,h,ln_f} + lm_head
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(vocab_size, n_embd),  # token embeddings
                wpe=nn.Embedding(block_size, n_embd),  # learned absolute position embeddings
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(config, i) for i in range(n_layer)]),
                ln_f=nn.LayerNorm(n_embd, eps=1e-5, bias=bias),
            )
        )
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017; GPT-2): one matrix embeds tokens and scores them,
        # saving vocab_size x n_embd parameters (38M for GPT-2 small).
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: "scale the weights of residual layers at initialization by 1/sqrt(N)", N = number of
        # residual layers (2 per block), so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # GPT-2 / nanoGPT: N(0, 0.02) for every matrix and embedding, zero biases; LayerNorm keeps
        # PyTorch's ones/zeros.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # -- Backbone interface ------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return self.config.n_embd

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def block_class(self) -> type[nn.Module]:
        return Block

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, ``6 N + 12 L H T`` (PaLM appendix B, nanoGPT estimate_mfu).

        N counts every parameter except the position table, which is a lookup, not a matmul;
        the token embedding stays in because, tied, it is also the output projection.
        """
        n_params = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        return transformer_flops_per_token(n_params, self.config.n_layer, self.config.n_embd, seq_len)

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """Allocate a KVCache for ``batch_size`` sequences of up to ``max_len`` tokens in total.

        ``device`` and ``dtype`` default to those of the model's weights; pass the autocast dtype
        (e.g. torch.bfloat16) to halve the cache when decoding under mixed precision.
        """
        if max_len > self.config.block_size:
            raise ValueError(
                f"KV cache max_len={max_len} exceeds block_size={self.config.block_size}: the model has "
                f"no position embedding beyond {self.config.block_size}. Use max_len <= block_size."
            )
        weight = self.transformer.wte.weight
        c = self.config
        return KVCache(
            n_layer=c.n_layer,
            batch_size=batch_size,
            n_head=c.n_head,
            max_len=max_len,
            head_size=c.n_embd // c.n_head,
            device=device if device is not None else weight.device,
            dtype=dtype if dtype is not None else weight.dtype,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        bidirectional: range | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, T, n_embd) after the final LayerNorm.

        Args:
            input_ids: (B, T) int64 token ids.
            attention_mask: (B, S) with 1 on real tokens and 0 on padding, where S = T without a
                cache and S = cache.pos + T with one (the mask of every position so far). ``None``
                takes the fast path: plain causal attention (``is_causal=True``). That is exact
                for training batches, which are right-padded: a causal query never looks right, so
                real tokens never see the padding after them (pad positions produce garbage that
                the loss ignores via labels = -100). Pass the mask for left padding (batched
                generation): positions then count real tokens only and pads are never attended.
            cache: a KVCache from ``new_cache`` for incremental decoding; the new tokens attend to
                everything cached before them and ``cache.pos`` advances by T.
            bidirectional: the blocks (indices) whose attention has no causal mask: every token
                attends to every real token of its row (whole-text context for classifiers,
                tasks/context.py). Padding is masked only when ``attention_mask`` is given.
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        S = past + T  # total positions the new tokens can see
        self._check_lengths(B, T, S, attention_mask, cache)
        if bidirectional is not None and cache is not None:
            raise ValueError("bidirectional attention reads the whole row at once: it takes no KV cache")
        device = input_ids.device

        # Position ids. Without a mask: past .. S-1, shared by the batch. With one: count real tokens
        # (cumsum - 1) so a left-padded row starts at position 0 like it would alone; pads clamp to 0.
        if attention_mask is None:
            pos = torch.arange(past, S, device=device)  # (T,)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:S]  # (B, T)

        # Attention mask. Only build one when needed: is_causal=True alone selects the fused kernels.
        if attention_mask is None and cache is None:
            attn_mask, is_causal = None, True
        elif attention_mask is None and T == 1:
            attn_mask, is_causal = None, False  # one new token may see every cached key
        else:
            attn_mask, is_causal = self._build_attn_mask(attention_mask, past, T, device), False
        # Blocks in `bidirectional` see every real key: no mask at all without padding (the fused
        # non-causal kernels), else the padding mask alone.
        layer_args = [(attn_mask, is_causal)] * len(self.transformer.h)
        if bidirectional is not None:
            full = (
                None if attention_mask is None else self._build_attn_mask(attention_mask, 0, T, device, False)
            )
            for i in bidirectional:
                layer_args[i] = (full, False)

        x = self.transformer.wte(input_ids) + self.transformer.wpe(pos)  # (B, T, C)
        x = self.transformer.drop(x)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block, (mask, causal) in zip(self.transformer.h, layer_args, strict=True):
            if recompute:
                # Non-reentrant checkpointing (the one torch recommends) restores the RNG state, so
                # the recomputed dropout masks are the forward's.
                x = checkpoint(block, x, mask, causal, cache, use_reentrant=False)
            else:
                x = block(x, mask, causal, cache)  # (B, T, C)
        if cache is not None:
            cache.pos = S  # every layer wrote at the same offset; advance once
        return self.transformer.ln_f(x)  # (B, T, C)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Project hidden states (B, T, C) to logits (B, T, vocab_size) with the tied embedding."""
        return self.lm_head(hidden)

    # -- helpers ------------------------------------------------------------------------------

    def _check_lengths(
        self,
        B: int,
        T: int,
        S: int,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> None:
        """Raise a ValueError that names the numbers and the fix, before any indexing fails."""
        block_size = self.config.block_size
        if T > block_size:
            raise ValueError(
                f"Sequence length {T} exceeds block_size={block_size}. Truncate or chunk inputs to at "
                f"most {block_size} tokens, or build the model with a larger block_size."
            )
        if S > block_size:
            raise ValueError(
                f"KV cache position {S - T} + {T} new tokens = {S} exceeds block_size={block_size}. "
                f"Stop decoding at {block_size} tokens, or re-encode the last {block_size} tokens into a "
                f"fresh cache (a sliding window)."
            )
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"KV cache was allocated for batch size {cache.batch_size}, got {B}.")
            if S > cache.max_len:
                raise ValueError(
                    f"KV cache position {S - T} + {T} new tokens = {S} exceeds the cache's "
                    f"max_len={cache.max_len}. Allocate it with GPT.new_cache(batch_size, max_len >= {S})."
                )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, S):
            what = "cache.pos + T" if cache is not None else "T"
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, {what}) = {(B, S)}."
            )

    @staticmethod
    def _build_attn_mask(
        attention_mask: torch.Tensor | None, past: int, T: int, device: torch.device, causal: bool = True
    ) -> torch.Tensor:
        """Boolean SDPA mask, True where query (at positions past .. past+T-1) may attend key.

        Causal (unless ``causal`` is False) AND key-is-real. Every query may also attend to itself:
        a padded query would otherwise see no key at all, its softmax would be 0/0 and the NaN would
        reach the loss through the backward pass even though the position is ignored. Real queries
        see themselves anyway.
        """
        S = past + T
        q_pos = torch.arange(past, S, device=device)[:, None]  # (T, 1)
        k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
        allowed = k_pos <= q_pos if causal else torch.ones(T, S, dtype=torch.bool, device=device)  # (T, S)
        if attention_mask is None:
            return allowed[None, None]  # (1, 1, T, S): a cache prefill without padding
        real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        return (allowed & real) | (k_pos == q_pos)  # (B, 1, T, S)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())
