"""SST-2 and CoNLL-2003 with a real pretrained LM: SmolLM2-135M + LoRA, full fine-tune, random init.

    rows     lora     configs/finetune/{sst2,conll2003}_smollm2.yaml as shipped (LoRA r 16, all linears),
                      causal context
             bidirectional, repeat   the same LoRA fine-tune with --model.init_args.context bidirectional
                      (no causal mask, padding masked) or repeat (the text twice, read on the second copy)
             full     the same with --model.init_args.peft null and lr 5e-5 (every weight trains)
             random   the same architecture (SmolLM2's config.json) from random weights, full training
    each     python main.py fit ... --trainer.max_steps N    then    python main.py test --ckpt_path last.ckpt
             (with --val-every K: validation every K steps and `test` on best.ckpt, the step chosen
             on the validation split by the config's checkpoint.monitor; the test set is read once)
    seeds    --seeds S1 S2 ...: one fit per seed (seed_everything); the table gives mean and sd
    table    --table A/results.json B/results.json ...: one table of runs made in several --work
             folders (e.g. two at a time, one per core); runs nothing

Every phase is a plain `python main.py ...` subprocess (printed before it runs). Measured per run:
the test score (SST-2 test.tsv accuracy, CoNLL-2003 eng.testb entity F1, conlleval), trainable
parameters (the line `fit` prints), the fit process's peak RSS (`wait4`), seconds per step (from
the Throughput callback's train/samples_per_sec in TensorBoard: training only, validation and
checkpointing excluded), steps and examples seen. Results accumulate in <work>/results.json; a
Markdown table is printed at the end. Needs the converted model: python scripts/get_smollm2.py.

    python benchmarks/smollm2_results.py --rows lora --tasks sst2 --steps 200     # the reference's budget
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = {
    # task: (config, headline metric of its test report, label)
    "sst2": ("configs/finetune/sst2_smollm2.yaml", "accuracy", "SST-2 test accuracy"),
    "conll2003": ("configs/finetune/conll2003_smollm2.yaml", "entity_f1", "CoNLL-2003 eng.testb entity F1"),
}
SMOLLM2 = Path("~/.cache/gptlab/models/SmolLM2-135M-Instruct").expanduser()
# Fields of SmolLM2's config.json that define the architecture (the random-init row builds it).
ARCHITECTURE = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip


ROWS = ["lora", "bidirectional", "repeat", "full", "random"]


def row_args(row: str) -> list[str]:
    """Command-line overrides of the shipped config for one row."""
    if row == "lora":
        return ["--model.init_args.context", "causal"]
    if row in ("bidirectional", "repeat"):
        return ["--model.init_args.context", row]
    full = ["--model.init_args.peft", "null"]
    if row == "full":
        return [*full, "--model.init_args.optimizer.init_args.lr", "5e-5"]
    if row == "random":
        config = json.loads((SMOLLM2 / "config.json").read_text())
        overrides = {k: config[k] for k in ARCHITECTURE if k in config}
        backbone = {
            "class_path": "gptlab.models.HFBackbone",
            # name_or_path: null, or the shipped config's path merges in beside model_type
            "init_args": {"name_or_path": None, "model_type": "llama", "config_overrides": overrides},
        }
        return [*full, "--model.init_args.backbone", json.dumps(backbone)]
    raise SystemExit(f"unknown row {row!r}")


def run(command: list[str], log: Path) -> tuple[float, int]:
    """Run `command` (printed first), output to `log`; (wall seconds, peak RSS in bytes)."""
    print("$ " + " ".join(command), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (kB on Linux)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"failed after {seconds:.0f}s (exit {code}); see {log}:\n{log.read_text()[-3000:]}")
    print(f"  done in {seconds / 60:.1f} min", flush=True)
    return seconds, usage.ru_maxrss * 1024


def seconds_per_step(run_dir: Path, batch_size: int) -> float | None:
    """Mean training seconds per step from the TensorBoard scalars train/samples_per_sec."""
    points = scalars(run_dir, "train/samples_per_sec")
    # windows are log_every_n_steps long: a mean of per-window seconds per step
    return sum(batch_size / p.value for p in points) / len(points) if points else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", default=["lora", "full", "random"], choices=ROWS)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every fit (batch 16)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[None], help="seed_everything of each fit")
    parser.add_argument(
        "--val-every", type=int, default=None, help="validate every K steps and test best.ckpt"
    )
    parser.add_argument("--work", default="logs/smollm2_results", help="runs, logs and results.json")
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="RESULTS_JSON",
        help="print one table of these results.json files; run nothing",
    )
    args = parser.parse_args()
    if args.table:
        print_table([r for file in args.table for r in json.loads(Path(file).read_text()).values()])
        return
    if not (SMOLLM2 / "config.json").is_file():
        raise SystemExit(f"{SMOLLM2} is missing: python scripts/get_smollm2.py")
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    every = args.val_every or args.steps
    for task, row, seed in [(t, r, s) for t in args.tasks for r in args.rows for s in args.seeds]:
        config, metric, _ = TASKS[task]
        name = f"{task}_{row}" + (f"_seed{seed}" if seed is not None else "")
        logs = work / name
        if (logs / "done").is_file():
            continue
        overrides = [
            "--trainer.max_steps",
            str(args.steps),
            "--trainer.val_check_interval",
            str(every),
            "--trainer.num_sanity_val_steps",
            "0",  # no validation before training
            *(["--seed_everything", str(seed)] if seed is not None else []),
        ]
        common = ["--config", config, "--logs", str(logs), "--trainer.enable_progress_bar", "false"]
        fit_log = work / f"{name}.fit.log"
        seconds, rss = run([sys.executable, "main.py", "fit", *common, *row_args(row), *overrides], fit_log)
        run_dir = sorted(logs.glob("*/version_*"))[-1]
        ckpt = run_dir / "checkpoints" / ("best.ckpt" if args.val_every else "last.ckpt")
        run([sys.executable, "main.py", "test", "--ckpt_path", str(ckpt)], work / f"{name}.test.log")
        report = json.loads((run_dir / "reports" / "test_report.json").read_text())
        counts = re.search(r"gptlab: ([\d,]+) trainable parameters of ([\d,]+)", fit_log.read_text())
        batch = 16
        results[name] = {
            "task": task,
            "row": row,
            "seed": seed,
            "checkpoint": ckpt.name,
            "score": report["metrics"][metric],
            "metric": metric,
            "trainable_params": int(counts.group(1).replace(",", "")) if counts else None,
            "total_params": int(counts.group(2).replace(",", "")) if counts else None,
            "peak_rss_gb": rss / 1e9,
            "s_per_step": seconds_per_step(run_dir, batch),
            "steps": args.steps,
            "examples_seen": args.steps * batch,
            "fit_wall_s": seconds,
            "command": " ".join(["python main.py fit", *common, *row_args(row), *overrides]),
            "run": str(run_dir),
        }
        results_file.write_text(json.dumps(results, indent=2) + "\n")
        (logs / "done").write_text("")
    print_table(results.values())


def scalars(run_dir: Path, tag: str) -> list:
    """The TensorBoard points (step, value) of one scalar of a run; [] when it was not logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def best_step(result: dict) -> str:
    """The validated step `best.ckpt` kept, "step (value)", from the run's logged validation metric."""
    if result["checkpoint"] != "best.ckpt":
        return "last"
    run_dir = Path(result["run"])
    monitor = yaml.safe_load((run_dir / "config.yaml").read_text())["checkpoint"]["monitor"]
    points = scalars(run_dir, monitor)
    if not points:
        return "?"
    best = max(points, key=lambda p: (p.value, -p.step))  # ModelCheckpoint keeps the first of equals
    return f"{best.step + 1} ({best.value:.3f})"  # Lightning logs the validation after step N at N - 1


def print_table(results) -> None:
    """One Markdown row per (task, row, steps): the score's mean and sd over its seeds, then each
    seed's value of every column (runs of one row may have shared the machine differently)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["row"], r["steps"]), []).append(r)
    print(
        "\n| task | row | steps x 16 | score: mean ± sd (each seed) | seeds | best step (val) | "
        "trainable params | peak RSS | s / step | fit (min) |"
    )
    print("|---|---|---:|---|---|---|---:|---|---|---|")
    for (task, row, steps), rs in sorted(
        groups.items(), key=lambda g: (g[0][0], ROWS.index(g[0][1]), g[0][2])
    ):
        rs = sorted(rs, key=lambda r: r["seed"] or 0)
        scores = [r["score"] for r in rs]
        sd = f" ± {statistics.stdev(scores):.4f}" if len(scores) > 1 else ""
        print(
            f"| {TASKS[task][2]} | {row} | {steps} | **{statistics.mean(scores):.4f}{sd}** "
            f"({per_seed(rs, 'score', '{:.4f}'.format)}) | {per_seed(rs, 'seed', str)} | "
            f"{', '.join(map(best_step, rs))} | {rs[0]['trainable_params']:,} | "
            f"{per_seed(rs, 'peak_rss_gb', '{:.2f} GB'.format)} | "
            f"{per_seed(rs, 's_per_step', '{:.2f}'.format)} | "
            f"{per_seed(rs, 'fit_wall_s', lambda s: f'{s / 60:.0f}')} |"
        )


def per_seed(results: list[dict], key: str, fmt) -> str:
    """One column's value of each run, formatted, "?" where it was not measured."""
    return ", ".join(fmt(r[key]) if r.get(key) is not None else "?" for r in results)


if __name__ == "__main__":
    main()
