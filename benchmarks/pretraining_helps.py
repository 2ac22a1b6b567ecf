"""Does pretraining help? The same small GPT fine-tuned from random init and from a gptlab checkpoint.

    corpus     scripts/prepare_english_small.py: SST-2 + CoNLL-2003 training sentences, labels dropped
    pretrain   configs/pretrain/english_small.yaml (+ Tiny Shakespeare), causal LM, fixed steps
    finetune   configs/finetune/{sst2,conll2003}.yaml, twice each with identical settings and steps:
                 random      backbone config and tokenizer of the pretraining run, random weights
                 pretrained  init_from the pretraining run's last.ckpt
    test       best.ckpt (by validation) of each run on SST-2 test.tsv / CoNLL-2003 eng.testb

Every phase is a plain `python main.py ...` subprocess (printed before it runs), so each number
can be reproduced by hand. Results go to <work>/results.json and a Markdown table on stdout.

    nice -n 5 python benchmarks/pretraining_helps.py            # all stages, ~30 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = "data/tinyshakespeare/input.txt"
TASKS = {
    # task: (config, headline metric of its test report, table label)
    "sst2": ("configs/finetune/sst2.yaml", "accuracy", "SST-2 test.tsv accuracy"),
    "conll2003": ("configs/finetune/conll2003.yaml", "entity_f1", "CoNLL-2003 eng.testb entity F1"),
}


def main_py(*args: str, log: Path) -> float:
    """Run `python main.py <args>` (printed first), output to `log`; returns the wall time."""
    command = [sys.executable, "main.py", *args]
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"failed after {seconds:.0f}s (exit {result.returncode}); see {log}:\n{tail}")
    print(f"  done in {seconds / 60:.1f} min", flush=True)
    return seconds


def only_run(logs: Path, experiment: str) -> Path:
    runs = sorted((logs / experiment).glob("version_*"))
    if len(runs) != 1:
        raise SystemExit(f"expected one run in {logs / experiment}, found {runs}: use a fresh --work")
    return runs[0]


def capped(log: Path) -> bool:
    """Whether a fit stopped at its time cap (Lightning's Timer) before reaching its steps."""
    return "Time limit reached" in log.read_text(errors="replace")


def steps_done(run: Path) -> int:
    """The step of a run's last checkpoint (its last validation; fewer if a time cap stopped it)."""
    import torch

    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return int(checkpoint["global_step"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("logs/pretraining_helps"), help="output directory")
    parser.add_argument(
        "--stage",
        choices=["all", "corpus", "pretrain", "finetune", "table"],
        default="all",
        help="table: print only",
    )
    parser.add_argument("--pretrain-steps", type=int, default=600, help="~8 min on 2 free CPU cores")
    parser.add_argument("--sst2-steps", type=int, default=250, help="fine-tuning steps of both SST-2 runs")
    parser.add_argument("--conll2003-steps", type=int, default=250, help="steps of both CoNLL runs")
    parser.add_argument(
        "--only", nargs="+", default=sorted(TASKS), choices=sorted(TASKS), help="fine-tune these tasks only"
    )
    parser.add_argument("--val-batches", type=int, default=10, help="validation batches per check (4 checks)")
    # Safety caps for a shared machine (the limit is 15 min per fine-tune); a run that hits
    # its cap stops early, which results.json shows as steps_done < steps.
    parser.add_argument("--pretrain-cap", default="00:00:12:00", help="max_time of the pretraining")
    parser.add_argument("--finetune-cap", default="00:00:14:00", help="max_time of each fine-tune")
    args = parser.parse_args()
    work = args.work if args.work.is_absolute() else REPO / args.work
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results_file = work / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    corpus = work / "corpus"
    if args.stage in ("all", "corpus"):
        script = REPO / "scripts" / "prepare_english_small.py"
        subprocess.run([sys.executable, str(script), "--out", str(corpus)], check=True)
    if args.stage in ("all", "pretrain"):
        seconds = main_py(
            "fit", "--config", "configs/pretrain/english_small.yaml",
            "--data.init_args.train_files", json.dumps([str(corpus / "*.txt"), SHAKESPEARE]),
            "--logs", str(logs), "--experiment", "pretrain",
            "--trainer.max_steps", str(args.pretrain_steps),
            "--trainer.val_check_interval", str(args.pretrain_steps // 2),
            "--trainer.max_time", args.pretrain_cap,
            log=work / "pretrain.log",
        )  # fmt: skip
        run = only_run(logs, "pretrain")
        results["pretrain"] = {
            "run": str(run),
            "steps": args.pretrain_steps,
            "steps_done": steps_done(run),
            "time_capped": capped(work / "pretrain.log"),
            "minutes": seconds / 60,
        }
        results_file.write_text(json.dumps(results, indent=2) + "\n")
    if args.stage in ("all", "finetune"):
        pretrain = Path(results["pretrain"]["run"])
        checkpoint = pretrain / "checkpoints" / "last.ckpt"
        backbone = yaml.safe_load((pretrain / "config.yaml").read_text())["model"]["init_args"]["backbone"]
        for task, (config, metric, _) in TASKS.items():
            if task not in args.only:
                continue
            steps = getattr(args, f"{task}_steps")
            for start in ("random", "pretrained"):
                experiment = f"{task}_{start}"
                if start == "pretrained":
                    init = ["--model.init_args.init_from", str(checkpoint)]
                else:
                    # Same architecture and tokenizer, random weights: only the starting point differs.
                    init = [
                        "--model.init_args.init_from", "null",
                        "--model.init_args.backbone", json.dumps(backbone),
                        "--data.init_args.tokenizer", str(pretrain / "tokenizer"),
                    ]  # fmt: skip
                previous = logs / experiment
                if previous.exists():
                    # A rerun (e.g. with other steps) keeps the earlier run beside it, renamed.
                    previous.rename(logs / f"{experiment}.{time.strftime('%Y%m%d-%H%M%S')}")
                fit_seconds = main_py(
                    "fit", "--config", config, *init,
                    "--logs", str(logs), "--experiment", experiment,
                    "--trainer.max_steps", str(steps),
                    "--trainer.val_check_interval", str(max(1, steps // 4)),
                    "--trainer.limit_val_batches", str(args.val_batches),
                    "--trainer.max_time", args.finetune_cap,
                    log=work / f"{experiment}.fit.log",
                )  # fmt: skip
                run = only_run(logs, experiment)
                best = str(run / "checkpoints" / "best.ckpt")
                test_seconds = main_py("test", "--ckpt_path", best, log=work / f"{experiment}.test.log")
                report = json.loads((run / "reports" / "test_report.json").read_text())
                results[experiment] = {
                    "run": str(run),
                    "steps": steps,
                    "steps_done": steps_done(run),
                    "time_capped": capped(work / f"{experiment}.fit.log"),
                    metric: report["metrics"][metric],
                    "fit_minutes": fit_seconds / 60,
                    "test_minutes": test_seconds / 60,
                    "metrics": report["metrics"],
                }
                results_file.write_text(json.dumps(results, indent=2) + "\n")
    if args.stage in ("all", "finetune", "table"):
        print_table(results, work)


def print_table(results: dict, work: Path) -> None:
    pre = results["pretrain"]
    cap = capped(work / "pretrain.log")
    print(f"\npretraining: {pre['steps_done']} of {pre['steps']} steps, {pre['minutes']:.1f} min"
          f"{' (stopped by its time cap)' if cap else ''}\n")  # fmt: skip
    print("| task (test set, metric) | fine-tune steps (each) | from random init | from gptlab pretraining |")
    print("|---|---:|---:|---:|")
    for task, (_, metric, label) in TASKS.items():
        runs = [results.get(f"{task}_{start}") for start in ("random", "pretrained")]
        if None in runs:
            continue
        logs = [work / f"{task}_{start}.fit.log" for start in ("random", "pretrained")]
        steps = " / ".join(
            f"{run['steps']}{' (time cap)' if capped(log) else ''}"
            for run, log in zip(runs, logs, strict=True)
        )
        cells = " | ".join(f"{run[metric]:.4f} ({run['fit_minutes']:.1f} min)" for run in runs)
        print(f"| {label} | {steps} | {cells} |")


if __name__ == "__main__":
    main()
