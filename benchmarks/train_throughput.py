"""Training speed of gptlab against a hand-written PyTorch loop and Hugging Face's Trainer.

    python benchmarks/train_throughput.py                         # both configs, 3 rounds, CPU
    python benchmarks/train_throughput.py --configs nanogpt-cpu --rounds 1 --steps 50

The same GPT (same width, depth, context, batch, optimizer, clipping, fp32) trains for the same
number of steps on the same tokens (Tiny Shakespeare, characters) with:

    gptlab   `main.py fit` through gptlab's CLI (Lightning Trainer, our callbacks, progress bar)
    torch    a minimal loop: batch = stacked windows, forward, loss, backward, clip, AdamW step
             (the floor for framework overhead: the same GPT module, nothing around it)
    hf       transformers' Trainer with a GPT2LMHeadModel of the same size

Each run is its own child process (clean memory figures, no shared warm caches); frameworks
alternate within each round so that a machine shared with other jobs slows all of them alike.
Tokens/s are measured from the end of step `--warmup` to the end of the last step, from host
timestamps taken at the end of each step (after a device sync on CUDA). MFU is model FLOPs
(`GPT.num_flops_per_token`, 6N + attention) per second over the fp32 matmul peak measured by
this script in the same run (best of several 1024^3 products). Peak memory: the child's peak
resident set (CPU) or `torch.cuda.max_memory_allocated` (CUDA), and its growth over the
process's size right before the model is built.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

FRAMEWORKS = ("gptlab", "torch", "hf")


@dataclass
class BenchConfig:
    """One model + batch setting; every framework trains exactly this."""

    name: str
    gptlab_config: str  # experiment YAML the gptlab run starts from
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    warmup_steps: int = 100
    bias: bool = False
    vocab_size: int = 66  # Tiny Shakespeare's 65 characters + <|endoftext|>


CONFIGS = {
    # nanoGPT's shakespeare_char model (6 layers x 6 heads x 384, context 256), at a CPU-sized batch.
    "gpt-6x384": BenchConfig("gpt-6x384", "configs/pretrain/shakespeare_char.yaml", 6, 6, 384, 256, 8),
    # The nanoGPT CPU recipe exactly as configs/pretrain/shakespeare_char.yaml has it.
    "nanogpt-cpu": BenchConfig("nanogpt-cpu", "configs/pretrain/shakespeare_char.yaml", 4, 4, 128, 64, 12),
    # Almost no compute: the time per step is the framework's own cost (loop, hooks, logging, data).
    "overhead": BenchConfig("overhead", "configs/pretrain/shakespeare_char.yaml", 1, 1, 16, 8, 1),
}


# ----------------------------------------------------------------------------- shared helpers
def rss_kib(field: str = "VmRSS") -> int:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def memory_report(device: str, baseline_kib: int) -> dict:
    import torch

    if device == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20, "growth_mib": None}
    peak = rss_kib("VmHWM")
    return {"peak_mib": peak / 1024, "growth_mib": (peak - baseline_kib) / 1024}


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def now() -> tuple[float, float]:
    """(wall clock, CPU time of this process): taken at the end of every step."""
    return time.perf_counter(), time.process_time()


def rates(stamps: list[tuple[float, float]], warmup: int, tokens_per_step: int) -> dict:
    """Tokens per wall second and per CPU second over the steps after `warmup` (stamps[i] = end of step i)."""
    timed = len(stamps) - warmup
    wall = stamps[-1][0] - stamps[warmup - 1][0]
    cpu = stamps[-1][1] - stamps[warmup - 1][1]
    return {"steps": len(stamps), "tokens_per_sec": timed * tokens_per_step / wall,
            "tokens_per_cpu_sec": timed * tokens_per_step / cpu}  # fmt: skip


def prepare_tokens(data: Path, cache: Path) -> Path:
    """Tokenize Tiny Shakespeare once with gptlab's TextDataModule (Char, first 90 % trains)."""
    from gptlab.data import Char, TextDataModule

    dm = TextDataModule(
        train_files=str(data), tokenizer=Char(unk_token=None), block_size=64, stride=1, val_fraction=0.1,
        val_split="tail", cache_dir=str(cache),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm.train_dataset.path


# ----------------------------------------------------------------------------- (a) gptlab
def run_gptlab(
    cfg: BenchConfig, args: argparse.Namespace, device: str, tokens_path: Path | None = None
) -> dict:
    """gptlab's `fit`; with `args.interleaved`, a TorchLoop step after every gptlab step (one process)."""
    import lightning as L

    from gptlab.cli import GPTLabCLI

    steps = args.warmup + args.steps
    stamps: list[tuple[float, float]] = []
    loop = TorchLoop(cfg, steps, device, tokens_path) if args.interleaved else None
    # Interleaved: spans[f][i] = (wall, CPU) seconds of step i of framework f. A gptlab step runs
    # from the end of the previous torch step to this on_train_batch_end (all of Lightning's work
    # between two batches, data loading included); the torch step follows it at once.
    spans: dict[str, list[tuple[float, float]]] = {"gptlab": [], "torch": []}
    resumed: list[tuple[float, float]] = []

    class StepTimer(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sync(device)
            stamps.append(now())
            if loop is None:
                return
            if resumed:
                spans["gptlab"].append(tuple(b - a for a, b in zip(resumed[-1], stamps[-1], strict=True)))
            loop.step()
            resumed.append(now())
            spans["torch"].append(tuple(b - a for a, b in zip(stamps[-1], resumed[-1], strict=True)))

    baseline = rss_kib()
    backbone = "--model.init_args.backbone.init_args."
    cli = GPTLabCLI(
        args=[
            "--config", str(REPO / cfg.gptlab_config),
            f"{backbone}n_layer", str(cfg.n_layer), f"{backbone}n_head", str(cfg.n_head),
            f"{backbone}n_embd", str(cfg.n_embd), f"{backbone}block_size", str(cfg.block_size),
            f"{backbone}bias", str(cfg.bias).lower(),
            "--data.init_args.train_files", str(args.data),
            "--data.init_args.block_size", str(cfg.block_size),
            "--data.init_args.batch_size", str(cfg.batch_size),
            "--data.init_args.cache_dir", str(args.cache),
            "--model.init_args.scheduler.init_args.max_steps", str(steps),
            "--trainer.accelerator", "gpu" if device == "cuda" else "cpu",
            "--trainer.max_steps", str(steps),
            # Training only, as in the other two: no validation (nor its sanity check, whose
            # evaluation batch would set the peak memory) and no sample generation.
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.callbacks", "[]",
            "--logs", str(args.logs), "--experiment", f"bench-{cfg.name}",
            *args.gptlab_args,
        ],
        run=False,
    )  # fmt: skip
    cli.trainer.callbacks.append(StepTimer())
    if loop is not None:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        tokens = cfg.batch_size * cfg.block_size
        out = {}
        for framework, timed in spans.items():
            timed = timed[args.warmup :]
            wall, cpu = (sum(t[i] for t in timed) for i in (0, 1))
            out[framework] = {"steps": len(timed), "tokens_per_sec": len(timed) * tokens / wall,
                              "tokens_per_cpu_sec": len(timed) * tokens / cpu}  # fmt: skip
        return out
    if not args.profile:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return {
            **rates(stamps, args.warmup, cfg.batch_size * cfg.block_size),
            **memory_report(device, baseline),
        }
    profiler = cProfile.Profile(time.process_time)
    profiler.runcall(cli.trainer.fit, cli.model, datamodule=cli.datamodule)
    return {"profile": step_profile(pstats.Stats(profiler), len(stamps)), "steps": len(stamps)}


# Where a gptlab training step spends its CPU time: (label, file suffix, function), cumulative.
PROFILED = [
    ("whole training step (Lightning loop)", "loops/training_epoch_loop.py", "advance"),
    ("forward + loss (training_step)", "gptlab/tasks/base.py", "training_step"),
    ("backward", "torch/_tensor.py", "backward"),
    ("optimizer update (fused AdamW)", "torch/optim/adam.py", "_fused_adam"),
    ("gradient clipping", "torch/nn/utils/clip_grad.py", "clip_grad_norm_"),
    ("next batch (DataLoader + collate)", "loops/fetchers.py", "__next__"),
    ("batch to device", "lightning/pytorch/core/module.py", "_apply_batch_transfer_handler"),
    ("self.log calls", "lightning/pytorch/core/module.py", "log"),
    ("progress bar", "progress/rich_progress.py", "on_train_batch_end"),
    ("progress bar", "progress/tqdm_progress.py", "on_train_batch_end"),
    ("Throughput callback", "gptlab/callbacks.py", "on_train_batch_end"),
    ("checkpoint callback", "callbacks/model_checkpoint.py", "on_train_batch_end"),
    ("writing logs", "logger_connector/logger_connector.py", "update_train_step_metrics"),
]


def step_profile(stats: pstats.Stats, steps: int) -> dict[str, float]:
    """Milliseconds of CPU per training step in each PROFILED function (cProfile inflates Python)."""
    out: dict[str, float] = {}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.stats.items():
        for label, suffix, function in PROFILED:
            if name == function and filename.endswith(suffix):
                out[label] = out.get(label, 0.0) + 1000 * cumulative / steps
    step = out.get("whole training step (Lightning loop)", 0.0)
    model = sum(out.get(label, 0.0) for label, *_ in PROFILED[1:5])
    out["everything else (loop, hooks, data, logging)"] = step - model
    return out


# ----------------------------------------------------------------------------- (b) plain PyTorch
class TorchLoop:
    """The minimal loop: batch = stacked windows, forward, loss, backward, clip, AdamW step.

    The floor for framework overhead: the same GPT module, nothing around it. `step()` trains one
    batch; the same windows in the same order as gptlab's loader (T + 1 tokens, stride 1, seeded
    permutation): T inputs and their T next-token targets.
    """

    def __init__(self, cfg: BenchConfig, total_steps: int, device: str, tokens_path: Path) -> None:
        import numpy as np
        import torch

        from gptlab.data import SeededShuffleSampler
        from gptlab.models import GPT
        from gptlab.optim import WarmupCosine

        torch.manual_seed(1337)
        self.device, self.cfg = device, cfg
        self.tokens = torch.from_numpy(np.load(tokens_path).astype(np.int64))
        T = cfg.block_size
        self.model = GPT(cfg.vocab_size, T, cfg.n_layer, cfg.n_head, cfg.n_embd, 0.0, cfg.bias).to(device)
        # nanoGPT's groups: decay matrices, not biases / norms.
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        keep = [p for p in self.model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
        # Fused, as the gptlab configs.
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
        self.scheduler = WarmupCosine(self.optimizer, cfg.warmup_steps, total_steps, 0.1)
        self.order = iter(SeededShuffleSampler(len(self.tokens) - T, 1337))
        self.offsets = torch.arange(T + 1)

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        starts = torch.tensor([next(self.order) for _ in range(self.cfg.batch_size)])
        window = self.tokens[starts[:, None] + self.offsets].to(self.device, non_blocking=True)  # (B, T + 1)
        logits = self.model.logits(self.model(window[:, :-1]))  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), window[:, 1:].reshape(-1))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        sync(self.device)
        return loss


def run_torch(cfg: BenchConfig, args: argparse.Namespace, device: str, tokens_path: Path) -> dict:
    baseline = rss_kib()
    steps = args.warmup + args.steps
    loop = TorchLoop(cfg, steps, device, tokens_path)
    stamps = []
    for _ in range(steps):
        loss = loop.step()
        stamps.append(now())
    B, T = cfg.batch_size, cfg.block_size
    return {**rates(stamps, args.warmup, B * T), "final_loss": loss.item(), **memory_report(device, baseline)}


# ----------------------------------------------------------------------------- (c) HF Trainer
def run_hf(cfg: BenchConfig, args: argparse.Namespace, device: str, tokens_path: Path) -> dict:
    import numpy as np
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

    baseline = rss_kib()
    tokens = torch.from_numpy(np.load(tokens_path).astype(np.int64))
    T = cfg.block_size

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(tokens) - T + 1

        def __getitem__(self, i: int) -> dict:
            window = tokens[i : i + T]
            return {"input_ids": window, "labels": window}  # GPT2LMHeadModel shifts the labels

    stamps: list[tuple[float, float]] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            sync(device)
            stamps.append(now())

    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=T, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    steps = args.warmup + args.steps
    targs = TrainingArguments(
        output_dir=str(args.logs / "hf"), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, adam_beta1=cfg.betas[0], adam_beta2=cfg.betas[1],
        weight_decay=cfg.weight_decay, max_grad_norm=1.0, lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps, logging_steps=25, save_strategy="no", eval_strategy="no",
        report_to="none", use_cpu=device == "cpu", dataloader_num_workers=0, seed=1337,
        optim="adamw_torch_fused",  # the Trainer's default, and the gptlab configs' optimizer
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=Windows(), callbacks=[StepTimer()])
    trainer.train()
    params = sum(p.numel() for p in model.parameters())
    return {
        **rates(stamps, args.warmup, cfg.batch_size * T),
        "params": params,
        **memory_report(device, baseline),
    }


# ----------------------------------------------------------------------------- orchestration
def child(args: argparse.Namespace) -> None:
    """One framework, one config, one process; prints one JSON line."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    cfg = CONFIGS[args.config]
    if args.batch_size:
        cfg.batch_size = args.batch_size
    if args.framework == "gptlab":
        result = run_gptlab(cfg, args, device, args.tokens)
    elif args.framework == "torch":
        result = run_torch(cfg, args, device, args.tokens)
    else:
        result = run_hf(cfg, args, device, args.tokens)
    print(
        "RESULT " + json.dumps({"framework": args.framework, "config": cfg.name, "device": device, **result})
    )


def launch(framework: str, config: str, args: argparse.Namespace, tokens: Path, workdir: Path) -> dict:
    command = [
        sys.executable, __file__, "--child", framework, "--config", config, "--tokens", str(tokens),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", str(args.data),
        "--cache", str(args.cache), "--logs", str(workdir / "logs"),
    ]  # fmt: skip
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.cpu:
        command.append("--cpu")
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.gptlab_args:
        command.append("--gptlab-args=" + " ".join(args.gptlab_args))
    if args.profile:
        command.append("--profile")
    if args.interleaved:
        command.append("--interleaved")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false"}
    log = workdir / f"{config}-{framework}.log"
    with log.open("a") as out:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=out, text=True, env=env, cwd=workdir)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{framework} on {config} failed (exit {done.returncode}); see {log}")
    return json.loads(lines[-1][len("RESULT ") :])


def flops_per_token(cfg: BenchConfig) -> int:
    from gptlab.models import GPT

    model = GPT(cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, 0.0, cfg.bias)
    return model.num_flops_per_token(cfg.block_size)


def orchestrate(args: argparse.Namespace) -> dict:
    import torch

    from gptlab.callbacks import measure_matmul_flops

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    workdir = Path(tempfile.mkdtemp(prefix="gptlab-bench-"))
    tokens = prepare_tokens(args.data, args.cache)
    frameworks = [f for f in args.frameworks.split(",") if f]
    results: dict = {"device": device, "threads": torch.get_num_threads(), "configs": {}}
    peaks: dict[str, list[float]] = {"wall": [], "cpu": []}
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        if args.batch_size:
            cfg.batch_size = args.batch_size
        runs: dict[str, list[dict]] = {f: [] for f in frameworks}
        for round_ in range(args.rounds):
            # Rotate the order each round: no framework always runs first (or right after another).
            order = frameworks[round_ % len(frameworks) :] + frameworks[: round_ % len(frameworks)]
            for framework in order:
                peaks["wall"].append(measure_matmul_flops(device, torch.float32, size=1024, seconds=0.5))
                if device == "cpu":
                    peaks["cpu"].append(
                        measure_matmul_flops(device, torch.float32, 1024, 0.5, clock=time.process_time)
                    )
                run = launch(framework, name, args, tokens, workdir)
                runs[framework].append(run)
                print(
                    f"[{name} round {round_ + 1}] {framework}: {run['tokens_per_sec']:,.0f} tokens/s, "
                    f"{run['tokens_per_cpu_sec']:,.0f} tokens/CPU-s",
                    flush=True,
                )
        results["configs"][name] = {
            "config": asdict(cfg),
            "runs": runs,
            "flops_per_token": flops_per_token(cfg),
        }
    # The best product seen during the whole run: contention only ever lowers a measurement.
    results["matmul_peak_flops"] = {clock: max(values) for clock, values in peaks.items() if values}
    results["workdir"] = str(workdir)
    return results


def paired(runs: dict[str, list[dict]], key: str, framework: str, base: str) -> str:
    """Speed of `framework` over `base`: the ratio within each round, then the median over rounds."""
    if framework == base:
        return "1.00x"
    if base not in runs:
        return "-"
    ratios = [a[key] / b[key] for a, b in zip(runs[framework], runs[base], strict=True)]
    return f"{statistics.median(ratios):.2f}x"


def summarize(results: dict, clock: str) -> str:
    """Markdown table; `clock` "wall" (tokens per second) or "cpu" (tokens per CPU-second)."""
    key = "tokens_per_sec" if clock == "wall" else "tokens_per_cpu_sec"
    unit = "tokens/s" if clock == "wall" else "tokens/CPU-s"
    peak = results["matmul_peak_flops"][clock]
    lines = [
        f"device: {results['device']} ({results['threads']} threads); fp32 matmul peak measured in this run: "
        f"{peak / 1e9:.1f} GFLOP/{'s' if clock == 'wall' else 'CPU-s'}",
        "",
        f"| config | framework | {unit} (median) | vs torch loop | vs HF Trainer | MFU "
        "| peak memory MiB (growth) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in results["configs"].items():
        runs = entry["runs"]
        median = {f: statistics.median(r[key] for r in rs) for f, rs in runs.items()}

        for f, rs in runs.items():
            mfu = median[f] * entry["flops_per_token"] / peak
            mem = statistics.median(r["peak_mib"] for r in rs)
            growth = [r["growth_mib"] for r in rs if r["growth_mib"] is not None]
            mem_text = f"{mem:,.0f}" + (f" (+{statistics.median(growth):,.0f})" if growth else "")
            lines.append(
                f"| {name} | {f} | {median[f]:,.0f} | {paired(runs, key, f, 'torch')} | "
                f"{paired(runs, key, f, 'hf')} | {mfu:.1%} | {mem_text} |"
            )
    return "\n".join(lines)


def interleaved(args: argparse.Namespace) -> None:
    """gptlab against the torch loop step by step in one process: a ratio that load cannot skew.

    Separate processes see different background load (on a shared machine the same run's rate
    moves by up to 1.5x); alternating single steps exposes both loops to the same load, the same
    CPU frequency and each other's cache traffic.
    """
    tokens = prepare_tokens(args.data, args.cache)
    workdir = Path(tempfile.mkdtemp(prefix="gptlab-interleaved-"))
    clocks = [("tokens_per_cpu_sec", "tokens/CPU-s"), ("tokens_per_sec", "tokens/s")]
    print("| config | round | " + " | ".join(f"gptlab {u} | torch {u} | ratio" for _, u in clocks) + " |")
    print("|---|---|" + "---|---|---|" * len(clocks))
    for name in args.configs.split(","):
        ratios: dict[str, list[float]] = {key: [] for key, _ in clocks}
        for round_ in range(args.rounds):
            run = launch("gptlab", name, args, tokens, workdir)
            cells = []
            for key, _ in clocks:
                ratios[key].append(run["gptlab"][key] / run["torch"][key])
                cells.append(f"{run['gptlab'][key]:,.0f} | {run['torch'][key]:,.0f} | {ratios[key][-1]:.3f}")
            print(f"| {name} | {round_ + 1} | " + " | ".join(cells) + " |", flush=True)
        medians = " | ".join(f"| | {statistics.median(ratios[key]):.3f}" for key, _ in clocks)
        print(f"| {name} | median | {medians} |")


def profile(args: argparse.Namespace) -> None:
    """Print where gptlab's training step spends its CPU time, per config (one profiled run each)."""
    tokens = prepare_tokens(args.data, args.cache)
    workdir = Path(tempfile.mkdtemp(prefix="gptlab-profile-"))
    for name in args.configs.split(","):
        result = launch("gptlab", name, args, tokens, workdir)
        print(f"\n{name}: CPU ms per training step under cProfile ({result['steps']} steps)\n")
        print("| where | ms / step |\n|---|---|")
        for label, ms in result["profile"].items():
            print(f"| {label} | {ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", default="gpt-6x384,nanogpt-cpu", help="comma-separated: " + ", ".join(CONFIGS)
    )
    parser.add_argument(
        "--frameworks", default=",".join(FRAMEWORKS), help="comma-separated subset of gptlab,torch,hf"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (allocator, caches)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per framework, interleaved")
    parser.add_argument("--batch-size", type=int, default=0, help="override every config's batch size")
    parser.add_argument("--data", type=Path, default=REPO / "data/tinyshakespeare/input.txt")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gptlab-bench-cache")
    parser.add_argument("--cpu", action="store_true", help="stay on CPU even if CUDA is available")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per run (torch.set_num_threads); 0 = torch's default",
    )
    parser.add_argument("--out", type=Path, help="also write all measurements as JSON here")
    parser.add_argument(
        "--gptlab-args",
        type=str.split,
        default=[],
        help="extra main.py options for the gptlab runs (to profile)",
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="one process per round: a torch-loop step after every gptlab step (load hits both alike)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one gptlab run per config (cProfile) instead of timing",
    )
    # Internal: one measurement in a child process.
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--logs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.framework = args.child
        child(args)
        return
    if not args.data.is_file():
        parser.error(f"--data {args.data} does not exist (Tiny Shakespeare: see README, Data)")
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown --configs {sorted(unknown)}; choose from {sorted(CONFIGS)}")
    if args.profile:
        profile(args)
        return
    if args.interleaved:
        interleaved(args)
        return
    results = orchestrate(args)
    clocks = ["cpu", "wall"] if results["device"] == "cpu" else ["wall"]
    tables = {clock: summarize(results, clock) for clock in clocks}
    for clock, table in tables.items():
        print(f"\n{'CPU time' if clock == 'cpu' else 'wall clock'}:\n{table}")
    if args.out:
        args.out.write_text(json.dumps({**results, "tables": tables}, indent=2))


if __name__ == "__main__":
    main()
