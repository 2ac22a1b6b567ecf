"""`fit --config X --print_config > Y`, then `fit --config Y`: the same experiment, for every shipped config.

The printed config is a fixed point (printing Y gives Y back), holds no value that cannot be read
back (a tokenizer recipe, a backbone that `init_from` implies), and builds the same model, data
and trainer as X; one tiny experiment is trained from both and ends with equal weights.
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from conftest import REPO
from gptlab.cli import GPTLabCLI, main

CONFIGS = sorted((REPO / "configs" / "pretrain").glob("*.yaml")) + sorted(
    (REPO / "configs" / "finetune").glob("*.yaml")
)
QUICKSTART = REPO / "configs" / "pretrain" / "quickstart.yaml"
# Overlays are partial: each is printed stacked on the quick start.
OVERLAYS = sorted((REPO / "configs" / "trainer").glob("*.yaml")) + sorted(
    (REPO / "configs" / "backbone").glob("*.yaml")
)


def printed(capsys, *args: str) -> str:
    """stdout of `main.py fit <args> --print_config` (in-process)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", sys.argv[:1]), pytest.raises(SystemExit) as exit_:
        main(["fit", *args, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_.value.code in (0, None), err
    return out


def init_from_args(config: Path, tiny_runs) -> list[str]:
    """A gptlab checkpoint for configs that fine-tune one (the shipped path does not exist here)."""
    model = yaml.safe_load(config.read_text()).get("model", {}).get("init_args", {})
    if not model.get("init_from"):
        return []
    source = tiny_runs.runs["causal_lm"] / "checkpoints" / "last.ckpt"
    return ["--model.init_args.init_from", str(source)]


def built(args: list[str]) -> GPTLabCLI:
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return GPTLabCLI(args=args, run=False)


def summary(cli: GPTLabCLI) -> dict:
    """What decides the experiment: model class and hyperparameters, data settings, trainer limits."""
    data = {k: v for k, v in vars(cli.datamodule).items() if not k.startswith("_") and k != "trainer"}
    data["tokenizer_source"] = repr(data.get("tokenizer_source"))
    trainer = cli.trainer
    return {
        "model": (type(cli.model).__name__, repr(dict(cli.model.hparams))),
        "data": (type(cli.datamodule).__name__, repr(sorted(data.items(), key=lambda kv: kv[0]))),
        "trainer": (
            trainer.max_steps,
            trainer.max_epochs,
            trainer.val_check_interval,
            trainer.accumulate_grad_batches,
            trainer.gradient_clip_val,
            str(trainer.precision),
            [type(c).__name__ for c in trainer.callbacks],
        ),
    }


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_printed_config_reads_back_as_the_same_experiment(config, tiny_runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped data paths are relative to the repository
    extra = init_from_args(config, tiny_runs) + ["--logs", str(tmp_path / "logs")]
    first = printed(capsys, "--config", str(config), *extra)
    assert "Unable to serialize" not in first
    if "--model.init_args.init_from" in extra:  # the backbone init_from implies is written out
        assert "backbone: null" not in first and "class_path: gptlab.models.GPT" in first
    path = tmp_path / "printed.yaml"
    path.write_text(first)
    assert printed(capsys, "--config", str(path)) == first  # a fixed point
    if "smollm2" in config.stem:
        return  # building it needs the converted SmolLM2 weights; the print is what is tested here
    original = built(["--config", str(config), *extra])
    # run=False has no subcommand: the fit-only keys of the printed file are left out to build it.
    fit_only = ("ckpt_path", "weights_only")
    plain = {k: v for k, v in yaml.safe_load(first).items() if k not in fit_only}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    again = built(["--config", str(tmp_path / "plain.yaml")])
    assert summary(again) == summary(original)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_printed_overlay_stack_is_a_fixed_point(overlay, tmp_path, capsys):
    first = printed(capsys, "--config", str(QUICKSTART), "--config", str(overlay))
    assert "Unable to serialize" not in first
    path = tmp_path / "printed.yaml"
    path.write_text(first)
    assert printed(capsys, "--config", str(path)) == first


def test_a_run_from_the_printed_config_trains_the_same_weights(tiny_runs, tmp_path, capsys):
    # The tiny classification experiment with the default tokenizer (a BPE recipe, which printed as
    # "Unable to serialize instance BPE(...)" before), trained once from its YAML and once from
    # the printed copy.
    config = yaml.safe_load(tiny_runs.configs["classification"].read_text())
    config["data"]["init_args"].pop("tokenizer")
    config["model"]["init_args"]["backbone"]["init_args"]["vocab_size"] = 512  # room for BPE() on tiny data
    config["logs"] = str(tmp_path / "logs")
    source = tmp_path / "source.yaml"
    source.write_text(yaml.safe_dump(config))
    path = tmp_path / "printed.yaml"
    path.write_text(printed(capsys, "--config", str(source)))
    for name, yaml_file in (("a", source), ("b", path)):
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            main(["fit", "--config", str(yaml_file), "--experiment", name, "--trainer.max_steps", "2"])
    a, b = (
        torch.load(tmp_path / "logs" / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
        for name in "ab"
    )
    assert a["global_step"] == b["global_step"] == 2
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], msg=key)


@pytest.mark.parametrize("form", ["separate", "equals"])
def test_command_line_text_with_colon_space_is_taken_as_typed(form, tiny_runs, capsys):
    # YAML would read "Question: {prompt}" as a mapping; a str-typed key takes it as the text typed.
    text = "Question: {prompt}\nAnswer: "
    option = "--data.init_args.prompt_template"
    args = [option, text] if form == "separate" else [f"--data.prompt_template={text}"]
    out = printed(capsys, "--config", str(tiny_runs.configs["generation"]), *args)
    assert yaml.safe_load(out)["data"]["init_args"]["prompt_template"] == text
    cli = built(["--config", str(tiny_runs.configs["generation"]), option, text])
    assert cli.datamodule.prompt_template == text


def test_help_lists_every_command_and_where_model_and_data_keys_are(capsys):
    with mock.patch.object(sys, "argv", sys.argv[:1]), pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "{fit,validate,test,predict,export}" in out and "export Write a checkpoint" in out
    assert "--model.help SequenceClassification" in out and "--data.help ClassificationDataModule" in out
    # ... and those help keys list the class's keys, with their docstrings.
    with mock.patch.object(sys, "argv", sys.argv[:1]), pytest.raises(SystemExit):
        main(["fit", "--data.help", "ClassificationDataModule"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--data.column_names" in out and "--data.val_fraction" in out and "no header line" in out
