"""The same LoRA fine-tune through gptlab and through transformers + peft, side by side.

    model   SmolLM2-135M-Instruct (python scripts/get_smollm2.py), LoRA r 16 / alpha 32 / dropout 0.05
            on every linear layer, a 2-class last-token head
    data    SST-2 train.tsv, batch 16, at most 128 tokens, dynamic padding
    steps   --steps optimizer steps, AdamW 3e-4, the first --warmup steps not measured

    gptlab    python main.py fit --config configs/finetune/sst2_smollm2.yaml (in-process GPTLabCLI)
    gptlab-bidirectional, gptlab-repeat
              the same with --model.init_args.context bidirectional / repeat (r = 1)
    trainer   transformers' Trainer on get_peft_model(LlamaForSequenceClassification)
    trainer-grouped
              the same Trainer with train_sampling_strategy="group_by_length" (the former
              group_by_length: true), transformers' own answer to padding waste: batches of
              similar lengths, drawn from the same rows
    loop      the same peft model in a plain PyTorch loop (the reference of docs/pretrained.md)

All but trainer-grouped train on the same batches in the same order: gptlab's own seeded order of
SST-2 (gptlab.data.SeededShuffleSampler, what the gptlab variant draws), handed to the others as a
fixed order; the script checks that these variants saw the same real tokens at every step, since
activation memory follows the longest batch a run meets (trainer-grouped regroups the same rows:
the same real tokens in all, checked too). Each variant runs in its own process
(peak RSS is a per-process high-water mark) with the same number of threads; the variants
alternate for --rounds rounds so that a change in the machine's load hits all of them alike.
Measured over the steps after the warm-up: real tokens (attention mask) per CPU-second of the
process (user + system, so other jobs on the machine count less than in wall time) and per wall
second; and the process's peak RSS. Prints a table and the ratios
gptlab / the faster of the two others (speed) and gptlab / the smaller (memory).

    python benchmarks/lora_speed.py --steps 20 --warmup 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2 = Path("~/.cache/gptlab/models/SmolLM2-135M-Instruct").expanduser()
CONFIG = REPO / "configs" / "finetune" / "sst2_smollm2.yaml"
TRAIN = REPO / "data" / "sst2" / "train.tsv"
BATCH, LR, MAX_LEN, SEED = 16, 3e-4, 128, 1337
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


class Window:
    """CPU and wall time and real tokens over steps warmup .. steps-1."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.step, self.tokens = warmup, 0, 0
        self.per_step: list[int] = []  # real tokens of every step, warm-up included
        self.cpu0 = self.wall0 = self.cpu = self.wall = None

    def begin(self) -> None:
        if self.step == self.warmup:
            self.cpu0, self.wall0 = time.process_time(), time.perf_counter()

    def end(self, tokens: int) -> None:
        self.per_step.append(tokens)
        if self.step >= self.warmup:
            self.tokens += tokens
            self.cpu, self.wall = time.process_time() - self.cpu0, time.perf_counter() - self.wall0
        self.step += 1


def sst2_texts() -> tuple[list[str], list[int]]:
    import csv

    with TRAIN.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"] for r in rows], [int(r["label"]) for r in rows]


def gptlab_order(count: int, steps: int) -> list[int]:
    """The training rows, in order, of gptlab's first `steps` batches (one process, epoch 0)."""
    from gptlab.data import SeededShuffleSampler

    return SeededShuffleSampler(count, SEED, batch_size=BATCH).order(0)[: steps * BATCH]


def peft_model():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    model = AutoModelForSequenceClassification.from_pretrained(SMOLLM2, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    return get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **LORA)), tokenizer


def run_gptlab(steps: int, warmup: int, context: str = "causal") -> Window:
    import lightning as L

    from gptlab.cli import GPTLabCLI

    window = Window(warmup)

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            window.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            window.end(int(batch["attention_mask"].sum()))

    with tempfile.TemporaryDirectory() as logs:
        args = [
            "--config", str(CONFIG), "--logs", logs, "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--data.init_args.batch_size", str(BATCH), "--data.init_args.block_size", str(MAX_LEN),
            "--model.init_args.context", context,
        ]  # fmt: skip
        cli = GPTLabCLI(args=args, run=False)
        cli.trainer.callbacks.append(Meter())
        cli.trainer.fit(cli.model, cli.datamodule)
    return window


def run_trainer(steps: int, warmup: int, grouped: bool = False) -> Window:
    import datasets
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

    model, tokenizer = peft_model()
    texts, labels = sst2_texts()
    rows = gptlab_order(len(texts), steps)
    data = datasets.Dataset.from_dict({"text": [texts[i] for i in rows], "label": [labels[i] for i in rows]})
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LEN), batched=True)
    data = data.remove_columns(["text"])
    window, counts = Window(warmup), []
    pad = DataCollatorWithPadding(tokenizer)

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):  # the rows are already in gptlab's order
            if grouped:  # ... regrouped by length by the Trainer's own sampler
                return super()._get_train_sampler(*args, **kwargs)
            return torch.utils.data.SequentialSampler(self.train_dataset)

    def collate(features):
        batch = pad(features)
        counts.append(int(batch["attention_mask"].sum()))
        return batch

    class Meter(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            window.begin()

        def on_step_end(self, args, state, control, **kwargs):
            window.end(counts[window.step])

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=LR,
            warmup_steps=max(1, steps // 10), lr_scheduler_type="cosine", weight_decay=0.01,
            logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=SEED, max_grad_norm=1.0,
            train_sampling_strategy="group_by_length" if grouped else "random",
        )  # fmt: skip
        InOrder(
            model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Meter()]
        ).train()
    return window


def run_loop(steps: int, warmup: int) -> Window:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    model, tokenizer = peft_model()
    model.train()
    texts, labels = sst2_texts()
    order = gptlab_order(len(texts), steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    window = Window(warmup)
    for step in range(steps):
        window.begin()
        rows = order[step * BATCH : (step + 1) * BATCH]
        batch = tokenizer([texts[i] for i in rows], truncation=True, max_length=MAX_LEN, padding=True,
                          return_tensors="pt")  # fmt: skip
        loss = model(**batch, labels=torch.tensor([labels[i] for i in rows])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.end(int(batch["attention_mask"].sum()))
    return window


VARIANTS = {
    "gptlab": run_gptlab,
    "gptlab-bidirectional": lambda steps, warmup: run_gptlab(steps, warmup, "bidirectional"),
    "gptlab-repeat": lambda steps, warmup: run_gptlab(steps, warmup, "repeat"),
    "trainer": run_trainer,
    "trainer-grouped": lambda steps, warmup: run_trainer(steps, warmup, grouped=True),
    "loop": run_loop,
}
REGROUPED = ("trainer-grouped",)  # the same rows in other batches


def child(variant: str, steps: int, warmup: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    window = VARIANTS[variant](steps, warmup)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"variant": variant, "tokens": window.tokens, "cpu_s": window.cpu, "wall_s": window.wall,
              "per_step": window.per_step}  # fmt: skip
    print("RESULT " + json.dumps({**result, "peak_rss": peak}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants", nargs="+", default=["gptlab", "trainer", "loop"], choices=list(VARIANTS)
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.steps, args.warmup, args.threads)
    if not (SMOLLM2 / "config.json").is_file():
        raise SystemExit(f"{SMOLLM2} is missing: python scripts/get_smollm2.py")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for round_ in range(args.rounds):
        for variant in args.variants:
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
            print(f"round {round_ + 1}: {variant} ...", flush=True)
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            print(f"  {result}", flush=True)
            results[variant].append(result)
    seen = {(v, tuple(r["per_step"])) for v, runs in results.items() for r in runs if v not in REGROUPED}
    if len({steps for _, steps in seen}) != 1:
        raise SystemExit(f"the variants trained on different batches (real tokens per step): {sorted(seen)}")
    totals = {v: sum(r["per_step"]) for v, runs in results.items() for r in runs}
    if len(set(totals.values())) != 1:
        raise SystemExit(f"the variants trained on different rows (real tokens in all): {totals}")
    summary = {}
    for variant, runs in results.items():
        tokens = sum(r["tokens"] for r in runs)
        summary[variant] = {
            "tokens_per_cpu_s": tokens / sum(r["cpu_s"] for r in runs),
            "tokens_per_s": tokens / sum(r["wall_s"] for r in runs),
            "peak_rss_gb": max(r["peak_rss"] for r in runs) / 1e9,
        }
    print("\n| variant | tokens / CPU-second | tokens / second (wall) | peak RSS |")
    print("|---|---:|---:|---:|")
    for variant, s in summary.items():
        cells = f"{s['tokens_per_cpu_s']:.1f} | {s['tokens_per_s']:.1f} | {s['peak_rss_gb']:.2f} GB"
        print(f"| {variant} | {cells} |")
    for variant in ("gptlab-bidirectional", "gptlab-repeat"):
        if variant in summary and "gptlab" in summary:
            cost = summary["gptlab"]["tokens_per_cpu_s"] / summary[variant]["tokens_per_cpu_s"]
            print(f"{variant} / gptlab (causal): {cost:.3f}x CPU-seconds per step (same batches)")
            summary.setdefault("context_cost", {})[variant] = cost
    others = [v for v in summary if not v.startswith("gptlab") and v != "context_cost"]
    if "gptlab" in summary and others:
        fastest = max(others, key=lambda v: summary[v]["tokens_per_cpu_s"])
        smallest = min(others, key=lambda v: summary[v]["peak_rss_gb"])
        speed = summary["gptlab"]["tokens_per_cpu_s"] / summary[fastest]["tokens_per_cpu_s"]
        memory = summary["gptlab"]["peak_rss_gb"] / summary[smallest]["peak_rss_gb"]
        print(f"\ngptlab / {fastest} (the faster): {speed:.3f}x tokens per CPU-second")
        print(f"gptlab / {smallest} (the smaller): {memory:.3f}x peak RSS")
        summary["ratios"] = {"speed_vs": fastest, "speed": speed, "memory_vs": smallest, "memory": memory}
    if args.out:
        Path(args.out).write_text(
            json.dumps({"summary": summary, "runs": results, "args": vars(args)}, indent=2)
        )


if __name__ == "__main__":
    main()
