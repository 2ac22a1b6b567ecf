"""What activation checkpointing and bf16 cost and save on a CPU: one training step, side by side.

    fp32            the default: fp32 weights and compute
    checkpointing   fp32, `gradient_checkpointing: true` on the backbone (each block recomputed in backward)
    bf16-mixed      fp32 weights, bf16 autocast (configs/trainer/bf16-mixed.yaml)
    bf16-true       bf16 weights, optimizer state and compute (configs/trainer/bf16-true.yaml)

Each option runs in its own process (peak RSS is a per-process high-water mark) on the same
backbone, batch and AdamW; the options alternate for --rounds rounds. Reported: CPU seconds per
training step (user + system of the process, so the machine's other jobs count less than in
wall time) and peak RSS, each also as a ratio to fp32. The backbone is gptlab's GPT by default, or
any HFBackbone directory (e.g. the converted SmolLM2) with --hf DIR.

    python benchmarks/memory_options.py                         # GPT 6 x 384, batch 8 x 256 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OPTIONS = ("fp32", "checkpointing", "bf16-mixed", "bf16-true")


def child(option: str, args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from gptlab.models import GPT, HFBackbone

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpointing = option == "checkpointing"
    if args.hf:
        backbone = HFBackbone(name_or_path=args.hf, gradient_checkpointing=checkpointing)
    else:
        backbone = GPT(vocab_size=8192, block_size=args.seq, n_layer=6, n_head=6, n_embd=384,
                       gradient_checkpointing=checkpointing)  # fmt: skip
    if option == "bf16-true":
        backbone = backbone.to(torch.bfloat16)
    backbone.train()
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-4)
    ids = torch.randint(0, backbone.vocab_size, (args.batch, args.seq + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=option == "bf16-mixed")
    cpu = []
    for step in range(args.steps + 1):
        start = time.process_time()
        with autocast:
            logits = backbone.logits(backbone(ids[:, :-1]))  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step allocates optimizer state and warms up kernels
            cpu.append(time.process_time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"option": option, "cpu_s_per_step": sum(cpu) / len(cpu), "peak_rss": peak}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hf", default=None, help="an HFBackbone directory instead of the GPT")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per run (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    passed = [a for a in sys.argv[1:] if a != "--child"]
    runs: dict[str, list[dict]] = {o: [] for o in args.options}
    for round_ in range(args.rounds):
        for option in args.options:
            proc = subprocess.run([sys.executable, __file__, *passed, "--child", option], env=env,
                                  capture_output=True, text=True, cwd=Path(__file__).parents[1])  # fmt: skip
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"{option} failed:\n{proc.stderr[-3000:]}")
            runs[option].append(json.loads(lines[-1][len("RESULT ") :]))
            print(f"round {round_ + 1}: {runs[option][-1]}", flush=True)
    summary = {
        o: {
            "cpu_s_per_step": sum(r["cpu_s_per_step"] for r in rs) / len(rs),
            "peak_rss_gb": max(r["peak_rss"] for r in rs) / 1e9,
        }
        for o, rs in runs.items()
    }
    base = summary.get("fp32")
    print("\n| option | CPU-s / step | vs fp32 | peak RSS | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for option, s in summary.items():
        speed = f"{s['cpu_s_per_step'] / base['cpu_s_per_step']:.2f}x" if base else "-"
        memory = f"{s['peak_rss_gb'] / base['peak_rss_gb']:.2f}x" if base else "-"
        print(f"| {option} | {s['cpu_s_per_step']:.2f} | {speed} | {s['peak_rss_gb']:.2f} GB | {memory} |")


if __name__ == "__main__":
    main()
