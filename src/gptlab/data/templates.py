"""Jinja prompt templates (`SFTDataModule.prompt_template` with `{{ }}` / `{% %}` markup).

    template --compile--> refused: syntax errors, {% include / import / extends %} (no files)
             --render(record)--> prompt, bounded: RENDER_SECONDS per record and RENDER_CHARS of
                                 output (`'a' * 10**13`, `range(10**9)`, nested loops: one line)

A template comes with the data and runs once per record: Jinja's sandbox keeps it away from Python
internals, but bounds neither time nor memory, so gptlab does (docs/bad_inputs.md).
"""

from __future__ import annotations

import functools
import math
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from gptlab.errors import DataError

# A prompt renders in microseconds and is at most a few thousand tokens long: these are far above
# any real template and far below what would stall or exhaust the machine.
RENDER_SECONDS = 2.0
RENDER_CHARS = 1_000_000


class RenderBound(Exception):
    """A template went past RENDER_SECONDS or RENDER_CHARS (the message says which)."""


def is_jinja(template: str) -> bool:
    """A template with Jinja markup ({{ }} or {% %}); others are str.format templates."""
    return "{{" in template and "}}" in template or "{%" in template


def format_fields(template: str) -> list[str]:
    """The str.format fields (`{question}`) in a Jinja template, where they are plain text: a
    template mixing both styles leaves them unrendered in every prompt."""
    return list(dict.fromkeys(re.findall(r"(?<!\{)\{([A-Za-z_]\w*)\}(?!\})", template)))


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    """The environment transformers uses for chat templates, with sizes bounded.

    Sandboxed (a template cannot reach Python internals), `trim_blocks` / `lstrip_blocks` (a line
    with only a `{% %}` tag leaves nothing behind), the final newline kept, and an undefined
    name is an error instead of an empty string (a misspelt column would otherwise vanish).
    `*` and `**` go through `call_binop`, which refuses results past RENDER_CHARS items or
    digits; this also stops Jinja computing constant ones (`'a' * 10**13`) while compiling.
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for items, n in ((left, right), (right, left)):
                    if (
                        isinstance(items, str | list | tuple)
                        and isinstance(n, int)
                        and len(items) * n > RENDER_CHARS
                    ):
                        raise RenderBound(f"{items!r:.20} * {n} would make {len(items) * n} items")
            elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                digits = right * math.log10(abs(left))
                if digits > RENDER_CHARS:
                    raise RenderBound(f"{left} ** {right} would have {digits:.0f} digits")
            return super().call_binop(context, operator, left, right)

    return Bounded(
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined
    )


@functools.lru_cache(maxsize=8)
def jinja_template(template: str) -> Any:
    """Compile a prompt template (ValueError: what is wrong with it, in one line)."""
    import jinja2
    from jinja2 import nodes

    environment = _environment()
    try:
        tree = environment.parse(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"not a valid Jinja template ({err.message}, template line {err.lineno})") from None
    for node in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        tag = {"FromImport": "from", "Extends": "extends"}.get(
            type(node).__name__, type(node).__name__.lower()
        )
        raise ValueError(
            f"{{% {tag} %}} (template line {node.lineno}) reads another template file, which a prompt "
            f"template may not: write what it holds into the template itself"
        )
    try:
        return environment.from_string(tree)
    except RenderBound as err:
        raise ValueError(f"{err}, more than a prompt may hold ({RENDER_CHARS} characters)") from None


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise RenderBound in the body after `seconds` (SIGALRM: only in the main thread and where
    nothing else uses the alarm; elsewhere the caller's checks between output pieces remain)."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if not usable or signal.getsignal(signal.SIGALRM) not in (signal.SIG_DFL, None):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RenderBound(f"it took more than {seconds:g} s")

    signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def render_jinja(template: Any, record: dict, location: str) -> str:
    """`template` rendered with the record's values; DataError (naming `location`) when it cannot
    be, or goes past RENDER_SECONDS / RENDER_CHARS."""
    import jinja2

    pieces: list[str] = []
    try:
        with _time_limit(RENDER_SECONDS):
            deadline, size = time.monotonic() + RENDER_SECONDS, 0
            for piece in template.generate(**record):
                size += len(piece)
                if size > RENDER_CHARS:
                    raise RenderBound(f"it renders more than {RENDER_CHARS} characters")
                if time.monotonic() > deadline:
                    raise RenderBound(f"it took more than {RENDER_SECONDS:g} s")
                pieces.append(piece)
    except RenderBound as err:
        raise DataError(
            f"{location}: prompt_template is bounded to {RENDER_SECONDS:g} s and {RENDER_CHARS} characters "
            f"per record, and {err}; a prompt needs far less: simplify the template (loops, ranges, `*`)"
        ) from None
    except OverflowError as err:  # the sandbox's range() past its MAX_RANGE
        raise DataError(f"{location}: prompt_template cannot render this record ({err})") from None
    except jinja2.UndefinedError as err:
        keys = ", ".join(map(repr, record)) or "none"
        raise DataError(
            f"{location}: prompt_template uses a value the record does not have ({err.message}; keys: "
            f"{keys}); fix the template (test optional values with `{{% if x is defined %}}`) or the data"
        ) from None
    except jinja2.TemplateError as err:
        raise DataError(f"{location}: prompt_template cannot render this record ({err})") from None
    return "".join(pieces)
