"""gptlab's LightningCLI: `python main.py {fit,validate,test,predict} --config ...`.

What it adds to LightningCLI:

- runs land in `logs/<experiment>/version_N/` (TensorBoard events, `config.yaml`, `checkpoints/`
  with `best.ckpt` by the monitored metric and `last.ckpt`, the tokenizer, `reports/`);
- `test`/`validate`/`predict --ckpt_path <run>/checkpoints/X.ckpt` need no --config: the run's own
  `config.yaml` and `tokenizer/` are used, and outputs go back into that run directory;
- `fit --ckpt_path last` resumes the newest run of the experiment in place;
- `test` writes `reports/test_report.{txt,md,json}` and prints the report;
- every run logs throughput and MFU (`throughput.*`, gptlab.callbacks.Throughput);
- a sharded FSDP checkpoint (a folder) is consolidated on the fly for evaluation under any other
  strategy (e.g. on one device);
- user errors (`GPTLabError`) print one line and exit 2 instead of a traceback.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import ModelParallelStrategy

from gptlab.callbacks import Throughput
from gptlab.data import DataModule
from gptlab.errors import CheckpointError, ConfigError, GPTLabError
from gptlab.reports import write_report
from gptlab.strategies import is_sharded_checkpoint, save_consolidated
from gptlab.tasks import TaskModule

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


def run_dir_of(ckpt_path: str | Path | None) -> Path | None:
    """The run directory of a checkpoint written by gptlab (`<run>/checkpoints/<name>.ckpt`)."""
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    return path.parent.parent if path.parent.name == "checkpoints" else None


def latest_checkpoint(logs: Path, experiment: str, name: str = "last.ckpt") -> Path | None:
    """`<name>` of the newest run of `experiment` that has one (a file, or a sharded FSDP folder)."""
    runs = [p for p in (logs / experiment).glob("version_*") if (p / "checkpoints" / name).exists()]
    runs.sort(key=lambda p: int(p.name.split("_")[-1]) if p.name.split("_")[-1].isdigit() else -1)
    return runs[-1] / "checkpoints" / name if runs else None


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
        # Evaluate with the tokenizer the run trained with, unless one is given explicitly.
        explicit = any("tokenizer" in a for a in self._argv)
        if self.subcommand in EVAL_SUBCOMMANDS and run and (run / "tokenizer").is_dir() and not explicit:
            if "tokenizer" in cfg.data.get("init_args", {}):
                cfg.data.init_args.tokenizer = str(run / "tokenizer")

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
    """Entry point of `main.py`: user errors exit 2 with one line, not a traceback."""
    try:
        GPTLabCLI(args=args)
    except GPTLabError as err:
        print(f"gptlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
