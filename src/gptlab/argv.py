"""The command line before and beside parsing: what a command's argv says, and how it is rewritten.

`with_run_config` adds a checkpoint's run config to a command without one (before parsing);
`quote_text_value` quotes a text value that YAML would read as a mapping (a retried parse);
`user_asks_for_remote_code` and `tokenizer_option` tell what the user's own options ask for
(gptlab.resolve reads them, never a run's record).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gptlab.errors import CheckpointError, ConfigError
from gptlab.loading import RUN_CODE_KEYS, records_remote_code
from gptlab.runs import is_run_config, run_dir_of

EVAL_SUBCOMMANDS = ("validate", "test", "predict")


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name value` / `--name=value` in argv, None without one."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def quote_text_value(argv: list[str], message: str) -> tuple[list[str], str, str] | None:
    """(argv, quoted, text): argv with the value that a parser `message` refuses as "not a str"
    quoted as a YAML string, that quoted string and the text as typed.

    Only a value that YAML read as a mapping or list although the key wants text (it contains
    ": " or starts with "{" / "["), and only where it was written on the command line; None when
    there is no such value (the error stands).
    """
    keys = re.findall(r'Parser key "([^"]+)":\s*\n\s*Expected a <class \'str\'>', message)
    if not keys:
        return None
    name = keys[-1].split(".")[-1]
    for i, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        if not option.startswith("--") or option.rsplit(".", 1)[-1].lstrip("-") != name:
            continue
        if not equals:
            if i + 1 >= len(argv):
                continue
            value = argv[i + 1]
        if not (": " in value or value.lstrip()[:1] in ("{", "[")) or value.startswith('"'):
            continue
        quoted = json.dumps(value)  # a JSON string is a YAML double-quoted string of the same text
        return [*argv[:i], f"{option}={quoted}", *argv[i + (1 if equals else 2) :]], quoted, value
    return None


def print_config_flags(argv: list[str]) -> set[str] | None:
    """The flags of a `--print_config[=flags]` in argv (an empty set without flags), None without one."""
    for arg in argv:
        if arg == "--print_config":
            return set()
        if arg.startswith("--print_config="):
            return set(arg.split("=", 1)[1].split(","))
    return None


def with_run_config(argv: list[str]) -> list[str]:
    """Add `--config <run>/config.yaml` to a command that names a checkpoint file but no config
    (`fit` then resumes the run with its own settings)."""
    if not argv or argv[0] not in (*EVAL_SUBCOMMANDS, "fit"):
        return argv
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = option(argv, "--ckpt_path")
    run = run_dir_of(ckpt)
    if ckpt is None or (argv[0] == "fit" and ckpt in ("last", "hpc", "registry")):
        return argv
    if ckpt in ("best", "last"):
        raise ConfigError(
            f"--ckpt_path {ckpt}: a separate `{argv[0]}` has no {ckpt} checkpoint of its own (that name "
            f"means the {ckpt} of a fit in the same process); give the file, e.g. --ckpt_path "
            f"logs/<experiment>/version_N/checkpoints/{ckpt}.ckpt (its run's config.yaml is found beside it)"
        )
    if ckpt and "://" not in ckpt and not Path(ckpt).exists():
        raise CheckpointError(f"--ckpt_path {ckpt} does not exist: check the path")
    config = run / "config.yaml" if run is not None else None
    if config is None or not config.is_file():
        raise ConfigError(
            f"--ckpt_path {ckpt}: no run config found next to it (expected {config or '<run>/config.yaml'}); "
            f"pass the experiment's --config explicitly"
        )
    return [argv[0], "--config", str(config), *argv[1:]]


def user_asks_for_remote_code(argv: list[str]) -> bool:
    """Whether the user's own config files or command-line options turn on a run-code setting
    (`trust_remote_code`). Config files inside a run directory and checkpoints are records of what
    a run did, not the user's consent to run a model's code now (docs/design.md §6.3).
    """
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        if name in ("-c", "--config"):
            if is_run_config(value):
                continue
            try:
                data = yaml.safe_load(Path(value).read_text())
            except (OSError, yaml.YAMLError):
                continue
            if records_remote_code(data):
                return True
        elif name.startswith("--") and name.endswith(RUN_CODE_KEYS):
            if str(yaml.safe_load(value or "false")).lower() in ("true", "yes", "1"):
                return True
        elif name.startswith("--") and any(key in value for key in RUN_CODE_KEYS):
            try:
                if records_remote_code(yaml.safe_load(value)):
                    return True
            except yaml.YAMLError:
                continue
    return False


def config_files(argv: list[str]) -> list[str]:
    """The config files named by `-c` / `--config` options, in order."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-c", "--config")]


def uses_run_config(argv: list[str], ckpt: str | Path | None) -> bool:
    """Whether a `--config` of argv is the config.yaml of the run of the checkpoint `ckpt`
    (however either path is spelled)."""
    run = run_dir_of(ckpt)
    own = (run / "config.yaml").resolve() if run is not None else None
    return own is not None and any(Path(c).resolve() == own for c in config_files(argv))


def tokenizer_option(argv: list[str]) -> str | None:
    """The command-line option by which the user chose a tokenizer, None without one.

    The one test of "the user gave a tokenizer": an option under `--data` that names a tokenizer
    (`--data.init_args.tokenizer X`) or whose value sets one (`--data '{..."tokenizer": ...}'`).
    A config file does not count: it may be a run's record (gptlab.resolve).
    """
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) and name.startswith("--") else ""
        if name.startswith("--data") and ("tokenizer" in name or "tokenizer" in value):
            return name
    return None
