"""peft under DDP and FSDP2 (2 CPU processes), from `init_from`, and exact resume after kill -9.

The reference of every distributed run is the same LoRA fine-tune in one process with the same
global batch, as in tests/test_distributed.py; the resume test reuses tests/test_resume.py's
harness (a real SIGKILL of a separate process, continued with `--ckpt_path last`).
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, TINY_CORPUS, finish_dist_run, start_dist_run, tiny_config
from gptlab.cli import main
from gptlab.loading import load_checkpoint
from gptlab.tasks import CausalLM
from test_distributed import TIMEOUT, assert_every_rank_succeeded, assert_same_losses, run_dir
from test_peft import LORA, save_llama

pytestmark = [pytest.mark.slow]

STEPS = 4
PER_RANK_BATCH = 4
RECORD = ["--trainer.callbacks+=dist_run.Recorder", "--throughput.peak_flops", "1e11"]


def one_process(config: Path, name: str, *args: str) -> dict:
    """The fine-tune in this process with the global batch of two ranks; rank 0's record."""
    out = config.parent / f"{name}_out"
    out.mkdir()
    os.environ["GPTLAB_TEST_OUT"] = str(out)
    try:
        batch = ["--data.init_args.batch_size", str(2 * PER_RANK_BATCH)]
        main(["fit", "--config", str(config), *RECORD, "--experiment", name, *batch, *args])
    finally:
        del os.environ["GPTLAB_TEST_OUT"]
    return json.loads((out / "rank0.json").read_text())


def launch(config: Path, name: str, *args: str) -> list[dict]:
    """The fine-tune on 2 processes (`tests/dist_run.py`); every rank's record."""
    out = config.parent / f"{name}_out_{len(list(config.parent.glob(f'{name}_out*')))}"
    out.mkdir()
    batch = ["--data.init_args.batch_size", str(PER_RANK_BATCH)]
    command = ["fit", "--config", str(config), *RECORD, "--experiment", name, *batch, *args]
    code, output = finish_dist_run(start_dist_run(command, config.parent, out), name, TIMEOUT)
    assert_every_rank_succeeded(name, code, output, out)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> dict[str, Path]:
    """LoRA fine-tunes of a causal LM from `init_from`: a tiny GPT pretraining run, a tiny Llama directory."""
    tmp = tmp_path_factory.mktemp("peft_dist")
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, text in enumerate(TINY_CORPUS):
        (corpus / f"doc{i}.txt").write_text(text)
    pretrain = tiny_config(tmp, corpus, **{"model.init_args.backbone.init_args.n_layer": 2})
    main(["fit", "--config", str(pretrain), "--experiment", "base", "--trainer.max_steps", "2"])
    base_run = tmp / "logs" / "base" / "version_0"
    llama = save_llama(tmp / "llama", base_run / "tokenizer")
    configs = {}
    for name, source in (("gpt", base_run / "checkpoints" / "last.ckpt"), ("llama", llama)):
        config = yaml.safe_load(pretrain.read_text())
        model = config["model"]["init_args"]
        model.pop("backbone")
        # No dropout: two ranks draw other masks than one process (compared to 1e-5 here).
        lora = {"class_path": "peft.LoraConfig", "init_args": {**LORA["init_args"], "lora_dropout": 0.0}}
        model.update(init_from=str(source), peft=lora)
        model["optimizer"]["init_args"]["weight_decay"] = 0.1
        # A schedule of its own length: a run stopped at STEPS and resumed to 2 STEPS follows it too.
        model["scheduler"]["init_args"]["max_steps"] = 2 * STEPS
        config["data"]["init_args"]["stride"] = 1  # full windows: equal weights per rank
        config["trainer"].update(max_steps=STEPS, val_check_interval=STEPS, gradient_clip_val=1.0)
        configs[name] = tmp / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(config))
    return configs


def adapter_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    state = {
        k: v for k, v in checkpoint["state_dict"].items() if k != "tokens_seen" and not k.startswith("head.")
    }
    assert state and all(".lora_" in k for k in state), sorted(state)
    return state


def ddp(*args: str) -> list[str]:
    return ["--config", str(REPO / "configs/trainer/ddp.yaml"), "--trainer.accelerator", "cpu", *args]


@pytest.mark.distributed
def test_lora_under_ddp_matches_one_process(experiments):
    config = experiments["gpt"]
    reference = one_process(config, "ref")
    records = launch(config, "ddp", *ddp("--trainer.devices", "2"))
    assert {r["strategy"] for r in records} == {"DDPStrategy"}
    assert_same_losses(records, reference)
    got = adapter_state(torch.load(run_dir(config, "ddp") / "checkpoints" / "last.ckpt", weights_only=True))
    ref = adapter_state(torch.load(run_dir(config, "ref") / "checkpoints" / "last.ckpt", weights_only=True))
    assert set(got) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


@pytest.mark.distributed
def test_lora_under_fsdp_matches_one_process_resumes_and_evaluates_on_one_device(experiments):
    """FSDP2 units hold frozen base weights and trainable adapters together; the sharded checkpoint
    holds the adapters only, resumes under FSDP and is tested on one device."""
    config = experiments["llama"]
    fsdp = [
        "--config", str(REPO / "configs/trainer/fsdp.yaml"), "--trainer.accelerator", "cpu",
        "--trainer.devices", "2", "--trainer.strategy.init_args.activation_checkpointing", "true",
    ]  # fmt: skip
    longer = ["--trainer.max_steps", str(2 * STEPS), "--trainer.val_check_interval", str(STEPS)]
    reference = one_process(config, "ref_long", *longer)
    first = launch(config, "fsdp", *fsdp, "--trainer.val_check_interval", str(STEPS))
    assert all(r["sharded"] and r["strategy"] == "FSDP" for r in first)
    last = run_dir(config, "fsdp") / "checkpoints" / "last.ckpt"
    assert last.is_dir()
    saved = load_checkpoint(last)
    adapter_state(saved)
    assert saved["gptlab"]["peft"]["base"] == str(config.parent / "llama")
    # Resumed under FSDP from the sharded folder: the steps of one uninterrupted run.
    second = launch(config, "fsdp", *fsdp, *longer, "--ckpt_path", "last")
    records = [dict(a, losses=a["losses"] + b["losses"]) for a, b in zip(first, second, strict=True)]
    assert_same_losses(records, reference)
    final = load_checkpoint(last)
    ref = adapter_state(
        torch.load(run_dir(config, "ref_long") / "checkpoints" / "last.ckpt", weights_only=True)
    )
    for key, value in ref.items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    # On one device, from the folder alone (the base comes from the recorded init_from).
    main(["test", "--ckpt_path", str(last), "--trainer.strategy", "auto", "--trainer.devices", "1"])
    report = json.loads((run_dir(config, "fsdp") / "reports" / "test_report.json").read_text())
    model = CausalLM.load_from_checkpoint(last)
    assert report["metrics"]["loss"] > 0 and any(".lora_" in n for n, _ in model.named_parameters())
    # Export reads the folder too: the adapter (peft's format) and the merged model, each checked
    # against gptlab's logits to 1e-5 before anything is written.
    from gptlab.export import export

    assert (export(str(last), str(config.parent / "adapter")) / "adapter_model.safetensors").is_file()
    assert (export(str(last), str(config.parent / "merged"), merged=True) / "model.safetensors").is_file()


def test_lora_kill_and_resume_is_exact(tmp_path):
    """kill -9 of a LoRA fine-tune (base: a Hugging Face directory as the backbone's name_or_path),
    continued with `--ckpt_path last` from a checkpoint of adapters and head: the batches, losses
    and final weights of the uninterrupted run."""
    import test_resume as harness

    config = harness.experiment(tmp_path, "finetune")
    data = yaml.safe_load(config.read_text())
    model = data["model"]["init_args"]
    # The base is a pretrained model directory: it brings its own tokenizer (a recipe would train a
    # new vocabulary over its embeddings, which gptlab refuses).
    from gptlab.data import BPE

    tokenizer = tmp_path / "tokenizer"
    BPE(vocab_size=300).train([Path(data["data"]["init_args"]["train_files"]).read_text()]).save_pretrained(
        str(tokenizer)
    )
    llama = save_llama(tmp_path / "llama", tokenizer)
    model["backbone"] = {"class_path": "gptlab.models.HFBackbone", "init_args": {"name_or_path": str(llama)}}
    model["peft"] = LORA  # lora_dropout and the head's dropout draw from the step's RNG
    config.write_text(yaml.safe_dump(data))
    reference = harness.run(config, "ref")
    assert reference[-1]["step"] == harness.STEPS
    step = harness.mid_epoch_step(
        reference, random.Random(harness.SEED), harness.EVERY + 1, 3 * harness.EVERY
    )
    code, output, _ = harness.spawn(config, "lora", interrupt=(signal.SIGKILL, harness.at_step(step)))
    assert code == -signal.SIGKILL, output[-3000:]
    saved = harness.checkpoint(config, "lora")
    assert saved["gptlab"]["peft"]["base"] == str(llama)
    adapter_state(saved)
    assert {k for k in saved["state_dict"] if k.startswith("head.")} == {"head.1.weight", "head.1.bias"}
    again = harness.run(config, "lora", resume=True)
    first = harness.batches_before(reference, saved["global_step"])
    why = f"(kill -9 at step {step}, GPTLAB_TEST_SEED={harness.SEED})"
    harness.assert_same_batches(again, reference, first, why)
    assert len(again) == len(reference) - first
    harness.assert_same_weights(config, "lora", "ref")
