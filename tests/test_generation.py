"""The Generation task through the CLI: SFT fit -> test report -> predict -> export -> transformers.

One tiny run (the shipped configs/finetune/gsm8k_sft.yaml with a tiny model and tiny files stacked
on top) is shared by the module; commands run in-process through `gptlab.cli.main` (a subprocess
would spend most of its time importing).
"""

from __future__ import annotations

import inspect
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torchmetrics.text import BLEUScore
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, shared_data
from gptlab.cli import GPTLabCLI, main
from gptlab.decoding import generate_batch
from gptlab.loading import load_backbone_weights
from gptlab.models import GPT
from gptlab.tasks import CausalLM, Generation, SequenceClassification, TokenClassification
from gptlab.tasks.generation import GSM8K_ANSWER, AnswerExactMatch

SFT_CONFIG = REPO / "configs" / "finetune" / "gsm8k_sft.yaml"
TINY_BACKBONE = dict(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)


def arithmetic(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    pairs = [(rng.randint(1, 20), rng.randint(1, 20)) for _ in range(n)]
    return [
        {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
        for a, b in pairs
    ]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """`main.py fit` with the shipped SFT config, shrunk; returns the run directory."""
    tmp = tmp_path_factory.mktemp("sft")
    for name, records in (("train", arithmetic(40, 0)), ("test", arithmetic(6, 1))):
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    overrides = {
        "logs": str(tmp / "logs"),
        "experiment": "tiny_sft",
        "model": {
            "init_args": {
                # from scratch: no pretraining run, so the backbone and the tokenizer are given
                "init_from": None,
                "backbone": {"class_path": "gptlab.models.GPT", "init_args": TINY_BACKBONE},
                "max_new_tokens": 12,
                "num_samples": 6,
            }
        },
        "data": {
            "init_args": {
                "train_files": str(tmp / "train.jsonl"),
                "test_files": str(tmp / "test.jsonl"),
                "predict_files": str(tmp / "test.jsonl"),
                "tokenizer": {"class_path": "gptlab.data.BPE", "init_args": {"vocab_size": 300}},
                "block_size": 64,
                "val_fraction": 0.1,
                "batch_size": 4,
                "eval_batch_size": 4,
                "cache_dir": str(tmp / "cache"),
            }
        },
        "trainer": {
            "max_steps": 8,
            "val_check_interval": 4,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(overrides))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only adds synchronisation
    try:
        main(["fit", "--config", str(SFT_CONFIG), "--config", str(tmp / "tiny.yaml")])
    finally:
        torch.set_num_threads(threads)
    return tmp / "logs" / "tiny_sft" / "version_0"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_shipped_config_instantiates_on_the_real_data(sft_run: Path):
    shared_data("gsm8k/train.jsonl")
    ckpt = str(sft_run / "checkpoints" / "last.ckpt")
    # run=False: no subcommand; init_from swapped for the tiny run (backbone + tokenizer come from it)
    cli = GPTLabCLI(args=["--config", str(SFT_CONFIG), "--model.init_args.init_from", ckpt], run=False)
    assert isinstance(cli.model, Generation) and cli.model.backbone.config.vocab_size == 320
    assert cli.datamodule.tokenizer_source == str(sft_run / "tokenizer")
    assert cli.datamodule.prompt_template == "Question: {question}\nAnswer: "
    assert cli.datamodule.role_files["test"] == "data/gsm8k/test.jsonl" and cli.datamodule.packing
    assert cli.model.test_metrics["exact_match"].pattern.pattern == r"#### (\-?[0-9\.\,]+)"


def test_exact_match_defaults_to_whole_completions_with_whitespace_normalised():
    exact = AnswerExactMatch()
    exact.update(["Paris ", "the  cat\nsat", "#### 4", "1,000."], ["Paris", "the cat sat", "#### 5", "1000"])
    # "#### 4" is not "#### 5" as a whole; no number normalisation without a pattern ("1,000." != "1000").
    assert exact.compute().item() == 0.5 and int(exact.found) == 4
    gsm8k = AnswerExactMatch(GSM8K_ANSWER)
    gsm8k.update(["so #### 1,000.", "no answer"], ["#### 1000", "#### 3"])
    assert gsm8k.compute().item() == 0.5 and int(gsm8k.found) == 1
    assert (
        Generation(backbone=GPT(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)).answer_pattern
        == ""
    )


def test_generation_takes_the_backbone_options_of_every_task_in_the_same_order():
    shared = [
        "backbone",
        "optimizer",
        "scheduler",
        "init_from",
        "freeze_backbone",
        "backbone_lr_scale",
        "peft",
    ]
    for task in (Generation, CausalLM, SequenceClassification, TokenClassification):
        names = [n for n in inspect.signature(task.__init__).parameters if n in shared]
        assert names == shared, task.__name__
    backbone = GPT(vocab_size=16, block_size=8, n_layer=1, n_head=1, n_embd=8)
    frozen = Generation(backbone=backbone, freeze_backbone=True, backbone_lr_scale=0.5)
    assert frozen.freeze_backbone and frozen.backbone_lr_scale == 0.5


def test_test_report_scores_the_generations(sft_run: Path):
    # A decoding option given on the command line wins over the checkpoint's hyperparameters.
    main(
        [
            "test",
            "--ckpt_path",
            str(sft_run / "checkpoints" / "last.ckpt"),
            "--model.init_args.max_new_tokens",
            "10",
        ]
    )
    report = json.loads((sft_run / "reports" / "test_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["examples_generated"] == 6 and len(report["samples"]) == 6
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert metrics["tokens_evaluated"] > 0
    # The metrics are those of the sample generations (all six are shown): recompute them.
    completions = [s["completion"] for s in report["samples"]]
    references = [s["reference"] for s in report["samples"]]
    assert references == [r["answer"] for r in arithmetic(6, 1)]
    exact = AnswerExactMatch(GSM8K_ANSWER)  # the GSM8K config's pattern
    exact.update(completions, references)
    assert metrics["exact_match"] == pytest.approx(exact.compute().item())
    assert metrics["bleu"] == pytest.approx(BLEUScore()(completions, [[r] for r in references]).item())
    assert 0 <= metrics["rougeL_f"] <= 1
    assert "max_new_tokens=10, temperature=0.0" in report["meta"]["decoding"] and report["meta"][
        "checkpoint"
    ].endswith("last.ckpt")
    assert "exact_match" in (sft_run / "reports" / "test_report.md").read_text()
    assert report["meta"]["exact_match"].startswith(f"answer_pattern {GSM8K_ANSWER!r}")
    # predict writes the same greedy completions for the same prompts
    main(
        [
            "predict",
            "--ckpt_path",
            str(sft_run / "checkpoints" / "last.ckpt"),
            "--model.init_args.max_new_tokens",
            "10",
        ]
    )
    # Reports and predictions get the mode a plain write gives (the umask's), readable by others.
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(sft_run / "reports").glob("test_report.*"), sft_run / "predictions" / "predictions.jsonl"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path
    lines = (sft_run / "predictions" / "predictions.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["prompt"] for p in predictions] == [s["prompt"] for s in report["samples"]]
    assert [p["completion"] for p in predictions] == completions


def test_export_round_trip(sft_run: Path, tmp_path: Path):
    ckpt = sft_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    task = Generation.load_from_checkpoint(ckpt).eval()
    ours = AutoTokenizer.from_pretrained(sft_run / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(out)
    text = "Question: What is 12 plus 7?\nAnswer: 12 + 7 = 19\n#### 19"
    ids = ours(text)["input_ids"]
    assert theirs(text)["input_ids"] == ids and theirs.decode(ids) == text
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = torch.tensor([ids])
    with torch.no_grad():
        expected = task.backbone.logits(task.backbone(batch))
        torch.testing.assert_close(model(batch).logits, expected, atol=1e-5, rtol=0)
    assert model.config.eos_token_id == theirs.eos_token_id
    # The context length travels with the tokenizer: truncation stops at the position table's end.
    assert theirs.model_max_length == TINY_BACKBONE["block_size"]
    long_ids = theirs(text * 20, truncation=True)["input_ids"]
    assert (
        len(long_ids) == TINY_BACKBONE["block_size"]
        and model(torch.tensor([long_ids])).logits.isfinite().all()
    )
    # transformers' greedy generate continues exactly like gptlab's decoding
    prompt = ours("Question: What is 3 plus 4?\nAnswer: ")["input_ids"]
    hf_new = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    (ours_new,) = generate_batch(
        task.backbone, [prompt], max_new_tokens=10, temperature=0, eos_token_id=ours.eos_token_id
    )
    # ours stops before the EOS (not returned); transformers includes it
    assert hf_new == ours_new + [ours.eos_token_id] * (len(hf_new) - len(ours_new))
    # gptlab starts from the exported directory (init_from) with the same weights
    fresh = GPT(**TINY_BACKBONE)
    load_backbone_weights(fresh, out)
    state = task.backbone.state_dict()
    assert all(torch.equal(fresh.state_dict()[k], state[k]) for k in state)


def test_export_refuses_bad_input_and_writes_nothing(sft_run: Path, tmp_path: Path, capsys):
    # A checkpoint without the run's tokenizer beside it
    lone = tmp_path / "elsewhere" / "checkpoints"
    lone.mkdir(parents=True)
    shutil.copy(sft_run / "checkpoints" / "last.ckpt", lone / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--ckpt_path", str(lone / "last.ckpt"), "--out", str(tmp_path / "a")])
    assert exit_info.value.code == 2
    assert "no tokenizer beside this checkpoint" in capsys.readouterr().err and not (tmp_path / "a").exists()
    # ... which --tokenizer fixes
    main(
        [
            "export",
            "--ckpt_path",
            str(lone / "last.ckpt"),
            "--out",
            str(tmp_path / "a"),
            "--tokenizer",
            str(sft_run / "tokenizer"),
        ]
    )
    assert (tmp_path / "a" / "model.safetensors").is_file()
    # An existing directory is not overwritten
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "mine.txt").write_text("precious")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(sft_run / "checkpoints" / "last.ckpt"), "--out", str(keep)])
    assert "already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in keep.iterdir()] == ["mine.txt"]
    # Not a gptlab checkpoint
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt_path", str(tmp_path / "foreign.ckpt"), "--out", str(tmp_path / "b")])
    assert "not written by gptlab" in capsys.readouterr().err


@pytest.mark.parametrize(
    "family, logits_step",
    [("llama", {}), ("granite", {"logits_scaling": 4.0}), ("gemma2", {"final_logit_softcapping": 0.5})],
)
def test_export_of_a_hugging_face_backbone(tmp_path: Path, family: str, logits_step: dict):
    """An HFBackbone (a tiny Llama; Granite and Gemma 2, whose forward changes the logits after the
    LM head) exports as itself, with the tokenizer's special ids and the same logits."""
    from gptlab.data import BPE
    from gptlab.export import check_export, to_hf_model
    from gptlab.models import HFBackbone

    tokenizer = BPE(vocab_size=300).train(["some text to train on"] * 10)
    torch.manual_seed(0)
    backbone = HFBackbone(
        model_type=family,
        config_overrides=dict(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            **({"head_dim": 16, "num_key_value_heads": 2} if family == "gemma2" else {}),
            **logits_step,
        ),  # fmt: skip
    ).eval()
    model = to_hf_model(backbone, tokenizer)
    model.save_pretrained(tmp_path)
    assert check_export(backbone, tmp_path) <= 1e-5
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.eos_token_id == tokenizer.eos_token_id
