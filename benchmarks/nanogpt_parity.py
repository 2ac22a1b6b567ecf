"""nanoGPT parity: gptlab's shakespeare_char run beside nanoGPT's own training procedure, per seed.

    OMP_NUM_THREADS=1 python benchmarks/nanogpt_parity.py --seeds 1337 1 2

For each seed it trains the same 4 x 4 x 128 character GPT for 2000 steps twice:

    gptlab     `main.py fit --config configs/pretrain/shakespeare_char.yaml --seed_everything S
               --data.init_args.seed S` (weights and data order both drawn from the seed)
    reference  nanoGPT's train.py procedure written out in one loop (karpathy/nanoGPT, the
               README's CPU "baby GPT" command): its data prep (65 sorted characters, first 90 %
               train), `get_batch` (12 random offsets per step drawn from the global RNG),
               `get_lr` (warmup 100, cosine to 1e-4 at 2000), AdamW groups (dim >= 2 decay 0.1),
               betas (0.9, 0.99), clipping 1.0, and `estimate_loss` (20 random batches per split
               every 250 steps) -- on gptlab's GPT module with bias=False, nanoGPT's architecture
               (it differs only in GELU: tanh approximation here, exact in nanoGPT).

Two crossed runs separate what differs (`--only crossed-order` / `--only crossed-randint`, not in
the default set): nanoGPT's loop from gptlab's seed-1337 initial weights and token stream, with
gptlab's batch order for data seed S, or with nanoGPT-style random offsets from a generator seeded S.

Every final model is then scored the same two ways on the same last 10 % of the text:
`full` = every validation token a target once (64 inputs + 1 per window, gptlab's val/loss) and
`nanogpt` = nanoGPT's 20-batch estimate, averaged over 50 independent draws (its spread shows how
much one estimate can move). Prints one JSON object per run and a summary table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from gptlab.models import GPT  # noqa: E402

TEXT = REPO / "data/tinyshakespeare/input.txt"
BLOCK, BATCH, STEPS, EVAL_EVERY, EVAL_ITERS = 64, 12, 2000, 250, 20
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 100


def get_lr(it: int) -> float:
    """nanoGPT's train.py get_lr, verbatim in meaning."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > STEPS:
        return MIN_LR
    ratio = (it - WARMUP) / (STEPS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


@torch.no_grad()
def full_val_loss(model: GPT, val: torch.Tensor) -> float:
    """Mean loss with every validation token a target once, as gptlab's val/loss: windows of
    BLOCK inputs + 1 stepping by BLOCK (the stream's last partial window left out)."""
    n = (len(val) - 1) // BLOCK
    x = val[: n * BLOCK].view(n, BLOCK)  # (N, T)
    y = val[1 : n * BLOCK + 1].view(n, BLOCK)  # (N, T)
    total, count = 0.0, 0
    for xs, ys in zip(x.split(256), y.split(256), strict=True):
        logits = model.logits(model(xs))
        loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum")
        total, count = total + loss.item(), count + ys.numel()
    return total / count


@torch.no_grad()
def nanogpt_estimate(model: GPT, data: torch.Tensor, generator: torch.Generator | None = None) -> float:
    """nanoGPT's estimate_loss for one split: the mean of EVAL_ITERS random batches."""
    losses = []
    for _ in range(EVAL_ITERS):
        ix = torch.randint(len(data) - BLOCK, (BATCH,), generator=generator)
        x = torch.stack([data[i : i + BLOCK] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + BLOCK] for i in ix])
        logits = model.logits(model(x))
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item())
    return sum(losses) / len(losses)


def nanogpt_loop(
    model: GPT, train: torch.Tensor, val: torch.Tensor, starts: Callable[[], torch.Tensor]
) -> dict:
    """nanoGPT's train.py loop over STEPS steps; `starts()` gives each batch's window offsets."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.99))
    log = {}
    start = time.perf_counter()
    for it in range(STEPS + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        if it % EVAL_EVERY == 0:
            model.eval()
            train_est, val_est = nanogpt_estimate(model, train), nanogpt_estimate(model, val)
            model.train()
            log[it] = {"train": round(train_est, 4), "val": round(val_est, 4)}
        if it == STEPS:  # nanoGPT evaluates at max_iters, then stops
            break
        ix = starts()
        x = torch.stack([train[i : i + BLOCK] for i in ix])  # (B, T)
        y = torch.stack([train[i + 1 : i + 1 + BLOCK] for i in ix])
        logits = model.logits(model(x))  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    log["wall_seconds"] = round(time.perf_counter() - start, 1)
    model.eval()
    return log


def reference(seed: int) -> tuple[GPT, torch.Tensor, dict]:
    """nanoGPT end to end: its data preparation, initialisation and random batches."""
    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    torch.manual_seed(seed)
    model = GPT(len(chars), BLOCK, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
    # get_batch: offsets from the global RNG (which estimate_loss draws from too)
    log = nanogpt_loop(model, train, val, lambda: torch.randint(len(train) - BLOCK, (BATCH,)))
    return model, val, log


def crossed(seed: int, work: Path, batches: str) -> tuple[GPT, torch.Tensor, dict]:
    """nanoGPT's loop from gptlab's initial weights (seed 1337) and token stream.

    `batches`: "order" = gptlab's training order for data seed `seed` (SeededShuffleSampler),
    "randint" = nanoGPT-style offsets from a generator seeded with `seed`.
    """
    from gptlab.cli import GPTLabCLI

    cli = GPTLabCLI(
        args=[
            "--config", str(REPO / "configs/pretrain/shakespeare_char.yaml"),
            "--seed_everything", "1337", "--data.init_args.seed", str(seed),
            "--data.init_args.cache_dir", str(work / "cache"), "--logs", str(work / "crossed-logs"),
        ],
        run=False,
    )  # fmt: skip
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    train = torch.from_numpy(data.train_dataset.tokens.astype("int64"))
    val = torch.from_numpy(data.val_dataset.tokens.astype("int64"))
    if batches == "order":
        order = iter(data.train_dataloader().sampler)  # window i starts at token i (stride 1)
        starts = lambda: torch.tensor([next(order) for _ in range(BATCH)])  # noqa: E731
    else:
        generator = torch.Generator().manual_seed(seed)
        starts = lambda: torch.randint(len(train) - BLOCK, (BATCH,), generator=generator)  # noqa: E731
    model = cli.model.backbone
    return model, val, nanogpt_loop(model, train, val, starts)


def gptlab(seed: int, work: Path, extra: list[str]) -> tuple[GPT, torch.Tensor, dict]:
    """`main.py fit` with the shipped config and this seed; the model and val tokens it used."""
    from gptlab.tasks import CausalLM

    logs, cache = work / f"logs-{seed}", work / "cache"
    command = [
        sys.executable, str(REPO / "main.py"), "fit",
        "--config", str(REPO / "configs/pretrain/shakespeare_char.yaml"),
        # the seed draws both the initial weights and the data order (nanoGPT: one torch seed)
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed), "--logs", str(logs),
        "--data.init_args.cache_dir", str(cache), "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    run = next(logs.glob("*/version_0"))
    model = CausalLM.load_from_checkpoint(run / "checkpoints/last.ckpt", map_location="cpu").backbone.eval()
    # The val stream gptlab scored (its own character ids, EOS included).
    val = torch.from_numpy(__import__("numpy").load(next(cache.rglob("val.npy"))).astype("int64"))
    return model, val, {"wall_seconds": round(wall, 1), "run_dir": str(run)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument(
        "--only",
        choices=["gptlab", "reference", "crossed-order", "crossed-randint"],
        default=None,
        help="one kind of run; the crossed ones are not part of the default set",
    )
    parser.add_argument("--draws", type=int, default=50, help="nanoGPT estimates averaged per model")
    parser.add_argument("--work", default=None, help="where gptlab's runs go (default: a temp dir)")
    args, extra = parser.parse_known_args()  # the rest goes to gptlab's `main.py fit`
    work = Path(args.work or tempfile.mkdtemp(prefix="gptlab-parity-"))
    rows = []
    for seed in args.seeds:
        for name in ("gptlab", "reference", "crossed-order", "crossed-randint"):
            if args.only != name and (args.only is not None or name.startswith("crossed")):
                continue
            if name == "gptlab":
                model, val, log = gptlab(seed, work, extra)
            elif name == "reference":
                model, val, log = reference(seed)
            else:
                model, val, log = crossed(seed, work, name.split("-")[1])
            draws = torch.Generator().manual_seed(0)
            estimates = [nanogpt_estimate(model, val, draws) for _ in range(args.draws)]
            row = {
                "run": name,
                "seed": seed,
                "full": round(full_val_loss(model, val), 4),
                "nanogpt_mean": round(statistics.mean(estimates), 4),
                "nanogpt_std": round(statistics.stdev(estimates), 4),
                "nanogpt_min": round(min(estimates), 4),
                **log,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{'run':<10} {'seed':>5} {'full val':>9} {'nanoGPT est. (mean +- std)':>28} {'wall s':>7}")
    for r in rows:
        est = f"{r['nanogpt_mean']:.4f} +- {r['nanogpt_std']:.4f}"
        print(f"{r['run']:<10} {r['seed']:>5} {r['full']:>9.4f} {est:>28} {r['wall_seconds']:>7}")
    for name in dict.fromkeys(r["run"] for r in rows):
        full = [r["full"] for r in rows if r["run"] == name]
        if len(full) > 1:
            print(
                f"{name}: mean {statistics.mean(full):.4f}, sd {statistics.stdev(full):.4f} over "
                f"{len(full)} seeds; {sum(f <= 1.90 for f in full)} of {len(full)} at or below 1.90"
            )


if __name__ == "__main__":
    main()
