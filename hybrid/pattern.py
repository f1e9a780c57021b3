"""The layer-pattern grammar of layout files: `"[M1 M1 M1 M1 Ag M1 M1 M1] x 2"` -> one entry per layer.

Grammar (whitespace separates tokens; `[` and `]` also split tokens, so `[M2` and `M2]` are fine)::

    pattern := item*
    item    := atom repeat?
    atom    := layer | "[" pattern "]"          (groups nest; an empty group is an error)
    repeat  := "x" N  |  "xN"                    (N an integer >= 1; "x 1" is the same as no repeat)
    layer   := CODE (":" MLP)?

    CODE    mixer                       MLP suffix (default: defaults.mlp.kind for mixer layers)
    M1      mamba1                      :swiglu  attach a SwiGLU MLP after the mixer
    M2      mamba2                      :moe     a mixture of SwiGLU experts (hybrid/moe.py)
    A, Ag   attention, kind global      :none    no MLP after the mixer
    Aw      attention, kind local (sliding window)
    As      attention, kind sparse (window + sinks + strided keys)
    F       none: an MLP-only layer     (always has an MLP, so `F:none` is an error)

Examples: `"M2 M2 Aw M2 M2 Ag"`, `"[M2 F M2 F M2 Ag F] x 2"`, `"[[M1 x 3 Aw] x 2 Ag] x 4"`,
`"M2:none x 24"`, `"[M1 M1:moe] x 4"` (MoE on every other layer; defaults.mlp.moe_every: 2 with moe_offset: 1
says the same of any pattern). A repeat applies to the item just before it; `M2 x 2 x 3` is an error (write
`[M2 x 2] x 3`).

Each layer becomes a dict such as `{"mixer": "attention", "kind": "local"}` (plus `"mlp"` when suffixed): the
explicit list form of `layers:`, to which per-layer overrides are applied afterwards. `compress` goes the
other way, from per-layer tokens to the shortest pattern that spells them.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache

from .spec import MLP_KINDS, LayoutError

CODES = {
    "M1": {"mixer": "mamba1"},
    "M2": {"mixer": "mamba2"},
    "A": {"mixer": "attention", "kind": "global"},
    "Ag": {"mixer": "attention", "kind": "global"},
    "Aw": {"mixer": "attention", "kind": "local"},
    "As": {"mixer": "attention", "kind": "sparse"},
    "F": {"mixer": "none"},
}
# A guard against typos such as `x 100000` nesting into millions of layers.
MAX_LAYERS = 10_000

_TOKEN = re.compile(r"\[|\]|[^\s\[\]]+")
_REPEAT = re.compile(r"x(.*)")  # no layer code starts with x


@dataclass(frozen=True)
class _Token:
    text: str
    pos: int   # character offset in the pattern string


class _Parser:
    """Recursive descent over the token list; every error points at the token it stopped on."""

    def __init__(self, text: str):
        self.text = text
        self.tokens = [_Token(m.group(), m.start()) for m in _TOKEN.finditer(text)]
        self.i = 0

    def fail(self, tok: _Token | None, why: str, allowed: str) -> LayoutError:
        pos = len(self.text) if tok is None else tok.pos
        got = "end of pattern" if tok is None else repr(tok.text)
        return LayoutError(f"layers: pattern error at position {pos}: {why} (got {got}; allowed: {allowed})\n"
                           f"    {self.text}\n    {' ' * pos}^")

    def peek(self) -> _Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> _Token | None:
        tok = self.peek()
        self.i += 1
        return tok

    def sequence(self, opener: _Token | None) -> list[dict]:
        """Items up to the end of the text (top level) or up to the `]` matching `opener`."""
        layers: list[dict] = []
        while True:
            tok = self.take()
            if tok is None:
                if opener is not None:
                    raise self.fail(opener, "unbalanced bracket: this '[' is never closed", "a matching ']'")
                return layers
            if tok.text == "]":
                if opener is None:
                    raise self.fail(tok, "unbalanced bracket: ']' without an opening '['", "a layer code or '['")
                return layers
            if tok.text == "[":
                atom = self.sequence(tok)
                if not atom:
                    raise self.fail(tok, "empty group", "at least one layer inside [ ]")
            elif _REPEAT.fullmatch(tok.text):
                raise self.fail(tok, "repeat with nothing before it to repeat", "a layer code or a [ ] group first")
            else:
                atom = [self.layer(tok)]
            count = self.repeat()
            if len(layers) + len(atom) * count > MAX_LAYERS:
                raise self.fail(tok, f"the pattern expands to more than {MAX_LAYERS} layers", "fewer layers")
            layers += atom * count

    def repeat(self) -> int:
        """The optional `x N` after an item (1 when absent)."""
        tok = self.peek()
        m = _REPEAT.fullmatch(tok.text) if tok is not None else None
        if m is None:
            return 1
        self.take()
        count_tok, digits = tok, m.group(1)
        if not digits:  # "x N" written as two tokens
            count_tok = self.take()
            digits = count_tok.text if count_tok is not None else ""
        if not digits.isdigit():
            raise self.fail(count_tok, "a repeat count must follow 'x'", "an integer >= 1")
        if int(digits) < 1:
            raise self.fail(count_tok, f"repeat count x{int(digits)} leaves nothing", "an integer >= 1")
        nxt = self.peek()
        if nxt is not None and _REPEAT.fullmatch(nxt.text):
            raise self.fail(nxt, "a second repeat on the same item", "brackets, e.g. [M2 x 2] x 3")
        return int(digits)

    def layer(self, tok: _Token) -> dict:
        code, colon, mlp = tok.text.partition(":")
        if code not in CODES:
            raise self.fail(tok, "unknown layer code" + _did_you_mean(code, CODES), ", ".join(CODES))
        entry = dict(CODES[code])
        if colon:
            if mlp not in MLP_KINDS:
                raise self.fail(tok, f"unknown MLP suffix ':{mlp}'" + _did_you_mean(mlp, MLP_KINDS),
                                ", ".join(f":{k}" for k in MLP_KINDS))
            if code == "F" and mlp == "none":
                raise self.fail(tok, "F is an MLP-only layer, so F:none would be an empty layer",
                                "F, F:swiglu or F:moe")
            entry["mlp"] = mlp
        return entry


def _did_you_mean(word: str, choices) -> str:
    lowered = {c.lower(): c for c in choices}
    match = lowered.get(word.lower()) or next(iter(difflib.get_close_matches(word, list(choices), 1)), None)
    return f"; did you mean {match!r}?" if match else ""


def expand(text: str) -> list[dict]:
    """Expand a pattern string into the explicit list form: one dict per layer (mixer, kind, mlp).
    Raises LayoutError naming the offending token and its character position."""
    # repeats share entry objects; each layer gets its own, since overrides edit them one by one
    return [dict(entry) for entry in _Parser(text).sequence(None)]


def compress(tokens: list[str]) -> str:
    """The shortest pattern (in characters; a nested group counts extra) that expands to `tokens` (layer
    codes, possibly suffixed), using `[...] x N` / `T x N` for repeats: ['M2', 'F', 'M2', 'F'] -> '[M2 F] x 2'."""
    tokens = tuple(tokens)
    if len(tokens) > 128:  # the interval search is cubic; runs alone are plenty for very deep stacks
        return _run_length(tokens)

    def cost(text: str, inside: bool) -> tuple:
        # a group nested in another reads harder than a few more characters, so it costs extra:
        # "[M2 F M2 F M2 Ag F] x 2" beats "[M2 [F M2] x 2 Ag F] x 2"
        nested = text.count("[") if inside else _nested_groups(text)
        return len(text) + 6 * nested, len(text)

    @lru_cache(maxsize=None)
    def best(i: int, j: int, inside: bool) -> str:
        """Best spelling of tokens[i:j]; inside: it will sit within a group."""
        n = j - i
        if n == 1:
            return tokens[i]
        options = [best(i, k, inside) + " " + best(k, j, inside) for k in range(i + 1, j)]
        for period in range(1, n // 2 + 1):
            if n % period == 0 and tokens[i:j] == tokens[i:i + period] * (n // period):
                unit = best(i, i + period, True)
                options.append(f"{unit if period == 1 else f'[{unit}]'} x {n // period}")
        return min(options, key=lambda s: cost(s, inside))

    return best(0, len(tokens), False) if tokens else ""


def _nested_groups(text: str) -> int:
    depth = nested = 0
    for ch in text:
        if ch == "[":
            nested += depth > 0
            depth += 1
        elif ch == "]":
            depth -= 1
    return nested


def _run_length(tokens: tuple) -> str:
    out, i = [], 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        out.append(tokens[i] if j - i == 1 else f"{tokens[i]} x {j - i}")
        i = j
    return " ".join(out)
