"""GPU check: a short fit + test with each of ddp, fsdp, bf16-mixed and compile; tokens/s and MFU of each.

    python scripts/gpu_check.py                     # on a CUDA machine, from the repository root
    python scripts/gpu_check.py --smoke             # the same plumbing on CPU with a tiny model

Each variant is `main.py fit` on the quickstart experiment (Python's standard library as text,
nothing downloaded) with nanoGPT's small GPU model (6 layers x 384, context 256, batch 64),
stacked with the variant's overlays from configs/trainer/, then `main.py test` on its last
checkpoint. The fsdp variant is also tested on one device with the default strategy (its sharded
checkpoint consolidated on the fly). Throughput and MFU come from gptlab's Throughput callback
(TensorBoard scalars train/tokens_per_sec and train/mfu), averaged over the logged windows after
the first (compilation and warm-up). Exit status 1 if any step fails; the table is printed anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER = REPO / "configs" / "trainer"

# Overlays per variant, stacked in this order on the experiment.
VARIANTS = {
    "ddp": ["ddp.yaml"],
    "fsdp": ["fsdp.yaml"],
    "bf16-mixed": ["gpu.yaml", "bf16-mixed.yaml"],
    "compile": ["gpu.yaml", "bf16-mixed.yaml", "compile.yaml"],
}


def model_args(smoke: bool, steps: int) -> list[str]:
    """nanoGPT's shakespeare-char GPU model on the quickstart data; a tiny one for --smoke."""
    b = "--model.init_args.backbone.init_args."
    layers, width, heads, block, batch = (2, 64, 2, 64, 8) if smoke else (6, 384, 6, 256, 64)
    return [
        f"{b}n_layer", str(layers), f"{b}n_embd", str(width), f"{b}n_head", str(heads),
        f"{b}block_size", str(block), "--data.init_args.block_size", str(block),
        "--data.init_args.batch_size", str(batch), "--data.init_args.eval_batch_size", str(batch),
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
        "--trainer.limit_val_batches", "10", "--trainer.limit_test_batches", "10",
        "--trainer.log_every_n_steps", str(max(1, steps // 10)),
    ]  # fmt: skip


def run(command: list[str], log: Path, timeout: int) -> tuple[bool, float]:
    """Run a main.py command, appending its output to `log`; (succeeded, seconds)."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        try:
            done = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout
            )
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            out.write(f"\n(timed out after {timeout}s)\n")
            ok = False
    return ok, time.perf_counter() - start


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir)).Reload()
    return [e.value for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def check_variant(name: str, args: argparse.Namespace, logs: Path) -> dict:
    main = [sys.executable, str(REPO / "main.py")]
    experiment = f"gpu_check_{name}"
    overlays = [arg for overlay in VARIANTS[name] for arg in ("--config", str(TRAINER / overlay))]
    fit = [*main, "fit", "--config", str(REPO / "configs/pretrain/quickstart.yaml"), *overlays]
    fit += [*model_args(args.smoke, args.steps), "--logs", str(logs), "--experiment", experiment]
    if args.smoke:
        # CPU stand-ins: 2 gloo processes for ddp/fsdp, the eager backend instead of minutes of C++.
        fit += ["--trainer.accelerator", "cpu", "--trainer.devices", "2" if name in ("ddp", "fsdp") else "1"]
        if name == "compile":
            fit += ["--trainer.callbacks.init_args.backend", "eager"]
    log = logs / f"{name}.log"
    result: dict = {"variant": name, "log": str(log)}
    ok, seconds = run(fit, log, args.timeout)
    result["fit"] = "ok" if ok else "FAILED"
    result["fit_s"] = round(seconds)
    runs = sorted((logs / experiment).glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not ok or not runs:
        return result
    run_dir = runs[-1]
    tokens, mfu = scalars(run_dir, "train/tokens_per_sec"), scalars(run_dir, "train/mfu")
    # The first window holds compilation and allocator warm-up: leave it out when there are more.
    steady = slice(1, None) if len(tokens) > 1 else slice(None)
    if tokens:
        result["tokens_per_sec"] = sum(tokens[steady]) / len(tokens[steady])
    if mfu:
        result["mfu"] = sum(mfu[steady]) / len(mfu[steady])
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    test = [*main, "test", "--ckpt_path", str(ckpt)]
    if args.smoke and name in ("ddp", "fsdp"):
        test += ["--trainer.devices", "2"]
    ok, _ = run(test, log, args.timeout)
    report = run_dir / "reports" / "test_report.json"
    result["test"] = "ok" if ok and report.is_file() else "FAILED"
    if report.is_file():
        result["test_loss"] = json.loads(report.read_text())["metrics"]["loss"]
    if name == "fsdp":
        # The sharded checkpoint on one device, default strategy: consolidated on the fly.
        one = [*test, "--trainer.strategy", "auto", "--trainer.devices", "1"]
        ok, _ = run(one, log, args.timeout)
        result["test_1_device"] = "ok" if ok else "FAILED"
        if ok and report.is_file():
            result["test_1_device_loss"] = json.loads(report.read_text())["metrics"]["loss"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps per variant")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed for each main.py command")
    parser.add_argument("--logs", type=Path, help="run directory root (default: a new temporary directory)")
    parser.add_argument("--smoke", action="store_true", help="check the plumbing on CPU with a tiny model")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.steps = min(args.steps, 20)
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run this on a GPU machine, or pass --smoke to check it on CPU")
        name = torch.cuda.get_device_name(0)
        print(f"devices: {torch.cuda.device_count()} x {name}; torch {torch.__version__}")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="gptlab-gpu-check-"))
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.variants.split(","):
        result = check_variant(name, args, logs)
        results.append(result)
        print(json.dumps(result), flush=True)

    print("\n| variant | fit | test | tokens/s | MFU | fit time | test loss |\n|---|---|---|---|---|---|---|")
    for r in results:
        tokens = f"{r['tokens_per_sec']:,.0f}" if "tokens_per_sec" in r else "-"
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        test = r.get("test", "-") + (f" (1 device: {r['test_1_device']})" if "test_1_device" in r else "")
        loss = f"{r['test_loss']:.4f}" if "test_loss" in r else "-"
        print(f"| {r['variant']} | {r['fit']} | {test} | {tokens} | {mfu} | {r['fit_s']}s | {loss} |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    failed = [r["variant"] for r in results if "FAILED" in json.dumps(r)]
    if failed:
        print(f"FAILED: {', '.join(failed)} (logs in {logs})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
