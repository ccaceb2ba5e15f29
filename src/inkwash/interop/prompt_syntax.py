"""The Stable Diffusion WebUI's prompt syntax for emphasis and long prompts (AUTOMATIC1111's
``parse_prompt_attention`` and the chunking of ``sd_hijack_clip``), written anew.

``parse_attention(text)`` splits a prompt into ``(text, weight)`` fragments: ``(x)`` multiplies the weight of
``x`` by 1.1 (nested brackets multiply again), ``[x]`` divides it by 1.1, ``(x:1.5)`` multiplies it by 1.5;
``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are literal characters; an unclosed ``(`` or ``[`` applies its
multiplier to the rest of the prompt and a stray ``)`` or ``]`` is literal text. ``BREAK`` (upper case, a word
of its own) ends the current chunk: it is returned as the fragment ``(BREAK, None)``. Neighbouring fragments of
the same weight are merged.

``chunk_tokens(fragments, ...)`` lays the fragments' tokens out in chunks of 75 as the WebUI does, including
its comma rule: when a chunk fills up and a comma lies within its last 20 tokens, the tokens after that comma
move on to the next chunk.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = "BREAK"
COMMA_BACKTRACK = 20  # the WebUI's default "comma_padding_backtrack"

_ATTENTION = re.compile(
    r"""
    \\[()\[\]\\]        # an escaped bracket or backslash
    | \\                # a lone backslash (dropped, as the WebUI does)
    | \(
    | \[
    | :\s*([+-]?[.\d]+)\s*\)   # the end of (text:weight)
    | \)
    | \]
    | [^\\()\[\]:]+
    | :
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[tuple[str, float | None]]:
    """``text`` -> ``[(fragment, weight), ...]``; a ``BREAK`` is ``("BREAK", None)``. Never empty: a prompt
    without text gives ``[("", 1.0)]``."""
    parts: list[list] = []  # [text, weight]; weight None for BREAK
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part[1] is not None:
                part[1] *= factor

    for match in _ATTENTION.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            parts.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(parts))
        elif piece == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(x:1.2.3)": the WebUI fails here; the ":1.2.3)" is kept as text
                parts.append([piece, 1.0])
                continue
            multiply(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif piece == "]" and square_open:
            multiply(square_open.pop(), SQUARE)
        else:
            for i, words in enumerate(_BREAK.split(piece)):
                if i:
                    parts.append([BREAK, None])
                parts.append([words, 1.0])
    for start in round_open:
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, SQUARE)
    merged: list[list] = []
    for part in parts:
        if merged and part[1] is not None and merged[-1][1] == part[1]:
            merged[-1][0] += part[0]
        else:
            merged.append(part)
    if not merged:
        merged = [["", 1.0]]
    return [(part[0], part[1]) for part in merged]


def chunk_tokens(
    fragments: list[tuple[list[int], float | None]],
    *,
    chunk_length: int = 75,
    comma: int | None = None,
    backtrack: int = COMMA_BACKTRACK,
) -> list[tuple[list[int], list[float]]]:
    """Tokenized fragments ``[(token ids, weight or None for BREAK), ...]`` -> chunks ``[(ids, weights), ...]``
    of at most ``chunk_length`` tokens each, without BOS, EOS or padding; at least one (possibly empty) chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal ids, weights, last_comma
        chunks.append((ids, weights))
        ids, weights, last_comma = [], [], -1

    for tokens, weight in fragments:
        if weight is None:
            next_chunk()
            continue
        for token in tokens:
            if comma is not None and token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == chunk_length and last_comma != -1 and len(ids) - last_comma <= backtrack:
                moved_ids, moved_weights = ids[last_comma + 1 :], weights[last_comma + 1 :]
                ids, weights = ids[: last_comma + 1], weights[: last_comma + 1]
                next_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == chunk_length:
                next_chunk()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        next_chunk()
    return chunks
