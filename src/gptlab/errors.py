"""Errors that gptlab reports to the user as one line, without a traceback.

Every problem a user can fix (a bad path, a wrong value, an incompatible checkpoint) raises a
subclass of `GPTLabError` whose message names what is wrong, where (file, line, key) and what to do.
`main.py` catches them, prints the message and exits non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class GPTLabError(Exception):
    """Base class of the errors shown to the user as a single message."""


class ConfigError(GPTLabError, ValueError):
    """A configuration value is wrong or two values disagree (e.g. tokenizer vs. vocab_size)."""


class CheckpointError(GPTLabError, ValueError):
    """A checkpoint is missing, truncated, unsafe or belongs to something else."""


class DataError(GPTLabError, ValueError):
    """Input data is missing, malformed or too small; the message names the file, line or key."""


def user_error(err: BaseException) -> GPTLabError | None:
    """The GPTLabError that `err` is or was raised from (its `__cause__` / `__context__` chain),
    None without one: jsonargparse re-raises a constructor's error as another one."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, GPTLabError):
        cause = cause.__cause__ or cause.__context__
    return cause
