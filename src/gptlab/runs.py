"""Run folders: what a run directory holds and how commands find, create and clean them up.

    logs/<experiment>/version_N/       claimed atomically by `claim_version`
        config.yaml                    the run's config (`is_run_config`)
        .fit.lock                      held while a `fit` trains the run (`hold_run`)
        checkpoints/*.ckpt             `run_dir_of(ckpt)` is the run; `latest_checkpoint` resumes
        tokenizer/                     `pretrained_tokenizer`
        reports/                       test reports
        predictions/predictions.<ext>  what `predict` wrote (`predictions_path`)

Also what a run (or a Hugging Face model directory) given as `init_from` records: its backbone
config (`pretrained_backbone`), hyperparameters (`checkpoint_hparams`) and tokenizer.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Trainer

from gptlab.checkpointing import resume_checkpoint
from gptlab.data.cache import ClaimHeld, claim
from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import is_sharded_checkpoint, load_checkpoint, verify_checkpoint


def run_dir_of(ckpt_path: str | Path | None) -> Path | None:
    """The run directory of a checkpoint written by gptlab (`<run>/checkpoints/<name>.ckpt`)."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def latest_checkpoint(logs: Path, experiment: str, name: str = "last.ckpt") -> Path | None:
    """What `fit --ckpt_path last` resumes: the newest *complete* checkpoint of the experiment's latest
    run, `<name>` unless it is truncated or missing (see gptlab.checkpointing.resume_checkpoint)."""
    return resume_checkpoint(logs, experiment, name)


# config.json keys that describe the file, not the model (left out when rebuilding the config).
_HF_META_KEYS = (
    "architectures",
    "transformers_version",
    "model_type",
    "_name_or_path",
    "torch_dtype",
    "dtype",
)


def checkpoint_hparams(path: str | Path) -> dict[str, Any]:
    """The hyperparameters a gptlab checkpoint was built with (its `hyper_parameters`)."""
    return load_checkpoint(path, mmap=True).get("hyper_parameters", {}) or {}  # tensors not read


def _remote_code_message(source: str | Path) -> str:
    return (
        f"init_from={source}: its config.json has auto_map, i.e. the model runs code shipped in that "
        f"directory, which gptlab does not execute unless asked; if you trust it, set "
        f"model.init_args.backbone to {{class_path: gptlab.models.HFBackbone, init_args: "
        f"{{name_or_path: {source}, trust_remote_code: true}}}}"
    )


def hf_directory_config(source: str | Path) -> dict[str, Any]:
    """The config.json of a Hugging Face model directory given as `init_from`, checked: valid JSON
    with a model_type, and weights beside it (what from_pretrained would need, said in one line)."""
    source = Path(source)
    config_file = source / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"init_from={source}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"init_from={source}: {config_file} line {err.lineno} column {err.colno} is not valid JSON "
            f"({err.msg}); re-save the model with save_pretrained (or fix the file)"
        ) from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ConfigError(
            f"init_from={source}: {config_file} names no model_type, so transformers cannot tell which "
            f"architecture it is; re-save the model with save_pretrained"
        )
    weights = [
        p for p in source.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")
    ]
    if not weights:
        raise ConfigError(
            f"init_from={source}: no weights in the directory (expected model.safetensors or "
            f"pytorch_model.bin beside config.json); copy them there, or give the model's complete directory"
        )
    return config


def pretrained_backbone(source: str | Path) -> dict[str, Any]:
    """The backbone config (class_path + init_args) of a gptlab checkpoint or a Hugging Face directory."""
    source = Path(source)
    if source.is_dir():
        config = hf_directory_config(source)
        if "auto_map" in config:
            # The model's code lives in the directory (config.json's auto_map): running it is
            # trust_remote_code, which gptlab never turns on by itself.
            raise ConfigError(_remote_code_message(source))
        overrides = {k: v for k, v in config.items() if k not in _HF_META_KEYS}
        # Random weights from the config (offline, like any HFBackbone), then init_from loads the
        # weights at fit start: the fine-tuned checkpoint stays loadable without this directory.
        return {
            "class_path": "gptlab.models.HFBackbone",
            "init_args": {"model_type": config["model_type"], "config_overrides": overrides},
        }
    backbone = checkpoint_hparams(source).get("backbone")
    if not isinstance(backbone, dict) or "class_path" not in backbone:
        raise ConfigError(
            f"{source} does not record its backbone config (it was not written by `main.py fit`): "
            f"give model.init_args.backbone, the same as the pretraining run's"
        )
    return backbone


def check_init_from(source: str | Path, trust_remote_code: bool = False) -> None:
    """`init_from` must be a gptlab checkpoint that loads safely, or a Hugging Face model directory
    (whose own model code, if any, runs only when the configured backbone sets trust_remote_code).
    """
    path = Path(source)
    if path.is_dir() and not is_sharded_checkpoint(path):
        if not trust_remote_code and "auto_map" in hf_directory_config(path):
            raise ConfigError(_remote_code_message(source))
        return
    if not path.exists():
        raise CheckpointError(
            f"init_from={source} does not exist: give a gptlab checkpoint "
            f"(logs/<experiment>/version_N/checkpoints/*.ckpt) or a Hugging Face model directory"
        )
    verify_checkpoint(path)


# Keys of a run's config that name the weights it starts from (a peft run's base among them).
_BASE_KEYS = ("init_from", "name_or_path")


def bases_of_runs(logs: Path) -> dict[Path, Path]:
    """{resolved base path: the run config naming it} for every run under the logs root `logs`.

    What a run reads its weights from (`init_from`, an HFBackbone's `name_or_path`, hence a peft
    run's base): replacing it would silently change what those runs' checkpoints mean. Relative
    paths are taken from the working directory, as `fit` took them.
    """
    found: dict[Path, Path] = {}

    def walk(node: Any, config: Path) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _BASE_KEYS and isinstance(value, str) and value:
                    found.setdefault(Path(value).expanduser().resolve(), config)
                walk(value, config)
        elif isinstance(node, list):
            for value in node:
                walk(value, config)

    for config in sorted(Path(logs).glob("*/version_*/config*.yaml")):
        try:
            walk(yaml.safe_load(config.read_text()), config)
        except (OSError, yaml.YAMLError):
            continue  # an unreadable record names no base
    return found


def pretrained_tokenizer(source: str | Path) -> Path | None:
    """The tokenizer that goes with a gptlab checkpoint (`<run>/tokenizer`) or a Hugging Face directory."""
    source = Path(source)
    if source.is_dir():
        found = any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return source if found else None
    run = run_dir_of(source)
    return run / "tokenizer" if run is not None and (run / "tokenizer").is_dir() else None


def backbone_tokenizer(name_or_path: str) -> str:
    """The tokenizer of a pretrained HFBackbone's `name_or_path`: the directory when it holds
    tokenizer files, a hub name as it is; a ConfigError for a directory without them."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path  # a hub name: transformers finds its tokenizer (or says why not)
    tokenizer = pretrained_tokenizer(path) if path.is_dir() else None
    if tokenizer is None:
        raise ConfigError(
            f"HFBackbone name_or_path={name_or_path}: no tokenizer files in it (tokenizer.json or "
            f"tokenizer_config.json), and a tokenizer recipe would train a new vocabulary that the "
            f"pretrained embeddings do not know: set data.init_args.tokenizer to the model's tokenizer"
        )
    return str(tokenizer)


def is_run_config(path: str | Path) -> bool:
    """A config file that `fit` wrote into a run directory (beside `checkpoints/`): a record of a run."""
    path = Path(path)
    return (path.parent / "checkpoints").is_dir() or (path.parent / "hparams.yaml").is_file()


def check_writable_dir(directory: Path, what: str, fix: str) -> None:
    """Fail unless `directory` exists and is writable, or can be created (its nearest existing
    ancestor is a writable directory); checked before training so a run cannot die at its first save.
    `what` names the setting (e.g. "--logs"), `fix` says what to do (e.g. "set --logs to ...").
    """
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(
            f"{what} {directory}: cannot create it, {existing} is a file, not a directory; {fix}"
        )
    # os.access is the question the kernel answers on write (root passes it, even on 0o555).
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{what} {directory}: {existing} is not writable by this user; {fix} (or fix its permissions)"
        )


# Set by rank 0 for the processes Lightning launches (they inherit the environment): the run
# directory it claimed, so that every rank logs into the same version_N.
CLAIMED_RUN_ENV = "GPTLAB_CLAIMED_RUN"


def claim_version(root: Path) -> int:
    """Create `root/version_N` for the next free N and return N; atomic across processes.

    Lightning's loggers list `root` and take the highest version + 1, so two runs started at the
    same moment pick the same N and share one directory. `mkdir` without exist_ok is the
    create-exclusive step: whoever creates the directory owns it, the other tries N + 1.
    """
    root.mkdir(parents=True, exist_ok=True)
    taken = [p.name.split("_", 1)[1] for p in root.glob("version_*") if p.is_dir()]
    version = max((int(t) for t in taken if t.isdigit()), default=-1) + 1
    while True:
        try:
            (root / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


RUN_LOCK = ".fit.lock"


@contextlib.contextmanager
def hold_run(run: Path) -> Iterator[None]:
    """Hold `run` for one `fit` while the body runs; a second `fit` of the same run is refused.

    Two resumes of one run would both write its `last.ckpt`, each over the other's steps. The
    lock is the data cache's claim file (gptlab.data.cache.claim, not waiting): a holder that
    crashed leaves it behind, and it is taken over when its pid is dead on this host (or, from
    another host, when its heartbeat stopped), or when it was copied with the run folder.
    """
    try:
        with claim(run / RUN_LOCK, what=f"the run {run}", wait=False):
            yield
    except ClaimHeld as held:
        raise ConfigError(
            f"--ckpt_path: the run {run} is being trained by {held.holder} (lock {held.path}); "
            f"two fits of one run would overwrite each other's checkpoints: wait for it to finish, "
            f"or start a new run (without --ckpt_path)"
        ) from None


def remove_empty_parents(directory: Path, stop: Path) -> None:
    """Remove `directory` and its parents up to (not including) `stop` while they are empty."""
    while directory != stop and stop in directory.parents and directory.is_dir():
        try:
            directory.rmdir()  # only succeeds on an empty directory
        except OSError:
            return
        directory = directory.parent


def remove_traces(log_dir: Path, before: set[Path] | None) -> None:
    """Undo what a command that failed before training wrote into `log_dir` (logger files, config.yaml).

    `before` lists the paths that existed when the command started (None: `log_dir` did not exist,
    the command created it). Nothing that existed is touched, and once a checkpoint was written
    (the run trained) everything stays.
    """
    if not log_dir.exists():
        return
    new = [p for p in log_dir.rglob("*") if before is None or p not in before]
    if any(p.suffix == ".ckpt" for p in new):
        return
    if before is None:
        shutil.rmtree(log_dir, ignore_errors=True)
        return
    for path in sorted(new, key=lambda p: len(p.parts), reverse=True):  # files before their folders
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)


def task_class_of(class_path: str) -> type | None:
    """The class a `module.Name` path names, or None when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def predictions_path(trainer: Trainer, name: str) -> Path:
    """Where `predict` writes: `<run>/predictions/<name>` (every task, one layout); one file per
    process when several predict (the rank in the name: `predictions.rank1.jsonl`)."""
    directory = Path(trainer.log_dir or trainer.default_root_dir) / "predictions"
    if trainer.world_size > 1:
        stem, _, suffix = name.rpartition(".")
        name = f"{stem}.rank{trainer.global_rank}.{suffix}"
    return directory / name
