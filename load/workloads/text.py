"""Deterministic filler text: words from a fixed built-in list, cut to an exact length.

Rules:
- Text depends only on the `random.Random` it is drawn from (never the global `random`), so the
  same seed gives the same characters on every machine and Python >= 3.11.
- `TextSource.text(chars)` returns exactly `chars` characters ending in a newline, so segments
  concatenate into readable paragraphs and a segment's length is the caller's to choose (the emulator's
  tokenizer counts 4 characters a token, so a 2,048-token segment is `tokens_to_chars(2048)` = 8,192).
- Cheap: one `Random.randbytes` call and one join per segment (~13 ns a character on this machine).
  Segments meant to be shared are built once by their workload and reused as the same `str` object.
"""

from __future__ import annotations

import random

CHARS_PER_TOKEN = 4  # the emulator's tokenizer is exactly 4 characters a token (brief; anchors.md uses 4 too)

# A fixed vocabulary of 256 common English words (one random byte each), some carrying punctuation
# so that the text has sentence-like rhythm. The list is part of what a seed means: editing it
# changes every generated text.
WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is was for on that with as by at from it an are were this which be or have had
    not but one all their they there been has when who will more no if out so said what up its about
    into than them can only other new some could time these two may then do first any my now such
    like our over man me even most made after also did many before must through back years where much
    your way well down should because each just those people how too little state good very make
    world still own see men work long get here between both life being under never day same another
    know while last might us great old year off come since against go came right used take three
    system, data, model, request, cache, memory, server, token, prompt, answer, question, result,
    system. data. model. request. cache. memory. server. token. prompt. answer. question. result.
    replica router policy prefix block queue latency throughput batch decode prefill engine worker
    document section chapter table figure value number record field index key page file line text
    user customer account order invoice payment product price service support ticket issue report
    please explain describe summarize compare list check verify update create delete return call
    however therefore although unless whether during without within across toward around
    small large early late high low fast slow open closed public
    private local global current previous next final initial main total average maximum minimum
    however, therefore, meanwhile, finally,
    """.split()
)
assert len(WORDS) == 256 and len(set(WORDS)) == 256, "a random byte must index exactly one word"
_WORD_SPACE = tuple(w + " " for w in WORDS)


def tokens_to_chars(tokens: int) -> int:
    """Characters in a segment of `tokens` tokens at the emulator's 4 characters a token."""
    return tokens * CHARS_PER_TOKEN


class TextSource:
    """Draws word text of exact lengths from one seeded `random.Random`."""

    __slots__ = ("_rng",)

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def text(self, chars: int) -> str:
        """Exactly `chars` characters of words, the last one a newline (a 1-character text is "\\n")."""
        if chars <= 0:
            return ""
        body = chars - 1
        parts: list[str] = []
        have = 0
        while have < body:
            # One random byte picks one of the 256 words: `randbytes` is a single C call and
            # deterministic for a seeded Random, ~3x faster than `choices`. A word with its space
            # averages 5.9 characters; a second pass is rare and only guarantees the length.
            words = (body - have) * 10 // 57 + 4  # ~3% more than needed at 5.9 characters a word
            chunk = "".join(map(_WORD_SPACE.__getitem__, self._rng.randbytes(words)))
            parts.append(chunk)
            have += len(chunk)
        return "".join(parts)[:body] + "\n"


def text_from(seed: int | str, chars: int) -> str:
    """`chars` characters of text determined by `seed` alone (for content keyed by an id)."""
    return TextSource(random.Random(seed)).text(chars)
