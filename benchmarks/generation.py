"""Decoding speed: gptlab's `generate_batch` vs transformers' `generate`, on the same exported weights.

    python benchmarks/generation.py                          # GPT-2 small shape, random weights
    python benchmarks/generation.py --preset walkthrough     # the README walkthrough's model shape
    python benchmarks/generation.py --ckpt logs/.../checkpoints/last.ckpt    # a trained run
    python benchmarks/generation.py --device cuda --profile

Both sides decode greedily the same prompts (batch 1, and batch 8 of different lengths, left
padded) for exactly `--new_tokens` tokens (no EOS stop), from the same weights: the model is
exported to a temporary Hugging Face directory (`gptlab.export.to_hf_model` + `save_pretrained`,
what `main.py export` writes) and gptlab loads its GPT back from that directory
(`load_hf_weights`). Tokens/s counts new tokens per second of wall time, prefill included.
Runs alternate (gptlab, transformers, gptlab, ...) so that load on a shared machine hits both
alike; the median of `--repeats` runs is reported, with the ratio gptlab / transformers and
whether both produced the same tokens. `--profile` prints where the time goes (torch.profiler,
top operators by self time) for one more run of each side at each batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gptlab.decoding import generate_batch  # noqa: E402
from gptlab.loading import load_hf_weights  # noqa: E402
from gptlab.models import GPT  # noqa: E402

PRESETS = {
    # GPT-2 small (124M parameters), the usual reference point.
    "gpt2": dict(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, n_embd=768),
    # configs/finetune/gsm8k_sft.yaml's backbone (the README walkthrough).
    "walkthrough": dict(vocab_size=4096, block_size=512, n_layer=4, n_head=4, n_embd=192),
}
PROMPT_LENGTHS = [64, 40, 56, 32, 64, 48, 24, 60]  # batch 8: left padding exercised


def build(args: argparse.Namespace, workdir: Path) -> tuple[GPT, torch.nn.Module, str]:
    """(gptlab GPT, transformers model) holding the same weights, via an exported directory."""
    if args.ckpt:
        from gptlab.export import export
        from gptlab.loading import load_checkpoint

        export(args.ckpt, str(workdir / "hf"))
        config = load_checkpoint(args.ckpt)["hyper_parameters"]["backbone"]["init_args"]
        shape = {k: config[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias")}
        source = args.ckpt
    else:
        from transformers import GPT2LMHeadModel

        from gptlab.models.convert import gpt2_config, gpt_to_gpt2_state_dict

        torch.manual_seed(0)
        shape = PRESETS[args.preset]
        random_gpt = GPT(**shape)
        hf = GPT2LMHeadModel(gpt2_config(random_gpt))
        hf.load_state_dict(gpt_to_gpt2_state_dict(random_gpt))
        hf.save_pretrained(workdir / "hf")
        source = f"preset {args.preset} (random weights)"
    gpt = GPT(**shape)
    load_hf_weights(gpt, workdir / "hf")
    hf = AutoModelForCausalLM.from_pretrained(workdir / "hf", dtype=torch.float32)
    # Decode exactly new_tokens tokens on both sides: no EOS stop, pad id 0 for left padding.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return gpt.to(args.device).eval(), hf.to(args.device).eval(), source


def prompts_for(batch: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS[:batch]]


def run_gptlab(gpt: GPT, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    return generate_batch(gpt, prompts, max_new_tokens=new_tokens, temperature=0)


def run_hf(hf: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    length = max(len(p) for p in prompts)
    device = hf.device
    ids = torch.zeros(len(prompts), length, dtype=torch.long)
    mask = torch.zeros(len(prompts), length, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, length - len(p) :], mask[i, length - len(p) :] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[:, length:].tolist()


def timed(fn, *args) -> tuple[float, list[list[int]]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def profile(name: str, device: str, fn, *args) -> None:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn(*args)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(f"\n--- where the time goes: {name} (top operators by {key})")
    print(prof.key_averages().table(sort_by=key, row_limit=12))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default="gpt2", help="model shape (random weights)"
    )
    parser.add_argument("--ckpt", help="a gptlab checkpoint to benchmark instead of a preset")
    parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (median reported)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of each side")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        gpt, hf, source = build(args, Path(tmp))
    import transformers

    print(
        f"model: {source}, {sum(p.numel() for p in gpt.parameters()) / 1e6:.1f}M parameters; device "
        f"{args.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; greedy, {args.new_tokens} new tokens per row, median of {args.repeats}"
    )
    results = []
    for batch in args.batches:
        prompts = prompts_for(batch, gpt.vocab_size)
        run_gptlab(gpt, prompts, 8)  # warm-up: allocator, kernels, lazy inits
        run_hf(hf, prompts, 8)
        times: dict[str, list[float]] = {"gptlab": [], "transformers": []}
        outputs = {}
        for _ in range(args.repeats):
            for name, fn, model in (("gptlab", run_gptlab, gpt), ("transformers", run_hf, hf)):
                seconds, outputs[name] = timed(fn, model, prompts, args.new_tokens)
                times[name].append(seconds)
        tokens = batch * args.new_tokens
        speed = {name: tokens / statistics.median(t) for name, t in times.items()}
        row = {
            "batch": batch,
            "gptlab_tok_s": round(speed["gptlab"], 1),
            "transformers_tok_s": round(speed["transformers"], 1),
            "ratio": round(speed["gptlab"] / speed["transformers"], 2),
            "same_tokens": outputs["gptlab"] == outputs["transformers"],
        }
        results.append(row)
        print(
            f"batch {batch}: gptlab {row['gptlab_tok_s']:8.1f} tok/s   transformers "
            f"{row['transformers_tok_s']:8.1f} tok/s   ratio {row['ratio']:.2f}x   "
            f"same tokens: {row['same_tokens']}",
            flush=True,
        )
    if args.profile:
        for batch in args.batches:
            prompts = prompts_for(batch, gpt.vocab_size)
            sides = (("gptlab generate_batch", run_gptlab, gpt), ("transformers generate", run_hf, hf))
            for name, fn, model in sides:
                profile(f"{name}, batch {batch}", args.device, fn, model, prompts, args.new_tokens)
    if args.json:
        meta = {
            "source": source,
            "device": args.device,
            "threads": torch.get_num_threads(),
            "new_tokens": args.new_tokens,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
