"""gptlab's LightningCLI: `python main.py {fit,validate,test,predict} --config ...` (and `export`).

Wiring of the pieces that make a command (docs/design.md §5.1):

    argv --gptlab.argv (run config of a checkpoint, quoting)--> check_config_files --> parse
         --> _parse_ckpt_path: the checkpoint read once (gptlab.resolve.read_checkpoint), its task
             and conflicting overrides refused, its hyperparameters applied
         --> before_instantiate_classes: check_settings, a resumed run folder held (one fit at a
             time, gptlab.runs.hold_run), loggers pointed at the run folder,
             gptlab.resolve.resolve (backbone, tokenizer, label names, block_size, remote-code
             consent), a new run's version_N claimed (gptlab.runs.RunClaim)
         --> instantiate --> run (a failure before the first batch removes what it wrote)
         --> after_test: the report written into the run folder

User errors print one line and exit 2 (`main`).
"""

from __future__ import annotations

import errno
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from gptlab._lightning import add_subcommand, subcommand_parser
from gptlab.argv import (
    EVAL_SUBCOMMANDS,
    config_files,
    option,
    print_config_flags,
    quote_text_value,
    user_asks_for_remote_code,
    uses_run_config,
    with_run_config,
)
from gptlab.callbacks import Checkpoint, LearningRate, ProgressBar, ProgressLog, Throughput, quiet_lightning
from gptlab.checkpointing import install_atomic_checkpoints
from gptlab.config_check import OneLineParser, check_config_files, check_settings
from gptlab.data import DataModule
from gptlab.errors import ConfigError, GPTLabError, user_error
from gptlab.loading import consolidated_copy, is_sharded_checkpoint
from gptlab.reports import publish_report
from gptlab.resilience import NonFiniteLoss, Preemption
from gptlab.resolve import (
    CheckpointRecord,
    UserInput,
    check_overrides,
    check_task,
    checkpoint_model,
    read_checkpoint,
    read_init_from,
    resolve,
)
from gptlab.runs import (
    RunClaim,
    RunDirectory,
    backbone_tokenizer,
    checkpoint_to_resume,
    configure_loggers,
    remove_traces,
    run_dir_of,
)
from gptlab.tasks import TaskModule
from gptlab.tasks.base import use_peft_types

__all__ = ["GPTLabCLI", "main", "user_asks_for_remote_code", "with_run_config"]


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


def _label_names_of(datamodule: Any) -> list[str] | None:
    # Data modules of labelled data (classification, token classification) expose `label_names`.
    return getattr(datamodule, "label_names", None)


def _model_args(cfg: Namespace) -> dict[str, Any]:
    """The parsed `model.init_args` as plain values ({} without a model class)."""
    init_args = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
    return init_args.as_dict() if isinstance(init_args, Namespace) else {}


class GPTLabCLI(LightningCLI):
    """LightningCLI with gptlab's run layout, checkpoint defaults and reports.

    Wiring only: the argv is rewritten by gptlab.argv, what a command runs is decided by
    gptlab.resolve (from the checkpoint and init_from records, each read once), and the run
    folder's lifecycle is gptlab.runs' (RunClaim, RunDirectory).
    """

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
        self._records: dict[str, CheckpointRecord] = {}  # each checkpoint read once
        self._claim = RunClaim()
        self._consolidated_dir: tempfile.TemporaryDirectory | None = None
        try:
            self._start(args, run)
        except BaseException:
            # Whatever stopped the command (a bad input, a bug, Ctrl-C) before it trained leaves
            # no half-made run folder behind.
            self._claim.remove_if_untrained()
            raise
        finally:
            self._claim.release()

    def _start(self, args: ArgsType, run: bool) -> None:
        super().__init__(
            model_class=TaskModule,
            datamodule_class=DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunDirectory,
            seed_everything_default=1337,
            parser_class=OneLineParser,
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
        flags = print_config_flags(argv)
        if flags:  # skip_default / skip_unset: jsonargparse's own printing (nothing filled in)
            self.config = parser.parse_args(argv)
        self.config = parser.parse_args([a for a in argv if print_config_flags([a]) is None])
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
            ckpt = cfg.get("ckpt_path")
            self._resolve(cfg, ckpt if ckpt and Path(ckpt).exists() else None, printing=True)
        except GPTLabError as err:
            print(
                f"gptlab: warning: printed without what init_from / ckpt_path would add ({err})",
                file=sys.stderr,
            )
        printer = subcommand_parser(self, subcommand) if subcommand else parser
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
        add_subcommand(parser, "export", export, help=EXPORT_HELP)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            # jsonargparse re-raises a constructor's error as "Does not validate against any of the
            # Union subtypes" with the original as __cause__: give the user our one-line error.
            cause = user_error(err)
            if cause is None:
                raise
            raise cause from None
        finally:
            self._claim.forget_versions()

    def _record(self, ckpt: str) -> CheckpointRecord:
        if ckpt not in self._records:
            self._records[ckpt] = read_checkpoint(ckpt)
        return self._records[ckpt]

    def _parse_ckpt_path(self) -> None:
        # Before anyone unpickles it (the trainer later): a checkpoint that does not load with
        # weights_only=True stops here with one line; the same read gives its hyperparameters.
        cfg = self.config[self.config.subcommand] if self.config.get("subcommand") else None
        ckpt = cfg.get("ckpt_path") if cfg is not None else None
        record = self._record(ckpt) if ckpt and Path(ckpt).exists() else None
        if record is None or record.sharded:
            return
        model = cfg.get("model")
        check_task(record, model.get("class_path") if isinstance(model, Namespace) else None)
        # LightningCLI puts the checkpoint's hyperparameters over the parsed config, which undoes
        # command-line options such as `test --ckpt_path X --model.init_args.max_new_tokens 64`.
        # The checkpoint of a gptlab run was written from that run's config.yaml: when it is the
        # config in use, the hyperparameters are already there and the command line must win.
        own_config = uses_run_config(self._argv, option(self._argv, "--ckpt_path"))
        if not own_config or self.config.subcommand == "fit":  # a resume: checked whatever the config
            check_overrides(record, _model_args(cfg), self.config.subcommand)  # not replaced silently
        if own_config:
            return
        hparams = checkpoint_model(record)
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic checkpoint writes for every strategy that saves through a CheckpointIO, and the
        # cleanup of what killed saves left behind (gptlab.checkpointing).
        install_atomic_checkpoints(trainer)
        bar = trainer.progress_bar_callback
        if type(bar) is RichProgressBar:  # Lightning's default, or the plain class from a config
            trainer.callbacks[trainer.callbacks.index(bar)] = ProgressBar.like(bar)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        # A command that fails before its first batch (bad data found in setup, a model / data
        # mismatch) leaves no half-made run behind: Lightning creates the logger's directory and event file
        # before any setup hook runs (trainer/call.py _call_setup_hook), so remove what it added.
        # Rank 0 only: asking another rank's logger for its log_dir would fix its version early.
        logger = self.trainer.logger if self.trainer.is_global_zero else None
        log_dir = Path(logger.log_dir) if logger is not None and logger.log_dir else None
        before = set(log_dir.rglob("*")) if log_dir is not None and log_dir.exists() else None
        if log_dir is not None and log_dir == self._claim.claimed:
            before = None  # claimed (created empty) by this command
        batches = self._claim.batches
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
        # Always on: plain progress lines where no terminal shows the bar (a batch job's log).
        parser.add_lightning_class_args(ProgressLog, "progress")
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
            found = checkpoint_to_resume(logs, cfg.experiment)  # None: the first run (said)
            cfg.ckpt_path = ckpt = str(found) if found is not None else None
            if found is not None and not (record := self._record(str(found))).sharded:
                check_overrides(record, _model_args(cfg), "fit")  # resolved now: not checked in parsing
        # Lightning passes weights_only=None to torch.load, which an environment variable
        # (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD) can turn into full unpickling: ask for safe loading.
        if "weights_only" in cfg and cfg.weights_only is None:
            cfg.weights_only = True
        check_settings(self.subcommand, cfg, ckpt)
        run = run_dir_of(ckpt)
        # (a remote URL, s3://..., is left to Lightning's fsspec loading, with weights_only)
        local = ckpt and "://" not in ckpt and ckpt not in ("best", "last", "hpc", "registry")
        if self.subcommand == "fit" and run is not None:
            self._claim.hold(run)  # one fit per run folder at a time
        configure_loggers(cfg, run)
        self._resolve(cfg, ckpt if local else None, printing=False)
        self._claim.claim(cfg.trainer)

    def _resolve(self, cfg: Namespace, ckpt: str | None, printing: bool) -> None:
        """Fill in what the config leaves to the checkpoints and the model (gptlab.resolve)."""
        model = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
        data = cfg.data.get("init_args") if isinstance(cfg.get("data"), Namespace) else None
        if model is None:
            return
        record = self._record(ckpt) if ckpt else None
        backbone = model.get("backbone")
        backbone_args = backbone.get("init_args") if isinstance(backbone, Namespace) else None
        init_from = None
        if model.get("init_from"):
            need = "backbone" in model and backbone is None and (record is None or record.sharded)
            trust = bool(backbone_args and backbone_args.get("trust_remote_code"))
            init_from = read_init_from(model.init_from, self.subcommand, need, trust)
        user, plain = UserInput.of(self._argv), data.as_dict() if data is not None else None
        name = backbone_args.get("name_or_path") if backbone_args else None
        hf_tokenizer = backbone_tokenizer(str(name)) if name else None
        out = resolve(
            self.subcommand, model.as_dict(), plain, record, init_from, user, printing, hf_tokenizer
        )
        for line in out.warnings:
            rank_zero_warn(line)
        for line in out.announce:
            rank_zero_info(line)
        if out.backbone is not None:
            # init_args stay plain values (a dict-typed argument such as config_overrides must not
            # become a Namespace).
            init_args = Namespace(**out.backbone.get("init_args", {}))
            model.backbone = Namespace(class_path=out.backbone["class_path"], init_args=init_args)
        for key in ("block_size", "tokenizer", "label_names"):
            if getattr(out, key) is not None:
                data[key] = getattr(out, key)

    # ----------------------------------------------------------------- sharded checkpoints
    def _ckpt_for_strategy(self) -> None:
        """Give a sharded FSDP checkpoint to a strategy that cannot read folders as one consolidated file."""
        kwargs = self.config_init[self.subcommand]
        ckpt, strategy = kwargs.get("ckpt_path"), self.trainer.strategy
        if ckpt and is_sharded_checkpoint(ckpt) and not isinstance(strategy, ModelParallelStrategy):
            self._consolidated_dir, path = consolidated_copy(ckpt, resuming=self.subcommand == "fit")
            self._ckpt_source, kwargs["ckpt_path"] = str(ckpt), str(path)

    before_fit = before_validate = before_test = before_predict = _ckpt_for_strategy

    def after_test(self) -> None:
        report = getattr(self.model, "test_report", None)
        # log_dir broadcasts from rank 0 under a distributed strategy: every rank must ask for it.
        run = Path(self.trainer.log_dir) if report is not None else None
        if report is None or not self.trainer.is_global_zero:
            return
        # The config files this command read (the run's own config.yaml when none was given).
        publish_report(report, run, self._ckpt_source or self.trainer.ckpt_path, config_files(self._argv))


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
            f"kept: free space (or set --logs_root / data.init_args.cache_dir to another disk) and run again",
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
