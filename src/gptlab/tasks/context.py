"""What each position of a classified text can read: causal, bidirectional or repeated context.

A decoder labels a word at its first sub-token, where causal attention has shown it only the words
to its left: "Washington" in "Washington beat Dallas" is tagged before "beat" is read. Two known
remedies make the whole text visible to every position (docs/design.md, "Context"):

    causal          x1 x2 x3 | each position reads itself and what is left of it (pretraining)
    bidirectional   x1 x2 x3 | no causal mask in the chosen layers; padding stays masked
                               (LS-unLLaMA, arXiv 2310.01208; layer-wise arXiv 2401.14556)
    repeat (r = 1)  x1 x2 x3 x1' x2' x3'
                             | the text r + 1 times in one row, positions continuing; the head
                               reads the last copy, whose tokens have read one whole copy before
                               them (echo embeddings arXiv 2402.15449; arXiv 2601.17585)

`repeat` needs nothing from the backbone (any causal model), at (r + 1) times the tokens;
`bidirectional` costs nothing extra but must be supported by the backbone's attention, which
`check_bidirectional` probes at start. Both change only how hidden states are computed: after
`last_copy`, hidden states are aligned with the original tokens, so heads, labels, pooling and
word alignment are the same in every mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from gptlab.errors import ConfigError
from gptlab.models.backbone import Backbone

MODES = ("causal", "bidirectional", "repeat")


@dataclass
class Context:
    """What each position reads: `context: bidirectional` in YAML, or the fields below as a mapping.

    Args:
        mode: `causal` (the default: each token reads only the tokens before it), `bidirectional`
            (no causal mask, so every token reads the whole text; padding stays masked) or
            `repeat` (the text given `repeats` + 1 times in one row; the head reads the last copy).
        repeats: with `repeat`, the number of extra copies r (default 1: the text twice). The row
            is (r + 1) x the data's block_size tokens at most, which must fit the model.
        layers: with `bidirectional`, the layers without causal mask as `[start, stop]` (Python
            slice bounds, so `[20, 30]` is layers 20..29 and `[-4, null]` the last four); default
            every layer. Ranges are supported on gptlab's GPT; an HFBackbone goes through
            transformers' own `is_causal`, which covers every layer.
    """

    mode: str = "causal"
    repeats: int | None = None
    layers: list[int | None] | None = None

    def as_value(self) -> str | dict:
        """The YAML value: the mode alone when nothing else is set (`bidirectional`), else a mapping."""
        if self.repeats is None and self.layers is None:
            return self.mode
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        """One phrase for messages: `repeat (repeats 2)`, `bidirectional (layers [20, 30])`."""
        extras = [f"{k} {v}" for k, v in asdict(self).items() if k != "mode" and v is not None]
        return f"{self.mode} ({', '.join(extras)})" if extras else self.mode


def parse_context(
    value: Context | Mapping | str | None, task: str, modes: tuple[str, ...] = MODES
) -> Context:
    """The validated Context of `value` (a mode name, a mapping of Context's fields, or a Context).

    `modes` are the ones the task supports (a language model stays causal). Every problem is
    collected into one ConfigError naming `model.init_args.context`.
    """
    key = "model.init_args.context"
    if value is None:
        value = "causal"
    if isinstance(value, str):
        context = Context(mode=value)
    elif isinstance(value, Context):
        context = Context(**asdict(value))
    elif isinstance(value, Mapping):
        unknown = sorted(set(value) - {"mode", "repeats", "layers"})
        if unknown:
            raise ConfigError(f"{key}: unknown field(s) {unknown}; a context has mode, repeats and layers")
        context = Context(**dict(value))
    else:
        raise ConfigError(f"{key}={value!r}: give a mode name ({', '.join(MODES)}) or a mapping with mode")
    if context.mode not in MODES:
        raise ConfigError(f"{key}: unknown context {context.mode!r}; use one of {', '.join(MODES)}")
    if context.mode not in modes:
        raise ConfigError(
            f"{key}: {task} takes context: {' | '.join(modes)}, not {context.mode} (a language model "
            f"predicts each token from the ones before it, so its attention must stay causal); whole-text "
            f"context is for SequenceClassification and TokenClassification"
        )
    problems = []
    if context.repeats is not None:
        if context.mode != "repeat":
            problems.append(f"repeats={context.repeats} is for mode: repeat, not {context.mode}: remove it")
        elif isinstance(context.repeats, bool) or not isinstance(context.repeats, int) or context.repeats < 1:
            problems.append(
                f"repeats={context.repeats!r} must be a whole number >= 1 (the text is given repeats + 1 "
                f"times)"
            )
    if context.layers is not None:
        if context.mode != "bidirectional":
            problems.append(
                f"layers={context.layers} is for mode: bidirectional, not {context.mode}: remove it"
            )
        elif len(context.layers) != 2 or not all(v is None or _is_int(v) for v in context.layers):
            problems.append(f"layers={context.layers} must be [start, stop] (whole numbers or null)")
    if problems:
        raise ConfigError(f"{key}: " + "; ".join(problems))
    if context.mode == "repeat" and context.repeats is None:
        context.repeats = 1
    return context


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def bidirectional_layers(context: Context, backbone: Backbone) -> range | None:
    """The layers without causal mask (None for other modes), checked against the backbone's depth."""
    if context.mode != "bidirectional":
        return None
    n = backbone.num_layers
    if context.layers is None:
        return range(n)
    layers = range(n)[slice(*context.layers)]
    if len(layers) == 0 or any(v is not None and not -n <= v <= n for v in context.layers):
        raise ConfigError(
            f"model.init_args.context.layers={context.layers}: the model has {n} layers (0..{n - 1}); give "
            f"[start, stop] with 0 <= start < stop <= {n} (or negative indices from the end)"
        )
    return layers


def describe_reading(context: Context, layers: range | None, num_layers: int, block_size: int | None) -> str:
    """What the context makes each position read, and what it cuts (printed at the start of fit)."""
    if layers is not None:
        which = "every layer" if len(layers) == num_layers else f"layers {layers.start}..{layers.stop - 1}"
        return f"no causal mask in {which} of {num_layers}, padding masked"
    copies = context.repeats + 1
    cut = (
        f"rows of up to {copies} x {block_size} = {copies * block_size} tokens: a text is cut to its first "
        f"{block_size} tokens (data.init_args.block_size) before it is repeated"
        if block_size is not None
        else "no block_size known to bound the rows"
    )
    return f"each text is read {copies} times in one row and labelled on the last copy; {cut}"


# ----------------------------------------------------------------------------- repeat


def repeat_rows(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, repeats: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each right-padded row's real tokens `repeats` + 1 times in a row: (B, T) -> (B, (r + 1) L_max).

    Row b becomes x_b x_b ... x_b (r + 1 copies of its L_b real tokens) and is right-padded again,
    so the batch contract holds for the backbone, and positions simply continue across copies.
    """
    lengths = attention_mask.sum(1, keepdim=True)  # (B, 1)
    copies = repeats + 1
    width = copies * int(lengths.max())
    pos = torch.arange(width, device=input_ids.device)[None]  # (1, W)
    real = pos < copies * lengths  # (B, W)
    source = pos % lengths.clamp(min=1)  # (B, W): which token of the original row
    ids = torch.where(real, input_ids.gather(1, source.clamp(max=input_ids.size(1) - 1)), 0)
    return ids, real.to(attention_mask.dtype)  # (B, W), (B, W)


def last_copy(hidden: torch.Tensor, attention_mask: torch.Tensor, repeats: int) -> torch.Tensor:
    """The hidden states of each row's last copy, aligned with the original row: (B, W, H) -> (B, T, H).

    Token t of row b (length L_b) sits at r L_b + t of its repeated row; padding gets zeros.
    """
    B, T = attention_mask.shape
    lengths = attention_mask.sum(1, keepdim=True)  # (B, 1)
    index = repeats * lengths + torch.arange(T, device=hidden.device)[None]  # (B, T)
    index = index.clamp(max=hidden.size(1) - 1)
    out = hidden.gather(1, index[..., None].expand(-1, -1, hidden.size(-1)))  # (B, T, H)
    return out * attention_mask[..., None].to(out.dtype)


# ----------------------------------------------------------------------------- bidirectional probe


@torch.no_grad()
def check_bidirectional(backbone: Backbone, layers: range, source: str) -> None:
    """Refuse, at start, a backbone whose attention does not really become bidirectional.

    On a 6-token probe in eval mode: with `bidirectional=layers` the first token's output must
    change when the last token changes (else the mask was silently kept causal), and rows padded on
    the right or on the left (packed rows, for a padding-free backbone) must give their real
    tokens the outputs they get alone (else padding leaks into real positions). Skipped for weights
    not materialised yet (meta device).
    """
    param = next(backbone.parameters(), None)
    if param is None or param.is_meta:
        return
    was_training = backbone.training
    backbone.eval()
    device = param.device
    ids = torch.arange(1, 7, device=device).remainder(backbone.vocab_size)[None]  # (1, 6)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % backbone.vocab_size
    ones = torch.ones_like(ids)
    failure = None
    try:
        alone = backbone(ids, ones, bidirectional=layers)  # (1, 6, H)
        later = backbone(changed, ones, bidirectional=layers)
        scale = max(1.0, alone.abs().max().item())
        if not (alone[0, 0] - later[0, 0]).abs().max().item() > 1e-6 * scale:
            failure = "the first token's output does not change when the last token does (still causal)"
        short = backbone(ids[:, :3], ones[:, :3], bidirectional=layers)  # (1, 3, H)
        for side in ("right", "left"):
            pad = torch.zeros(1, 3, dtype=ids.dtype, device=device)
            row = torch.cat([ids[:, :3], pad], 1) if side == "right" else torch.cat([pad, ids[:, :3]], 1)
            mask = torch.cat([ones[:, :3], pad], 1) if side == "right" else torch.cat([pad, ones[:, :3]], 1)
            both = backbone(torch.cat([row, ids]), torch.cat([mask, ones]), bidirectional=layers)
            real = mask[0].bool()
            diff = max((both[0, real] - short[0]).abs().max().item(), (both[1] - alone[0]).abs().max().item())
            if failure is None and not diff <= 1e-4 * scale:
                failure = f"{side} padding changes the outputs of real tokens by {diff:.1e} (padding leaks)"
    except ConfigError:
        raise  # the backbone's own refusal (e.g. a layer range it cannot express)
    except (TypeError, ValueError, RuntimeError) as err:
        failure = f"its forward fails with bidirectional attention ({type(err).__name__}: {err})"
    finally:
        backbone.train(was_training)
    if failure:
        raise ConfigError(
            f"model.init_args.context: bidirectional: {source} cannot run without the causal mask here: "
            f"{failure}; use context: repeat (any causal model) or causal"
        )
