"""Run folders: what a run directory holds and how commands find, create and clean them up.

    logs/<experiment>/version_N/       claimed atomically by `claim_version`
        config.yaml                    the run's config (`is_run_config`)
        .fit.lock                      held while a `fit` trains the run (`hold_run`)
        checkpoints/*.ckpt             `run_dir_of(ckpt)` is the run; `latest_checkpoint` resumes
        tokenizer/                     `pretrained_tokenizer`
        reports/                       test reports
        predictions/predictions.<ext>  what `predict` wrote (`predictions_path`)

Also what a run (or a Hugging Face model directory) given as `init_from` records: its backbone
config (`pretrained_backbone`), hyperparameters (`checkpoint_hparams`) and tokenizer; and a
command's own run folder: `RunClaim` (version_N created, removed again when the command fails
before its first batch; a resumed run held, `hold_run`), `RunDirectory` (config.yaml and
tokenizer written when fit starts), `retarget_loggers` (a resumed or evaluated run's loggers
write into it).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

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


def checkpoint_to_resume(logs: Path, experiment: str) -> Path | None:
    """`fit --ckpt_path last`: the checkpoint to resume, or None (said in one line) where the
    experiment has no run yet. Not an error: the first run of a preemptible job starts fresh."""
    found = latest_checkpoint(logs, experiment)
    if found is None:
        rank_zero_info(
            f"gptlab: --ckpt_path last: experiment {experiment!r} has no checkpoint under {logs} yet: "
            f"starting from scratch (a new run)"
        )
    return found


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


def pretrained_backbone(source: str | Path, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    """The backbone config (class_path + init_args) of a gptlab checkpoint or a Hugging Face directory.

    `hparams`: the checkpoint's hyperparameters when already read (it is then not opened again).
    """
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
    backbone = (checkpoint_hparams(source) if hparams is None else hparams).get("backbone")
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


def backbone_tokenizer(name_or_path: str) -> str | None:
    """The tokenizer of a pretrained HFBackbone's `name_or_path`: the directory when it holds
    tokenizer files, a hub name as it is, None for a local path without tokenizer files."""
    path = Path(name_or_path).expanduser()
    if not path.exists():
        return name_or_path  # a hub name: transformers finds its tokenizer (or says why not)
    tokenizer = pretrained_tokenizer(path) if path.is_dir() else None
    return str(tokenizer) if tokenizer is not None else None


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


# --------------------------------------------------------------------------- a command's run folder
def retarget_loggers(trainer_cfg: Namespace, save_dir: Path, name: str, version: str) -> None:
    """Point every configured logger that takes `save_dir` / `version` (TensorBoard, CSV, ...) at
    `save_dir/name/version`; loggers that write elsewhere (e.g. to a tracking server) are kept as
    configured. `trainer.logger: false` keeps no logger, with the run as the Trainer's root dir.
    """
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


def recorded_config(text: str) -> Any:
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


def configure_loggers(cfg: Namespace, run: Path | None) -> None:
    """Runs land in logs/<experiment>/version_N; resuming or evaluating a checkpoint writes
    into that checkpoint's run directory (`run`). `cfg`: the subcommand's parsed config."""
    save_dir, name, version = (
        (run.parent.parent, run.parent.name, run.name) if run else (Path(cfg.logs), cfg.experiment, None)
    )
    if cfg.trainer.logger in (None, True):
        cfg.trainer.logger = Namespace(
            class_path="lightning.pytorch.loggers.TensorBoardLogger",
            init_args=Namespace(save_dir=str(save_dir), name=name, version=version, default_hp_metric=False),
        )
    elif run is not None:
        # The user's logger(s) stay: only where they write moves to the run directory.
        retarget_loggers(cfg.trainer, save_dir, name, version)


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
            action = "keep" if recorded_config(path.read_text()) == recorded_config(ours) else "rotate"
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


class BatchSeen(Callback):
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


class RunClaim:
    """The run folder a new command creates (`claim`) and removes again when it fails before its
    first batch (`remove_if_untrained`): nothing half-made stays behind."""

    def __init__(self) -> None:
        self.claimed: Path | None = None
        """The run directory this command created."""
        self.existed: Path | None = None
        """The nearest folder above it that existed before."""
        self.versioned: list[Namespace] = []
        """Logger init_args given a claimed version."""
        self.batches = BatchSeen()
        """Whether any batch ran (then the run keeps its files)."""
        self.held = contextlib.ExitStack()
        """The run folder a resume holds (`hold_run`) until `release`."""

    def claim(self, trainer_cfg: Namespace) -> None:
        """Give every TensorBoard / CSV logger of a new run a version_N this process created itself."""
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        loggers = trainer_cfg.logger if isinstance(trainer_cfg.logger, list) else [trainer_cfg.logger]
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
                self.versioned.append(args)
                continue
            if rank_zero_only.rank != 0:
                continue  # launched by another tool: rank 0's directory reaches it by broadcast
            if root not in claimed:
                existed = root
                while not existed.exists() and existed != existed.parent:
                    existed = existed.parent
                claimed[root] = claim_version(root)
                if self.claimed is None:
                    self.claimed, self.existed = root / f"version_{claimed[root]}", existed
                    os.environ[CLAIMED_RUN_ENV] = str(self.claimed)
            args.version = f"version_{claimed[root]}"
            self.versioned.append(args)

    def hold(self, run: Path) -> None:
        """Hold the run folder that this `fit` resumes (`hold_run`, rank 0: one process per run)."""
        if rank_zero_only.rank == 0:
            self.held.enter_context(hold_run(run))

    def remove_if_untrained(self) -> None:
        """Remove the run directory this command claimed (and the empty folders it created above
        it), unless the run trained: a failure before the first batch leaves nothing behind."""
        if self.claimed is None or self.batches.seen:
            return
        remove_traces(self.claimed, None)  # keeps everything once a checkpoint was written
        if not self.claimed.exists() and self.existed is not None:
            remove_empty_parents(self.claimed.parent, self.existed)

    def forget_versions(self) -> None:
        """The loggers have their claimed version now; the config.yaml written into the run
        records none, so that fitting from it again starts a new run instead of sharing this one."""
        for args in self.versioned:
            args.version = None

    def release(self) -> None:
        """Stop handing the claimed directory to processes started from now on; let go of the
        run folder held."""
        if self.claimed is not None and os.environ.get(CLAIMED_RUN_ENV) == str(self.claimed):
            del os.environ[CLAIMED_RUN_ENV]
        self.held.close()
