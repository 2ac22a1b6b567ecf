"""Every use of Lightning's private API (gptlab/_lightning.py) still works on the installed Lightning.

A failure here names the private name or attribute that changed: adapt gptlab/_lightning.py and the
lightning range in pyproject.toml. Each test drives the real Lightning object (a tiny BoringModel
run on CPU), so a renamed attribute fails here rather than deep inside a training run.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import re

import lightning
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

import gptlab
from conftest import REPO
from gptlab import _lightning

CHANGED = f"lightning {lightning.__version__} changed a private API that gptlab/_lightning.py uses"


@pytest.mark.parametrize("module,name", _lightning.NAMES, ids=[n for _, n in _lightning.NAMES])
def test_private_name_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{CHANGED}: {module}.{name} is gone"


@pytest.mark.parametrize(
    "cls,name,params", _lightning.OVERRIDDEN, ids=[f"{c.__name__}.{n}" for c, n, _ in _lightning.OVERRIDDEN]
)
def test_overridden_private_method_keeps_its_signature(cls, name, params):
    method = getattr(cls, name, None)
    assert method is not None, f"{CHANGED}: {cls.__name__}.{name} is gone (gptlab overrides it)"
    found = tuple(inspect.signature(method).parameters)
    assert found == params, f"{CHANGED}: {cls.__name__}.{name}{found}, gptlab overrides {params}"


def test_private_names_are_used_through_lightning_module_only():
    # (1) no other module imports a private Lightning name
    imports = []
    for path in sorted((REPO / "src" / "gptlab").rglob("*.py")):
        if path.name == "_lightning.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                imports += [
                    f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                ]
    assert imports == []
    # (2) a gptlab subclass of a Lightning class uses (self./super().) only those private members
    # of its Lightning bases that _lightning.OVERRIDDEN lists
    listed = {(cls, name) for cls, name, _ in _lightning.OVERRIDDEN}
    unlisted = []
    for info in pkgutil.walk_packages(gptlab.__path__, "gptlab."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            bases = [b for b in cls.__mro__[1:] if b.__module__.startswith("lightning")]
            used = set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)", inspect.getsource(cls)))
            for name in sorted(used):
                owners = [b for b in bases if name in vars(b) or f"self.{name} =" in inspect.getsource(b)]
                if owners and not any((b, name) in listed for b in owners):
                    unlisted.append(f"{cls.__qualname__}.{name} (from {owners[0].__name__})")
    assert unlisted == [], "use these through gptlab/_lightning.py"


class _Recorder(BoringModel):
    """Records what LightningCLI's private ContextVar holds while the model is built."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.given = _lightning.given_hyperparameters.get()


def test_cli_private_members(capsys):
    cli = LightningCLI(
        _Recorder,
        BoringDataModule,
        args=["validate", "--model.width=8", "--trainer.limit_val_batches=1", "--trainer.logger=false"],
        trainer_defaults={"accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False},
        save_config_callback=None,
    )
    assert cli.model.given is not None and cli.model.given.get("width") == 8
    assert _lightning.given_hyperparameters.get() is None  # outside an instantiation
    assert _lightning.subcommand_parser(cli, "validate").dump(cli.config["validate"])
    _lightning.add_subcommand(cli.parser, "extra", LightningCLI.init_parser(cli), help="an extra command")
    assert "an extra command" in cli.parser.format_help()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("boring")
    checkpoint = ModelCheckpoint(dirpath=folder, save_top_k=1)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        limit_train_batches=3,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=folder,
    )
    model = BoringModel()
    assert _lightning.attached_trainer(model) is None
    trainer.fit(model, BoringDataModule())
    return trainer, model, checkpoint, folder


def test_trainer_private_members(fitted):
    trainer, model, checkpoint, folder = fitted
    assert _lightning.attached_trainer(model) is trainer
    assert isinstance(_lightning.should_update_logs(trainer), bool)
    position = _lightning.loop_position(trainer)
    assert position.is_last_batch and position.batches_ready == position.batches_completed == 3
    assert not position.restarted_mid_epoch and not position.epoch_started
    _lightning.close_restarted_epoch(trainer)
    trainer.save_checkpoint(folder / "saved.ckpt")
    state = _lightning.batch_progress_state(torch.load(folder / "saved.ckpt", weights_only=True))
    assert state is not None and state["current"]["completed"] == 3
    for stale in folder.glob("*.ckpt"):
        stale.unlink()
    _lightning.save_final_checkpoint(checkpoint, trainer)
    assert list(folder.glob("*.ckpt")), "no checkpoint saved"


def test_plugin_private_members():
    bar = RichProgressBar(refresh_rate=3, leave=True)
    assert _lightning.progress_bar_settings(bar)[:2] == (3, True)
    strategy = ModelParallelStrategy(save_distributed_checkpoint=False)
    assert _lightning.saves_sharded(strategy) is False
    _lightning.fill_auto_data_parallel_size(strategy, 4)
    assert strategy._data_parallel_size == 4  # what Lightning's setup_environment reads
    plain = Trainer(accelerator="cpu", logger=False)
    assert _lightning.configured_checkpoint_io(plain.strategy) is None
    wrapped = Trainer(accelerator="cpu", logger=False, plugins=[AsyncCheckpointIO()])
    io = _lightning.configured_checkpoint_io(wrapped.strategy)
    assert isinstance(io, _lightning.WrappingCheckpointIO)
    inner = TorchCheckpointIO()
    _lightning.set_wrapped_checkpoint_io(io, inner)
    assert io.checkpoint_io is inner


def test_sharded_checkpoint_functions(tmp_path):
    # A one-process round trip through torch.distributed.checkpoint, as gptlab.strategies and
    # gptlab.loading call these.
    state = {"weight": torch.arange(6.0).reshape(2, 3)}
    _lightning.distributed_checkpoint_save(state, tmp_path)
    torch.save({"step": 7}, tmp_path / _lightning.METADATA_FILENAME)
    loaded = {"weight": torch.zeros(2, 3)}
    _lightning.distributed_checkpoint_load(loaded, tmp_path)
    assert torch.equal(loaded["weight"], state["weight"])
    whole = _lightning.load_distributed_checkpoint(tmp_path)
    assert torch.equal(whole["weight"], state["weight"]) and whole["step"] == 7
