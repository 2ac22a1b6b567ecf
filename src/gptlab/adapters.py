"""Parameter-efficient fine-tuning (LoRA, IA3, ...) through the peft library, inside a gptlab backbone.

    TaskModule(backbone, peft=LoraConfig(r=16, ...))
        └─ add_adapters(backbone, config)
             where:  HFBackbone -> backbone.model (the PreTrainedModel: peft's per-architecture
                     defaults and "all-linear" know it); GPT -> the GPT itself
             how:    peft's tuner (the code path of `peft.inject_adapter_in_model`) replaces each
                     targeted Linear by a peft layer holding the frozen `base_layer` and the adapter;
                     every base weight is frozen. The backbone keeps its interface (forward ->
                     hidden states), which `peft.get_peft_model` would not (docs/design.md).
        task heads live outside the backbone: they stay fully trainable.

Checkpoints under peft hold the trainable part only (adapters, heads, buffers of the task) and a
reference to the base model with a fingerprint of its weights (`base_fingerprint`): the base comes
back from that reference (a Hugging Face directory or hub name, or `init_from`), and a checkpoint
put on another base is refused. Base weights keep their own names in every file gptlab reads or
writes (`base_state_dict`): `...c_attn.weight`, never peft's `...c_attn.base_layer.weight`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from gptlab.errors import ConfigError
from gptlab.models.hf import HFBackbone

INSTALL = "pip install 'gptlab[peft]'"
# How peft names the wrapped original layer inside its layers (peft.tuners.tuners_utils.BaseTunerLayer).
_BASE_LAYER = ".base_layer."
# Linear layers of our GPT's blocks (GPT-2's names): LoRA on every one of them by default.
_GPT_LINEARS = ["c_attn", "c_proj", "c_fc"]


def require_peft(what: str = "model.init_args.peft") -> None:
    """Raise a one-line ConfigError naming the pip command when peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(f"{what} needs the peft library, which is not installed: {INSTALL}") from None


def adapter_target(backbone: nn.Module) -> nn.Module:
    """The module peft adapts: an HFBackbone's PreTrainedModel, or the backbone itself (our GPT)."""
    return backbone.model if isinstance(backbone, HFBackbone) else backbone


def with_default_targets(backbone: nn.Module, config: Any) -> Any:
    """A copy of the peft `config` with gptlab's default target modules filled in where it has none.

    LoRA-like methods (LoRA, AdaLoRA, LoHa, LoKr, ...) adapt every linear layer of the blocks (the
    setting of QLoRA, Dettmers et al. 2023, and of the reference in benchmarks/): "all-linear" for a
    Hugging Face model (peft leaves its output layer out) and the GPT-2 names for ours. IA3 takes
    peft's own per-architecture defaults, GPT-2's for our GPT (same module names).
    """
    import copy

    from peft.utils import constants

    config = copy.deepcopy(config)
    if getattr(config, "target_modules", None) is not None:
        return config
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    hf = isinstance(backbone, HFBackbone)
    if kind == "IA3":
        if hf:
            return config  # peft looks up model.config.model_type itself
        config.target_modules = list(constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["gpt2"])
        config.feedforward_modules = list(
            constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["gpt2"]
        )
        return config
    config.target_modules = "all-linear" if hf else list(_GPT_LINEARS)
    return config


def module_names(module: nn.Module, limit: int = 12) -> str:
    """The distinct names of `module`'s leaf layers with weights, e.g. "q_proj (Linear), ...", shortened."""
    seen: dict[str, str] = {}
    for name, child in module.named_modules():
        if name and not list(child.children()) and any(True for _ in child.parameters(recurse=False)):
            seen.setdefault(name.rsplit(".", 1)[-1], type(child).__name__)
    names = [f"{n} ({t})" for n, t in seen.items()]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def add_adapters(backbone: nn.Module, config: Any) -> Any:
    """Inject the adapters of peft `config` into `backbone` in place and freeze its base weights.

    Returns peft's tuner object (kept by the task for methods that act during training, e.g.
    AdaLoRA's rank allocation); the adapted modules are the backbone's own.
    """
    require_peft()
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.error import NoMatchingPeftModuleError

    if not isinstance(config, PeftConfig):
        raise ConfigError(
            f"model.init_args.peft must be a peft config (e.g. peft.LoraConfig), got {config!r}"
        )
    kind = type(config).__name__
    if config.is_prompt_learning or config.peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ConfigError(
            f"model.init_args.peft: {kind} is not supported by gptlab's backbones (prompt learning "
            f"such as prefix tuning needs peft's whole-model wrapper); use LoraConfig, AdaLoraConfig "
            f"or IA3Config"
        )
    tuner_class = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    if tuner_class.uses_shared_state:
        raise ConfigError(
            f"model.init_args.peft: {kind} keeps state shared across layers, which gptlab's backbones "
            f"do not support; use LoraConfig, AdaLoraConfig or IA3Config"
        )
    target = adapter_target(backbone)
    config = with_default_targets(backbone, config)
    resolve_targets(target, config)
    if getattr(config, "inference_mode", False):
        # peft would freeze the adapters: a fit would train the head alone while reporting adapters.
        raise ConfigError(
            "model.init_args.peft.init_args.inference_mode=true freezes the adapters, so `fit` would train "
            "only the task head: leave it out (test / predict / export never train anyway)"
        )
    if getattr(config, "modules_to_save", None):
        # peft would wrap them in copies whose weights load under other names (seen as a backbone
        # that does not match its checkpoint); gptlab's task heads are outside the backbone anyway.
        raise ConfigError(
            f"model.init_args.peft.init_args.modules_to_save={list(config.modules_to_save)}: gptlab does not "
            f"support it (task heads sit outside the backbone and always train fully; backbone modules "
            f"under peft train through adapters only): leave it out, or fine-tune without peft"
        )
    layers = getattr(config, "layers_to_transform", None)
    layers = [layers] if isinstance(layers, int) else list(layers or [])
    outside = [i for i in layers if not 0 <= i < backbone.num_layers]
    if outside:  # peft would say the target_modules match nothing
        raise ConfigError(
            f"model.init_args.peft.init_args.layers_to_transform={layers}: the backbone has "
            f"{backbone.num_layers} layers (0..{backbone.num_layers - 1}), so {outside} name none of them"
        )
    try:
        tuner = tuner_class(target, config, adapter_name="default")
    except (NoMatchingPeftModuleError, ValueError) as err:
        if isinstance(err, NoMatchingPeftModuleError) or "not found in the base model" in str(err):
            targets = config.target_modules
            targets = sorted(targets) if isinstance(targets, set) else targets  # peft keeps a set
            raise ConfigError(
                f"model.init_args.peft.init_args.target_modules={targets!r} matches no "
                f"module of the backbone ({type(target).__name__}); its layers are: {module_names(target)}"
            ) from None
        raise ConfigError(f"model.init_args.peft ({kind}): {' '.join(str(err).split())}") from None
    return tuner


def resolve_targets(target: nn.Module, config: Any) -> None:
    """Make `config.target_modules` mean what the docs say, in place, before peft reads it.

    "all-linear" on our GPT (not a transformers PreTrainedModel, so peft cannot find its output
    layer) becomes every Linear but `lm_head`, as on a Hugging Face model. A list entry that matches
    no module is refused by name: peft adapts what the other entries match and drops it silently.
    """
    targets = getattr(config, "target_modules", None)
    if isinstance(targets, str):
        if targets.lower() == "all-linear" and not isinstance(target, PreTrainedModel):
            head = getattr(target, "lm_head", None)
            config.target_modules = [
                name for name, m in target.named_modules() if isinstance(m, nn.Linear) and m is not head
            ]
        return  # otherwise a regular expression over the full names: peft matches it
    if not targets:
        return
    names = [name for name, _ in target.named_modules() if name]
    # peft's rule (peft.tuners.tuners_utils.check_target_module_exists): the name or its last parts
    unmatched = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unmatched and len(unmatched) < len(targets):  # none matching: peft's own error, named below
        raise ConfigError(
            f"model.init_args.peft.init_args.target_modules: {sorted(unmatched)!r} match no module of the "
            f"backbone ({type(target).__name__}), while the others do: check the spelling, or remove "
            f"them; its layers are: {module_names(target)}"
        )


# LoRA initialisations that compute the adapters (and PiSSA / OLoRA / MiCA a residual base
# weight) from the base weights; peft's LoraLayer.update_layer runs them on whatever the base
# holds when the adapters are injected. With init_from the pretrained weights arrive later.
_RERUN_FROM_BASE = {"olora": "olora_init", "mica": "mica_init"}
# Those that need more than the weights (data, quantisation, gradients): not run again.
_NOT_RERUN = ("corda", "loftq", "eva", "lora_ga")


def init_from_base(backbone: nn.Module, config: Any) -> None:
    """Run again the adapter initialisation of `config` that reads the base weights, now that the
    pretrained base is loaded (docs/design.md, known traps: PiSSA / OLoRA on random weights).

    Default LoRA (B = 0) reads nothing and is left as it is. The randomised SVD of
    `pissa_niter_<k>` draws from a fixed seed, so that every load of the same base (fit, resume,
    evaluation of an adapter checkpoint) rebuilds the same residual base weights.
    """
    init = getattr(config, "init_lora_weights", True)
    if not isinstance(init, str):
        return
    kind = "pissa" if init.startswith("pissa") else init.lower()
    if kind.startswith(_NOT_RERUN):
        raise ConfigError(
            f"model.init_args.peft.init_args.init_lora_weights={init!r} initialises the adapters from "
            f"more than the base weights, which gptlab cannot redo once init_from has loaded them: "
            f"use pissa, olora or the default (true)"
        )
    if kind != "pissa" and kind not in _RERUN_FROM_BASE:
        return
    from peft.tuners.lora import LoraLayer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for module in backbone.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                if kind == "pissa":
                    module.pissa_init("default", init)
                else:
                    getattr(module, _RERUN_FROM_BASE[kind])("default")


def is_adapted(module: nn.Module) -> bool:
    """True when `module` holds peft adapter layers."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def adapter_prefix(config: Any) -> str:
    """The name fragment of peft's adapter tensors for this method ("lora_", "ia3_", ...)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].prefix


def base_name(name: str) -> str:
    """A base weight's name as in the plain model (`a.q_proj.base_layer.weight` -> `a.q_proj.weight`)."""
    return name.replace(_BASE_LAYER, ".")


def base_state_dict(module: nn.Module, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """`module.state_dict()` without adapter tensors, under the plain model's names.

    `prefix`: the adapter name fragment to leave out; None finds the adapted layers by type.
    """
    state = module.state_dict()
    adapter_keys = _adapter_keys(module, state) if prefix is None else {k for k in state if prefix in k}
    return {base_name(k): v for k, v in state.items() if k not in adapter_keys}


def _adapter_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of `state` that belong to peft adapters (inside a peft layer, outside its base_layer)."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return set()
    layers = [name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    keys = set()
    for key in state:
        for layer in layers:
            if key.startswith(layer + ".") and not key.startswith(layer + _BASE_LAYER[:-1] + "."):
                keys.add(key)
    return keys


def load_base_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load plain-model weights (`base_state_dict` names) into `module`, adapted or not; strict.

    Adapter tensors keep their values; every base weight must be given.
    """
    own = module.state_dict()
    names = {base_name(k): k for k in own if k not in _adapter_keys(module, own)}
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise RuntimeError(f"base weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")
    module.load_state_dict({names[k]: v for k, v in state.items()}, strict=False)


def base_fingerprint(backbone: nn.Module) -> str:
    """A short hash identifying the base weights: names, shapes, dtypes and a sample of each tensor.

    Cheap for any model size (at most 256 evenly spaced values per tensor), and enough to tell
    two bases apart: another checkpoint or another initialisation differs in every sampled value.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(backbone).items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        sample = flat[::step][:256].to(device="cpu", dtype=torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------ AdaLoRA
# AdaLoRA (Zhang et al. 2023) reallocates the rank budget during training: peft's tuner scores
# every singular triplet from the gradients after each optimizer step (`update_and_allocate`) and
# adds an orthogonality penalty on P and Q to the loss (in AdaLoraModel.forward, which gptlab's
# backbones never call: `orthogonality_penalty` computes the same term).
def is_adalora(config: Any) -> bool:
    return config is not None and str(getattr(config.peft_type, "value", config.peft_type)) == "ADALORA"


def orthogonality_penalty(tuner: Any) -> torch.Tensor:
    """AdaLoRA's regulariser: mean over P (lora_A) and Q (lora_B) of ||P P^T - I||_F, ||Q^T Q - I||_F."""
    terms = []
    for name, p in tuner.model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and tuner.trainable_adapter_name in name:
            cov = p @ p.T if "lora_A" in name else p.T @ p  # (r, r)
            terms.append(
                torch.linalg.matrix_norm(cov - torch.eye(cov.size(0), dtype=cov.dtype, device=cov.device))
            )
    weight = tuner.peft_config[tuner.trainable_adapter_name].orth_reg_weight
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


def adalora_state(tuner: Any) -> dict[str, Any]:
    """What AdaLoRA's rank allocator has learnt (its importance averages), for exact resume."""
    allocator = tuner.rankallocator
    config = tuner.peft_config[tuner.trainable_adapter_name]
    return {
        "ipt": dict(allocator.ipt),
        "exp_avg_ipt": dict(allocator.exp_avg_ipt),
        "exp_avg_unc": dict(allocator.exp_avg_unc),
        "rank_pattern": dict(config.rank_pattern or {}),
    }


def load_adalora_state(tuner: Any, state: dict[str, Any]) -> None:
    allocator = tuner.rankallocator
    for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
        setattr(allocator, key, dict(state[key]))
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = dict(state["rank_pattern"]) or None


def without_adapters(backbone: nn.Module, merge: bool = False) -> nn.Module:
    """A copy of `backbone` with every peft layer replaced by the base layer it wraps.

    `merge`: fold the adapters into the base weights first (peft's own `merge`), so that the copy
    computes what the adapted backbone does; otherwise the copy is the plain base.
    """
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    plain = copy.deepcopy(backbone)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, module.get_base_layer())
    target = adapter_target(plain)
    if "peft_config" in target.__dict__:  # set by peft's tuner on the adapted model
        del target.__dict__["peft_config"]
    return plain


def tied_on_one_side(backbone: nn.Module) -> list[tuple[str, str]]:
    """(adapted layer, module) pairs where a peft layer wraps a weight that the module shares
    (tied: the token embedding and the LM head) and the module itself has no adapter. A merge
    folds the adapter into the one shared tensor, so it changes the module too, which the
    fine-tune never did: the merged model computes something else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [name for name, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)]
    owners: dict[int, list[str]] = {}
    for name, param in backbone.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(name.rpartition(".")[0])
    pairs = []
    for layer in layers:
        weight = backbone.get_submodule(layer).get_base_layer().weight
        for owner in owners[id(weight)]:
            if not any(owner == other or owner.startswith(f"{other}.") for other in layers):
                pairs.append((layer, owner))
    return pairs


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of `module`, each shared tensor counted once."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in module.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, total
