"""Prompts beyond the text encoder's window, and per-word weights: `(word:1.3)`, `(word)`, `[word]`.

Both are off by default (`PromptOptions()`): a prompt is then tokenized and encoded exactly as diffusers does it,
one row of `model_max_length` ids per prompt, its tail beyond the window dropped with a warning.

The semantics are AUTOMATIC1111 webui's (its prompt parser, its chunking and its "Original" emphasis), the syntax
users of Stable Diffusion expect; where they differ from it, the list at the end says how and why.

**Weighting** (`PromptOptions(weighting=True)`). The prompt is read as text with weights:

- `(text)` multiplies the weight of `text` by 1.1, `[text]` divides it by 1.1, `(text:W)` multiplies it by W, a
  decimal number (`1.3`, `.5`, `-1`, `+2.`; no exponent). Brackets nest and their factors multiply:
  `((a))` is 1.21, `((a:1.5))` is 1.65, `[(a)]` is 1.0.
- `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` stand for the characters themselves; any other backslash is literal text.
- Unbalanced brackets: a `)` or `]` with no open bracket of its kind is literal text; a `(` or `[` never closed
  still weighs all the text after it (1.1 or 1/1.1); a `:` that does not form `:W)` is literal text.
- Adjacent text of equal weight is joined, then each run is tokenized on its own (`a(b:1.2)` tokenizes `a` and
  `b` separately), every token taking its run's weight; BOS, EOS and padding weigh 1. So `(word:1.0)`, or a
  prompt without brackets, gives exactly the plain prompt's ids and embedding.
- After encoding, each chunk's hidden states (L, D) are multiplied position by position by their tokens' weights,
  then rescaled by one factor so that the chunk's mean over all L x D values is the mean it had before weighting.
  The rescaling is skipped where either mean is zero to within rounding (at most NEGLIGIBLE_MEAN times the chunk's
  mean absolute value), as with text encoders whose last layer norm has no bias: the factor would be a ratio of two
  rounding errors, scaling the chunk arbitrarily.

**Long prompts** (`PromptOptions(long_prompts=True)`). A prompt's ids are cut into chunks of
`chunk_length = model_max_length - 2` ids (75 for CLIP), each framed as the tokenizer frames a short prompt
(BOS + ids + EOS, padded with the checkpoint's pad token to `model_max_length`), so a prompt that fits the window is
one chunk, identical to the default. Each chunk is encoded on its own and the chunks' hidden states are concatenated
along the sequence axis: K chunks give a (K * model_max_length, D) text context for the U-Net. Within a request every
prompt, and every negative prompt when guidance runs, is padded to the most chunks any of them has, each missing
chunk being the embedding of the empty prompt "" (diffusers' unconditional input). An empty prompt is one chunk.

**Differences from AUTOMATIC1111**, on purpose: `BREAK` is plain text (no forced chunk break); chunks break at
exactly `chunk_length` ids (no moving the words after a nearby comma into the next chunk); no textual-inversion
embedding names; a lone backslash is kept as text (A1111 drops it); the mean is restored per prompt and chunk (A1111
takes it over all the prompts of a batch, so a prompt's embedding would depend on the prompts batched with it);
padding uses the checkpoint's pad token (A1111 pads with EOS: the same ids for SD 1.x, where the pad token is EOS).
diffusers' community `lpw_stable_diffusion` reads the same syntax but restores the mean over a whole prompt rather
than per chunk, frames chunks with the padding before EOS (EOS last in every chunk), can drop the BOS/EOS of middle
chunks (no_boseos_middle), and caps prompts at 3 chunks by default (max_embeddings_multiples). compel reads another
syntax (`word++`, `(word)1.3`) and weighs differently; it is not followed here.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

from sdrt.engine.tokenizer import CLIPTokenizer

#: the factor of one pair of round brackets, and the divisor of one pair of square brackets
BRACKET_FACTOR = 1.1

_SYNTAX = re.compile(
    r"""
      \\(?P<escaped>[()\[\]\\])
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\s*\)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)
_CLOSING = {")": "(", "]": "["}
_LARGEST_WEIGHT = float(np.finfo(np.float32).max)  # token weights are float32, as the hidden states they scale
#: a chunk mean this small against its mean absolute value is rounding noise, not a mean worth restoring
NEGLIGIBLE_MEAN = 1e-6


@dataclasses.dataclass(frozen=True)
class PromptOptions:
    """How prompts are read. The default reads them as diffusers does: plain text, truncated to the window.

    `long_prompts`: encode prompts longer than the text encoder's window in chunks and concatenate them. The U-Net
    then takes a longer text context: bundles exported before it could are refused with InvalidArgumentError (asking
    for a re-export), and TensorRT engines take one chunk only.
    `weighting`: read `(text:1.3)`, `(text)`, `[text]` and `\\(` escapes as weights (see this module's docstring).
    """

    long_prompts: bool = False
    weighting: bool = False


@dataclasses.dataclass(frozen=True)
class WeightedText:
    """A run of prompt text and the weight of every token it becomes."""

    text: str
    weight: float


@dataclasses.dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt's chunks: `input_ids` (K, L) int64 and each position's weight, `weights` (K, L) float32."""

    input_ids: np.ndarray
    weights: np.ndarray

    @property
    def chunks(self) -> int:
        return len(self.input_ids)


def parse_weights(prompt: str) -> list[WeightedText]:
    """`prompt`'s text runs with their weights, adjacent runs of equal weight joined (at least one run).

    Raise ValueError for a weight beyond float32's range (the embedding would be infinite).
    """
    runs: list[list] = []  # [text, weight], weights multiplied in place as brackets close
    open_at: dict[str, list[int]] = {"(": [], "[": []}  # bracket -> index in `runs` where each open one starts

    def weigh_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for match in _SYNTAX.finditer(prompt):
        if match["escaped"] is not None:
            runs.append([match["escaped"], 1.0])
        elif match["open"] is not None:
            open_at[match["open"]].append(len(runs))
        elif match["weight"] is not None and open_at["("]:
            weigh_from(open_at["("].pop(), float(match["weight"]))
        elif match["close"] is not None and open_at[_CLOSING[match["close"]]]:
            opening = _CLOSING[match["close"]]
            weigh_from(open_at[opening].pop(), BRACKET_FACTOR if opening == "(" else 1 / BRACKET_FACTOR)
        else:  # text, or a closing bracket or ":W)" with nothing open to close
            runs.append([match[0], 1.0])
    for start in open_at["("]:
        weigh_from(start, BRACKET_FACTOR)
    for start in open_at["["]:
        weigh_from(start, 1 / BRACKET_FACTOR)
    joined: list[WeightedText] = []
    for text, weight in runs:
        if not abs(weight) <= _LARGEST_WEIGHT:  # NaN too: an infinite weight times zero
            raise ValueError(f"the weight of {text!r} ({weight:g}) is beyond float32's range")
        if joined and joined[-1].weight == weight:
            joined[-1] = WeightedText(joined[-1].text + text, weight)
        else:
            joined.append(WeightedText(text, weight))
    return joined or [WeightedText("", 1.0)]


def tokenize_prompt(tokenizer: CLIPTokenizer, prompt: str, options: PromptOptions) -> TokenizedPrompt:
    """`prompt` as chunks of ids with per-position weights, read as `options` say. Without long prompts, one chunk
    (the tokenizer's own ids for the prompt), its tail dropped with the tokenizer's warning.

    Raise ValueError for an unusable weight (see `parse_weights`).
    """
    runs = parse_weights(prompt) if options.weighting else [WeightedText(prompt, 1.0)]
    ids: list[int] = []
    token_weights: list[float] = []
    for run in runs:
        run_ids = tokenizer.encode(run.text)
        ids += run_ids
        token_weights += [run.weight] * len(run_ids)
    if not options.long_prompts:
        ids = tokenizer.truncate(ids)
    size = tokenizer.chunk_length
    starts = range(0, max(len(ids), 1), size)  # an empty prompt is one chunk: BOS, EOS, padding
    input_ids = np.stack([tokenizer.frame(ids[start : start + size]) for start in starts])  # (K, L)
    weights = np.ones(input_ids.shape, dtype=np.float32)  # (K, L): BOS, EOS and padding weigh 1
    for row, start in enumerate(starts):
        chunk = token_weights[start : start + size]
        weights[row, 1 : 1 + len(chunk)] = chunk
    return TokenizedPrompt(input_ids, weights)


def emphasize(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`hidden` (K, L, D) scaled position by position by `weights` (K, L), each chunk then rescaled to its mean
    before weighting (unless a mean is negligible: see the module docstring). Chunks whose weights are all 1 come
    back unchanged, bit for bit."""
    if np.all(weights == 1.0):
        return hidden
    weighted = hidden * weights[:, :, None]  # (K, L, D)
    before = hidden.mean(axis=(1, 2), dtype=np.float64)  # (K,)
    after = weighted.mean(axis=(1, 2), dtype=np.float64)  # (K,)
    scale = np.abs(hidden).mean(axis=(1, 2), dtype=np.float64) * NEGLIGIBLE_MEAN  # (K,)
    restorable = (np.abs(before) > scale) & (np.abs(after) > scale)  # (K,)
    factor = np.where(restorable, before / np.where(restorable, after, 1.0), 1.0).astype(np.float32)  # (K,)
    return weighted * factor[:, None, None]  # (K, L, D)


def text_context(hidden: np.ndarray, chunks: int, empty: np.ndarray | None) -> np.ndarray:
    """One prompt's U-Net context (chunks * L, D): its chunks' hidden states `hidden` (K, L, D) in order, then
    `empty` (1, L, D), the empty prompt's, for each of the chunks - K missing ones (None only when none is)."""
    missing = chunks - len(hidden)
    padding = [empty[0]] * missing if missing else []
    return np.concatenate([*hidden, *padding])  # (chunks * L, D)
