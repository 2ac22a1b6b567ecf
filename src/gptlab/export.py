"""`python main.py export`: a gptlab checkpoint -> a Hugging Face model directory.

    <run>/checkpoints/best.ckpt --+--> backbone --> GPT2LMHeadModel (our GPT; gptlab.models.convert)
                                  |                 or the HFBackbone's own model
    <run>/tokenizer/ -------------+--> tokenizer
                                  v
    OUT/  config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json ...

A peft fine-tune (adapters on a frozen base, gptlab.adapters) exports its adapter in peft's own
format (`adapter_config.json`, `adapter_model.safetensors`): `PeftModel.from_pretrained(base, OUT)`
loads it on the transformers form of its base; `--merged true` writes the plain model with the
adapter merged into the base weights instead. Both are checked like a plain export.

The directory loads with `AutoModelForCausalLM.from_pretrained(OUT)` and
`AutoTokenizer.from_pretrained(OUT)` and gives gptlab's logits (checked before anything is
written, tolerance 1e-5). gptlab starts from it too: `init_from: OUT` (and `tokenizer: OUT`).
It is written into a temporary directory and renamed into place, so a failed export leaves
nothing behind and an existing OUT is never touched without `--overwrite true`.
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
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, PreTrainedModel

from gptlab.errors import CheckpointError, ConfigError
from gptlab.models import GPT, HFBackbone
from gptlab.models.convert import gpt2_config, gpt_to_gpt2_state_dict

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
        overwrite: replace an existing non-empty `out` that holds an earlier export (a flat model
            directory with config.json); never a run folder, a logs root or the checkpoint's folder.
        merged: for a peft checkpoint, write the plain model with the adapter merged into its base
            weights instead of the adapter alone (peft's format). Other checkpoints: no effect.
    """
    from gptlab.cli import run_dir_of  # not at import time: cli.py imports this module lazily too

    out_dir = Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not overwrite:
            raise ConfigError(
                f"--out {out_dir} already exists and is not empty: give --out a new directory, or pass "
                f"--overwrite true to replace an earlier export there"
            )
        check_overwritable(out_dir, Path(ckpt_path))
    task = _load_task(Path(ckpt_path))
    source = tokenizer
    if source is None:
        run = run_dir_of(ckpt_path)
        candidate = run / "tokenizer" if run is not None else None
        if candidate is None or not candidate.is_dir():
            raise CheckpointError(
                f"{ckpt_path}: no tokenizer beside this checkpoint (expected "
                f"{candidate or '<run>/tokenizer'}); pass --tokenizer DIR with the tokenizer the model "
                f"was trained with"
            )
        source = str(candidate)
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--tokenizer {source}: cannot load it ({err})") from None
    backbone = task.backbone.eval()
    if len(tok) > backbone.vocab_size:
        raise CheckpointError(
            f"the tokenizer {source} has {len(tok)} tokens but the model only {backbone.vocab_size}: "
            f"pass the tokenizer the model was trained with (--tokenizer)"
        )

    peft = getattr(task, "peft_config", None) is not None
    model = peft_export_model(task, tok, merged) if peft else to_hf_model(backbone, tok)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    # mkdtemp makes the directory private (0700); the export is a normal directory (umask applies).
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    try:
        model.save_pretrained(tmp)  # safetensors; tied lm_head stored once
        tok.save_pretrained(tmp)
        info = {"checkpoint": str(ckpt_path), "task": type(task).__name__, "tokenizer": str(source)}
        if peft:
            info["peft"] = {"base": task.base_source(), "merged": merged}
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n")
        diff = check_adapter_export(task, tok, tmp) if peft and not merged else check_export(backbone, tmp)
        for path in tmp.iterdir():  # safetensors' writer leaves 0600; files of an export are shared
            path.chmod(0o666 & ~umask)
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "the adapter of " if peft and not merged else "merged " if peft else ""
    match = f"transformers logits match gptlab's: max |diff| {diff:.1e}"
    print(f"exported {what}{ckpt_path} to {out_dir} ({match})")
    return out_dir


def check_overwritable(out_dir: Path, ckpt_path: Path) -> None:
    """`--overwrite` replaces an earlier export, nothing else: never the checkpoint being exported,
    a run folder or a logs root (`--out logs` would otherwise delete every run)."""
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
    entries = list(out_dir.iterdir())
    folders = [p.name for p in entries if p.is_dir()]
    if not any((out_dir / name).is_file() for name in (EXPORT_INFO, "config.json")) or folders:
        reason = f"it holds folders ({', '.join(sorted(folders)[:3])})" if folders else "no config.json"
        raise ConfigError(
            f"--out {out_dir} does not look like a model directory written by export ({reason}); "
            f"--overwrite only replaces an earlier export, and would {what}"
        )


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
    diff = (ours - theirs).abs().max().item()
    if diff > LOGITS_ATOL:
        raise CheckpointError(
            f"the exported model's logits differ from gptlab's by {diff:.2e} (> {LOGITS_ATOL}); "
            f"nothing written"
        )
    return diff


# ------------------------------------------------------------------------------ peft adapters
def peft_export_model(task, tokenizer, merged: bool):
    """The transformers form of a peft fine-tune's backbone: a PeftModel on the plain base, or merged.

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
    return model.merge_and_unload().eval() if merged else model.eval()


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


def _load_task(ckpt_path: Path):
    from gptlab.tasks.base import load_checkpoint

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
    return task_class.load_from_checkpoint(ckpt_path, map_location="cpu")


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
