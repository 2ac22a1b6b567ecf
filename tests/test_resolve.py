"""gptlab.resolve, rule by rule, with small dicts (no Lightning, no files): docs/design.md
"How a command is resolved" lists the rules in this order."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptlab.argv import tokenizer_option
from gptlab.errors import CheckpointError, ConfigError
from gptlab.resolve import (
    CheckpointRecord,
    InitFromRecord,
    UserInput,
    check_overrides,
    check_task,
    resolve,
)

GPT = {"class_path": "gptlab.models.GPT", "init_args": {"block_size": 32, "n_layer": 1}}
RUN = Path("logs/pre/version_0")
CKPT = CheckpointRecord(
    path=str(RUN / "checkpoints/last.ckpt"),
    hparams={"backbone": GPT, "label_names": ["O", "B-PER"], "init_from": None},
    task="gptlab.tasks.TokenClassification",
    run=RUN,
    run_tokenizer=RUN / "tokenizer",
    run_config=RUN / "config.yaml",
)
INIT = InitFromRecord(source="pre.ckpt", backbone=GPT, tokenizer=Path("logs/pre/version_0/tokenizer"))
RECIPE = {"class_path": "gptlab.data.Char"}
NOBODY = UserInput()


def test_1_init_from_is_not_used_when_fit_resumes_a_run():
    other = InitFromRecord(source="other.ckpt")
    out = resolve("fit", {"backbone": GPT, "init_from": "other.ckpt"}, None, CKPT, other, NOBODY)
    assert out.warnings and "init_from=other.ckpt is not used" in out.warnings[0]
    # the run was started from it: nothing to say
    started = CheckpointRecord(path=CKPT.path, hparams={"init_from": "pre.ckpt"})
    assert (
        resolve("fit", {"backbone": GPT, "init_from": "pre.ckpt"}, None, started, INIT, NOBODY).warnings == []
    )


def test_2_backbone_comes_from_the_checkpoint_then_init_from_never_over_the_config():
    from_ckpt = resolve("test", {"backbone": None}, None, CKPT, None, NOBODY)
    assert from_ckpt.backbone == GPT and CKPT.path in from_ckpt.reasons["backbone"]
    assert (
        resolve("fit", {"backbone": None, "init_from": "pre.ckpt"}, None, None, INIT, NOBODY).backbone == GPT
    )
    assert resolve("test", {"backbone": GPT}, None, CKPT, None, NOBODY).backbone is None  # the config's stays
    # a checkpoint that records none cannot fill it in
    with pytest.raises(ConfigError, match="does not record its backbone config"):
        resolve("test", {"backbone": None}, None, CheckpointRecord(path="x.ckpt"), None, NOBODY)


def test_3_data_block_size_is_the_backbones_unless_the_data_sets_one():
    assert resolve("fit", {"backbone": GPT}, {"block_size": None}, None, None, NOBODY).block_size == 32
    assert resolve("fit", {"backbone": GPT}, {"block_size": 16}, None, None, NOBODY).block_size is None
    assert resolve("fit", {"backbone": None}, {"block_size": None}, CKPT, None, NOBODY).block_size == 32


def test_4_init_from_with_a_tokenizer_recipe_takes_the_pretraining_tokenizer():
    out = resolve(
        "fit", {"backbone": GPT, "init_from": "pre.ckpt"}, {"tokenizer": RECIPE}, None, INIT, NOBODY
    )
    assert out.tokenizer == str(INIT.tokenizer)
    given = resolve(
        "fit", {"backbone": GPT, "init_from": "pre.ckpt"}, {"tokenizer": "tok/"}, None, INIT, NOBODY
    )
    assert given.tokenizer is None  # a tokenizer directory in the config stays
    lost = InitFromRecord(source="pre.ckpt", tokenizer=None)
    with pytest.raises(ConfigError, match="init_from=pre.ckpt: no tokenizer found"):
        resolve("fit", {"backbone": GPT, "init_from": "pre.ckpt"}, {"tokenizer": RECIPE}, None, lost, NOBODY)


def test_4_a_pretrained_backbone_with_a_tokenizer_recipe_takes_its_own_tokenizer():
    hf = {"class_path": "gptlab.models.HFBackbone", "init_args": {"name_or_path": "smol"}}
    out = resolve(
        "fit", {"backbone": hf}, {"tokenizer": RECIPE}, None, None, NOBODY, backbone_tokenizer="smol"
    )
    assert out.tokenizer == "smol" and "name_or_path smol" in out.reasons["tokenizer"]
    with pytest.raises(ConfigError, match="name_or_path=smol: no tokenizer files in it"):
        resolve("fit", {"backbone": hf}, {"tokenizer": RECIPE}, None, None, NOBODY, backbone_tokenizer=None)
    # a tokenizer given, or a checkpoint's run (rule 7): not replaced
    assert resolve("fit", {"backbone": hf}, {"tokenizer": "tok"}, None, None, NOBODY).tokenizer is None
    assert resolve("test", {"backbone": hf}, {"tokenizer": RECIPE}, CKPT, None, NOBODY).tokenizer == str(
        CKPT.run_tokenizer
    )


def test_5_evaluating_a_checkpoint_keeps_its_label_names():
    data = {"label_names": None}
    assert resolve("test", {"backbone": GPT}, data, CKPT, None, NOBODY).label_names == ["O", "B-PER"]
    assert resolve("test", {"backbone": GPT}, {"label_names": ["A"]}, CKPT, None, NOBODY).label_names is None
    assert resolve("fit", {"backbone": GPT}, data, CKPT, None, NOBODY).label_names is None


def test_6_recorded_trust_remote_code_is_not_consent():
    remote = {
        "class_path": "gptlab.models.HFBackbone",
        "init_args": {"name_or_path": "m", "trust_remote_code": True},
    }
    record = CheckpointRecord(path=CKPT.path, hparams={"backbone": remote})
    with pytest.raises(ConfigError, match=f"comes from {CKPT.path}, not from your config"):
        resolve("test", {"backbone": None}, None, record, None, NOBODY)
    with pytest.raises(ConfigError, match="comes from logs/pre/version_0/config.yaml"):
        resolve(
            "test", {"backbone": remote}, None, None, None, UserInput(run_configs=(str(RUN / "config.yaml"),))
        )
    assert resolve("test", {"backbone": None}, None, record, None, UserInput(asks_remote_code=True)).backbone
    # --print_config prints what the config implies; the consent is the command's question
    assert resolve("test", {"backbone": None}, None, record, None, NOBODY, printing=True).backbone == remote


def test_7_the_runs_tokenizer_on_resume_and_on_evaluation():
    data = {"tokenizer": RECIPE}
    resumed = resolve("fit", {"backbone": GPT}, data, CKPT, None, NOBODY)
    assert resumed.tokenizer == str(RUN / "tokenizer") and resumed.announce
    with pytest.raises(
        ConfigError, match="--data.init_args.tokenizer: resuming logs/pre/version_0 continues"
    ):
        resolve(
            "fit",
            {"backbone": GPT},
            {"tokenizer": "other/"},
            CKPT,
            None,
            UserInput("--data.init_args.tokenizer"),
        )
    assert resolve("test", {"backbone": GPT}, data, CKPT, None, NOBODY).tokenizer == str(RUN / "tokenizer")
    mine = UserInput(tokenizer_option="--data.init_args.tokenizer")
    assert resolve("test", {"backbone": GPT}, {"tokenizer": "mine/"}, CKPT, None, mine).tokenizer is None
    assert resolve("test", {"backbone": GPT}, data, CKPT, None, NOBODY, printing=True).tokenizer is None


def test_the_user_gave_a_tokenizer():
    assert tokenizer_option(["fit", "--data.init_args.tokenizer", "tok/"]) == "--data.init_args.tokenizer"
    assert tokenizer_option(["test", "--data.tokenizer=tok/"]) == "--data.tokenizer"
    assert tokenizer_option(["fit", "--data", '{"init_args": {"tokenizer": "tok/"}}']) == "--data"
    # a config file is not the command line's choice (it may be a run's record), nor another key
    assert tokenizer_option(["test", "--config", "tokenizer.yaml", "--model.init_args.seed", "1"]) is None


def test_a_checkpoint_of_another_task_is_refused():
    with pytest.raises(CheckpointError, match="is a checkpoint of gptlab.tasks.token_classification"):
        check_task(CKPT, "gptlab.tasks.SequenceClassification")
    check_task(CKPT, "gptlab.tasks.TokenClassification")
    check_task(CKPT, None)


def test_overrides_that_conflict_with_the_checkpoint_are_named():
    with pytest.raises(ConfigError, match=r"model.init_args.label_names: \['A'\] here, \['O', 'B-PER'\]"):
        check_overrides(CKPT, {"label_names": ["A"], "backbone": GPT})
    check_overrides(CKPT, {"label_names": None, "backbone": GPT})  # unset: the checkpoint's
    # init_from only initialises a new run (rule 1 warns); a resume advises a new run from its weights
    check_overrides(CKPT, {"init_from": "other.ckpt"}, "fit")
    with pytest.raises(ConfigError, match=r"a resume continues .* --model.init_args.init_from logs/pre"):
        check_overrides(CKPT, {"label_names": ["A"]}, "fit")
