"""Weight conversion between our GPT and Hugging Face's GPT-2 (``GPT2LMHeadModel``).

Our parameter names are GPT-2's (both follow OpenAI's checkpoint), so the mapping is the identity
on names. The one real difference: GPT-2 implements its linear layers as ``Conv1D``, which stores
the weight as (in_features, out_features), the transpose of ``nn.Linear``. Used by the parity test,
the Hugging Face export and loading a GPT-2 directory into our GPT (gptlab.loading).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import GPT2Config

from gptlab.models.gpt import GPT

# Linear layers that GPT-2 stores as Conv1D (weight transposed). Embeddings, LayerNorms and the
# lm_head (an nn.Linear in GPT2LMHeadModel too) need no transpose.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# Activations equal to our nn.GELU(approximate="tanh"); anything else would change the logits.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def gpt2_config(gpt: GPT) -> GPT2Config:
    """The ``GPT2Config`` describing ``gpt``, for ``GPT2LMHeadModel(gpt2_config(gpt))``."""
    c = gpt.config
    # GPT-2's end-of-text token is 50256; keep it when it exists so exported models generate and stop
    # like GPT-2, otherwise leave it unset (transformers warns about ids outside the vocabulary).
    eos = 50256 if c.vocab_size > 50256 else None
    return GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        activation_function="gelu_new",  # the tanh GELU, as in our MLP
        layer_norm_epsilon=1e-5,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=True,
        architectures=["GPT2LMHeadModel"],
    )


def gpt_to_gpt2_state_dict(gpt: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT2LMHeadModel's names, loadable with ``strict=True``.

    With ``bias=False`` GPT-2 still expects every bias, so they are exported as zeros, which
    computes exactly what the bias-free model does. Tensors are detached copies.
    """
    sd = {}
    for name, tensor in gpt.state_dict().items():
        t = tensor.detach()
        sd[name] = t.t().contiguous() if name.endswith(_CONV1D) else t.clone()
    if not gpt.config.bias:
        c = gpt.config
        biases = {
            "ln_1.bias": c.n_embd,
            "attn.c_attn.bias": 3 * c.n_embd,
            "attn.c_proj.bias": c.n_embd,
            "ln_2.bias": c.n_embd,
            "mlp.c_fc.bias": 4 * c.n_embd,
            "mlp.c_proj.bias": c.n_embd,
        }
        ref = gpt.lm_head.weight
        for i in range(c.n_layer):
            for suffix, size in biases.items():
                sd[f"transformer.h.{i}.{suffix}"] = torch.zeros(size, dtype=ref.dtype, device=ref.device)
        sd["transformer.ln_f.bias"] = torch.zeros(c.n_embd, dtype=ref.dtype, device=ref.device)
    return sd


def from_gpt2_state_dict(state_dict: Mapping[str, torch.Tensor], config: GPT2Config) -> GPT:
    """Build our GPT from a GPT2LMHeadModel state dict and its config (the reverse direction).

    Typical use: ``hf = GPT2LMHeadModel.from_pretrained(path); gpt = from_gpt2_state_dict(
    hf.state_dict(), hf.config)``. Raises ValueError if the config uses features our GPT does not
    have (another activation, LayerNorm epsilon, MLP width, attention scaling variant).
    """
    problems = []
    if config.activation_function not in _TANH_GELUS:
        problems.append(f"activation_function={config.activation_function!r} (ours is the tanh GELU)")
    if config.layer_norm_epsilon != 1e-5:
        problems.append(f"layer_norm_epsilon={config.layer_norm_epsilon} (ours is 1e-5)")
    if config.n_inner not in (None, 4 * config.n_embd):
        problems.append(f"n_inner={config.n_inner} (ours is 4 * n_embd = {4 * config.n_embd})")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True (ours scales by 1/sqrt(head_size) only)")
    if not getattr(config, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False (ours scales by 1/sqrt(head_size))")
    if not getattr(config, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False (ours ties input and output embeddings)")
    if problems:
        raise ValueError("This GPT-2 config cannot be loaded into gptlab's GPT: " + "; ".join(problems))

    gpt = GPT(
        vocab_size=config.vocab_size,
        block_size=config.n_positions,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_embd=config.n_embd,
        dropout=config.resid_pdrop,
        bias=True,
    )
    sd = {
        name: t.t().contiguous() if name.endswith(_CONV1D) else t
        for name, t in state_dict.items()
        # older checkpoints carry the causal-mask buffers attn.bias / attn.masked_bias: not weights
        if not name.endswith((".attn.bias", ".attn.masked_bias"))
    }
    # GPT2LMHeadModel.state_dict() lists the tied lm_head; some saved files hold only wte
    sd.setdefault("lm_head.weight", sd["transformer.wte.weight"])
    gpt.load_state_dict(sd, strict=True)
    return gpt
