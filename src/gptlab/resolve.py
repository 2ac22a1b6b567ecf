"""What a command runs: the settings a config leaves to checkpoints and run folders, decided in one place.

    argv --parse--> config (plain dicts) --+
    --ckpt_path  --read once--> CheckpointRecord --+--> resolve() --> Resolution: backbone, tokenizer,
    init_from    --read once--> InitFromRecord ----+                 label names, block_size, each with
    the user's own options ----> UserInput --------+                 its reason, or one ConfigError

`resolve` is a plain function of plain values: no Lightning object, no file read. The records are
read before it (`read_checkpoint`, `read_init_from`: each checkpoint opened once), the CLI applies
the result to its config (gptlab.cli). The rules, in the order `resolve` applies them, are listed
in docs/design.md ("How a command is resolved"), each with its test in tests/test_resolve.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptlab.argv import EVAL_SUBCOMMANDS, config_files, tokenizer_option, user_asks_for_remote_code
from gptlab.checkpointing import require_complete
from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import (
    is_sharded_checkpoint,
    load_checkpoint,
    records_remote_code,
    require_lightning_checkpoint,
    verify_checkpoint,
)
from gptlab.runs import (
    check_init_from,
    is_run_config,
    pretrained_backbone,
    pretrained_tokenizer,
    run_dir_of,
    task_class_of,
)


# --------------------------------------------------------------------------- records
@dataclass(frozen=True)
class CheckpointRecord:
    """What `--ckpt_path` and its run folder record, read once (`read_checkpoint`)."""

    path: str
    """The checkpoint as given."""
    sharded: bool = False
    """A folder of shards: its hyperparameters are not read while resolving."""
    hparams: dict[str, Any] = field(default_factory=dict)
    """Its hyperparameters (the task's init arguments); empty for a sharded folder."""
    task: str | None = None
    """The class path of the task that wrote it."""
    run: Path | None = None
    """Its run folder (`<run>/checkpoints/<name>.ckpt`), None for a checkpoint outside one."""
    run_tokenizer: Path | None = None
    """`<run>/tokenizer` when the run saved one."""
    run_config: Path | None = None
    """`<run>/config.yaml` when the run recorded one."""


def read_checkpoint(path: str) -> CheckpointRecord:
    """Open `--ckpt_path` once: complete, loads with weights_only=True, written by Lightning."""
    require_complete(path)  # a cut-off or empty file is named as such
    checkpoint: dict[str, Any] = {}
    if is_sharded_checkpoint(path):
        verify_checkpoint(path)  # before the FSDP strategy hands the folder to DCP
    else:
        # One memory-mapped weights_only load: refuses a crafted pickle, names the task.
        checkpoint = load_checkpoint(path, mmap=True)
        require_lightning_checkpoint(path, checkpoint)
    hparams = checkpoint.get("hyper_parameters") or {}
    run = run_dir_of(path)
    return CheckpointRecord(
        path=str(path),
        sharded=not checkpoint,
        hparams=hparams,
        task=checkpoint.get("gptlab", {}).get("task") or hparams.get("_class_path"),
        run=run,
        run_tokenizer=run / "tokenizer" if run is not None and (run / "tokenizer").is_dir() else None,
        run_config=run / "config.yaml" if run is not None and (run / "config.yaml").is_file() else None,
    )


@dataclass(frozen=True)
class InitFromRecord:
    """What `model.init_args.init_from` records (`read_init_from`)."""

    source: str
    backbone: dict[str, Any] | None = None
    """Its backbone config (class_path + init_args); read only when the config gives none."""
    tokenizer: Path | None = None
    """Its tokenizer (`<run>/tokenizer`, or a Hugging Face directory's tokenizer files)."""


def read_init_from(
    source: str, subcommand: str | None, need_backbone: bool, trust_remote_code: bool
) -> InitFromRecord:
    """Check `init_from` (under fit, the command it initialises) and read what the config lacks.

    A checkpoint file is opened once, weights_only (the check of `check_init_from` for a file).
    """
    hparams = None
    if Path(source).is_file():
        if subcommand == "fit" or need_backbone:
            hparams = load_checkpoint(source, mmap=True).get("hyper_parameters") or {}
    elif subcommand == "fit":
        check_init_from(source, trust_remote_code=trust_remote_code)
    return InitFromRecord(
        source=source,
        backbone=pretrained_backbone(source, hparams=hparams) if need_backbone else None,
        tokenizer=pretrained_tokenizer(source),
    )


@dataclass(frozen=True)
class UserInput:
    """What the user's own command line and config files ask for (never a run's record)."""

    tokenizer_option: str | None = None
    """The command-line option that chose a tokenizer (e.g. `--data.init_args.tokenizer`)."""
    asks_remote_code: bool = False
    """The user's own config or command line turns on trust_remote_code."""
    run_configs: tuple[str, ...] = ()
    """Config files given that are a run folder's config.yaml (records, not the user's choice)."""

    @classmethod
    def of(cls, argv: list[str]) -> UserInput:
        """What the command line `argv` (and the config files it names) asks for."""
        return cls(
            tokenizer_option=tokenizer_option(argv),
            asks_remote_code=user_asks_for_remote_code(argv),
            run_configs=tuple(c for c in config_files(argv) if is_run_config(c)),
        )


# --------------------------------------------------------------------------- checks on a checkpoint
def check_task(ckpt: CheckpointRecord, configured: str | None) -> None:
    """A checkpoint of another task than the configured model is refused, naming both.

    Otherwise Lightning would rebuild the checkpoint's task over the config (and fail later on
    whatever the data module lacks) or load mismatching weights.
    """
    if not configured or not ckpt.task:
        return
    ours, theirs = task_class_of(configured), task_class_of(ckpt.task)
    if ours is not None and theirs is not None and ours is not theirs:
        raise CheckpointError(
            f"--ckpt_path {ckpt.path} is a checkpoint of {theirs.__module__}.{theirs.__name__}, but the "
            f"config's model is {ours.__module__}.{ours.__name__}: use that run's own config (drop "
            f"--config; <run>/config.yaml is found beside the checkpoint) or a checkpoint of this task"
        )


def checkpoint_model(ckpt: CheckpointRecord) -> dict[str, Any]:
    """The model config that LightningCLI puts over the parsed one (its `_parse_ckpt_path`): the
    checkpoint's hyperparameters, from the record instead of a second read."""
    hparams = {k: v for k, v in ckpt.hparams.items() if k != "_instantiator"}
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return hparams


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """{dotted key: value} of the plain values in nested dicts (lists compared whole)."""
    if not isinstance(value, dict):
        return {prefix: list(value) if isinstance(value, tuple) else value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_leaves(item, f"{prefix}.{key}"))
    return out


def check_overrides(ckpt: CheckpointRecord, model: dict[str, Any], subcommand: str | None = None) -> None:
    """Model values of the config / command line that differ from the checkpoint's, named.

    LightningCLI puts the checkpoint's hyperparameters over the parsed config: a config other than
    the run's own would be overwritten without a word. A resume (`fit`) restores the checkpoint's
    weights, optimizer and schedule, so it is checked whatever the config, the run's own included:
    a changed model option (a new lr) would be ignored or fail to load.
    """
    ours = _leaves(model, "model.init_args")
    theirs = _leaves({k: v for k, v in ckpt.hparams.items() if not k.startswith("_")}, "model.init_args")
    ours.pop("model.init_args.init_from", None)  # only initialises a new run: a resume warns (rule 1)
    differ = [
        (k, ours[k], theirs[k]) for k in ours if k in theirs and ours[k] is not None and ours[k] != theirs[k]
    ]
    if not differ:
        return
    shown = "; ".join(f"{k}: {a!r} here, {b!r} in the checkpoint" for k, a, b in differ[:3])
    more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
    why = "the checkpoint's would silently replace them"
    if ckpt.run_config is None:
        hint = "give the values the checkpoint was trained with"
    elif subcommand == "fit":
        # A new lr would be overwritten by the restored optimizer state: other settings mean a new run.
        why = "a resume continues the checkpoint's model, optimizer and schedule as they were saved"
        hint = (
            f"resume with the run's own settings: main.py fit --ckpt_path {ckpt.path} without --config "
            f"and model options (its {ckpt.run_config} is used); to train on from its weights "
            f"with other settings, start a new run with --model.init_args.init_from {ckpt.path}"
        )
    else:
        hint = f"drop --config to use the run's own {ckpt.run_config} (command-line options then win)"
    raise ConfigError(
        f"--ckpt_path {ckpt.path} was trained with other model settings than this command's: {shown}{more}; "
        f"{why}: {hint}, or make them agree"
    )


# --------------------------------------------------------------------------- resolve
@dataclass
class Resolution:
    """The settings that will run, where they differ from the parsed config, and why."""

    backbone: dict[str, Any] | None = None
    """model.init_args.backbone to set (class_path + init_args)."""
    block_size: int | None = None
    """data.init_args.block_size to set."""
    tokenizer: str | None = None
    """data.init_args.tokenizer to set."""
    label_names: list[str] | None = None
    """data.init_args.label_names to set."""
    reasons: dict[str, str] = field(default_factory=dict)
    """setting -> why it has its value."""
    announce: list[str] = field(default_factory=list)
    """Lines to print (rank 0): choices the user did not write down."""
    warnings: list[str] = field(default_factory=list)
    """Settings the config gives that will not be used."""


def resolve(
    subcommand: str | None,
    model: dict[str, Any],
    data: dict[str, Any] | None,
    ckpt: CheckpointRecord | None,
    init_from: InitFromRecord | None,
    user: UserInput,
    printing: bool = False,
    backbone_tokenizer: str | None = None,
) -> Resolution:
    """Decide backbone, block_size, tokenizer and label names of a command, and check remote-code consent.

    Args:
        subcommand: fit / validate / test / predict (None: no subcommand, e.g. `run=False`).
        model: the parsed `model.init_args` (plain values).
        data: the parsed `data.init_args`, None without a data module.
        ckpt: what `--ckpt_path` records, None without one (or a remote one).
        init_from: what `model.init_args.init_from` records, None without one.
        user: what the user's own command line and config files ask for.
        printing: for `--print_config`: what the config implies (rules 1-5); the run folder's
            choices (6, 7) are the command's.
        backbone_tokenizer: the tokenizer of the configured HFBackbone's `name_or_path`
            (`runs.backbone_tokenizer`: its directory or hub name, None for a directory without
            tokenizer files); read only when the config names one.
    """
    out = Resolution()
    fit, evaluate = subcommand == "fit", subcommand in EVAL_SUBCOMMANDS
    recorded = ckpt if ckpt is not None and not ckpt.sharded else None  # hyperparameters read
    # 1. init_from is not used when fit resumes a run: the checkpoint's weights win.
    if init_from and fit and recorded and recorded.hparams.get("init_from") != init_from.source:
        out.warnings.append(
            f"gptlab: model.init_args.init_from={init_from.source} is not used: --ckpt_path {recorded.path} "
            f"resumes that run with its own weights (init_from only initialises a new run); drop one of them"
        )
    # 2. No backbone in the config: the checkpoint's, else init_from's.
    backbone = model.get("backbone")
    source = recorded.path if recorded else init_from.source if init_from else None
    if "backbone" in model and backbone is None and source is not None:
        backbone = out.backbone = (
            pretrained_backbone(recorded.path, hparams=recorded.hparams) if recorded else init_from.backbone
        )
        out.reasons["backbone"] = f"recorded by {source}"
        out.announce.append(f"gptlab: backbone {backbone['class_path']} configured as in {source}")
    else:
        source = None
    # 3. The data's sequence length is the backbone's unless the data sets its own (at most the
    # backbone's, checked by TaskModule.check_data).
    block = (backbone.get("init_args") or {}).get("block_size") if isinstance(backbone, dict) else None
    if data is not None and data.get("block_size", 0) is None and isinstance(block, int):
        out.block_size = block
        out.reasons["block_size"] = "the backbone's (data.init_args.block_size unset)"
    # 4. init_from with a tokenizer recipe: the pretraining tokenizer (a recipe would train a new
    # vocabulary that the pretrained embeddings do not know).
    tokenizer = data.get("tokenizer") if data is not None else None
    if init_from and data is not None and "tokenizer" in data and not isinstance(tokenizer, str):
        if init_from.tokenizer is None:
            raise ConfigError(
                f"init_from={init_from.source}: no tokenizer found with it (expected <run>/tokenizer next "
                f"to a gptlab checkpoint, or tokenizer files in a Hugging Face directory), and a tokenizer "
                f"recipe would not match the pretrained embeddings: set data.init_args.tokenizer to "
                f"the pretraining tokenizer's directory"
            )
        tokenizer = out.tokenizer = str(init_from.tokenizer)
        out.reasons["tokenizer"] = f"init_from {init_from.source}"
        out.announce.append(f"gptlab: tokenizer {tokenizer} (from init_from)")
    # 4 (continued). A new run of a pretrained backbone (`name_or_path`) with a tokenizer recipe:
    # the model's own tokenizer, for the same reason (a checkpoint's run has its own, rule 7).
    configured = model.get("backbone")
    name_or_path = (
        (configured.get("init_args") or {}).get("name_or_path") if isinstance(configured, dict) else None
    )
    if name_or_path and not init_from and ckpt is None and data is not None and isinstance(tokenizer, dict):
        if backbone_tokenizer is None:
            raise ConfigError(
                f"HFBackbone name_or_path={name_or_path}: no tokenizer files in it (tokenizer.json or "
                f"tokenizer_config.json), and a tokenizer recipe would train a new vocabulary that the "
                f"pretrained embeddings do not know: set data.init_args.tokenizer to the model's tokenizer"
            )
        tokenizer = out.tokenizer = backbone_tokenizer
        out.reasons["tokenizer"] = f"the backbone's name_or_path {name_or_path}"
        out.announce.append(f"gptlab: tokenizer {tokenizer} (from the backbone's name_or_path)")
    # 5. Evaluating a checkpoint with no label names given: the checkpoint's (its output ids).
    if evaluate and recorded and data is not None and "label_names" in data and data["label_names"] is None:
        names = recorded.hparams.get("label_names")
        if names:
            out.label_names = list(names)
            out.reasons["label_names"] = f"recorded by {recorded.path}"
    if printing:
        return out
    # 6. Running a model's own code needs the user's consent (docs/design.md §6.3).
    _check_remote_code(backbone, source, ckpt, user)
    # 7. The tokenizer of the checkpoint's run.
    saved = ckpt.run_tokenizer if ckpt is not None else None
    if saved is not None and data is not None and "tokenizer" in data:
        if fit:
            _resume_tokenizer(ckpt, saved, tokenizer, user, out)
        elif evaluate and not user.tokenizer_option:
            # Evaluation uses the tokenizer the run trained with, unless the user gives one.
            out.tokenizer = str(saved)
            out.reasons["tokenizer"] = f"the evaluated run's {saved}"
    return out


def _resume_tokenizer(
    ckpt: CheckpointRecord, saved: Path, tokenizer: Any, user: UserInput, out: Resolution
) -> None:
    """A resumed run keeps the tokenizer it trained with: a recipe would be retrained on today's
    files, and a changed corpus moves token ids under the weights."""
    given = user.tokenizer_option
    if given and str(tokenizer) != str(saved):
        raise ConfigError(
            f"{given}: resuming {ckpt.run} continues with the tokenizer it trained with ({saved}); "
            f"another tokenizer would change the meaning of the token ids under its weights: drop "
            f"{given}, or start a new run (without --ckpt_path) from its weights with "
            f"--model.init_args.init_from"
        )
    if str(tokenizer) != str(saved):
        out.announce.append(f"gptlab: resuming with the run's tokenizer {saved}")
    out.tokenizer = str(saved)
    out.reasons["tokenizer"] = f"the resumed run's {saved}"


def _check_remote_code(
    backbone: Any, backbone_source: str | None, ckpt: CheckpointRecord | None, user: UserInput
) -> None:
    """A backbone that would run its model's own code (trust_remote_code) must be asked for by the
    user's own config or command line, never by a checkpoint or a run folder's config.yaml
    (docs/design.md §6.3)."""
    if not isinstance(backbone, dict) or not records_remote_code(backbone.get("init_args")):
        return
    if user.asks_remote_code:
        return
    records = user.run_configs
    source = backbone_source or (records[0] if records else f"the checkpoint {ckpt.path if ckpt else None}")
    init_args = {**backbone["init_args"], "trust_remote_code": True}
    flow = json.dumps({"class_path": backbone["class_path"], "init_args": init_args})
    how = (
        "--model.init_args.backbone.init_args.trust_remote_code true"
        if records and not backbone_source
        else f"--model.init_args.backbone '{flow}'"
    )
    raise ConfigError(
        f"model.init_args.backbone.init_args.trust_remote_code: true comes from {source}, not from "
        f"your config or command line; a checkpoint or a run folder is a record, not consent to "
        f"run the model's own code: if you trust that code, add {how} to the command (or set it in "
        f"your own config)"
    )
