"""Parameter-efficient fine-tuning through peft (gptlab.adapters): adapters, checkpoints, export, errors.

Bases are tiny and random, saved the way real bases come: a gptlab pretraining checkpoint for our
GPT (the shared tiny causal LM run) and a Hugging Face directory for a Llama (random weights
written with save_pretrained, the tiny run's tokenizer beside them). Commands run in-process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml
from peft import IA3Config, LoraConfig

from finetune_data import finetune_config, write_sentiment
from gptlab import adapters
from gptlab.models import GPT, HFBackbone
from gptlab.tasks import CausalLM, SequenceClassification
from test_bad_inputs import one_line_error, snapshot
from tiny_runs import run_cli

LLAMA = {
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
}
LORA = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}}


def save_llama(directory: Path, tokenizer: Path | None = None, seed: int = 0) -> Path:
    """A tiny random Llama saved as a Hugging Face directory (with `tokenizer`'s files beside it)."""
    torch.manual_seed(seed)
    HFBackbone(model_type="llama", config_overrides=LLAMA).model.save_pretrained(directory)
    if tokenizer is not None:
        for file in tokenizer.iterdir():
            shutil.copy(file, directory / file.name)
    return directory


@pytest.fixture(scope="module")
def bases(tiny_runs, tmp_path_factory) -> SimpleNamespace:
    """init_from sources: the tiny GPT pretraining checkpoint and a tiny Llama directory; task data."""
    tmp = tmp_path_factory.mktemp("peft")
    tokenizer = tiny_runs.runs["causal_lm"] / "tokenizer"
    (tmp / "sentiment").mkdir()
    return SimpleNamespace(
        tmp=tmp,
        gpt=str(tiny_runs.runs["causal_lm"] / "checkpoints" / "last.ckpt"),
        llama=str(save_llama(tmp / "llama", tokenizer)),
        tokenizer=tokenizer,
        sentiment=write_sentiment(tmp / "sentiment"),
    )


def fit_config(bases: SimpleNamespace, tmp: Path, base: str, **model_args) -> Path:
    config = finetune_config(
        tmp, "classification", bases.sentiment, init_from=getattr(bases, base), **model_args
    )
    config["trainer"].update(max_steps=2, val_check_interval=2)
    path = tmp / "peft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tiny_gpt() -> GPT:
    return GPT(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


# ----------------------------------------------------------------- adapters in the backbone
@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_lora_adapts_every_linear_of_the_blocks_and_trains_adapters_and_head_only(kind):
    backbone = tiny_gpt() if kind == "gpt" else HFBackbone(model_type="llama", config_overrides=LLAMA)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        before = backbone(ids)
    task = SequenceClassification(backbone, label_names=["a", "b"], init_from="base", peft=LoraConfig(r=4))
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or n.startswith("head.") for n in trainable), trainable
    assert {"head.1.weight", "head.1.bias"} <= set(trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable if ".lora_" in n}
    linears = {"c_attn", "c_proj", "c_fc"} if kind == "gpt" else {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    }  # fmt: skip
    assert adapted == linears  # never the output layer (lm_head) or the embeddings
    # LoRA's B starts at zero: the adapted backbone computes what the base did.
    with torch.no_grad():
        torch.testing.assert_close(task.backbone(ids), before)
    n_trainable, total = adapters.count_parameters(task)
    assert n_trainable == sum(p.numel() for n, p in task.named_parameters() if p.requires_grad)
    assert 0 < n_trainable < total / 5


def test_target_modules_override_and_ia3_defaults():
    task = CausalLM(tiny_gpt(), init_from="base", peft=LoraConfig(r=2, target_modules=["c_attn"]))
    assert {n.split(".lora_")[0] for n, p in task.named_parameters() if p.requires_grad} == {
        f"backbone.transformer.h.{i}.attn.c_attn" for i in range(2)
    }
    task = CausalLM(tiny_gpt(), init_from="base", peft=IA3Config())
    trainable = sorted(n for n, p in task.named_parameters() if p.requires_grad)
    assert trainable and all(".ia3_l." in n for n in trainable), trainable


def test_all_linear_on_our_gpt_leaves_the_lm_head_out():
    """The docs: all-linear adapts every linear layer of the blocks, not the output layer."""
    task = CausalLM(tiny_gpt(), init_from="base", peft=LoraConfig(r=2, target_modules="all-linear"))
    adapted = {n.split(".lora_")[0] for n, p in task.named_parameters() if p.requires_grad}
    assert adapted == {
        f"backbone.transformer.h.{i}.{name}"
        for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }


# ----------------------------------------------------------------- the CLI: config, fit, checkpoint, test
def test_peft_config_from_yaml_and_command_line_is_recorded_as_plain_data(bases, tmp_path):
    from gptlab.cli import GPTLabCLI

    path = fit_config(bases, tmp_path, "gpt", peft=LORA)
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = GPTLabCLI(args=["--config", str(path)], run=False)
        assert isinstance(cli.model.peft_config, LoraConfig) and cli.model.peft_config.r == 4
        assert cli.model.hparams["peft"]["class_path"] == "peft.LoraConfig"
        # The command line alone, over a YAML without peft.
        plain = fit_config(bases, tmp_path, "gpt")
        args = ["--model.init_args.peft", "peft.LoraConfig", "--model.init_args.peft.init_args.r", "8"]
        cli = GPTLabCLI(args=["--config", str(plain), *args], run=False)
    assert cli.model.peft_config.r == 8
    assert any(".lora_" in n for n, p in cli.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("base", ["gpt", pytest.param("llama", marks=pytest.mark.slow)])
def test_peft_fit_saves_adapters_and_head_only_and_evaluates_from_the_checkpoint(
    bases, tmp_path, base, capsys
):
    from gptlab.cli import main

    path = fit_config(bases, tmp_path, base, peft=LORA)
    capsys.readouterr()
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(["fit", "--config", str(path)])
    printed = capsys.readouterr().out
    assert "trainable parameters of" in printed and "LoraConfig adapters on a frozen base" in printed
    run = tmp_path / "logs" / "classification" / "version_0"
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {k for k in keys if ".lora_" in k or k.startswith("head.") or k == "tokens_seen"}
    assert {"head.1.weight", "head.1.bias"} <= keys and any(".lora_" in k for k in keys)
    info = checkpoint["gptlab"]["peft"]
    assert info["method"] == "LoraConfig" and info["base"] == getattr(bases, base)
    assert len(info["base_fingerprint"]) == 16
    # Optimizer state for the trainable tensors only.
    assert len(checkpoint["optimizer_states"][0]["state"]) == len(keys) - 1
    assert checkpoint["hyper_parameters"]["peft"]["init_args"]["r"] == 4

    # `test` from the checkpoint alone: the base comes back from the recorded init_from.
    code, err = run_cli(capsys, "test", "--ckpt_path", str(ckpt))
    assert code == 0, err
    assert (run / "reports" / "test_report.json").is_file()
    code, err = run_cli(capsys, "predict", "--ckpt_path", str(ckpt))
    assert code == 0, err
    assert list((run / "predictions").iterdir())
    # And in Python: the same weights as the trained model's.
    task = SequenceClassification.load_from_checkpoint(ckpt)
    for key in keys:
        torch.testing.assert_close(task.state_dict()[key], checkpoint["state_dict"][key])


@pytest.fixture(scope="module")
def lora_run(bases) -> Path:
    """The last.ckpt of one LoRA fine-tune on the tiny Llama base (read only)."""
    from gptlab.cli import main

    tmp = bases.tmp / "lora_run"
    tmp.mkdir()
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(["fit", "--config", str(fit_config(bases, tmp, "llama", peft=LORA))])
    return tmp / "logs" / "classification" / "version_0" / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------- bad input (docs/bad_inputs.md)
def test_peft_target_modules_that_match_nothing(bases, tmp_path, capsys):
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["query", "value"]}}
    path = fit_config(bases, tmp_path, "gpt", peft=lora)
    code, err = run_cli(capsys, "fit", "--config", str(path))
    line = one_line_error(code, err, "target_modules=['query', 'value'] matches no module")
    assert "c_attn (Linear)" in line and "lm_head (Linear)" in line  # the backbone's own names
    assert not (tmp_path / "logs").exists()


def test_a_misspelled_target_module_beside_one_that_matches_is_refused(bases, tmp_path, capsys):
    """peft adapts what 'c_attn' matches and drops 'c_prj' silently: refused, naming the typo."""
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["c_attn", "c_prj"]}}
    path = fit_config(bases, tmp_path, "gpt", peft=lora)
    code, err = run_cli(capsys, "fit", "--config", str(path))
    line = one_line_error(code, err, "target_modules: ['c_prj'] match no module", "check the spelling")
    assert "c_proj (Linear)" in line
    assert not (tmp_path / "logs").exists()


def test_layers_to_transform_beyond_the_model_is_named_not_target_modules(bases, tmp_path, capsys):
    """Was: target_modules=['c_attn', ...] matches no module (the layers were the cause)."""
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "layers_to_transform": [0, 5]}}
    code, err = run_cli(capsys, "fit", "--config", str(fit_config(bases, tmp_path, "gpt", peft=lora)))
    line = one_line_error(code, err, "layers_to_transform=[0, 5]: the backbone has 1 layers (0..0), so [5]")
    assert "target_modules" not in line


def test_modules_to_save_is_refused_by_name_not_as_a_backbone_mismatch(bases, tmp_path, capsys):
    """Was: init_from=...: backbone does not match the checkpoint (missing [...modules_to_save...])."""
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "modules_to_save": ["lm_head"]}}
    code, err = run_cli(capsys, "fit", "--config", str(fit_config(bases, tmp_path, "gpt", peft=lora)))
    line = one_line_error(
        code, err, "modules_to_save=['lm_head']: gptlab does not support it", "leave it out"
    )
    assert "does not match" not in line


def test_inference_mode_adapters_are_refused_not_reported_as_trained(bases, tmp_path, capsys):
    """peft freezes inference_mode adapters: the fit trained the head alone and said 'LoRA adapters'."""
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "inference_mode": True}}
    code, err = run_cli(capsys, "fit", "--config", str(fit_config(bases, tmp_path, "gpt", peft=lora)))
    one_line_error(code, err, "inference_mode=true freezes the adapters", "leave it out")


@pytest.mark.parametrize(
    "schedule, needles",
    [
        ({}, ["total_step=None", "set it to the number of optimizer steps (trainer.max_steps=2)"]),
        (
            {"total_step": 5, "tinit": 8},
            ["tinit=8 + tfinal=0 leave no step of total_step=5", "raise total_step"],
        ),
    ],
    ids=["no_total_step", "tinit_past_total_step"],
)
def test_adalora_schedule_that_peft_refuses_is_one_line(schedule, needles, bases, tmp_path, capsys):
    """peft's AdaLoraConfig raises in __post_init__ while jsonargparse builds the model: was a
    116-line trace."""
    adalora = {"class_path": "peft.AdaLoraConfig", "init_args": {"init_r": 4, "target_r": 1, **schedule}}
    path = fit_config(bases, tmp_path, "gpt", peft=adalora)
    one_line_error(*run_cli(capsys, "fit", "--config", str(path)), *needles)
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_adapter_checkpoint_on_another_base(bases, lora_run, tmp_path, capsys):
    other = save_llama(tmp_path / "other_llama", bases.tokenizer, seed=1)
    before = snapshot(lora_run.parent.parent)
    args = ["--ckpt_path", str(lora_run), "--model.init_args.init_from", str(other)]
    code, err = run_cli(capsys, "test", *args)
    line = one_line_error(code, err, "trained on the base", bases.llama, str(other), "fingerprint")
    assert "load it on the base it was trained on" in line
    assert snapshot(lora_run.parent.parent) == before


def test_peft_without_the_peft_package(bases, tmp_path, capsys):
    path = fit_config(bases, tmp_path, "gpt", peft=LORA)
    with mock.patch.dict(sys.modules, {"peft": None}):  # `import peft` raises ImportError
        code, err = run_cli(capsys, "fit", "--config", str(path))
    one_line_error(code, err, "needs the peft library", "pip install 'gptlab[peft]'")
    assert not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_peft_without_the_peft_package_in_a_real_process(bases, tmp_path):
    """No peft at all (a package that fails to import shadows it): main.py says which pip command."""
    import os
    import subprocess

    from conftest import REPO

    (tmp_path / "shadow" / "peft").mkdir(parents=True)
    (tmp_path / "shadow" / "peft" / "__init__.py").write_text("raise ImportError('No module named peft')\n")
    path = fit_config(bases, tmp_path, "gpt", peft=LORA)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "main.py"), "fit", "--config", str(path)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    one_line_error(done.returncode, done.stderr, "needs the peft library", "pip install 'gptlab[peft]'")
    assert not (tmp_path / "logs").exists()


def test_peft_with_freeze_backbone(bases, tmp_path, capsys):
    path = fit_config(bases, tmp_path, "gpt", peft=LORA, freeze_backbone=True)
    code, err = run_cli(capsys, "fit", "--config", str(path))
    one_line_error(code, err, "model.init_args.peft and freeze_backbone: true exclude each other")
    assert not (tmp_path / "logs").exists()


def test_peft_on_a_random_backbone(bases, tmp_path, capsys):
    config = finetune_config(tmp_path, "classification", bases.sentiment, peft=LORA)  # no init_from
    path = tmp_path / "random.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(path))
    one_line_error(code, err, "has random weights", "set model.init_args.init_from")


@pytest.mark.slow
def test_init_from_a_peft_checkpoint(bases, lora_run, tmp_path, capsys):
    config = finetune_config(tmp_path, "classification", bases.sentiment, init_from=str(lora_run))
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = run_cli(capsys, "fit", "--config", str(path))
    one_line_error(code, err, f"init_from={lora_run} is a peft checkpoint", "--merged true")


# ----------------------------------------------------------------- export
def fit_run(bases: SimpleNamespace, name: str, config: dict) -> Path:
    """`fit` of `config` under bases.tmp/<name>; its last.ckpt."""
    from gptlab.cli import main

    tmp = bases.tmp / name
    tmp.mkdir()
    path = tmp / "config.yaml"
    config["logs"] = str(tmp / "logs")
    path.write_text(yaml.safe_dump(config))
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(["fit", "--config", str(path)])
    return tmp / "logs" / config["experiment"] / "version_0" / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def lm_runs(bases, tiny_runs) -> dict[str, Path]:
    """LoRA fine-tunes of a language model (CausalLM) on each base: {base: last.ckpt}."""
    runs = {}
    for base in ("gpt", "llama"):
        config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
        model = config["model"]["init_args"]
        model.pop("backbone")  # taken from init_from, with its tokenizer
        model.update(init_from=getattr(bases, base), peft=LORA)
        config["data"]["init_args"]["cache_dir"] = str(bases.tmp / "cache")
        config["trainer"].update(max_steps=4, val_check_interval=2)
        runs[base] = fit_run(bases, f"lm_{base}", config)
    return runs


@pytest.fixture(scope="module")
def gpt_lora_run(bases) -> Path:
    """A LoRA classifier fine-tune on the GPT base: last.ckpt (read only)."""
    config = finetune_config(bases.tmp, "classification", bases.sentiment, init_from=bases.gpt, peft=LORA)
    config["trainer"].update(max_steps=4, val_check_interval=2)
    return fit_run(bases, "gpt_classifier", config)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["gpt", "llama"])
def test_export_writes_the_adapter_in_peft_format_and_merged_on_request(
    bases, lm_runs, tmp_path, base, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptlab.adapters import without_adapters
    from gptlab.export import to_hf_model
    from gptlab.tasks import CausalLM

    ckpt = lm_runs[base]
    task = CausalLM.load_from_checkpoint(ckpt).eval()
    # Training moved the adapters off their start (LoRA's B = 0).
    assert any(p.abs().max() > 0 for n, p in task.named_parameters() if ".lora_B." in n)
    ids = torch.arange(16)[None] % 300
    with torch.no_grad():
        ours = task.backbone.logits(task.backbone(ids))

    adapter = tmp_path / "adapter"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(adapter))
    assert code == 0, err
    files = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == (bases.llama if base == "llama" else None)  # a .ckpt is no transformers base
    # The base as transformers has it: the Hugging Face directory, or (our GPT) its plain export.
    if base == "llama":
        hf_base = AutoModelForCausalLM.from_pretrained(bases.llama, dtype=torch.float32)
    else:
        plain = to_hf_model(without_adapters(task.backbone), AutoTokenizer.from_pretrained(adapter))
        plain.save_pretrained(tmp_path / "gpt_base")
        hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt_base", dtype=torch.float32)
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(hf_base, adapter).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    merged = tmp_path / "merged"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(merged), "--merged", "true")
    assert code == 0, err
    assert not (merged / "adapter_config.json").exists()
    with torch.no_grad():
        plain_logits = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(plain_logits, ours, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_export_of_a_peft_classifier_merged(gpt_lora_run, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "classifier"
    code, err = run_cli(
        capsys, "export", "--ckpt_path", str(gpt_lora_run), "--out", str(out), "--merged", "true"
    )
    assert code == 0, err
    task = SequenceClassification.load_from_checkpoint(gpt_lora_run).eval()
    batch = {"input_ids": torch.arange(3, 11)[None], "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(**batch).logits, task(batch), rtol=0, atol=1e-5)
    assert hf.config.id2label == {0: "negative", 1: "positive"}


@pytest.mark.slow
def test_export_of_a_peft_classifier_without_merged(gpt_lora_run, tmp_path, capsys):
    code, err = run_cli(capsys, "export", "--ckpt_path", str(gpt_lora_run), "--out", str(tmp_path / "x"))
    one_line_error(code, err, "is a peft SequenceClassification", "pass --merged true")
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------- other peft methods
@pytest.mark.slow
def test_adalora_allocates_its_rank_budget_and_checkpoints_the_allocator(bases, tiny_runs, tmp_path, capsys):
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    model = config["model"]["init_args"]
    model.pop("backbone")
    adalora = {"init_r": 4, "target_r": 1, "total_step": 8, "tinit": 1, "tfinal": 2, "deltaT": 1}
    model.update(init_from=bases.gpt, peft={"class_path": "peft.AdaLoraConfig", "init_args": adalora})
    config["data"]["init_args"]["cache_dir"] = str(bases.tmp / "cache")
    config["trainer"].update(max_steps=8, val_check_interval=4)
    ckpt = fit_run(bases, "adalora", config)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    state = checkpoint["state_dict"]
    singular = [v for k, v in state.items() if ".lora_E." in k]  # (init_r, 1) each
    assert singular and all(v.shape == (4, 1) for v in singular)
    # The budget fell from 4 to 1 triplet per layer on average: most singular values are masked.
    kept = sum(int((v != 0).sum()) for v in singular)
    assert kept <= len(singular) * 2, kept
    # The final allocation (step total_step - tfinal) is recorded and kept: masked triplets stay 0.
    pattern = checkpoint["gptlab"]["peft"]["adalora"]["rank_pattern"]
    assert pattern and sum(sum(kept) for kept in pattern.values()) == kept
    task = CausalLM.load_from_checkpoint(ckpt)
    assert task.peft_tuner.peft_config["default"].rank_pattern == pattern
    code, err = run_cli(capsys, "test", "--ckpt_path", str(ckpt))
    assert code == 0, err


@pytest.mark.slow
def test_lora_overlay_on_the_shipped_smollm2_config(fake_smollm2, bases, tmp_path, capsys):
    """configs/peft/lora.yaml stacked on configs/finetune/sst2_smollm2.yaml (a tiny stand-in model)."""
    from conftest import REPO
    from gptlab.cli import main

    args = [
        "fit", "--config", str(REPO / "configs/finetune/sst2_smollm2.yaml"),
        "--config", str(REPO / "configs/peft/lora.yaml"),
        "--data.init_args.train_files", str(bases.sentiment["train"]),
        "--data.init_args.val_files", str(bases.sentiment["dev"]),
        "--data.init_args.test_files", str(bases.sentiment["test"]),
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--logs", str(tmp_path / "logs"),
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
    ]  # fmt: skip
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        main(args)
    assert "LoraConfig adapters on a frozen base" in capsys.readouterr().out
    (ckpt,) = (tmp_path / "logs").rglob("last.ckpt")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert checkpoint["gptlab"]["peft"]["base"] == "~/.cache/gptlab/models/SmolLM2-135M-Instruct"
    assert checkpoint["hyper_parameters"]["peft"]["init_args"]["r"] == 16
    assert all(".lora_" in k or k.startswith("head.") or k == "tokens_seen" for k in checkpoint["state_dict"])


METHODS = {
    "lora": ("LoraConfig", {"r": 4}),
    "dora": ("LoraConfig", {"r": 4, "use_dora": True}),
    "adalora": ("AdaLoraConfig", {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 1, "tfinal": 2}),
    "ia3": ("IA3Config", {}),
    "loha": ("LoHaConfig", {"r": 4}),
    "lokr": ("LoKrConfig", {"r": 4}),
    "boft": ("BOFTConfig", {"boft_block_size": 4}),
    "fourierft": ("FourierFTConfig", {"n_frequency": 16}),
}


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("method", list(METHODS))
def test_peft_methods_train_on_both_backbones(method, kind):
    """The support table of docs/fine-tuning.md: forward and backward reach every adapter tensor."""
    import peft

    name, args = METHODS[method]
    backbone = tiny_gpt() if kind == "gpt" else HFBackbone(model_type="llama", config_overrides=LLAMA)
    task = SequenceClassification(
        backbone, label_names=["a", "b"], init_from="base", peft=getattr(peft, name)(**args)
    )
    batch = {"input_ids": torch.randint(0, 64, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    task(batch).sum().backward()
    adapter = [(n, p) for n, p in task.backbone.named_parameters() if p.requires_grad]
    assert adapter and all(p.grad is not None for _, p in adapter), [n for n, p in adapter if p.grad is None]
    assert all(not p.requires_grad for n, p in task.backbone.named_parameters() if ".base_layer." in n)


@pytest.mark.parametrize("name", ["VeraConfig", "PrefixTuningConfig", "PromptTuningConfig"])
def test_peft_methods_gptlab_refuses(name):
    import peft

    from gptlab.errors import ConfigError

    args = {"r": 4} if name == "VeraConfig" else {"num_virtual_tokens": 4, "task_type": "CAUSAL_LM"}
    with pytest.raises(ConfigError, match="model.init_args.peft: " + name):
        CausalLM(tiny_gpt(), init_from="base", peft=getattr(peft, name)(**args))


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_lora_with_activation_checkpointing_gives_the_same_gradients(kind):
    """Frozen inputs to every checkpointed block: the adapters still get their gradients (non-reentrant)."""
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        if kind == "gpt":
            backbone = GPT(
                vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, gradient_checkpointing=recompute
            )
        else:
            backbone = HFBackbone(
                model_type="llama", config_overrides=LLAMA, gradient_checkpointing=recompute
            )
        task = SequenceClassification(
            backbone, label_names=["a", "b"], init_from="base", peft=LoraConfig(r=4)
        )
        for name, p in task.named_parameters():  # B != 0, so that A gets a gradient too
            if ".lora_B." in name:
                torch.nn.init.normal_(p, std=0.1)
        task.train()
        batch = {
            "input_ids": torch.arange(16).reshape(2, 8),
            "attention_mask": torch.ones(2, 8, dtype=torch.long),
        }
        task(batch).sum().backward()
        grads.append({n: p.grad for n, p in task.named_parameters() if p.requires_grad})
    assert all(g is not None for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_generation_decodes_through_the_adapters_with_and_without_a_cache(kind):
    """SFT under peft: greedy decoding with the KV cache equals decoding without it, adapters included."""
    from gptlab.decoding import generate_batch
    from gptlab.tasks import Generation

    torch.manual_seed(0)
    backbone = tiny_gpt() if kind == "gpt" else HFBackbone(model_type="llama", config_overrides=LLAMA)
    task = Generation(backbone, init_from="base", peft=LoraConfig(r=4))
    for name, p in task.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change what the base would say
    plain = adapters.without_adapters(task.backbone)
    prompts = [[1, 2, 3], [4, 5]]
    kwargs = {"max_new_tokens": 6, "temperature": 0.0}
    cached = generate_batch(task.backbone, prompts, **kwargs)
    assert cached == generate_batch(task.backbone, prompts, use_cache=False, **kwargs)
    assert cached != generate_batch(plain, prompts, **kwargs)


@pytest.mark.parametrize("init", [True, "pissa", "pissa_niter_2", "olora"])
def test_adapters_start_from_the_loaded_base(bases, init):
    """Inits that read the base weights (PiSSA, OLoRA) run on the init_from weights, not on the
    random ones the backbone was built with: at step 0 the adapted model is the base, and its
    adapters and residual weights are those of peft on the loaded base."""
    from gptlab.loading import load_backbone_weights
    from gptlab.runs import pretrained_backbone

    args = pretrained_backbone(bases.gpt)["init_args"]
    base = GPT(**args).eval()
    load_backbone_weights(base, bases.gpt)
    task = CausalLM(GPT(**args), init_from=bases.gpt, peft=LoraConfig(r=4, init_lora_weights=init)).eval()
    task.load_base()  # what setup does, in every stage
    ids = torch.randint(0, args["vocab_size"], (2, 12))
    with torch.no_grad():
        ours, theirs = task.backbone.logits(task.backbone(ids)), base.logits(base(ids))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if init == "pissa_niter_2":
        # A randomised SVD: every load of the base (resume, evaluation) rebuilds the same weights.
        reference = CausalLM(GPT(**args), init_from=bases.gpt, peft=LoraConfig(r=4, init_lora_weights=init))
        reference.load_base()
        reference = reference.backbone
    else:
        # peft on the loaded base, as it would be applied to the pretrained model directly
        reference = GPT(**args)
        load_backbone_weights(reference, bases.gpt)
        adapters.add_adapters(reference, LoraConfig(r=4, init_lora_weights=init))
    ours, theirs = task.backbone.state_dict(), reference.state_dict()
    if init is True:  # A is random (its own draw), B = 0: only B and the base are the same
        ours = {k: v for k, v in ours.items() if "lora_A" not in k}
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], msg=key)


def test_an_init_from_more_than_the_base_weights_is_refused_with_init_from(bases):
    from gptlab.errors import ConfigError
    from gptlab.runs import pretrained_backbone

    args = pretrained_backbone(bases.gpt)["init_args"]
    task = CausalLM(GPT(**args), init_from=bases.gpt, peft=LoraConfig(r=4, init_lora_weights="eva"))
    with pytest.raises(ConfigError, match="init_lora_weights='eva' initialises the adapters from more than"):
        task.load_base()


def test_merged_export_of_an_adapter_on_a_tied_lm_head_names_the_cause(bases, tiny_runs, tmp_path, capsys):
    """LoRA on our GPT's lm_head, which shares its tensor with the token embedding: merged, the
    adapter moves the embedding too (was only "logits differ by ...")."""
    config = yaml.safe_load(tiny_runs.configs["causal_lm"].read_text())
    model = config["model"]["init_args"]
    model.pop("backbone")
    lora = {"class_path": "peft.LoraConfig", "init_args": {"r": 4, "target_modules": ["lm_head", "c_attn"]}}
    model.update(init_from=bases.gpt, peft=lora)
    config["data"]["init_args"]["cache_dir"] = str(bases.tmp / "cache")
    config["trainer"].update(max_steps=2, val_check_interval=2)
    ckpt = fit_run(bases, "tied_lm_head", config)
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "export", "--ckpt_path", str(ckpt), "--out", str(out), "--merged", "true")
    one_line_error(
        code, err, "logits differ", "adapter on lm_head changes a weight tied to transformer.wte",
        "left out of model.init_args.peft.init_args.target_modules", "export the adapter alone",
    )  # fmt: skip
    assert not out.exists()


@pytest.fixture(scope="module")
def own_base_run(bases) -> SimpleNamespace:
    """A LoRA classifier fine-tune on a private copy of the GPT base (which tests change and restore)."""
    base = bases.tmp / "own_base" / "checkpoints" / "base.ckpt"
    base.parent.mkdir(parents=True)
    shutil.copy(bases.gpt, base)
    shutil.copytree(bases.tokenizer, base.parent.parent / "tokenizer")  # where init_from's is looked for
    config = finetune_config(bases.tmp, "classification", bases.sentiment, init_from=str(base), peft=LORA)
    config["trainer"].update(max_steps=2, val_check_interval=2)
    return SimpleNamespace(base=base, ckpt=fit_run(bases, "own_base_run", config))


def test_an_adapter_checkpoint_whose_base_weights_changed_in_place(own_base_run, tmp_path, capsys):
    """Same path, other weights: was "trained on the base X ..., but this model's base is X"."""
    base = own_base_run.base
    shutil.copy(base, tmp_path / "original.ckpt")
    checkpoint = torch.load(base, weights_only=True)
    key = next(k for k in checkpoint["state_dict"] if k.endswith(".ln_1.weight"))  # not a tied one
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] + 1
    torch.save(checkpoint, base)
    try:
        code, err = run_cli(capsys, "test", "--ckpt_path", str(own_base_run.ckpt))
    finally:
        shutil.copy(tmp_path / "original.ckpt", base)
    line = one_line_error(code, err, f"the weights at {base} changed since the adapters were trained")
    assert "restore the base the adapters were trained on there, or point init_from at a copy" in line
    assert "this model's base is" not in line


def test_an_adapter_checkpoint_whose_base_was_deleted_names_it_as_the_base(own_base_run, tmp_path, capsys):
    """Was "checkpoint <base> does not exist: check the path (runs live in logs/<experiment>/)"."""
    base = own_base_run.base
    shutil.move(base, tmp_path / "moved.ckpt")
    try:
        code, err = run_cli(capsys, "test", "--ckpt_path", str(own_base_run.ckpt))
    finally:
        shutil.move(tmp_path / "moved.ckpt", base)
    line = one_line_error(code, err, f"init_from={base}, the base the peft adapters were trained on")
    assert "restore it there, or point model.init_args.init_from at a copy of it" in line
