"""Any Hugging Face causal language model behind the Backbone interface.

``HFBackbone`` loads a pretrained model (local directory or hub name) or builds a randomly
initialised one from a model type and a few config fields, with no download: the way tests and
from-scratch experiments get a Llama- or GPT-2-shaped model without network access.

The task never calls the HF model's own ``forward`` with labels: the loss lives in tasks/, so this
wrapper returns the base model's final hidden states and applies the LM head separately, exactly
like our GPT. Some families change the logits after the LM head inside their own forward
(Granite divides by ``logits_scaling``, Cohere multiplies by ``logit_scale``, Falcon-H1 by
``lm_head_multiplier``, Gemma 2/3 soft-cap with ``final_logit_softcapping``): ``logits`` applies
the same step, and every build checks on a short probe that hidden states -> ``logits`` give the
HF model's own logits, refusing a family whose head it does not reproduce (docs/design.md).
"""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptlab.errors import ConfigError
from gptlab.models.backbone import Backbone, transformer_flops_per_token
from gptlab.models.gguf import MODEL_NAME as SMOLLM2

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _build(
    name_or_path: str | None,
    model_type: str | None,
    overrides: dict[str, Any],
    trust_remote_code: bool,
    allow_missing_weights: bool = False,
) -> PreTrainedModel:
    """The transformers model: pretrained from `name_or_path`, or random from `model_type`'s config."""
    # Imported here: transformers' modeling code (with accelerate) is a second of every start-up.
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if name_or_path is not None:
        name_or_path = os.path.expanduser(name_or_path)  # "~/.cache/gptlab/models/..." in YAML
        # dtype=float32: transformers 5 defaults to dtype="auto" (the checkpoint's, often bf16),
        # but Lightning's precision plugins expect fp32 master weights and cast for compute;
        # training bf16 weights directly with AdamW loses small updates.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # its load report: said below in one line, or refused

        def load(**extra: Any) -> tuple[PreTrainedModel, dict]:
            return AutoModelForCausalLM.from_pretrained(
                name_or_path,
                dtype=torch.float32,
                trust_remote_code=trust_remote_code,
                output_loading_info=True,
                **overrides,
                **extra,
            )

        try:
            model, info = load()
        except (pickle.UnpicklingError, RuntimeError) as err:
            said = weights_failure(
                f"HFBackbone name_or_path={name_or_path}", name_or_path, err, lambda **k: load(**k)[1]
            )
            if said is None:
                raise
            raise ConfigError(said) from None
        except (OSError, ValueError) as err:
            # A missing directory, no network, no config.json or weights: a user error. (A model
            # with its own code is a ValueError too, answered by the caller.)
            if isinstance(err, ValueError) and "custom code" in str(err):
                raise
            raise ConfigError(_load_failure(name_or_path, err)) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        # Weights the files lack start random ("newly initialized"): a partly random base that
        # trains as if pretrained. Refused unless asked for, as init_from refuses it.
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            message = (
                f"HFBackbone name_or_path={name_or_path}: {len(missing)} weight(s) are not in its files "
                f"and start random (e.g. {', '.join(missing[:3])})"
            )
            if not allow_missing_weights:
                raise ConfigError(
                    f"{message}: give the model's complete directory, or set allow_missing_weights: true "
                    f"to train them from random values"
                )
            warnings.warn(f"gptlab: {message} (allow_missing_weights: true)", stacklevel=2)
        return model
    try:
        config = AutoConfig.for_model(model_type, **overrides)
    except ValueError as err:
        if "Unrecognized model identifier" not in str(err):
            raise
        raise ConfigError(
            f"HFBackbone model_type={model_type!r} is not a model type of this transformers "
            f"(e.g. gpt2, llama, qwen2, mistral): check the spelling, or load a checkpoint with name_or_path"
        ) from None
    return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def weights_failure(what: str, directory: str | Path, err: Exception, retry: Any = None) -> str | None:
    """One line for a `from_pretrained(directory)` that failed on the directory's weight files (None
    for other failures): a pickle the weights-only loader refused, or weights whose shapes are not
    config.json's. `retry(ignore_mismatched_sizes=True)` returns transformers' loading info, to name
    the tensors that differ (only called for that failure).

    Args:
        what: how the user gave the directory, e.g. "HFBackbone name_or_path=DIR" or "init_from=DIR".
        directory: the model directory.
        err: what from_pretrained raised.
        retry: loads again ignoring mismatched sizes, returning the loading info (a dict).
    """
    if isinstance(err, pickle.UnpicklingError):
        pickles = sorted(p.name for p in Path(directory).glob("*.bin")) or ["its weights"]
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        return (
            f"{what}: {', '.join(pickles)} is a pickle that the weights-only loader refuses "
            f"({(lines or ['not tensors only'])[0][:160]}); it was not loaded, since unpickling it could "
            f"run code: give the model's safetensors weights, or re-save it with save_pretrained where you "
            f"trust it"
        )
    if isinstance(err, RuntimeError) and "ignore_mismatched_sizes" in str(err) and retry is not None:
        mismatched = list(retry(ignore_mismatched_sizes=True).get("mismatched_keys") or [])
        shown = "; ".join(
            f"{k} {tuple(a)} in the weights, {tuple(b)} by config.json" for k, a, b in mismatched[:2]
        )
        return (
            f"{what}: config.json does not describe its weights ({len(mismatched)} tensors differ in shape, "
            f"e.g. {shown}): fix config.json, or give the directory the weights were saved with"
        )
    return None


def _load_failure(name_or_path: str, err: Exception) -> str:
    """One line on why `from_pretrained(name_or_path)` failed and what to do."""
    path = Path(name_or_path).expanduser()
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if path.is_dir():
        return (
            f"HFBackbone name_or_path={name_or_path}: the directory does not hold a loadable causal LM "
            f"({reason}); give a directory written by save_pretrained (config.json + weights)"
        )
    if path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        # the SmolLM2 configs name the directory that scripts/get_smollm2.py makes
        hint = " (make it with: python scripts/get_smollm2.py)" if path.name == SMOLLM2 else ""
        return (
            f"HFBackbone name_or_path={name_or_path}: no such directory{hint}; give a directory written by "
            f"save_pretrained, or a hub name such as gpt2"
        )
    return (
        f"HFBackbone name_or_path={name_or_path}: not found in the local Hugging Face cache and the hub "
        f"could not be reached ({reason}); download it once with network access (the cache is reused "
        f"offline), or give a local directory written by save_pretrained"
    )


# Config fields of the steps some families apply to the LM head's output inside their own forward
# (see each family's *ForCausalLM.forward in transformers); logits() applies the same ones.
_LOGITS_DIVISOR = "logits_scaling"  # Granite family: logits / logits_scaling
_LOGITS_MULTIPLIERS = ("logit_scale", "lm_head_multiplier")  # Cohere; Falcon-H1
_SOFTCAP = "final_logit_softcapping"  # Gemma 2/3, VaultGemma: cap * tanh(logits / cap)
# Largest |ours - theirs| accepted by the build-time probe, relative to the logits' scale.
PROBE_RTOL = 1e-5


class HFBackbone(Backbone):
    """A Hugging Face causal LM (``AutoModelForCausalLM``) used as a backbone.

    Give exactly one of ``name_or_path`` (load pretrained weights) or ``model_type`` (random
    weights, built from ``AutoConfig.for_model(model_type, **config_overrides)``).

    Args:
        name_or_path: Local directory (from ``save_pretrained``; ``~`` expands) or hub name (e.g.
            "gpt2") of a pretrained causal LM. Hub names need network access on first use.
        model_type: A transformers model type (e.g. "gpt2", "llama") to build with random weights,
            offline. Use ``config_overrides`` to make it small.
        config_overrides: Config fields to set, e.g. {"n_layer": 2, "n_embd": 64}. With
            ``model_type`` they define the model; with ``name_or_path`` they override the saved
            config (e.g. dropout).
        trust_remote_code: Allow models whose code lives in the checkpoint directory / hub repo.
            Only enable for sources you trust: it executes that code.
        gradient_checkpointing: Activation checkpointing through transformers'
            ``gradient_checkpointing_enable`` (non-reentrant): each decoder layer is recomputed
            in the backward pass instead of keeping its activations; about one extra forward per
            step for a fraction of the activation memory. Weights and outputs are unchanged.
        padding_free: Run a padded batch as one row of its real tokens only, each sequence
            attending to itself (transformers' packed-sequence masks from position ids), so
            no layer computes or stores anything for padding: the same hidden states at real
            tokens (to float rounding), less time and memory the more a batch is padded.
            Checked at build time on a probe; families whose masks do not support it run padded.
        allow_missing_weights: Accept a ``name_or_path`` whose files lack some of the model's
            weights (transformers initialises them randomly): by default that is refused, since
            the model would train as pretrained on a partly random base.
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        model_type: str | None = None,
        config_overrides: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        padding_free: bool = True,
        allow_missing_weights: bool = False,
    ) -> None:
        super().__init__()
        if (name_or_path is None) == (model_type is None):
            raise ConfigError(
                "HFBackbone needs exactly one of name_or_path (load pretrained weights) or model_type "
                f"(random weights from a config), got name_or_path={name_or_path!r}, "
                f"model_type={model_type!r}: remove one of them"
            )
        overrides = dict(config_overrides or {})
        self.name_or_path = name_or_path  # where pretrained weights come back from (peft checkpoints)
        self.trust_remote_code = trust_remote_code
        try:
            self.model: PreTrainedModel = _build(
                name_or_path, model_type, overrides, trust_remote_code, allow_missing_weights
            )
        except ValueError as err:
            if "custom code" not in str(err):
                raise
            # transformers' message spans lines and suggests the flag without saying what it does.
            raise ConfigError(
                f"HFBackbone {name_or_path or model_type!r} ships its own model code (auto_map in its "
                f"config.json), which gptlab does not run unless asked: set trust_remote_code: true "
                f"only if you trust that code (it executes on load)"
            ) from None

        # Ask the base model which optional inputs it takes, once, instead of failing per batch:
        # ALiBi models (BLOOM, MPT) take no position_ids.
        params = inspect.signature(self.model.base_model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        self._takes_use_cache = "use_cache" in params
        self._block_class = _find_block_class(self.model)
        self._num_layers = sum(isinstance(m, self._block_class) for m in self.model.modules())
        config = self.model.config
        self._logits_divisor = getattr(config, _LOGITS_DIVISOR, None)
        multipliers = [getattr(config, k, None) for k in _LOGITS_MULTIPLIERS]
        self._logits_multiplier = next((m for m in multipliers if m is not None), None)
        self._softcap = getattr(config, _SOFTCAP, None)
        self._check_logits(name_or_path or model_type)
        self.padding_free = padding_free and self._takes_position_ids and self._padding_free_matches()
        # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode as
        # built: without this, dropout (and transformers' gradient checkpointing, active in training
        # mode only) would stay off for a whole fine-tune (docs/design.md).
        self.train()
        if gradient_checkpointing:
            # Active in training mode only, as in transformers; non-reentrant keeps the RNG state
            # (same dropout masks) and works when the inputs need no grad (frozen embeddings, LoRA).
            options = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # the name since transformers 5.x
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)

    # -- Backbone interface ------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        # The LM head's input width, i.e. that of the hidden states forward returns: OPT models
        # with word_embed_proj_dim project below config.hidden_size before the head.
        weight = getattr(self.model.get_output_embeddings(), "weight", None)
        return weight.size(1) if weight is not None and weight.dim() == 2 else self.model.config.hidden_size

    @property
    def vocab_size(self) -> int:
        # the output embedding's rows, not config.vocab_size: they differ after resize_token_embeddings
        # on some models, and it is the logits' width that tasks rely on
        return self.model.get_output_embeddings().weight.size(0)

    @property
    def block_size(self) -> int | None:
        config = self.model.config
        # GPT-2 calls it n_positions (aliased as max_position_embeddings), most others
        # max_position_embeddings; RoPE models can stretch beyond it, but quality is not promised.
        for key in ("max_position_embeddings", "n_positions"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def block_class(self) -> type[nn.Module]:
        return self._block_class

    @property
    def num_layers(self) -> int:
        return self._num_layers  # counted once: forward checks bidirectional ranges against it

    def num_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, ``6 N + 12 L H T`` (PaLM appendix B).

        N counts the parameters used in matmuls: everything except embedding lookups (token and
        position tables), plus the output projection, which a tied model shares with the token table.
        """
        embedding_params = {
            id(p) for m in self.model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
        }
        n_params = sum(p.numel() for p in self.model.parameters() if id(p) not in embedding_params)
        out = self.model.get_output_embeddings().weight
        if id(out) in embedding_params:  # tied: the lm_head matmul still costs 6 V H per token
            n_params += out.numel()
        return transformer_flops_per_token(n_params, self.num_layers, self.hidden_size, seq_len)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        bidirectional: range | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, H) of the base model (already final-normed for GPT-2, Llama).

        With an ``attention_mask``, position ids count real tokens only (cumsum - 1), as
        ``generate`` does, so a left-padded row gets the same positions it would have alone; HF
        base models otherwise number positions 0..T-1 regardless of padding. ``bidirectional``
        must be every layer (transformers' ``is_causal`` switch has no per-layer form).
        """
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_use_cache:
            kwargs["use_cache"] = False  # no KV cache during training: it would only cost memory
        if bidirectional is not None:
            if bidirectional != range(self.num_layers):
                raise ConfigError(
                    f"model.init_args.context.layers: an HFBackbone is made bidirectional through "
                    f"transformers' is_causal, which applies to all {self.num_layers} layers, not to "
                    f"layers {bidirectional.start}..{bidirectional.stop - 1}: leave layers out (ranges "
                    f"work on gptlab's GPT)"
                )
            # transformers' own switch (a forward argument since 5.x): the masks it builds are
            # bidirectional with padding kept, and SDPA gets is_causal=False also where no mask is
            # built (the module's own is_causal=True would otherwise apply: docs/design.md).
            kwargs["is_causal"] = False
        if attention_mask is None or not self._takes_position_ids:
            return self.model.base_model(**kwargs).last_hidden_state  # (B, T, H)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        real = attention_mask.bool()
        if bool(real.all()) or (bidirectional is None and not self.padding_free):
            return self.model.base_model(**kwargs, position_ids=positions).last_hidden_state
        if bidirectional is not None and not self._own_bidirectional_mask:
            # Sliding-window or hybrid layers: transformers' own bidirectional masks, padded rows.
            return self.model.base_model(**kwargs, position_ids=positions).last_hidden_state
        if bidirectional is not None and not self.padding_free:
            # Padded rows: the padding mask as a 4D mask of our own (transformers 5.0's mask builders
            # let padding through with is_causal=False); every query also sees itself (no empty row).
            eye = torch.eye(real.size(1), dtype=torch.bool, device=real.device)
            kwargs["attention_mask"] = self._attention_mask_4d(real[:, None, None, :] | eye)  # (B, 1, T, T)
            return self.model.base_model(**kwargs, position_ids=positions).last_hidden_state
        # Padding-free: the real tokens of all rows as one row (1, N). With no attention mask and
        # no cache, transformers starts a new sequence wherever a position id does not follow
        # the previous one (masking_utils.find_packed_sequence_indices), so each row still
        # attends only to its own earlier tokens. Padding positions come back as zeros.
        kwargs.update(
            input_ids=input_ids[real][None], attention_mask=None, position_ids=positions[real][None]
        )
        if bidirectional is not None:
            # transformers' bidirectional masks do not split packed rows (every token would see
            # every other row): give the block-diagonal mask itself, one block per row.
            rows = torch.arange(real.size(0), device=real.device)[:, None].expand_as(real)[real]  # (N,)
            kwargs["attention_mask"] = self._attention_mask_4d((rows[:, None] == rows[None, :])[None, None])
        packed = self.model.base_model(**kwargs).last_hidden_state  # (1, N, H)
        hidden = packed.new_zeros(*input_ids.shape, packed.size(-1))
        return hidden.index_put((real,), packed[0])  # (B, T, H)

    @property
    def _own_bidirectional_mask(self) -> bool:
        # A padded or packed bidirectional batch gets a 4D mask of ours (boolean for SDPA, additive
        # for eager), the same for every layer: so only models whose layers all attend in full.
        # Sliding-window or hybrid layers (Mistral, Gemma 2) and other attention implementations
        # (flash, flex) run bidirectional batches padded, with transformers' own masks.
        config = self.model.config
        full = getattr(config, "sliding_window", None) is None and all(
            t == "full_attention" for t in getattr(config, "layer_types", None) or ()
        )
        return full and config._attn_implementation in ("sdpa", "eager")

    def _attention_mask_4d(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean (B, 1, T, S) mask, True where a query may attend a key, as the attention takes it."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = next(self.model.parameters()).dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own logits from hidden states: (B, T, H) -> (B, T, V).

        The output embedding (lm_head), then what the family's forward does after it: Granite's
        division by ``logits_scaling``, Cohere's ``logit_scale``, Falcon-H1's ``lm_head_multiplier``,
        Gemma 2's final soft-capping. Written as in transformers, so the values are the same.
        """
        logits = self.model.get_output_embeddings()(hidden)
        if self._logits_divisor is not None:
            logits = logits / self._logits_divisor
        if self._logits_multiplier is not None:
            logits = logits * self._logits_multiplier
        if self._softcap is not None:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return logits

    @torch.no_grad()
    def _check_logits(self, source: str) -> None:
        """Refuse, at build time, a family whose logits ``logits(forward(x))`` does not reproduce.

        Compares with the HF model's own forward on a fixed 4-token probe in eval mode. Skipped for
        weights not materialised yet (meta device), which no forward can run.
        """
        param = next(self.model.parameters(), None)
        if param is None or param.is_meta:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(4, device=param.device).remainder(self.vocab_size)[None]  # (1, 4)
            theirs = self.model(input_ids=ids, use_cache=False).logits.float()  # (1, 4, V)
            ours = self.logits(self(ids)).float()
        finally:
            self.model.train(was_training)
        diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
        if not diff <= PROBE_RTOL * max(1.0, theirs.abs().max().item()):
            raise ConfigError(
                f"HFBackbone {source}: {type(self.model).__name__} computes its logits in a way gptlab does "
                f"not reproduce (hidden states -> lm_head differ from the model's own logits by {diff:.1e} "
                f"on a probe), so training and evaluation would use other logits than the model's: this "
                f"family is not supported as a backbone"
            )

    @torch.no_grad()
    def _padding_free_matches(self) -> bool:
        """Whether the padding-free forward gives the padded forward's hidden states on a probe.

        Two rows of 3 and 6 tokens, right- and left-padded, in eval mode; False for families whose
        attention ignores packed position ids (they keep running padded batches).
        """
        param = next(self.model.parameters(), None)
        if param is None or param.is_meta:
            return False  # no forward on unmaterialised weights: run padded
        was_training = self.model.training
        self.model.eval()
        try:
            ids = torch.arange(12, device=param.device).remainder(self.vocab_size).view(2, 6)
            masks = [[[1, 1, 1, 0, 0, 0], [1] * 6], [[0, 0, 0, 1, 1, 1], [1] * 6]]  # right, left padding
            for mask in masks:
                mask = torch.tensor(mask, device=param.device)
                self.padding_free = False
                padded = self(ids, mask)
                self.padding_free = True
                packed = self(ids, mask)
                real = mask.bool()
                diff = (padded[real] - packed[real]).abs().max().item()
                if not diff <= PROBE_RTOL * max(1.0, padded[real].abs().max().item()):
                    return False
            return True
        finally:
            self.padding_free = False
            self.model.train(was_training)


def _find_block_class(model: PreTrainedModel) -> type[nn.Module]:
    """The class of the model's repeated transformer block.

    transformers lists it in ``_no_split_modules`` (the unit ``device_map`` must not split, which is
    the unit FSDP should wrap). Names are resolved to the classes actually present in the model;
    with several, the most frequent wins. Without that hint, fall back to the element class of the
    longest ModuleList of identical modules (the layer stack).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    counts = Counter(type(m) for m in model.modules() if type(m).__name__ in names)
    if counts:
        return counts.most_common(1)[0][0]
    stacks = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1
    ]
    if stacks:
        return type(max(stacks, key=len)[0])
    raise ValueError(
        f"Cannot find the transformer block class of {type(model).__name__}: it declares no "
        "_no_split_modules and has no ModuleList of identical layers."
    )
