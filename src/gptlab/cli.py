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
- user errors (`GPTLabError`) print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info

from gptlab.callbacks import Throughput
from gptlab.checkpointing import install_atomic_checkpoints, require_complete, resume_checkpoint
from gptlab.data import DataModule
from gptlab.errors import CheckpointError, ConfigError, GPTLabError
from gptlab.reports import write_report
from gptlab.resilience import NonFiniteLoss, Preemption
from gptlab.strategies import is_sharded_checkpoint, save_consolidated
from gptlab.tasks import TaskModule
from gptlab.tasks.base import load_checkpoint

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


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


def _option(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def with_run_config(argv: list[str]) -> list[str]:
    """Add `--config <run>/config.yaml` to an evaluation command that names a checkpoint but no config."""
    if not argv or argv[0] not in EVAL_SUBCOMMANDS:
        return argv
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = _option(argv, "--ckpt_path")
    run = run_dir_of(ckpt)
    if ckpt is None:
        return argv
    config = run / "config.yaml" if run is not None else None
    if config is None or not config.is_file():
        raise ConfigError(
            f"--ckpt_path {ckpt}: no run config found next to it (expected {config or '<run>/config.yaml'}); "
            f"pass the experiment's --config explicitly"
        )
    return [argv[0], "--config", str(config), *argv[1:]]


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
    return load_checkpoint(path).get("hyper_parameters", {}) or {}


def pretrained_backbone(source: str | Path) -> dict[str, Any]:
    """The backbone config (class_path + init_args) of a gptlab checkpoint or a Hugging Face directory."""
    source = Path(source)
    if source.is_dir():
        config_file = source / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"init_from={source}: not a Hugging Face model directory (no config.json)")
        config = json.loads(config_file.read_text())
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


def pretrained_tokenizer(source: str | Path) -> Path | None:
    """The tokenizer that goes with a gptlab checkpoint (`<run>/tokenizer`) or a Hugging Face directory."""
    source = Path(source)
    if source.is_dir():
        found = any((source / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        return source if found else None
    run = run_dir_of(source)
    return run / "tokenizer" if run is not None and (run / "tokenizer").is_dir() else None


def _label_names_of(datamodule: Any) -> list[str] | None:
    # Data modules of labelled data (classification, token classification) expose `label_names`.
    return getattr(datamodule, "label_names", None)


class RunDirectory(SaveConfigCallback):
    """Writes `config.yaml` and the tokenizer into the run directory when `fit` starts.

    A resumed run (same directory) keeps the files it already has: nothing is overwritten.
    Evaluation subcommands write nothing here; `test` writes its reports from the CLI.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        log_dir = Path(trainer.log_dir)
        if not (log_dir / self.config_filename).exists():
            super().setup(trainer, pl_module, stage)
        tokenizer_dir = log_dir / "tokenizer"
        datamodule = trainer.datamodule
        if trainer.is_global_zero and datamodule is not None and not tokenizer_dir.exists():
            datamodule.save_tokenizer(tokenizer_dir)


class GPTLabCLI(LightningCLI):
    """LightningCLI with gptlab's run layout, checkpoint defaults and reports."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        if args is None:
            # Rewritten in place (not passed as `args`): DDP re-launches this script with sys.argv.
            sys.argv[1:] = with_run_config(sys.argv[1:])
        elif isinstance(args, list):
            args = with_run_config(args)
        self._argv = args if isinstance(args, list) else sys.argv[1:]
        # The checkpoint as given, when evaluation reads a consolidated copy of a sharded one.
        self._ckpt_source: str | None = None
        self._consolidated_dir: tempfile.TemporaryDirectory | None = None
        super().__init__(
            model_class=TaskModule,
            datamodule_class=DataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunDirectory,
            seed_everything_default=1337,
            # The task owns optimizer and scheduler (injected through its constructor).
            auto_configure_optimizers=False,
            args=args,
            run=run,
        )

    def _parse_ckpt_path(self) -> None:
        # A cut-off or empty checkpoint file is named before anything tries to unpickle it.
        if self.config.get("subcommand") and self.config[self.config.subcommand].get("ckpt_path"):
            require_complete(self.config[self.config.subcommand].ckpt_path)
        # LightningCLI re-applies the checkpoint's hyperparameters over the parsed config, which
        # undoes command-line options such as `test --ckpt_path X --model.init_args.max_new_tokens 64`.
        # The checkpoint of a gptlab run was written from that run's config.yaml: when it is the
        # config in use, the hyperparameters are already there and the command line must win.
        run = run_dir_of(_option(self._argv, "--ckpt_path"))
        configs = [self._argv[i + 1] for i, a in enumerate(self._argv[:-1]) if a in ("-c", "--config")]
        if run is not None and any(Path(c) == run / "config.yaml" for c in configs):
            return
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        # Atomic checkpoint writes for every strategy that saves through a CheckpointIO, and the
        # cleanup of what killed saves left behind (gptlab.checkpointing).
        install_atomic_checkpoints(trainer)
        return trainer

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--experiment",
            type=str,
            default="default",
            help="Experiment name: runs land in logs/<experiment>/version_N/.",
        )
        parser.add_argument("--logs", type=str, default="logs", help="Root directory of all runs.")
        # Always present and configurable as `checkpoint.*`: best by the monitored metric, and last.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
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
        run = run_dir_of(ckpt)
        if run is not None or cfg.trainer.logger in (None, True):
            # Resuming or evaluating a checkpoint writes into that checkpoint's run directory.
            save_dir, name, version = (
                (run.parent.parent, run.parent.name, run.name) if run else (logs, cfg.experiment, None)
            )
            cfg.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=str(save_dir), name=name, version=version, default_hp_metric=False
                ),
            )
        self._fill_from_checkpoints(cfg, ckpt)
        # Evaluate with the tokenizer the run trained with, unless one is given explicitly.
        explicit = any("tokenizer" in a for a in self._argv)
        if self.subcommand in EVAL_SUBCOMMANDS and run and (run / "tokenizer").is_dir() and not explicit:
            if "tokenizer" in cfg.data.get("init_args", {}):
                cfg.data.init_args.tokenizer = str(run / "tokenizer")

    def _fill_from_checkpoints(self, cfg: Namespace, ckpt: str | None) -> None:
        """Fill in what the config leaves to the checkpoints: backbone, tokenizer, label names.

        - no backbone: the one recorded by `--ckpt_path` (evaluating or resuming a run), else by
          `init_from` (a gptlab checkpoint's run config, or a Hugging Face config.json);
        - `init_from` and a tokenizer *recipe*: the pretraining tokenizer instead (a recipe would
          train a new vocabulary that the pretrained embeddings do not know);
        - evaluating a checkpoint with no label_names given: the checkpoint's, so that its output
          ids keep their meaning.
        """
        model = cfg.model.get("init_args") if isinstance(cfg.get("model"), Namespace) else None
        data = cfg.data.get("init_args") if isinstance(cfg.get("data"), Namespace) else None
        if model is None:
            return
        ckpt = ckpt if ckpt and Path(ckpt).is_file() else None
        init_from = model.get("init_from")
        if "backbone" in model and model.backbone is None and (ckpt or init_from):
            source = ckpt or init_from
            backbone = pretrained_backbone(source)
            # init_args stay plain values (a dict-typed argument such as config_overrides must not
            # become a Namespace).
            model.backbone = Namespace(
                class_path=backbone["class_path"], init_args=Namespace(**backbone.get("init_args", {}))
            )
            rank_zero_info(f"gptlab: backbone {model.backbone.class_path} configured as in {source}")
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
        report.meta.update(
            checkpoint=str(ckpt) if ckpt else "(weights as initialised)",
            config=str(run / "config.yaml") if (run / "config.yaml").exists() else "(command line)",
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
    except GPTLabError as err:
        print(f"gptlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
