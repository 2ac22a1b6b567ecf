"""Checks on the user's config files and command line, before LightningCLI parses them.

    argv ──check_config_files()──> every --config file: exists, valid YAML, no key given twice
         ──LightningCLI / jsonargparse──> parser error? ──one_line_parser_error()──> ConfigError

Two gaps this closes (docs/bad_inputs.md):

- PyYAML, and jsonargparse on top of it, silently keep the *last* of two equal keys in one
  mapping (YAML 1.2 says keys must be unique; PyYAML does not enforce it). A config with
  `lr: 1e-3` and, further down, `lr: 1e-2` would train with 1e-2 and say nothing. We load every
  --config file once more with a loader that records each key's line and refuse duplicates,
  naming the file, both lines and the key.
- jsonargparse reports a bad key or value as a usage block plus a nested explanation of every
  Union subtype it tried (70+ lines for one misspelt option). The facts are in there: the key
  path, the class and the innermost reason; `one_line_parser_error` keeps those, adds the file
  and line where the key was written, and says where to look for the accepted options.

After parsing, `check_settings` refuses settings that would only fail later (at the first step,
save or validation), before anything is built.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from gptlab.adapters import require_peft
from gptlab.argv import EVAL_SUBCOMMANDS
from gptlab.errors import CheckpointError, ConfigError
from gptlab.runs import check_writable_dir, run_dir_of


class _KeyLinesLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (PyYAML keeps the last one)."""

    source = "<config>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the constructor below reports it
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.source} line {line}: key '{key}' is given twice in the same mapping (first on "
                    f"line {first}); YAML would silently keep only the last value: delete one of them"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _config_args(argv: list[str]) -> list[str]:
    """The values of every `--config X` / `-c X` / `--config=X` in argv."""
    values = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config_files(argv: list[str]) -> None:
    """Refuse a --config that does not exist, is not valid YAML, or gives a key twice.

    An inline YAML string (`--config '{trainer: {max_steps: 5}}'`, which jsonargparse accepts) is
    checked the same way; a value that is neither a file nor YAML text is a missing file.
    """
    # Two spellings of one option: argparse would keep the last one given without a word.
    root, logs = _option_value(argv, "--logs_root"), _option_value(argv, "--logs")
    if root is not None and logs is not None and root != logs:
        raise ConfigError(
            f"--logs_root {root} and --logs {logs} both set the root of all runs, to different directories: "
            f"give one (--logs_root, the spelling launchers such as torchrun leave alone)"
        )
    for value in _config_args(argv):
        path = Path(value)
        if path.is_dir():
            inside = sorted(path.glob("*.yaml"))[:1]
            hint = f" (e.g. --config {inside[0]})" if inside else ""
            raise ConfigError(f"--config {value}: a directory, not a config file; give a YAML file{hint}")
        if path.is_file():
            source, text = str(path), None
        elif "\n" in value or value.lstrip().startswith("{"):
            source, text = "--config (inline)", value
        else:
            raise ConfigError(
                f"--config {value}: no such file (working directory {Path.cwd()}); check the path"
            )
        if text is None:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as err:
                raise ConfigError(f"{source}: not UTF-8 text at byte {err.start}; save it as UTF-8") from None
        loader_class = type("_Loader", (_KeyLinesLoader,), {"source": source})
        loader = loader_class(text)
        try:
            data = loader.get_single_data()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(
                f"{source}{where}: not valid YAML ({err.problem or err.context}); fix the syntax there"
            ) from None
        finally:
            loader.dispose()
        if data is None:
            raise ConfigError(
                f"{source}: an empty config file (no keys); give it model:, data:, trainer: ... or drop "
                f"this --config"
            )
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: a YAML {type(data).__name__} at the top level, but a config file is a mapping "
                f"of keys (model:, data:, trainer: ...); remove the leading '- ' if the keys are in a list"
            )


# Lines of jsonargparse's Union explanation that carry no fact of their own.
_STRUCTURE = re.compile(
    r"^(- )?(Parser key \"|Does not validate against|Subtypes:|Errors:|Problem with given class_path|"
    r"Expected a <class 'NoneType'>|Given value type:|Given value:|Not a valid subclass)"
)


def _option_value(argv: list[str], option: str) -> str | None:
    """The value given to `option` (`--opt value` or `--opt=value`), the last one if repeated."""
    found = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            found = argv[i + 1]
        elif arg.startswith(option + "="):
            found = arg.split("=", 1)[1]
    return found


def one_line_parser_error(message: str, argv: list[str], subcommand: str | None) -> str:
    """jsonargparse's multi-line error as one line: key path (class): reason (file line N); what to do."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    reasons = [line for line in lines if not _STRUCTURE.match(line)]
    reason = reasons[0] if reasons else lines[0] if lines else message
    expected = [
        r.removeprefix("- ").removeprefix("Expected a ") for r in reasons if r.startswith("- Expected a")
    ]
    given = re.search(r"^\s*Given value: (.*)$", message, re.M)
    if expected and len(expected) == len(reasons) and given:
        # A plain value that matches none of a Union's types (e.g. trainer.precision: bogus).
        reason = f"{given[1]!r} is none of: {'; '.join(expected)}"
    key = ".init_args.".join(keys)
    text = f"{key}: {reason}" if key and not reason.startswith(key) else reason
    if classes and classes[-1] not in text:
        text = f"{text} (in {classes[-1]})"
    # Where the offending key was written: the last name the message quotes ('n_layers', or the
    # last key of the path) looked up as `name:` in the --config files, in order.
    option = re.findall(r"[Oo]ption '([A-Za-z_][\w.]*)'", reason)
    name = (option[-1] if option else keys[-1] if keys else "").split(".")[-1]
    # Given on the command line (it wins over the files): say so, not a file line.
    given = [
        a.split("=", 1)[0]
        for a in argv
        if a.startswith("--") and a.split("=", 1)[0].rsplit(".", 1)[-1].lstrip("-") == name
    ]
    if name and given:
        text += f" (command line: {given[-1]})"
        value = _option_value(argv, given[-1])
        if value is not None and (": " in value or value.lstrip()[:1] in ("{", "[")):
            kind = "mapping" if ": " in value and value.lstrip()[:1] != "[" else "list"
            text += (
                f"; a command-line value is read as YAML, so {value!r} is a {kind}: if you meant text, "
                f"quote it for YAML inside the shell's quotes, e.g. {given[-1]} '{json.dumps(value)}'"
            )
        name = ""
    if name:
        for value in _config_args(argv):
            path = Path(value)
            if not path.is_file():
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if re.match(rf"\s*{re.escape(name)}\s*:", line):
                    text += f" ({path} line {number})"
                    break
            else:
                continue
            break
    # An unknown subcommand (`main.py train`) has no help of its own: the list is in main.py --help.
    known = subcommand in ("fit", "validate", "test", "predict", "export")
    help_cmd = f"main.py {subcommand} --help" if known else "main.py --help"
    return f"{text}; see `{help_cmd}` for the accepted keys and types"


def check_settings(subcommand: str | None, cfg: Any, ckpt: str | None) -> None:
    """Settings that can only fail later (at the first step, the first save, the first
    validation), checked before anything is built.

    Args:
        subcommand: fit / validate / test / predict.
        cfg: the subcommand's parsed config (a jsonargparse Namespace).
        ckpt: `--ckpt_path` as given (after `last` was resolved for fit).
    """
    if ckpt == "":
        raise ConfigError(
            "--ckpt_path is empty: give a checkpoint file, `last` (fit: resume the newest run), or "
            "leave the option out"
        )
    # (a remote URL, s3://..., is left to Lightning's fsspec loading)
    local = ckpt and "://" not in ckpt and ckpt not in ("best", "last", "hpc", "registry")
    if local and not Path(ckpt).exists():
        raise CheckpointError(f"--ckpt_path {ckpt} does not exist: check the path")
    run = run_dir_of(ckpt)
    if run is None:
        check_writable_dir(Path(cfg.logs), "--logs_root", "set --logs_root to a directory you can write to")
    else:
        check_writable_dir(
            run, "run directory", "copy the run to a writable place and give --ckpt_path from there"
        )
    experiment = str(cfg.experiment)
    if (
        not experiment
        or experiment in (".", "..")
        or any(c in experiment for c in "/\\")
        or ".." in experiment
    ):
        raise ConfigError(
            f"--experiment {experiment!r}: give a plain name (no '/', '\\' or '..'): runs land in "
            f"{cfg.logs}/<experiment>/version_N; to write them elsewhere, set --logs_root"
        )
    # It becomes a folder name: longer than the filesystem allows, the logger's mkdir fails deep
    # inside Lightning ("File name too long"). 255 bytes is the limit of ext4, XFS, btrfs, APFS.
    if len(os.fsencode(experiment)) > 255:
        raise ConfigError(
            f"--experiment is {len(os.fsencode(experiment))} bytes long ({experiment[:40]!r}...), but it "
            f"names a folder and folder names are at most 255 bytes: give a shorter name"
        )
    trainer = cfg.trainer
    accumulate = trainer.get("accumulate_grad_batches")
    if accumulate is not None and accumulate < 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={accumulate} must be at least 1 (1: no accumulation)"
        )
    interval = trainer.get("val_check_interval")
    if interval is not None and interval <= 0:
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be positive: a number of training batches (int) "
            f"or a fraction of an epoch in (0, 1]; to validate less, raise it, or set "
            f"trainer.limit_val_batches to 0 for no validation"
        )
    if subcommand == "fit" and trainer.get("max_steps") == 0:
        raise ConfigError(
            "trainer.max_steps=0 trains nothing: give the number of optimizer steps, or -1 to "
            "train for trainer.max_epochs"
        )
    check_peft_config(cfg)
    data = cfg.data.get("init_args") if hasattr(cfg.get("data"), "get") else None
    cache = data.get("cache_dir") if data is not None else None
    if isinstance(cache, str) and cache:
        check_writable_dir(
            Path(cache).expanduser(),
            "data.init_args.cache_dir",
            "set data.init_args.cache_dir to a directory you can write to",
        )
    if subcommand in EVAL_SUBCOMMANDS and ckpt in ("best", "last"):
        found = sorted(
            (Path(cfg.logs) / experiment).glob(f"version_*/checkpoints/{ckpt}.ckpt"),
            key=lambda p: int(p.parts[-3].split("_")[1]) if p.parts[-3].split("_")[1].isdigit() else -1,
        )
        example = found[-1] if found else f"{cfg.logs}/{experiment}/version_N/checkpoints/{ckpt}.ckpt"
        raise ConfigError(
            f"--ckpt_path {ckpt}: a separate `{subcommand}` has no {ckpt} checkpoint of its own "
            f"(that name means the {ckpt} of a fit in the same process); give the file, e.g. "
            f"--ckpt_path {example} (its run's config.yaml is found beside it)"
        )


def check_peft_config(cfg: Any) -> None:
    """A peft config that its own class refuses (`__post_init__` raises ValueError when the model
    is built: a 100-line trace through jsonargparse), refused first in one line naming its keys."""
    model = cfg.get("model")
    model_args = model.get("init_args") if hasattr(model, "get") else None
    peft = model_args.get("peft") if hasattr(model_args, "get") else None
    if not hasattr(peft, "get") or not isinstance(peft.get("class_path"), str):
        return
    import importlib
    import warnings

    module, _, name = peft["class_path"].rpartition(".")
    try:
        peft_class = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return  # the parser has said so already
    # Nested configs (loftq_config, ...) as plain dicts, which peft's __post_init__ also accepts.
    args = {
        k: v.as_dict() if hasattr(v, "as_dict") else v for k, v in vars(peft.get("init_args") or {}).items()
    }
    key = "model.init_args.peft.init_args"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. AdaLoRA's "r is not used": said when it is built
            peft_class(**args)
    except (TypeError, ValueError) as err:
        said = f"model.init_args.peft ({name}): " + " ".join(str(err).split())
        if name == "AdaLoraConfig":
            total, tinit, tfinal = args.get("total_step"), args.get("tinit", 0), args.get("tfinal", 0)
            steps = cfg.trainer.get("max_steps") if cfg.get("trainer") is not None else None
            hint = f" (trainer.max_steps={steps})" if steps and steps > 0 else ""
            if total is None or total <= 0:
                said = (
                    f"{key}.total_step={total}: AdaLoRA plans its rank budget over the fit's steps and needs "
                    f"their number: set it to the number of optimizer steps{hint}"
                )
            elif tinit >= total - tfinal:
                said = (
                    f"{key}: tinit={tinit} + tfinal={tfinal} leave no step of total_step={total} for AdaLoRA "
                    f"to allocate its rank budget in: lower tinit / tfinal or raise total_step (tinit < "
                    f"total_step - tfinal)"
                )
        raise ConfigError(said) from None


class OneLineParser(LightningArgumentParser):
    """LightningArgumentParser whose errors are one line (a ConfigError) instead of usage + a wall."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            # A nested parser (a class's init_args tried as one Union subtype): jsonargparse
            # collects its error into the top-level one, which is shortened below.
            return super().error(message, ex)
        argv = getattr(self, "_gptlab_argv", None) or sys.argv[1:]
        subcommand = argv[0] if argv and not argv[0].startswith("-") else None
        if "peft" in message:
            # A peft config class that cannot be imported: say which package is missing.
            require_peft()
        error = ConfigError(one_line_parser_error(message, argv, subcommand))
        error.parser_message = message  # what `quote_text_value` reads to retry a parse
        raise error from None
