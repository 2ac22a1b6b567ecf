"""gptlab's LightningCLI: `python main.py {fit,validate,test,predict} --config ...` (and `export`).

What it adds to LightningCLI:

- runs land in `logs/<experiment>/version_N/` (TensorBoard events, `config.yaml`, `checkpoints/`
  with `best.ckpt` by the monitored metric and `last.ckpt`, the tokenizer, `reports/`);
- `test`/`validate`/`predict --ckpt_path <run>/checkpoints/X.ckpt` need no --config: the run's own
  `config.yaml` and `tokenizer/` are used, and outputs go back into that run directory;
- `fit --ckpt_path last` resumes the newest run of the experiment in place, from its newest complete
  checkpoint; checkpoints are written atomically (gptlab.checkpointing);
- `test` writes `reports/test_report.{txt,md,json}` and prints the report;
- fine-tuning: a task's `label_names` come from the data module (`data.label_names`), and with
  `init_from` the backbone config and the tokenizer come from the pretraining run when the YAML
  does not give them; evaluating a checkpoint reuses its backbone config and label names;
- every run logs throughput and MFU (`throughput.*`, gptlab.callbacks.Throughput);
- every fit saves `last.ckpt` every `preemption.every_n_steps` steps and on SIGTERM / SIGUSR1
  (then exits 75, gptlab.resilience.REQUEUE_EXIT_CODE), and stops at a non-finite loss
  (`nonfinite_loss.policy`);
- a sharded FSDP checkpoint (a folder) is consolidated on the fly for evaluation under any other
  strategy (e.g. on one device);
- user errors (`GPTLabError`, a parser error, a Lightning MisconfigurationException) print one
  line and exit 2 instead of a traceback; config files are checked for duplicate keys and YAML
  syntax first (gptlab.config_check);
- every checkpoint a command names (`--ckpt_path`, `init_from`) must load with
  `weights_only=True`: a crafted pickle is refused before Lightning or anything else reads it, and
  the trainer loads checkpoints with `weights_only=True` too;
- the log directory must be creatable and writable before anything is built.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from gptlab.adapters import require_peft
from gptlab.callbacks import Checkpoint, LearningRate, ProgressBar, Throughput
from gptlab.checkpointing import install_atomic_checkpoints, require_complete
from gptlab.config_check import check_config_files, one_line_parser_error
from gptlab.data import DataModule
from gptlab.errors import CheckpointError, ConfigError, GPTLabError
from gptlab.loading import (
    RUN_CODE_KEYS,
    is_sharded_checkpoint,
    load_checkpoint,
    records_remote_code,
    require_lightning_checkpoint,
    save_consolidated,
    verify_checkpoint,
)
from gptlab.reports import write_report
from gptlab.resilience import NonFiniteLoss, Preemption
from gptlab.runs import (
    CLAIMED_RUN_ENV,
    backbone_tokenizer,
    check_init_from,
    check_writable_dir,
    checkpoint_hparams,
    claim_version,
    hold_run,
    is_run_config,
    latest_checkpoint,
    pretrained_backbone,
    pretrained_tokenizer,
    remove_empty_parents,
    remove_traces,
    run_dir_of,
    task_class_of,
)
from gptlab.tasks import TaskModule
from gptlab.tasks.base import use_peft_types

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


HELP_DESCRIPTION = (
    "gptlab: pretrain and fine-tune GPT-style models from YAML. Keys of a command: "
    "`main.py fit --help` (trainer, checkpoint, ...); the model's and the data's keys depend on their "
    "class: `main.py fit --model.help SequenceClassification`, `main.py fit --data.help "
    "ClassificationDataModule` (any class name or class_path). `--print_config` prints a "
    "command's whole config."
)
EXPORT_HELP = (
    "Write a checkpoint as a Hugging Face model directory: main.py export --ckpt_path <run>/checkpoints/"
    "best.ckpt --out DIR (main.py export --help for its options)."
)


class _QuietLightning(logging.Filter):
    """Drops Lightning's advertising tips at start ("💡 Tip: ... litlogger", "... litmodels")."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_lightning() -> None:
    """Install `_QuietLightning` on the logger that emits the tips (once per process)."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _QuietLightning) for f in logger.filters):
        logger.addFilter(_QuietLightning())


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    """{dotted key: value} of the plain values in nested dicts (lists compared whole)."""
    if not isinstance(value, dict):
        return {prefix: list(value) if isinstance(value, tuple) else value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_leaves(item, f"{prefix}.{key}"))
    return out


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def quote_text_value(argv: list[str], message: str) -> tuple[list[str], str, str] | None:
    """(argv, quoted, text): argv with the value that a parser `message` refuses as "not a str"
    quoted as a YAML string, that quoted string and the text as typed.

    Only a value that YAML read as a mapping or list although the key wants text (it contains
    ": " or starts with "{" / "["), and only where it was written on the command line; None when
    there is no such value (the error stands).
    """
    keys = re.findall(r'Parser key "([^"]+)":\s*\n\s*Expected a <class \'str\'>', message)
    if not keys:
        return None
    name = keys[-1].split(".")[-1]
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        if not option.startswith("--") or option.rsplit(".", 1)[-1].lstrip("-") != name:
            continue
        if not equals:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        if not (": " in value or value.lstrip()[:1] in ("{", "[")) or value.startswith('"'):
            continue
        quoted = json.dumps(value)  # a JSON string is a YAML double-quoted string of the same text
        return [*argv[:i], f"{option}={quoted}", *argv[i + (1 if equals else 2) :]], quoted, value
    return None


def _print_config_flags(argv: list[str]) -> set[str] | None:
    """The flags of a `--print_config[=flags]` in argv (an empty set without flags), None without one."""
    for arg in argv:
        if arg == "--print_config":
            return set()
        if arg.startswith("--print_config="):
            return set(arg.split("=", 1)[1].split(","))
    return None


def with_run_config(argv: list[str]) -> list[str]:
    """Add `--config <run>/config.yaml` to a command that names a checkpoint file but no config
    (`fit` then resumes the run with its own settings)."""
    if not argv or argv[0] not in (*EVAL_SUBCOMMANDS, "fit"):
        return argv
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = _option(argv, "--ckpt_path")
    run = run_dir_of(ckpt)
    if ckpt is None or (argv[0] == "fit" and ckpt in ("last", "hpc", "registry")):
        return argv
    if ckpt in ("best", "last"):
        raise ConfigError(
            f"--ckpt_path {ckpt}: a separate `{argv[0]}` has no {ckpt} checkpoint of its own (that name "
            f"means the {ckpt} of a fit in the same process); give the file, e.g. --ckpt_path "
            f"logs/<experiment>/version_N/checkpoints/{ckpt}.ckpt (its run's config.yaml is found beside it)"
        )
    if ckpt and "://" not in ckpt and not Path(ckpt).exists():
        raise CheckpointError(f"--ckpt_path {ckpt} does not exist: check the path")
    config = run / "config.yaml" if run is not None else None
    if config is None or not config.is_file():
        raise ConfigError(
            f"--ckpt_path {ckpt}: no run config found next to it (expected {config or '<run>/config.yaml'}); "
            f"pass the experiment's --config explicitly"
        )
    return [argv[0], "--config", str(config), *argv[1:]]


def user_asks_for_remote_code(argv: list[str]) -> bool:
    """Whether the user's own config files or command-line options turn on a run-code setting
    (`trust_remote_code`). Config files inside a run directory and checkpoints are records of what
    a run did, not the user's consent to run a model's code now (docs/design.md §6.3).
    """
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name in ("-c", "--config"):
            if is_run_config(value):
                continue
            try:
                data = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue
            if records_remote_code(data):
                return True
        elif name.startswith("--") and name.endswith(RUN_CODE_KEYS):
            if str(yaml.safe_load(value or "false")).lower() in ("true", "yes", "1"):
                return True
        elif name.startswith("--") and any(key in value for key in RUN_CODE_KEYS):
            try:
                if records_remote_code(yaml.safe_load(value)):
                    return True
            except yaml.YAMLError:
                continue
    return False


def _label_names_of(datamodule: Any) -> list[str] | None:
    # Data modules of labelled data (classification, token classification) expose `label_names`.
    return getattr(datamodule, "label_names", None)


def retarget_loggers(trainer_cfg: Namespace, save_dir: Path, name: str, version: str) -> None:
    """Point every configured logger that takes `save_dir` / `version` (TensorBoard, CSV, ...) at
    `save_dir/name/version`; loggers that write elsewhere (e.g. to a tracking server) are kept as
    configured. `trainer.logger: false` keeps no logger, with the run as the Trainer's root dir.
    """
    import inspect

    if trainer_cfg.logger is False:
        trainer_cfg.default_root_dir = str(save_dir / name / version)
        return
    loggers = trainer_cfg.logger if isinstance(trainer_cfg.logger, list) else [trainer_cfg.logger]
    for logger in loggers:
        if not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
            continue
        cls = task_class_of(str(logger.get("class_path")))
        params = inspect.signature(cls).parameters if cls is not None else {}
        if "save_dir" not in params or "version" not in params:
            continue
        logger.init_args.save_dir, logger.init_args.version = str(save_dir), version
        if "name" in params:
            logger.init_args.name = name


def _recorded(text: str) -> Any:
    """A saved run config without what a resume sets by itself: `ckpt_path`, the loggers' settings
    (pointed at the run directory; only their classes are compared) and the data's tokenizer (the
    run's own `tokenizer/`, written once by the first command)."""
    config = yaml.safe_load(text) or {}
    if not isinstance(config, dict):
        return config
    config = {k: v for k, v in config.items() if k != "ckpt_path"}
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and "logger" in trainer:
        loggers = trainer["logger"] if isinstance(trainer["logger"], list) else [trainer["logger"]]
        trainer["logger"] = [x.get("class_path") if isinstance(x, dict) else x for x in loggers]
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        data["init_args"].pop("tokenizer", None)
    return config


class RunDirectory(SaveConfigCallback):
    """Writes `config.yaml` and the tokenizer into the run directory when `fit` starts.

    `config.yaml` is always the config of the newest command that trained the run: a resumed run
    with other settings (e.g. a new `--trainer.max_steps`) moves the previous one to
    `config.<n>.yaml` (n = 1, 2, ... in order, config.1.yaml being the first run's) and records its
    own; a resume that changes nothing but `ckpt_path` keeps the file as it is. The tokenizer is
    written once. Evaluation subcommands write nothing here; `test` writes its reports from the CLI.
    A resume changes config.yaml only at its first training batch, once the checkpoint loaded into
    the model and every check passed: a refused or failed resume leaves the run as it was.
    """

    _rotate = False  # a resume's config.yaml is moved aside at its first training batch

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = Path(trainer.log_dir)
        path = log_dir / self.config_filename
        action = "write"
        if trainer.is_global_zero and path.exists():
            ours = self.parser.dump(self.config, skip_none=False)
            action = "keep" if _recorded(path.read_text()) == _recorded(ours) else "rotate"
        action = trainer.strategy.broadcast(action)
        self._rotate = action == "rotate"
        if action == "write":
            super().setup(trainer, pl_module, stage)
        tokenizer_dir = log_dir / "tokenizer"
        datamodule = trainer.datamodule
        if trainer.is_global_zero and datamodule is not None and not tokenizer_dir.exists():
            datamodule.save_tokenizer(tokenizer_dir)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if not self._rotate:
            return
        self._rotate = False
        log_dir = Path(trainer.log_dir)
        path = log_dir / self.config_filename
        if trainer.is_global_zero:
            n = 1
            while (log_dir / f"{path.stem}.{n}{path.suffix}").exists():
                n += 1
            path.rename(log_dir / f"{path.stem}.{n}{path.suffix}")
            rank_zero_info(
                f"gptlab: {path} now records this resumed run; the previous one is {path.stem}.{n}.yaml"
            )
        super().setup(trainer, pl_module, "fit")


class _BatchSeen(Callback):
    """Notes whether any batch ran in this command: a failure after that is not "before training",
    and the run keeps its files (the curves of a run that diverged are what explains it).
    """

    def __init__(self) -> None:
        self.seen = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen = True

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0):
        # The sanity check (validation at step 0) comes before training proper.
        self.seen = self.seen or not trainer.sanity_checking

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0):
        self.seen = True

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0):
        self.seen = True


class _Parser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (a ConfigError) instead of usage + a wall."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            # A nested parser (a class's init_args tried as one Union subtype): jsonargparse
            # collects its error into the top-level one, which is shortened below.
            return super().error(message, ex)
        argv = getattr(self, "_gptlab_argv", None) or sys.argv[1:]
        subcommand = argv[0] if argv and not argv[0].startswith("-") else None
        if "peft" in message:
            # A peft config class that cannot be imported: say which package is missing.
            require_peft()
        error = ConfigError(one_line_parser_error(message, argv, subcommand))
        error.parser_message = message  # what `quote_text_value` reads to retry a parse
        raise error from None


class GPTLabCLI(LightningCLI):
    """LightningCLI with gptlab's run layout, checkpoint defaults and reports."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        if args is None:
            # Rewritten in place (not passed as `args`): DDP re-launches this script with sys.argv.
            sys.argv[1:] = with_run_config(sys.argv[1:])
        elif isinstance(args, list):
            args = with_run_config(args)
        self._argv = args if isinstance(args, list) else sys.argv[1:]
        quiet_lightning()
        # Duplicate keys, YAML syntax and missing files, with file and line, before jsonargparse.
        check_config_files([str(a) for a in self._argv])
        # The checkpoint as given, when evaluation reads a consolidated copy of a sharded one.
        self._ckpt_source: str | None = None
        # Where a backbone config filled in from a record came from (a checkpoint, init_from).
        self._backbone_source: str | None = None
        # The run directory this command claimed (created) and the nearest folder above it that
        # existed before: what a failure before training removes again.
        self._claimed: Path | None = None
        self._versioned_loggers: list[Namespace] = []  # logger init_args given a claimed version
        self._existed: Path | None = None
        self._batches = _BatchSeen()
        self._consolidated_dir: tempfile.TemporaryDirectory | None = None
        self._held = contextlib.ExitStack()  # the run folder a resume holds (gptlab.runs.hold_run)
        try:
            self._start(args, run)
        except BaseException:
            # Whatever stopped the command (a bad input, a bug, Ctrl-C) before it trained leaves
            # no half-made run folder behind.
            self._remove_claimed_run()
            raise
        finally:
            if self._claimed is not None and os.environ.get(CLAIMED_RUN_ENV) == str(self._claimed):
                del os.environ[CLAIMED_RUN_ENV]
            self._held.close()

    def _start(self, args: ArgsType, run: bool) -> None:
        super().__init__(
            model_class=TaskModule,
            datamodule_class=DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunDirectory,
            seed_everything_default=1337,
            parser_class=_Parser,
            # The task owns optimizer and scheduler (injected through its constructor).
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        if not (args is None or isinstance(args, list)):  # a dict or Namespace: Lightning's way
            super().parse_arguments(parser, args)
            return
        argv = list(args) if args is not None else sys.argv[1:]
        if not {a for a in argv if a not in EVAL_SUBCOMMANDS + ("fit",)} <= {"-h", "--help"}:
            use_peft_types()  # model arguments will be read: their `peft` type is peft's class
        # A command-line value is read as YAML, so "Question: {q}" becomes a mapping and fails a
        # str-typed key. Such a value is meant as text: quote it, parse again (once per value),
        # and put the text back (jsonargparse keeps a str key's raw value, quotes included).
        texts: dict[str, str] = {}
        for _ in range(len(argv)):
            try:
                self._parse(parser, argv, texts)
                return
            except ConfigError as err:
                quoted = quote_text_value(argv, getattr(err, "parser_message", ""))
                if quoted is None:
                    raise
                argv, texts[quoted[1]] = quoted[0], quoted[2]
                self._argv = parser._gptlab_argv = argv

    def _parse(self, parser: LightningArgumentParser, argv: list[str], texts: dict[str, str]) -> None:
        flags = _print_config_flags(argv)
        if flags:  # skip_default / skip_unset: jsonargparse's own printing (nothing filled in)
            self.config = parser.parse_args(argv)
        self.config = parser.parse_args([a for a in argv if _print_config_flags([a]) is None])
        for key, value in list(self.config.items()):
            if isinstance(value, str) and value in texts:
                self.config[key] = texts[value]
        if flags is None:
            return
        # `--print_config` prints what the command would run, so that `fit --config <printed>`
        # runs the same experiment: jsonargparse prints while parsing, before the backbone and
        # tokenizer that `init_from` implies are filled in (they would print as null).
        subcommand = self.config.get("subcommand")
        cfg = self.config[subcommand] if subcommand else self.config
        self.subcommand = subcommand
        try:
            self._fill_from_checkpoints(cfg, cfg.get("ckpt_path"))
        except GPTLabError as err:
            print(
                f"gptlab: warning: printed without what init_from / ckpt_path would add ({err})",
                file=sys.stderr,
            )
        printer = self._subcommand_parsers[subcommand] if subcommand else parser
        sys.stdout.write(printer.dump(cfg, skip_none=False))
        raise SystemExit(0)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs["description"] = HELP_DESCRIPTION
        parser = super().init_parser(**kwargs)
        parser._gptlab_argv = self._argv  # the args its one-line errors look up keys in
        return parser

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `export` is dispatched by `main()` before LightningCLI (it is not a Trainer method);
        # listed here so that `main.py --help` shows every command.
        export = LightningArgumentParser(description=EXPORT_HELP)
        parser._subcommands_action.add_subcommand("export", export, help=EXPORT_HELP)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse re-raises a constructor's error as "Does not validate against any of the
            # Union subtypes" with the original as __cause__: give the user our one-line error.
            cause = err
            while cause is not None and not isinstance(cause, GPTLabError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        finally:
            # The loggers have their claimed version now; the config.yaml written into the run
            # records none, so that fitting from it again starts a new run instead of sharing this one.
            for args in self._versioned_loggers:
                args.version = None

    def _parse_ckpt_path(self) -> None:
        # Before anyone unpickles it (Lightning's _parse_ckpt_path below, the trainer later): a
        # checkpoint that does not load with weights_only=True stops here with one line.
        ckpt = self.config[self.config.subcommand].get("ckpt_path") if self.config.get("subcommand") else None
        checkpoint = None
        if ckpt and Path(ckpt).exists():
            require_complete(ckpt)  # a cut-off or empty file is named as such
            if not is_sharded_checkpoint(ckpt):
                # One memory-mapped weights_only load: refuses a crafted pickle, names the task.
                checkpoint = load_checkpoint(ckpt, mmap=True)
                require_lightning_checkpoint(ckpt, checkpoint)
                self._check_task_of_checkpoint(ckpt, checkpoint)
            else:
                verify_checkpoint(ckpt)  # before the FSDP strategy hands the folder to DCP
        # LightningCLI re-applies the checkpoint's hyperparameters over the parsed config, which
        # undoes command-line options such as `test --ckpt_path X --model.init_args.max_new_tokens 64`.
        # The checkpoint of a gptlab run was written from that run's config.yaml: when it is the
        # config in use, the hyperparameters are already there and the command line must win.
        if self._uses_run_config(_option(self._argv, "--ckpt_path")):
            if checkpoint is not None and self.config.subcommand == "fit":
                # A resume restores the checkpoint's weights, optimizer and schedule: a model
                # option changed on the command line would be ignored or fail to load.
                self._refuse_overrides_of_checkpoint(ckpt, checkpoint.get("hyper_parameters") or {})
            return
        if checkpoint is not None:
            # Any other config would be overwritten by the checkpoint's values without a word.
            self._refuse_overrides_of_checkpoint(ckpt, checkpoint.get("hyper_parameters") or {})
        super()._parse_ckpt_path()

    def _uses_run_config(self, ckpt: str | Path | None) -> bool:
        """Whether a `--config` of this command is the config.yaml of the run of `ckpt`."""
        run = run_dir_of(ckpt)
        configs = [self._argv[i + 1] for i, a in enumerate(self._argv[:-1]) if a in ("-c", "--config")]
        return run is not None and any(Path(c).resolve() == (run / "config.yaml").resolve() for c in configs)

    def _refuse_overrides_of_checkpoint(self, ckpt: str, hparams: dict[str, Any]) -> None:
        """Model values of the config / command line that differ from the checkpoint's, named."""
        model = self.config[self.config.subcommand].get("model")
        init_args = model.get("init_args") if isinstance(model, Namespace) else None
        if not isinstance(init_args, Namespace):
            return
        ours = _leaves(init_args.as_dict(), "model.init_args")
        theirs = _leaves({k: v for k, v in hparams.items() if not k.startswith("_")}, "model.init_args")
        # init_from only initialises a new run: a resume says it is not used (a warning)
        ours.pop("model.init_args.init_from", None)
        differ = [
            (k, ours[k], theirs[k])
            for k in ours
            if k in theirs and ours[k] is not None and ours[k] != theirs[k]
        ]
        if not differ:
            return
        shown = "; ".join(f"{k}: {a!r} here, {b!r} in the checkpoint" for k, a, b in differ[:3])
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        run = run_dir_of(ckpt)
        why = "the checkpoint's would silently replace them"
        if run is None or not (run / "config.yaml").is_file():
            hint = "give the values the checkpoint was trained with"
        elif self.config.subcommand == "fit":
            # A resume continues the checkpoint's optimizer and schedule as saved (a new lr would
            # be overwritten by the restored optimizer state): other settings mean a new run.
            why = "a resume continues the checkpoint's model, optimizer and schedule as they were saved"
            hint = (
                f"resume with the run's own settings: main.py fit --ckpt_path {ckpt} without --config "
                f"and model options (its {run / 'config.yaml'} is used); to train on from its weights "
                f"with other settings, start a new run with --model.init_args.init_from {ckpt}"
            )
        else:
            hint = f"drop --config to use the run's own {run / 'config.yaml'} (command-line options then win)"
        raise ConfigError(
            f"--ckpt_path {ckpt} was trained with other model settings than this command's: {shown}{more}; "
            f"{why}: {hint}, or make them agree"
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic checkpoint writes for every strategy that saves through a CheckpointIO, and the
        # cleanup of what killed saves left behind (gptlab.checkpointing).
        install_atomic_checkpoints(trainer)
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar:  # Lightning's default, or the plain class from a config
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar.like(bar)
        return trainer

    def _check_task_of_checkpoint(self, ckpt: str, checkpoint: dict) -> None:
        """A checkpoint of another task than the configured model is refused, naming both.

        Otherwise Lightning would rebuild the checkpoint's task over the config (and fail later on
        whatever the data module lacks) or load mismatching weights.
        """
        model = self.config[self.config.subcommand].get("model")
        configured = model.get("class_path") if isinstance(model, Namespace) else None
        if not configured:
            return
        written_by = checkpoint.get("gptlab", {}).get("task") or checkpoint.get("hyper_parameters", {}).get(
            "_class_path"
        )
        if not written_by:
            return
        ours, theirs = task_class_of(configured), task_class_of(written_by)
        if ours is not None and theirs is not None and ours is not theirs:
            raise CheckpointError(
                f"--ckpt_path {ckpt} is a checkpoint of {theirs.__module__}.{theirs.__name__}, but the "
                f"config's model is {ours.__module__}.{ours.__name__}: use that run's own config (drop "
                f"--config; <run>/config.yaml is found beside the checkpoint) or a checkpoint of this task"
            )

    def _claim_run_dirs(self, cfg: Namespace) -> None:
        """Give every TensorBoard / CSV logger of a new run a version_N this process created itself."""
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        loggers = cfg.trainer.logger if isinstance(cfg.trainer.logger, list) else [cfg.trainer.logger]
        claimed: dict[Path, int] = {}
        for logger in loggers:
            if not isinstance(logger, Namespace) or not isinstance(logger.get("init_args"), Namespace):
                continue
            cls = task_class_of(str(logger.get("class_path")))
            args = logger.init_args
            if (
                cls is None
                or not issubclass(cls, CSVLogger | TensorBoardLogger)
                or args.get("version") is not None
            ):
                continue
            name = args.get("name", "lightning_logs")
            root = Path(args.get("save_dir") or ".") / (name or "")
            inherited = os.environ.get(CLAIMED_RUN_ENV)
            if inherited and Path(inherited).parent == root:
                args.version = Path(inherited).name  # a rank launched by rank 0: its directory
                self._versioned_loggers.append(args)
                continue
            if rank_zero_only.rank != 0:
                continue  # launched by another tool: rank 0's directory reaches it by broadcast
            if root not in claimed:
                existed = root
                while not existed.exists() and existed != existed.parent:
                    existed = existed.parent
                claimed[root] = claim_version(root)
                if self._claimed is None:
                    self._claimed, self._existed = root / f"version_{claimed[root]}", existed
                    os.environ[CLAIMED_RUN_ENV] = str(self._claimed)
            args.version = f"version_{claimed[root]}"
            self._versioned_loggers.append(args)

    def _remove_claimed_run(self) -> None:
        """Remove the run directory this command claimed (and the empty folders it created above
        it), unless the run trained: a failure before the first batch leaves nothing behind."""
        if self._claimed is None or self._batches.seen:
            return
        remove_traces(self._claimed, None)  # keeps everything once a checkpoint was written
        if not self._claimed.exists() and self._existed is not None:
            remove_empty_parents(self._claimed.parent, self._existed)

    def _run_subcommand(self, subcommand: str) -> None:
        # A command that fails before its first batch (bad data found in setup, a model / data
        # mismatch) leaves no half-made run behind: Lightning creates the logger's directory and event file
        # before any setup hook runs (trainer/call.py _call_setup_hook), so remove what it added.
        # Rank 0 only: asking another rank's logger for its log_dir would fix its version early.
        logger = self.trainer.logger if self.trainer.is_global_zero else None
        log_dir = Path(logger.log_dir) if logger is not None and logger.log_dir else None
        before = set(log_dir.rglob("*")) if log_dir is not None and log_dir.exists() else None
        if log_dir is not None and log_dir == self._claimed:
            before = None  # claimed (created empty) by this command
        batches = self._batches
        self.trainer.callbacks.append(batches)
        try:
            try:
                with warnings.catch_warnings():
                    if isinstance(self.datamodule, DataModule):
                        # gptlab's loaders resume mid-epoch exactly (data/base.py SeededShuffleSampler);
                        # Lightning warns on every such resume because they have no state_dict.
                        warnings.filterwarnings("ignore", message=".*your dataloader is not resumable")
                    super()._run_subcommand(subcommand)
            except ValueError as err:
                # Lightning checks val_check_interval against the epoch only once the data is
                # loaded (loops/fit_loop.py setup_data) and raises a plain ValueError: a config error.
                if "`val_check_interval`" not in str(err) or isinstance(err, GPTLabError):
                    raise
                raise ConfigError(f"trainer.val_check_interval: {' '.join(str(err).split())}") from None
        except BaseException:
            if log_dir is not None and not batches.seen:
                remove_traces(log_dir, before)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment",
            type=str,
            default="default",
            help="Experiment name: runs land in logs/<experiment>/version_N/.",
        )
        # `--logs_root` is the spelling that survives launchers: torchrun's parser reads options
        # placed after the script too and prefix-matches `--logs` to its own `--logs-specs`
        # (docs/multinode.md). `--logs` stays an alias, and `logs:` the key in YAML.
        parser.add_argument(
            "--logs_root", "--logs", dest="logs", type=str, default="logs", help="Root directory of all runs."
        )
        # Always present and configurable as `checkpoint.*`: best by the monitored metric, and last.
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        # The data module knows the labels (given, or read cheaply from the training labels); the
        # task needs them to size its head. jsonargparse skips the link for a model without a
        # `label_names` argument (TaskModule drops the recorded value from its hparams).
        parser.link_arguments(
            "data", "model.init_args.label_names", compute_fn=_label_names_of, apply_on="instantiate"
        )
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        # Always on, like the checkpoint callback: tokens/s, samples/s and MFU for every task.
        parser.add_lightning_class_args(Throughput, "throughput")
        # Always on: the learning rate of every parameter group at every logging step (`lr/...`).
        parser.add_lightning_class_args(LearningRate, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # Always on: periodic last.ckpt and save-then-exit on SIGTERM / SIGUSR1 (`preemption.*`),
        # and a NaN / inf training loss stops the run at its step (`nonfinite_loss.*`).
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(NonFiniteLoss, "nonfinite_loss")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        logs = Path(cfg.logs)
        ckpt = cfg.get("ckpt_path")
        if self.subcommand == "fit" and ckpt == "last":
            found = latest_checkpoint(logs, cfg.experiment)
            # Nothing to resume is not an error: the first run of a preemptible job starts fresh.
            cfg.ckpt_path = ckpt = str(found) if found is not None else None
            if found is not None:
                verify_checkpoint(found)  # resolved just now: not checked while parsing
                # Not seen by _parse_ckpt_path (it ran on the word `last`): the same check here.
                if not self._uses_run_config(found) and not is_sharded_checkpoint(found):
                    self._refuse_overrides_of_checkpoint(ckpt, checkpoint_hparams(found))
        if ckpt == "":
            raise ConfigError(
                "--ckpt_path is empty: give a checkpoint file, `last` (fit: resume the newest run), or "
                "leave the option out"
            )
        # (a remote URL, s3://..., is left to Lightning's fsspec loading, with weights_only below)
        local = ckpt and "://" not in ckpt and ckpt not in ("best", "last", "hpc", "registry")
        if local and not Path(ckpt).exists():
            raise CheckpointError(f"--ckpt_path {ckpt} does not exist: check the path")
        # Lightning passes weights_only=None to torch.load, which an environment variable
        # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn into full unpickling: ask for safe loading.
        if "weights_only" in cfg and cfg.weights_only is None:
            cfg.weights_only = True
        run = run_dir_of(ckpt)
        if run is None:
            check_writable_dir(logs, "--logs", "set --logs to a directory you can write to")
        else:
            check_writable_dir(
                run, "run directory", "copy the run to a writable place and give --ckpt_path from there"
            )
        self._check_settings(cfg, ckpt)
        if self.subcommand == "fit" and run is not None and rank_zero_only.rank == 0:
            self._held.enter_context(hold_run(run))  # one fit per run folder at a time
        # Resuming or evaluating a checkpoint writes into that checkpoint's run directory.
        save_dir, name, version = (
            (run.parent.parent, run.parent.name, run.name) if run else (logs, cfg.experiment, None)
        )
        if cfg.trainer.logger in (None, True):
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=str(save_dir), name=name, version=version, default_hp_metric=False
                ),
            )
        elif run is not None:
            # The user's logger(s) stay: only where they write moves to the run directory.
            retarget_loggers(cfg.trainer, save_dir, name, version)
        self._fill_from_checkpoints(cfg, ckpt)
        self._refuse_recorded_remote_code(cfg, ckpt)
        self._claim_run_dirs(cfg)
        if self.subcommand == "fit" and run is not None:
            self._resume_with_run_tokenizer(cfg, run)
        # Evaluate with the tokenizer the run trained with, unless one is given explicitly.
        explicit = any("tokenizer" in a for a in self._argv)
        if self.subcommand in EVAL_SUBCOMMANDS and run and (run / "tokenizer").is_dir() and not explicit:
            if "tokenizer" in cfg.data.get("init_args", {}):
                cfg.data.init_args.tokenizer = str(run / "tokenizer")

    def _fill_from_checkpoints(self, cfg: Namespace, ckpt: str | None) -> None:
        """Fill in what the config leaves to the checkpoints and the model: backbone, tokenizer,
        label names, the data's block_size.

        - no backbone: the one recorded by `--ckpt_path` (evaluating or resuming a run), else by
          `init_from` (a gptlab checkpoint's run config, or a Hugging Face config.json);
        - `init_from` and a tokenizer *recipe*: the pretraining tokenizer instead (a recipe would
          train a new vocabulary that the pretrained embeddings do not know);
        - evaluating a checkpoint with no label_names given: the checkpoint's, so that its output
          ids keep their meaning;
        - no data block_size (TextDataModule's default): the backbone's block_size.
        """
        model = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
        data = cfg.data.get("init_args") if isinstance(cfg.get("data"), Namespace) else None
        if model is None:
            return
        ckpt = ckpt if ckpt and Path(ckpt).is_file() else None
        init_from = model.get("init_from")
        if init_from and self.subcommand == "fit" and ckpt:
            recorded = checkpoint_hparams(ckpt).get("init_from")
            if recorded != init_from:
                # TaskModule.setup loads init_from only for a new run: the checkpoint wins.
                rank_zero_warn(
                    f"gptlab: model.init_args.init_from={init_from} is not used: --ckpt_path {ckpt} resumes "
                    f"that run with its own weights (init_from only initialises a new run); drop one of them"
                )
        if init_from and self.subcommand == "fit":
            backbone_args = model.get("backbone") and model.backbone.get("init_args")
            check_init_from(
                init_from, trust_remote_code=bool(backbone_args and backbone_args.get("trust_remote_code"))
            )
        if "backbone" in model and model.backbone is None and (ckpt or init_from):
            source = ckpt or init_from
            backbone = pretrained_backbone(source)
            # init_args stay plain values (a dict-typed argument such as config_overrides must not
            # become a Namespace).
            model.backbone = Namespace(
                class_path=backbone["class_path"], init_args=Namespace(**backbone.get("init_args", {}))
            )
            self._backbone_source = str(source)
            rank_zero_info(f"gptlab: backbone {model.backbone.class_path} configured as in {source}")
        backbone = model.get("backbone")
        if data is not None and data.get("block_size", 0) is None and isinstance(backbone, Namespace):
            # One source of truth: the data's sequence length is the model's unless the data sets
            # its own (at most the model's, checked by TaskModule.check_data).
            model_block = (backbone.get("init_args") or Namespace()).get("block_size")
            if isinstance(model_block, int):
                data.block_size = model_block
        if init_from and data is not None and "tokenizer" in data and not isinstance(data.tokenizer, str):
            tokenizer = pretrained_tokenizer(init_from)
            if tokenizer is None:
                raise ConfigError(
                    f"init_from={init_from}: no tokenizer found with it (expected <run>/tokenizer next to "
                    f"a gptlab checkpoint, or tokenizer files in a Hugging Face directory), and a tokenizer "
                    f"recipe would not match the pretrained embeddings: set data.init_args.tokenizer to "
                    f"the pretraining tokenizer's directory"
                )
            data.tokenizer = str(tokenizer)
            rank_zero_info(f"gptlab: tokenizer {tokenizer} (from init_from)")
        pretrained = backbone.get("init_args") if isinstance(backbone, Namespace) else None
        name_or_path = pretrained.get("name_or_path") if isinstance(pretrained, Namespace) else None
        if (
            name_or_path
            and not init_from
            and not ckpt
            and data is not None
            and isinstance(data.get("tokenizer"), Namespace)  # a recipe (Char, BPE), as for init_from
        ):
            data.tokenizer = backbone_tokenizer(str(name_or_path))
            rank_zero_info(f"gptlab: tokenizer {data.tokenizer} (from the backbone's name_or_path)")
        if (
            self.subcommand in EVAL_SUBCOMMANDS
            and ckpt
            and data is not None
            and "label_names" in data
            and data.label_names is None
        ):
            names = checkpoint_hparams(ckpt).get("label_names")
            if names:
                data.label_names = list(names)

    def _check_settings(self, cfg: Namespace, ckpt: str | None) -> None:
        """Settings that can only fail later (at the first step, the first save, the first
        validation), checked before anything is built."""
        experiment = str(cfg.experiment)
        if (
            not experiment
            or experiment in (".", "..")
            or any(c in experiment for c in "/\\")
            or ".." in experiment
        ):
            raise ConfigError(
                f"--experiment {experiment!r}: give a plain name (no '/', '\\' or '..'): runs land in "
                f"{cfg.logs}/<experiment>/version_N; to write them elsewhere, set --logs"
            )
        trainer = cfg.trainer
        accumulate = trainer.get("accumulate_grad_batches")
        if accumulate is not None and accumulate < 1:
            raise ConfigError(
                f"trainer.accumulate_grad_batches={accumulate} must be at least 1 (1: no accumulation)"
            )
        interval = trainer.get("val_check_interval")
        if interval is not None and interval <= 0:
            raise ConfigError(
                f"trainer.val_check_interval={interval} must be positive: a number of training batches (int) "
                f"or a fraction of an epoch in (0, 1]; to validate less, raise it, or set "
                f"trainer.limit_val_batches to 0 for no validation"
            )
        if self.subcommand == "fit" and trainer.get("max_steps") == 0:
            raise ConfigError(
                "trainer.max_steps=0 trains nothing: give the number of optimizer steps, or -1 to "
                "train for trainer.max_epochs"
            )
        data = cfg.data.get("init_args") if isinstance(cfg.get("data"), Namespace) else None
        cache = data.get("cache_dir") if data is not None else None
        if isinstance(cache, str) and cache:
            check_writable_dir(
                Path(cache).expanduser(),
                "data.init_args.cache_dir",
                "set data.init_args.cache_dir to a directory you can write to",
            )
        if self.subcommand in EVAL_SUBCOMMANDS and ckpt in ("best", "last"):
            found = sorted(
                (Path(cfg.logs) / experiment).glob(f"version_*/checkpoints/{ckpt}.ckpt"),
                key=lambda p: int(p.parts[-3].split("_")[1]) if p.parts[-3].split("_")[1].isdigit() else -1,
            )
            example = found[-1] if found else f"{cfg.logs}/{experiment}/version_N/checkpoints/{ckpt}.ckpt"
            raise ConfigError(
                f"--ckpt_path {ckpt}: a separate `{self.subcommand}` has no {ckpt} checkpoint of its own "
                f"(that name means the {ckpt} of a fit in the same process); give the file, e.g. "
                f"--ckpt_path {example} (its run's config.yaml is found beside it)"
            )

    def _resume_with_run_tokenizer(self, cfg: Namespace, run: Path) -> None:
        """A resumed run keeps the tokenizer it trained with (`<run>/tokenizer`): a recipe would be
        retrained on today's training files, and a changed corpus moves token ids under the weights."""
        data = cfg.data.get("init_args") if isinstance(cfg.get("data"), Namespace) else None
        saved = run / "tokenizer"
        if data is None or "tokenizer" not in data or not saved.is_dir():
            return
        given = [
            a.split("=")[0] for a in self._argv if a.split("=")[0].startswith("--data.") and "tokenizer" in a
        ]
        if given and str(data.tokenizer) != str(saved):
            raise ConfigError(
                f"{given[0]}: resuming {run} continues with the tokenizer it trained with ({saved}); "
                f"another tokenizer would change the meaning of the token ids under its weights: drop "
                f"{given[0]}, or start a new run (without --ckpt_path) from its weights with "
                f"--model.init_args.init_from"
            )
        if str(data.tokenizer) != str(saved):
            rank_zero_info(f"gptlab: resuming with the run's tokenizer {saved}")
        data.tokenizer = str(saved)

    def _refuse_recorded_remote_code(self, cfg: Namespace, ckpt: str | None) -> None:
        """A backbone that would run its model's own code (trust_remote_code) must be asked for by
        the user's own config or command line, never by a checkpoint or a run folder's config.yaml.
        """
        model = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
        backbone = model.get("backbone") if model is not None else None
        if not isinstance(backbone, Namespace) or not records_remote_code(backbone.get("init_args")):
            return
        if user_asks_for_remote_code(self._argv):
            return
        configs = [self._argv[i + 1] for i, a in enumerate(self._argv[:-1]) if a in ("-c", "--config")]
        records = [c for c in configs if is_run_config(c)]
        source = self._backbone_source or (records[0] if records else f"the checkpoint {ckpt}")
        init_args = {**backbone.init_args.as_dict(), "trust_remote_code": True}
        flow = json.dumps({"class_path": backbone.class_path, "init_args": init_args})
        how = (
            "--model.init_args.backbone.init_args.trust_remote_code true"
            if records and not self._backbone_source
            else f"--model.init_args.backbone '{flow}'"
        )
        raise ConfigError(
            f"model.init_args.backbone.init_args.trust_remote_code: true comes from {source}, not from "
            f"your config or command line; a checkpoint or a run folder is a record, not consent to "
            f"run the model's own code: if you trust that code, add {how} to the command (or set it in "
            f"your own config)"
        )

    # ----------------------------------------------------------------- sharded checkpoints
    def _ckpt_for_strategy(self) -> None:
        """Give a sharded FSDP checkpoint to a strategy that cannot read folders as one consolidated file."""
        kwargs = self.config_init[self.subcommand]
        ckpt = kwargs.get("ckpt_path")
        if (
            not ckpt
            or not is_sharded_checkpoint(ckpt)
            or isinstance(self.trainer.strategy, ModelParallelStrategy)
        ):
            return
        if self.subcommand == "fit":
            raise CheckpointError(
                f"--ckpt_path {ckpt} is a sharded FSDP checkpoint: resume it with the FSDP strategy "
                f"(--config configs/trainer/fsdp.yaml), or start a new run from its weights with "
                f"--model.init_args.init_from {ckpt}"
            )
        self._consolidated_dir = tempfile.TemporaryDirectory(prefix="gptlab-consolidated-")
        self._ckpt_source = str(ckpt)
        kwargs["ckpt_path"] = str(save_consolidated(ckpt, Path(self._consolidated_dir.name) / "model.ckpt"))

    before_fit = before_validate = before_test = before_predict = _ckpt_for_strategy

    def after_test(self) -> None:
        report = getattr(self.model, "test_report", None)
        # log_dir broadcasts from rank 0 under a distributed strategy: every rank must ask for it.
        run = Path(self.trainer.log_dir) if report is not None else None
        if report is None or not self.trainer.is_global_zero:
            return
        ckpt = self._ckpt_source or self.trainer.ckpt_path
        # The config files this command read (the run's own config.yaml when none was given).
        configs = [self._argv[i + 1] for i, a in enumerate(self._argv[:-1]) if a in ("-c", "--config")]
        report.meta.update(
            checkpoint=str(ckpt) if ckpt else "(weights as initialised)",
            config=" + ".join(configs) if configs else "(command line)",
            run_dir=str(run),
        )
        paths = write_report(report, run / "reports")
        print(report.to_text())
        print("report written to " + ", ".join(str(p) for p in paths))


def main(args: ArgsType = None) -> None:
    """Entry point of `main.py`: user errors exit 2 with one line, not a traceback.

    `main.py export --ckpt_path ... --out DIR` is not a Trainer method, so it is dispatched here
    rather than through LightningCLI's subcommands (see gptlab.export).
    """
    try:
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, list) and argv[:1] == ["export"]:
            from gptlab.export import main as export_main

            export_main(argv[1:])
            return
        GPTLabCLI(args=args)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise
        # A full disk (or quota) while writing anything outside a checkpoint save, which reports
        # its own (gptlab.callbacks.Checkpoint): the run folder this command made is removed.
        where = f" {err.filename}" if err.filename else ""
        print(
            f"gptlab: error: disk full while writing{where} ({err.strerror}); nothing of this run was "
            f"kept: free space (or set --logs / data.init_args.cache_dir to another disk) and run again",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except (GPTLabError, MisconfigurationException) as err:
        # MisconfigurationException: Lightning's own "this Trainer setting is invalid" (e.g.
        # max_steps=-5), a user error like ours. One line: what is wrong and where is in the text.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        prefix = "" if isinstance(err, GPTLabError) else "trainer: "
        print(f"gptlab: error: {prefix}{message}", file=sys.stderr)
        raise SystemExit(2) from None
