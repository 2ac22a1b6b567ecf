"""`python main.py export`: a gptlab checkpoint -> a Hugging Face model directory.

    <run>/checkpoints/best.ckpt --+--> backbone --> GPT2LMHeadModel (our GPT; gptlab.models.convert)
                                  |                 or the HFBackbone's own model
                                  +--> task head -> *ForSequenceClassification / *ForTokenClassification
    <run>/tokenizer/ -------------+--> tokenizer
                                  v
    OUT/  config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...

A language model (CausalLM, Generation) loads with `AutoModelForCausalLM.from_pretrained(OUT)`; a
SequenceClassification with `AutoModelForSequenceClassification` and a TokenClassification with
`AutoModelForTokenClassification` (id2label / label2id from the run's labels), so that
`transformers.pipeline("text-classification" | "token-classification", model=OUT)` runs on it.
Each gives gptlab's logits (checked before anything is written, tolerance 1e-5). gptlab starts
from it too: `init_from: OUT` (and `tokenizer: OUT`).
A peft fine-tune (adapters on a frozen base, gptlab.adapters) of a language model exports its
adapter in peft's own format (`adapter_config.json`, `adapter_model.safetensors`):
`PeftModel.from_pretrained(base, OUT)` loads it on the transformers form of its base. With
`--merged true` any peft fine-tune (classifiers too) is exported as a plain model, its adapters
merged into the base weights. Both are checked against gptlab's logits like a plain export.
It is written into a temporary directory and renamed into place, so a failed export leaves
nothing behind and an existing OUT is never touched without `--overwrite true`. `gptlab_export.json`
lists the files the export wrote: `--overwrite true` replaces those and nothing else (a user's
own files beside them stay), only in a directory that holds such a list, and never in a directory
that a run under the same logs root starts from (`init_from`, `name_or_path`: a peft run's base).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    GPT2LMHeadModel,
    PreTrainedModel,
)

from gptlab import adapters
from gptlab.data.tokenizers import save_tokenizer
from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import load_checkpoint
from gptlab.models import GPT, HFBackbone
from gptlab.models.convert import gpt2_config, gpt_to_gpt2_state_dict
from gptlab.runs import bases_of_runs, run_dir_of

# Written beside the model: where it came from (ignored by transformers).
EXPORT_INFO = "gptlab_export.json"
LOGITS_ATOL = 1e-5


def export(
    ckpt_path: str,
    out: str,
    tokenizer: str | None = None,
    overwrite: bool = False,
    merged: bool = False,
) -> Path:
    """Export a gptlab checkpoint as a Hugging Face model directory (safetensors + config + tokenizer).

    Args:
        ckpt_path: a gptlab checkpoint, e.g. logs/<experiment>/version_0/checkpoints/best.ckpt.
        out: the directory to write; it must not exist (or be empty) unless overwrite is true.
        tokenizer: the tokenizer directory or hub name to ship with the model; default: the run's
            own `<run>/tokenizer`, saved beside the checkpoints by `fit`.
        overwrite: replace the files of an earlier export in `out` (those its gptlab_export.json
            lists; other files stay); never a run folder, a logs root, the checkpoint's folder, or
            the base model of a run under the checkpoint's logs root.
        merged: for a peft checkpoint, write the plain model with the adapters merged into the base
            weights instead of the adapter alone (peft's format). Other checkpoints: no effect.
    """
    out_dir = Path(out)
    earlier: list[str] | None = None  # the files of the earlier export that this one replaces
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise ConfigError(
                f"--out {out_dir} already exists and is not empty: give --out a new directory, or pass "
                f"--overwrite true to replace an earlier export there"
            )
        earlier = check_overwritable(out_dir, Path(ckpt_path))
    task, recorded = _load_task(Path(ckpt_path))
    if earlier is not None:
        check_not_a_base(out_dir, Path(ckpt_path), task)
    run = run_dir_of(ckpt_path)
    own = run / "tokenizer" if run is not None and (run / "tokenizer").is_dir() else None
    source = tokenizer or (str(own) if own is not None else None)
    if source is None:
        raise CheckpointError(
            f"{ckpt_path}: no tokenizer beside this checkpoint (expected "
            f"{run / 'tokenizer' if run is not None else '<run>/tokenizer'}); pass --tokenizer DIR with the "
            f"tokenizer the model was trained with"
        )
    tok = _load_tokenizer(source)
    task.eval()  # dropout off in the head too
    backbone = task.backbone
    if len(tok) > backbone.vocab_size:
        raise CheckpointError(
            f"the tokenizer {source} has {len(tok)} tokens but the model only {backbone.vocab_size}: "
            f"pass the tokenizer the model was trained with (--tokenizer)"
        )
    if tokenizer is not None and own is not None:
        check_same_vocabulary(tok, source, _load_tokenizer(str(own)), own)

    head_task = _head_task(task)
    peft = getattr(task, "peft_config", None) is not None
    adapter = peft and not merged
    if adapter and head_task is not None:
        raise ConfigError(
            f"{ckpt_path} is a peft {type(task).__name__}: its adapter alone (peft's format) is exported "
            f"for language-model tasks only; pass --merged true to export the classifier with its "
            f"adapters merged (a transformers *For{head_task.title()}Classification directory)"
        )
    # Merged: the adapters folded into a copy of the base weights; checked against the adapted task.
    exported = merged_copy(task) if peft else task
    if adapter:
        model = peft_export_model(task, tok)
    elif head_task is not None:
        ensure_pad_token(tok)
        model = to_hf_classifier(exported, tok)
    else:
        model = to_hf_model(exported.backbone, tok)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    # mkdtemp makes the directory private (0700); the export is a normal directory (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        model.save_pretrained(tmp)  # safetensors; tied lm_head stored once
        # The context length travels with the tokenizer: a pipeline then truncates long inputs where
        # the data did in training and evaluation (its block_size; older checkpoints: the model's).
        save_tokenizer(tok, tmp, model_max_length=recorded.get("block_size", backbone.block_size))
        info = {
            "checkpoint": str(ckpt_path),
            "task": type(task).__name__,
            "architecture": type(model).__name__,
            "tokenizer": str(source),
        }
        if peft:
            info["peft"] = {"base": task.base_source(), "merged": merged}
        # What a later --overwrite may replace (this list included), and nothing else.
        info["files"] = sorted([*(p.name for p in tmp.iterdir()), EXPORT_INFO])
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        try:
            if adapter:
                diff = check_adapter_export(task, tok, tmp)
            elif head_task:
                diff = check_classifier_export(task, tmp, tok)
            else:
                diff = check_export(backbone, tmp)
        except CheckpointError as err:
            tied = adapters.tied_on_one_side(task.backbone) if peft and merged else []
            if not tied:
                raise
            layer, other = tied[0]
            alone = "" if head_task else ", or export the adapter alone (leave out --merged true)"
            raise CheckpointError(
                f"{err}: the adapter on {layer} changes a weight tied to {other} (one tensor), where the "
                f"fine-tune left {other} as it was; merged, it changes both; fine-tune again with {layer} "
                f"left out of model.init_args.peft.init_args.target_modules{alone}"
            ) from None
        for path in tmp.iterdir():  # safetensors' writer leaves 0600; files of an export are shared
            path.chmod(0o666 & ~umask)
        if earlier is not None:
            replace_export(tmp, out_dir, earlier)
        else:
            if out_dir.exists():
                out_dir.rmdir()  # empty (checked above)
            tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "the adapter of " if adapter else "merged " if peft else ""
    match = f"transformers logits match gptlab's: max |diff| {diff:.1e}"
    print(f"exported {what}{ckpt_path} to {out_dir} ({match})")
    return out_dir


def check_overwritable(out_dir: Path, ckpt_path: Path) -> list[str]:
    """`--overwrite` replaces an earlier export, nothing else: never the checkpoint being exported,
    a run folder or a logs root (`--out logs` would otherwise delete every run), and only the files
    the earlier export's gptlab_export.json lists. Returns those file names."""
    out = out_dir.resolve()
    what = "delete it: give --out a new directory (or remove the old one yourself)"
    if out == ckpt_path.resolve() or out in ckpt_path.resolve().parents:
        raise ConfigError(
            f"--out {out_dir} holds the checkpoint being exported ({ckpt_path}); --overwrite would {what}"
        )
    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not an export directory; --overwrite would {what}")
    runs = [p for p in out_dir.rglob("*") if p.name == "checkpoints" or p.suffix == ".ckpt"]
    if runs:
        raise ConfigError(
            f"--out {out_dir} contains a run folder or checkpoints ({runs[0]}); --overwrite would {what}"
        )
    marker = out_dir / EXPORT_INFO
    try:
        files = json.loads(marker.read_text()).get("files")
    except (OSError, ValueError, AttributeError):  # missing, not JSON, not a mapping
        files = None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        reason = (
            f"its {EXPORT_INFO} lists no files (an export of an older gptlab)"
            if marker.is_file()
            else f"no {EXPORT_INFO} listing the files an export wrote"
        )
        raise ConfigError(
            f"--out {out_dir} does not look like a model directory written by export ({reason}); "
            f"--overwrite only replaces the files of an earlier export, and would otherwise {what}"
        )
    # Plain names only: a list naming ../x or /x is not something export wrote.
    return [f for f in files if f not in ("", ".", "..") and Path(f).name == f]


def check_not_a_base(out_dir: Path, ckpt_path: Path, task) -> None:
    """`--out` must not be the base model of a recorded run: the exported checkpoint's own
    (`init_from`, `name_or_path`) or any run's under the same logs root (gptlab.runs.bases_of_runs)."""
    run = run_dir_of(ckpt_path)
    bases = bases_of_runs(run.parent.parent) if run is not None else {}
    for source in (getattr(task, "init_from", None), getattr(task.backbone, "name_or_path", None)):
        if source:
            bases[Path(source).expanduser().resolve()] = ckpt_path
    named_in = bases.get(out_dir.resolve())
    if named_in is not None:
        raise ConfigError(
            f"--out {out_dir} is the base model of a run ({named_in} starts from it); --overwrite "
            f"would change the weights under that run's checkpoints (its adapters, its init_from): "
            f"give --out a new directory"
        )


def replace_export(new: Path, out_dir: Path, earlier: list[str]) -> None:
    """Move the export in `new` into `out_dir` over the earlier export's files `earlier`; any other
    file of `out_dir` stays, and one that this export would write over is refused first."""
    names = [p.name for p in new.iterdir()]
    clash = [n for n in names if n not in earlier and (out_dir / n).exists()]
    if clash:
        raise ConfigError(
            f"--out {out_dir}: {clash[0]} is not a file of the earlier export there, and this export "
            f"would write over it: move it away, or give --out a new directory"
        )
    for name in earlier:
        if name not in names:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    # The list of files last: until it is replaced, it still names every earlier file.
    for name in sorted(names, key=lambda n: n == EXPORT_INFO):
        target = out_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(new / name, target)


def to_hf_model(backbone: torch.nn.Module, tokenizer) -> PreTrainedModel:
    """The transformers model computing what `backbone` computes, with the tokenizer's special ids."""
    if isinstance(backbone, GPT):
        config = gpt2_config(backbone)
        model = GPT2LMHeadModel(config)
        model.load_state_dict(gpt_to_gpt2_state_dict(backbone), strict=True)
    elif isinstance(backbone, HFBackbone):
        model = backbone.model
    else:
        raise CheckpointError(f"cannot export a {type(backbone).__name__} backbone (GPT or HFBackbone only)")
    # generate() stops and pads with the tokenizer's ids (gpt2_config only knows GPT-2's 50256).
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key, None)
        if key == "bos_token_id" and value is None:
            value = tokenizer.eos_token_id  # GPT-2's convention: <|endoftext|> starts and ends
        setattr(model.config, key, value)
        setattr(model.generation_config, key, value)
    return model.eval()


def check_export(backbone: torch.nn.Module, directory: Path) -> float:
    """Load `directory` with transformers and compare its logits with the backbone's; max |diff|."""
    # Our own export, plain GPT-2 or the HFBackbone's architecture: never code from the directory.
    hf = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False).eval()
    length = min(16, backbone.block_size or 16)
    ids = torch.arange(length).remainder(backbone.vocab_size)[None]  # (1, T): a fixed probe
    param = next(backbone.parameters())
    with torch.no_grad():
        ours = backbone.logits(backbone(ids.to(param.device))).float().cpu()
        theirs = hf(ids).logits.float()
    return _logits_diff(ours, theirs, "model")


def _logits_diff(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    """Max |ours - theirs|; a CheckpointError (nothing is written) above LOGITS_ATOL."""
    diff = (ours - theirs).abs().max().item()
    if diff > LOGITS_ATOL:
        raise CheckpointError(
            f"the exported {what}'s logits differ from gptlab's by {diff:.2e} (> {LOGITS_ATOL}); "
            f"nothing written"
        )
    return diff


# ----------------------------------------------------------------------------- task heads
# How gptlab's heads map onto transformers' (modeling_layers.Generic*, GPT2For*):
#
#   SequenceClassification  hidden[length - 1] -> dropout -> Linear(H, C, bias)
#   *ForSequenceClassification  score = Linear(H, C, bias=False) at the rightmost token != pad_token_id
#   TokenClassification     hidden -> dropout -> Linear(H, C, bias)        (per token)
#   *ForTokenClassification     dropout(classifier_dropout) -> Linear(H, C, bias)   the same
#
# Batches are right-padded, so "the last real token" and "the rightmost non-pad token" agree as long
# as the tokenizer never emits the pad token inside a text (checked). The sequence head's bias, which
# `score` lacks, moves into the final norm's bias: W (h + d) = W h + b with d = pinv(W) b (W has full
# row rank). A backbone whose final norm has no bias (Llama's RMSNorm) cannot carry it: such heads are
# trained with `head_bias: false`. Mean pooling has no transformers counterpart and is refused.


def _head_task(task) -> str | None:
    """ "sequence", "token", or None for a language model (exported as a causal LM)."""
    from gptlab.tasks import SequenceClassification, TokenClassification

    if isinstance(task, SequenceClassification):
        return "sequence"
    if isinstance(task, TokenClassification):
        return "token"
    return None


def ensure_pad_token(tokenizer) -> None:
    """transformers' sequence classifiers find the last token by `pad_token_id`: the tokenizer needs one."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(
                "the tokenizer has neither a pad nor an eos token, which transformers' classifiers need to "
                "find each text's end; pass --tokenizer with one that has a pad token"
            )
        tokenizer.pad_token = tokenizer.eos_token  # gptlab pads with eos too (gptlab.data.tokenizers)


def to_hf_classifier(task, tokenizer) -> PreTrainedModel:
    """The transformers `*ForSequenceClassification` / `*ForTokenClassification` computing `task`'s logits."""
    kind = _head_task(task)
    if kind == "sequence" and task.pooling != "last":
        raise CheckpointError(
            f"pooling={task.pooling!r}: transformers' *ForSequenceClassification reads the last non-pad "
            f"token's state only, so this classifier has no exact transformers equivalent; fine-tune with "
            f"model.init_args.pooling: last to export it, or use gptlab's test / predict"
        )
    context = task.context
    if context.mode == "repeat" or (
        context.mode == "bidirectional" and len(task.bidirectional) != task.backbone.num_layers
    ):
        raise CheckpointError(
            f"context {context.describe()}: a transformers classifier reads each text once, "
            f"{'with one attention mask for all layers' if context.mode != 'repeat' else 'not repeated'}, "
            f"so this classifier has no exact transformers equivalent; use gptlab's test / predict, or "
            f"fine-tune with context: bidirectional (all layers) or causal to export it"
        )
    backbone = task.backbone
    if adapters.is_adapted(backbone):
        # transformers' pipeline loads plain models: a peft classifier exports merged
        backbone = adapters.without_adapters(backbone, merge=True)
    lm = to_hf_model(backbone, tokenizer)  # the backbone as a causal LM, special ids set
    linear = task.head[-1]  # Sequential(Dropout, Linear)
    config = copy.deepcopy(lm.config)
    config.architectures = None  # from_config sets the head class's own name
    config.num_labels = linear.out_features  # before id2label: a count mismatch resets the names
    config.id2label = dict(enumerate(task.label_names))
    config.label2id = {name: i for i, name in enumerate(task.label_names)}
    if context.mode == "bidirectional":
        # transformers' own switch (config field): masks without the causal part, and SDPA told
        # is_causal=False where no mask is built; check_classifier_export checks both cases.
        config.is_causal = False
    if kind == "sequence":
        multi = getattr(task, "multi_label", False)
        # the pipeline applies sigmoid for multi-label, softmax otherwise
        config.problem_type = "multi_label_classification" if multi else "single_label_classification"
        auto = AutoModelForSequenceClassification
    else:
        config.classifier_dropout = task.head[0].p  # used in training only, as gptlab's
        auto = AutoModelForTokenClassification
    try:
        model = auto.from_config(config, dtype=torch.float32)
    except ValueError:
        raise CheckpointError(
            f"transformers has no {auto.__name__[len('AutoModelFor') :]} model for model type "
            f"{config.model_type!r}; export this backbone as a language model instead"
        ) from None
    model.base_model.load_state_dict(lm.base_model.state_dict(), strict=True)
    score = _score_layer(model)
    with torch.no_grad():
        score.weight.copy_(linear.weight)
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        if score.bias is not None:
            score.bias.copy_(bias)
        elif bias.abs().max() > 0:
            _bias_into_final_norm(model, linear.weight, bias)
    return model.eval()


def _score_layer(model: PreTrainedModel) -> nn.Linear:
    # GPT2ForSequenceClassification.score, GPT2ForTokenClassification.classifier, Llama*.score, ...
    heads = [
        m
        for name, m in model.named_children()
        if name != model.base_model_prefix and isinstance(m, nn.Linear)
    ]
    if len(heads) != 1:
        raise CheckpointError(f"cannot find the classification layer of {type(model).__name__}")
    return heads[0]


def _bias_into_final_norm(model: PreTrainedModel, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Add d = pinv(W) b to the final norm's bias, so that score(h + d) = W h + b (see above)."""
    base = model.base_model
    norm = next(
        (
            getattr(base, n)
            for n in ("ln_f", "norm", "final_layernorm", "final_layer_norm")
            if hasattr(base, n)
        ),
        None,
    )
    if getattr(norm, "bias", None) is None:
        raise CheckpointError(
            f"the classifier's head has a bias, which {type(model).__name__} has no place for (its score "
            f"layer has no bias and the backbone's final norm has none to carry it); fine-tune with "
            f"model.init_args.head_bias: false to export it to transformers"
        )
    shift = torch.linalg.pinv(weight.double()) @ bias.double()  # (H,): minimum-norm d with W d = b
    off = (weight.double() @ shift - bias.double()).abs().max().item()
    if off > LOGITS_ATOL / 10:  # no such d: more labels than hidden units (W lacks full row rank)
        labels, hidden = weight.shape
        raise CheckpointError(
            f"the classifier's head has a bias and {labels} labels on {hidden} hidden units: "
            f"{type(model).__name__}'s score layer has no bias, and the final norm's bias can carry the "
            f"head's only for at most {hidden} labels (here it would be off by {off:.1e}); fine-tune with "
            f"model.init_args.head_bias: false to export it to transformers"
        )
    norm.bias.add_(shift.to(norm.bias.dtype))


def check_classifier_export(task, directory: Path, tokenizer) -> float:
    """Load `directory` as transformers' classifier and compare its logits with the task's; max |diff|.

    The probe is a right-padded batch of three rows of different lengths, as gptlab's data modules
    build them, and its longest row alone without a mask (as a pipeline runs one text: attention
    takes another path there); token logits are compared at real tokens only (padding is ignored
    by both).
    """
    kind = _head_task(task)
    if tokenizer.pad_token_id in tokenizer("", add_special_tokens=True)["input_ids"]:
        raise CheckpointError(
            f"the tokenizer adds its pad token ({tokenizer.pad_token!r}) to every text, and transformers' "
            f"classifiers skip pad tokens when they look for a text's end; pass --tokenizer with a pad "
            f"token of its own"
        )
    auto = AutoModelForSequenceClassification if kind == "sequence" else AutoModelForTokenClassification
    hf = auto.from_pretrained(directory, dtype=torch.float32, trust_remote_code=False).eval()
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(min(len(tokenizer), 512)) if i not in special])
    length = min(12, task.backbone.block_size or 12)
    lengths = [length, max(1, length - 5), 1]
    input_ids = torch.full((len(lengths), length), tokenizer.pad_token_id)  # (B, T), right-padded
    attention_mask = torch.zeros_like(input_ids)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = ordinary[(torch.arange(n) * 7 + row) % len(ordinary)]
        attention_mask[row, :n] = 1
    param = next(task.parameters())
    with torch.no_grad():
        batch = {"input_ids": input_ids.to(param.device), "attention_mask": attention_mask.to(param.device)}
        ours = task(batch).float().cpu()
        theirs = hf(input_ids=input_ids, attention_mask=attention_mask).logits.float()
        alone = hf(input_ids=input_ids[:1]).logits.float()  # (1, ...): the full row, no mask
    if kind == "token":
        ours, theirs = ours[attention_mask.bool()], theirs[attention_mask.bool()]  # (real tokens, C)
        alone = alone[0]  # (T, C): every token of the first row is real
    ours, theirs = torch.cat([ours, ours[: len(alone)]]), torch.cat([theirs, alone])
    return _logits_diff(ours, theirs, type(hf).__name__)


# ------------------------------------------------------------------------------ peft adapters
def merged_copy(task):
    """A copy of a peft task whose backbone has the adapters merged into its base weights (peft's merge)."""
    from gptlab.adapters import without_adapters

    copied = copy.deepcopy(task)
    copied.backbone = without_adapters(copied.backbone, merge=True)
    return copied.eval()


def peft_export_model(task, tokenizer):
    """The transformers form of a peft fine-tune's backbone: a PeftModel on the plain base.

    The base is the backbone without its adapters, converted like a plain export (our GPT ->
    GPT2LMHeadModel); peft's `get_peft_model` adds the same adapters there (same module names:
    ours are GPT-2's), and the trained adapter tensors are copied in. GPT-2 stores its linear layers
    transposed (Conv1D), which peft handles with `fan_in_fan_out`; the adapter tensors themselves
    have the same shapes either way.
    """
    from peft import get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    from gptlab.adapters import adapter_target, without_adapters

    backbone = task.backbone.eval()
    base = to_hf_model(without_adapters(backbone), tokenizer)
    config = copy.deepcopy(task.peft_tuner.peft_config["default"])
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    config.base_model_name_or_path = None  # get_peft_model takes the base's (none: built here)
    if isinstance(backbone, GPT) and hasattr(config, "fan_in_fan_out"):
        config.fan_in_fan_out = True
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = _hub_or_directory(task.base_source())
    theirs = model.base_model.model
    for name, layer in adapter_target(backbone).named_modules():
        if isinstance(layer, BaseTunerLayer):
            state = {k: v for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}
            peer = theirs.get_submodule(name)
            missing = set(state) - set(peer.state_dict())
            if missing:
                raise CheckpointError(f"cannot export {name}'s adapter: peft's lacks {sorted(missing)[:3]}")
            peer.load_state_dict(state, strict=False)
    return model.eval()


def _hub_or_directory(source: str) -> str | None:
    """The base's name for adapter_config.json: a Hugging Face directory or hub name, not a .ckpt."""
    return None if source.endswith(".ckpt") or Path(source).is_file() else source


def check_adapter_export(task, tokenizer, directory: Path) -> float:
    """`PeftModel.from_pretrained(base, directory)` against gptlab's logits; max |diff|."""
    from peft import PeftModel

    from gptlab.adapters import without_adapters

    backbone = task.backbone.eval()
    base = to_hf_model(without_adapters(backbone), tokenizer)
    hf = PeftModel.from_pretrained(base, directory).eval()
    length = min(16, backbone.block_size or 16)
    ids = torch.arange(length).remainder(backbone.vocab_size)[None]  # (1, T): a fixed probe
    with torch.no_grad():
        ours = backbone.logits(backbone(ids)).float()
        theirs = hf(input_ids=ids).logits.float()
    diff = (ours - theirs).abs().max().item()
    if diff > LOGITS_ATOL:
        raise CheckpointError(
            f"the exported adapter's logits (PeftModel on the base) differ from gptlab's by {diff:.2e} "
            f"(> {LOGITS_ATOL}); nothing written"
        )
    return diff


def _load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--tokenizer {source}: cannot load it ({err})") from None


def check_same_vocabulary(tok, source: str, own, own_dir: Path) -> None:
    """`--tokenizer` must map text to the ids the model was trained on: the run's own tokenizer's."""
    theirs, ours = tok.get_vocab(), own.get_vocab()
    if theirs == ours:
        return
    moved = next(
        ((t, i, theirs.get(t)) for t, i in sorted(ours.items(), key=lambda x: x[1]) if theirs.get(t) != i),
        None,
    )
    example = (
        f"{moved[0]!r} is id {moved[1]} there, {'absent' if moved[2] is None else f'id {moved[2]}'} here"
        if moved is not None
        else f"it has {len(theirs) - len(ours)} tokens more"
    )
    raise CheckpointError(
        f"--tokenizer {source} is not the tokenizer the model was trained with: its vocabulary differs from "
        f"the run's {own_dir} ({example}); leave --tokenizer out to ship the run's own"
    )


def _load_task(ckpt_path: Path):
    """The task of a gptlab checkpoint, and what gptlab recorded beside it (task class, block_size)."""
    checkpoint = load_checkpoint(ckpt_path)  # safe load; clear errors for missing / broken files
    task_path = checkpoint.get("gptlab", {}).get("task")
    if task_path is None or "hyper_parameters" not in checkpoint:
        raise CheckpointError(
            f"{ckpt_path} was not written by gptlab's `fit` (no task or hyperparameters inside); "
            f"export a checkpoint from logs/<experiment>/version_N/checkpoints/"
        )
    module, _, name = task_path.rpartition(".")
    try:
        task_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise CheckpointError(f"{ckpt_path}: its task {task_path} is not available in this gptlab") from None
    return task_class.load_from_checkpoint(ckpt_path, map_location="cpu"), checkpoint["gptlab"]


def main(argv: list[str]) -> Path:
    """`python main.py export --ckpt_path ... --out DIR` (options and --help from `export`'s signature)."""
    from jsonargparse import ArgumentParser, auto_cli

    from gptlab.config_check import one_line_parser_error

    class Parser(ArgumentParser):
        # One line (a ConfigError, printed by gptlab.cli.main) instead of usage + error.
        def error(self, message: str, ex: Exception | None = None):
            if not self.exit_on_error:
                return super().error(message, ex)
            raise ConfigError(one_line_parser_error(message, argv, "export")) from None

    return auto_cli(export, args=argv, as_positional=False, parser_class=Parser)
