"""Reading checkpoints safely: single files, sharded FSDP folders, and a backbone's pretrained weights.

Every checkpoint a command names is read here with `weights_only=True` (docs/design.md, safe
loading): `load_checkpoint` (a `.ckpt` or a sharded folder, consolidated into the single-file
layout), `verify_checkpoint` (the same check before Lightning reads the file),
`load_backbone_weights` (`init_from`). A sharded folder's pickled metadata is read with an
allowlist (`verify_sharded_checkpoint`) before torch.distributed.checkpoint unpickles it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import io
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptlab import adapters
from gptlab._lightning import METADATA_FILENAME, load_distributed_checkpoint
from gptlab.errors import CheckpointError
from gptlab.models import GPT, Backbone, HFBackbone
from gptlab.models.convert import from_gpt2_state_dict
from gptlab.models.hf import weights_failure


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a folder checkpoint written by FSDP with `save_distributed_checkpoint=True`."""
    path = Path(path)
    return path.is_dir() and (path / METADATA_FILENAME).is_file()


# What torch.distributed.checkpoint pickles into a folder's `.metadata`: its own dataclasses and
# enums, torch sizes, dtypes and layouts, and paths.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_DCP_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
_DCP_METADATA = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` file, refusing every global outside `_DCP_*` (pickle docs,
    "Restricting Globals"): torch reads that file with a plain `pickle.load`."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        elif (module, name) in _DCP_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not something a sharded checkpoint holds")


def verify_sharded_checkpoint(path: str | Path) -> None:
    """Refuse a sharded checkpoint folder unless it loads without running code (CheckpointError).

    torch.distributed.checkpoint unpickles the folder's `.metadata` with a plain `pickle.load`
    and its non-tensor entries (optimizer hyperparameters, ...) with `torch.load(weights_only=False)`,
    so a crafted folder would run code while loading. Here the metadata is read with an allowlist
    of the classes DCP writes, and every non-tensor entry and Lightning's `meta.pt` with
    `weights_only=True`, before DCP or Lightning reads anything. Tensors DCP loads weights-only itself.
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    path = Path(path)
    what = path / _DCP_METADATA
    try:
        # Without it DCP reads nothing (and fails on its own, named by consolidate_checkpoint).
        if what.is_file():
            with open(what, "rb") as file:
                metadata = _MetadataUnpickler(file).load()
            items = metadata.state_dict_metadata
            for index, info in metadata.storage_data.items():
                if not isinstance(items.get(index.fqn), BytesStorageMetadata):
                    continue
                what = path / info.relative_path
                if getattr(info, "transform_descriptors", None):
                    why = f"entry {index.fqn} is stored with transforms gptlab never writes"
                    raise pickle.UnpicklingError(why)
                with open(what, "rb") as file:
                    file.seek(info.offset)
                    torch.load(io.BytesIO(file.read(info.length)), map_location="cpu", weights_only=True)
        what = path / METADATA_FILENAME
        torch.load(what, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means: do not let DCP unpickle it
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        raise CheckpointError(
            f"sharded checkpoint {path}: {what.name} does not load safely ({reason}); refusing to read "
            f"the folder. Use a checkpoint written by gptlab, from a source you trust"
        ) from None


def consolidate_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a sharded checkpoint folder into one single-device Lightning checkpoint dict (in CPU memory).

    The result has the layout of a normal `.ckpt` (`state_dict`, `hyper_parameters`, `global_step`,
    ...) and loads without any process group. Optimizer states are left out: FSDP saves them keyed
    by parameter name, which a plain optimizer cannot load; resume a sharded run with the FSDP strategy.
    """
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise CheckpointError(
            f"checkpoint {path} is not a sharded checkpoint folder (no {METADATA_FILENAME} inside); "
            f"pass a .ckpt file or a folder written by the FSDP strategy"
        )
    from torch.distributed.checkpoint.api import CheckpointException

    verify_sharded_checkpoint(path)
    try:
        checkpoint = load_distributed_checkpoint(path)
    # A missing shard, a truncated file, a foreign folder; DCP's own error is a BaseException.
    except (Exception, CheckpointException) as err:
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        raise CheckpointError(
            f"sharded checkpoint {path} cannot be read ({reason}); "
            f"it may be incomplete (a rank failed while saving): use another checkpoint of the run"
        ) from None
    for key in [k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)]:
        del checkpoint[key]
    checkpoint.pop("optimizer_states", None)
    return checkpoint


def save_consolidated(path: str | Path, output: str | Path) -> Path:
    """Write the single-file form of a sharded checkpoint folder to `output`."""
    output = Path(output)
    torch.save(consolidate_checkpoint(path), output)
    return output


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """Load a gptlab checkpoint safely (`weights_only=True`: no code runs while unpickling).

    A sharded FSDP checkpoint (a folder) is consolidated into the same single-file layout.
    `mmap=True` maps the tensors instead of reading them: a cheap way to check a large file.
    Raises CheckpointError (one line: the file, why, what to do) for a missing, truncated or
    unsafe file.
    """
    path = Path(path)
    if is_sharded_checkpoint(path):
        return consolidate_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist: check the path (runs live in logs/<experiment>/)"
        )
    if path.stat().st_size == 0:  # torch says only "EOFError" (no message) for it
        raise CheckpointError(
            f"checkpoint {path} is an empty file (0 bytes): a save that never happened or a failed copy; "
            f"use another checkpoint of the run"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "GLOBAL" not in str(err):
            # Not a refused class or function but an opcode the weights-only unpickler does not
            # read: random bytes do that, and so could a payload; either way nothing was loaded.
            lines = [line.strip() for line in str(err).splitlines() if "Unsupported" in line]
            reason = (lines or ["bad pickle"])[0]
            raise CheckpointError(
                f"checkpoint {path} could not be read by the weights-only loader ({reason}): "
                f"it is corrupt, or holds something other than tensors and plain values; it was not loaded: "
                f"use another checkpoint of the run"
            ) from None
        # torch's weights-only unpickler refused a global (a class or function to call): the file
        # holds Python objects, and building them could run any code (CVE-2025-32434 is why
        # torch >= 2.10 is required). Name the object, never fall back to weights_only=False.
        lines = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        raise CheckpointError(
            f"checkpoint {path} is not a weights-only checkpoint ({(lines or ['unsafe pickle'])[0][:160]}) "
            f"and was not loaded, since unpickling it could run code: only load checkpoints you trust, "
            f"and re-save this one with weights_only-safe contents (tensors, plain dicts / lists, "
            f"numbers, strings)"
        ) from None
    except Exception as err:  # truncated file, not a torch file, ...
        reason = (str(err).splitlines() or [""])[0].split(". ")[0][:200]  # torch's first sentence says it
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely ({type(err).__name__}: {reason}); "
            f"it may be truncated or not a gptlab checkpoint: use another checkpoint of the run"
        ) from None


# Backbone settings that make a model run code shipped with its weights (transformers' auto_map).
RUN_CODE_KEYS = ("trust_remote_code",)


def records_remote_code(value: object) -> bool:
    """True when a recorded config (nested dicts / lists / Namespaces) turns on a run-code setting."""
    if hasattr(value, "as_dict"):  # a jsonargparse Namespace
        value = value.as_dict()
    if isinstance(value, dict):
        return any(
            (key in RUN_CODE_KEYS and str(item).lower() in ("true", "yes", "1")) or records_remote_code(item)
            for key, item in value.items()
        )
    if isinstance(value, list | tuple):
        return any(records_remote_code(item) for item in value)
    return False


def verify_checkpoint(path: str | Path) -> None:
    """Fail with a CheckpointError unless `path` loads with `weights_only=True` (cheap: memory-mapped).

    The CLI calls it on every checkpoint a command names, before Lightning or anything else reads
    the file, so that a crafted pickle is refused by gptlab and never unpickled by anyone.
    """
    if is_sharded_checkpoint(path):
        verify_sharded_checkpoint(path)
    else:
        load_checkpoint(path, mmap=True)


def load_backbone_weights(backbone: Backbone, source: str | Path) -> None:
    """Copy pretrained weights into `backbone` from a gptlab `.ckpt` or a Hugging Face model directory."""
    source = Path(source)
    if source.is_dir():
        load_hf_weights(backbone, source)
        return
    checkpoint = load_checkpoint(source)
    if checkpoint.get("gptlab", {}).get("peft"):
        raise CheckpointError(
            f"init_from={source} is a peft checkpoint (adapters and head only, no base weights): export "
            f"it merged (`main.py export --ckpt_path {source} --out DIR --merged true`) and init_from DIR"
        )
    state = checkpoint.get("state_dict", {})
    weights = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    if not weights:
        raise CheckpointError(f"init_from={source}: the checkpoint holds no backbone weights")
    # Plain names also when peft adapters wrap some layers (gptlab.adapters).
    own = adapters.base_state_dict(backbone)
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in weights.items()
        if k in own and v.shape != own[k].shape
    ]
    if shapes:
        # load_state_dict would raise a RuntimeError listing every tensor (a wall of text).
        raise CheckpointError(
            f"init_from={source}: its backbone does not match the configured one ({len(shapes)} tensors "
            f"differ in shape, e.g. {'; '.join(shapes[:2])} (checkpoint vs model)); use the same backbone "
            f"config as the pretraining run, or leave model.init_args.backbone out to take the checkpoint's"
        )
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"init_from={source}: backbone does not match the checkpoint (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}); use the same backbone config as the pretraining run"
        )
    adapters.load_base_state_dict(backbone, weights)


def require_lightning_checkpoint(ckpt: str, checkpoint: Any) -> None:
    """`--ckpt_path` resumes or evaluates what Lightning wrote; a bare state dict has no trainer state."""
    if isinstance(checkpoint, dict) and {"state_dict", "pytorch-lightning_version"} <= set(checkpoint):
        return
    keys = sorted(map(str, checkpoint))[:4] if isinstance(checkpoint, dict) else []
    raise CheckpointError(
        f"--ckpt_path {ckpt} is not a checkpoint written by Lightning (a {type(checkpoint).__name__} "
        f"with keys {keys}, e.g. a plain torch.save(state_dict)): --ckpt_path takes a run's checkpoint, "
        f"logs/<experiment>/version_N/checkpoints/*.ckpt; start from bare weights by loading them into "
        f"the backbone in Python"
    )


def load_hf_weights(backbone: torch.nn.Module, directory: str | Path) -> None:
    """Copy the weights of a Hugging Face model directory into an existing backbone, in place.

    For our GPT the directory must hold a GPT-2 model of the same shape (e.g. one that
    `main.py export` wrote); for an HFBackbone, any model of the same architecture.
    """
    from transformers import AutoModelForCausalLM

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json)")
    # Custom model code in the directory runs only if the backbone itself was built trusting it.
    trust = bool(getattr(backbone, "trust_remote_code", False))

    def load(**extra: Any) -> Any:
        return AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, trust_remote_code=trust, **extra
        )

    try:
        hf = load()
    except (pickle.UnpicklingError, RuntimeError) as err:
        said = weights_failure(
            f"init_from={directory}", directory, err, lambda **k: load(output_loading_info=True, **k)[1]
        )
        if said is None:
            raise
        raise CheckpointError(said) from None
    except ValueError as err:
        if "custom code" not in str(err):
            raise
        raise CheckpointError(
            f"{directory} holds a model with its own code (auto_map in config.json), which gptlab does "
            f"not run unless the backbone sets trust_remote_code: true; do that only for code you trust"
        ) from None
    if isinstance(backbone, HFBackbone):
        target, source = backbone.model, hf.state_dict()
    elif isinstance(backbone, GPT):
        try:
            source = from_gpt2_state_dict(hf.state_dict(), hf.config).state_dict()
        except (ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{directory}: cannot load into gptlab's GPT: {err}") from None
        target = backbone
        if not backbone.config.bias:
            # A bias-free GPT exports zero biases; anything else would be silently dropped.
            own = adapters.base_state_dict(target)
            extra = {k: v for k, v in source.items() if k not in own}
            if any(v.abs().max() > 0 for v in extra.values()):
                raise CheckpointError(f"{directory}: the model has non-zero biases; set the GPT's bias: true")
            source = {k: v for k, v in source.items() if k in own}
    else:
        raise CheckpointError(f"cannot load {directory} into a {type(backbone).__name__}")
    # Base weights under their plain names, also when peft adapters wrap some layers.
    expected = {k: tuple(v.shape) for k, v in adapters.base_state_dict(target).items()}
    found = {k: tuple(v.shape) for k, v in source.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
        raise CheckpointError(
            f"{directory}: weights do not match the configured backbone (first differences: {diff}); "
            f"configure the backbone like the saved model (see its config.json)"
        )
    adapters.load_base_state_dict(target, source)


def consolidated_copy(ckpt: str | Path, resuming: bool) -> tuple[tempfile.TemporaryDirectory, Path]:
    """A sharded FSDP checkpoint as one file in a new temporary folder (kept while the folder
    object lives), for evaluation under a strategy that cannot read folders; `resuming` refuses."""
    if resuming:
        raise CheckpointError(
            f"--ckpt_path {ckpt} is a sharded FSDP checkpoint: resume it with the FSDP strategy "
            f"(--config configs/trainer/fsdp.yaml), or start a new run from its weights with "
            f"--model.init_args.init_from {ckpt}"
        )
    folder = tempfile.TemporaryDirectory(prefix="gptlab-consolidated-")
    return folder, save_consolidated(ckpt, Path(folder.name) / "model.ckpt")
