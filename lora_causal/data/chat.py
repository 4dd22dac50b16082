"""Assistant-only masks for chat data: which characters, then which tokens, of a rendered conversation are targets.

The whole conversation is rendered once by the tokenizer's chat template and tokenized once (with character
offsets). Each assistant turn t is located in that text by two more renders, which are strings and cheap:
- `before`: turns < t plus the generation prompt (what inference feeds the model), and
- `through`: turns <= t (what the conversation looks like when turn t is the last one).
The turn's targets are the characters between the two, end-of-turn token included. Tokenization stays linear in
the conversation's length; the prefix property (earlier turns render the same once later turns follow) is
checked on the text of every turn:
- `through` may end with an end-of-conversation marker that the full text carries only at its very end (Phi-3
  appends EOS when no generation prompt follows); such a suffix of special tokens is harmless and is not a target
  of earlier turns.
- `before` may end with generation-prompt text the conversation never shows (DeepSeek-R1 prefills `<think>\\n`);
  the turn then starts where the two part, provided the history before it is intact.
Anything else is a real history rewrite (an earlier turn rendered differently) and is refused with the turn, the
character position and both renderings.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

SHOWN_CHARS = 40  # characters of each rendering quoted in an error
MAX_MARKER_CHARS = 64  # the longest end-of-conversation marker looked for


class TemplateMismatch(ValueError):
    """The chat template renders an earlier turn differently once later turns follow."""


@dataclass(frozen=True)
class TurnTexts:
    """The renderings needed to locate assistant turn `turn` (message index) inside the full conversation."""

    turn: int
    before: str  # turns < turn + generation prompt ("" for turn 0)
    through: str  # turns <= turn, no generation prompt


def common_prefix_length(first: str, second: str) -> int:
    """Length of the longest common prefix of two strings."""
    limit = min(len(first), len(second))
    if first[:limit] == second[:limit]:
        return limit
    low, high = 0, limit  # first[:low] == second[:low] holds, first[:high] != second[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if first[:middle] == second[:middle]:
            low = middle
        else:
            high = middle
    return low


def _is_marker(text: str, special_tokens: tuple[str, ...]) -> bool:
    """True for text made only of special tokens and whitespace (at least one special token)."""
    found = False
    for token in sorted(special_tokens, key=len, reverse=True):
        if token and token in text:
            found = True
            text = text.replace(token, "")
    return found and not text.strip()


def _intact_length(partial: str, full: str, special_tokens: tuple[str, ...]) -> int | None:
    """How much of `partial` is the start of `full`, allowing a trailing end-of-conversation marker that `full`
    ends with; None when `partial` differs from `full` in more than such a marker."""
    shared = common_prefix_length(partial, full)
    if shared == len(partial):
        return shared
    for cut in range(shared, max(shared - MAX_MARKER_CHARS, -1), -1):
        suffix = partial[cut:]
        if full.endswith(suffix) and _is_marker(suffix, special_tokens):
            return cut
    return None


def _differs(turn: int, what: str, mine: str, full: str, at: int) -> TemplateMismatch:
    return TemplateMismatch(
        f"the chat template renders message {turn} ({what}) differently once later turns follow (it rewrites "
        f"history): at character {at} it reads {mine[at : at + SHOWN_CHARS]!r} on its own but "
        f"{full[at : at + SHOWN_CHARS]!r} in the whole conversation, so its tokens cannot be masked exactly; use a "
        "template that keeps earlier turns unchanged (TRL ships training templates for many models), or split "
        "the conversation"
    )


def assistant_char_spans(full: str, turns: list[TurnTexts], special_tokens: tuple[str, ...],
                         render_without_prompt: object = None) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant turn inside `full`, checked as the module describes.

    `render_without_prompt(turn)` renders turns < turn without a generation prompt; it is called only when
    `before` departs from `full`, to tell a generation-prompt difference from a history rewrite.
    """
    spans: list[tuple[int, int]] = []
    previous_end = 0
    for texts in turns:
        end = _intact_length(texts.through, full, special_tokens)
        if end is None:
            at = common_prefix_length(texts.through, full)
            raise _differs(texts.turn, "the assistant turn itself, as the last turn", texts.through, full, at)
        if texts.turn == 0:
            start = 0
        else:
            start = common_prefix_length(texts.before, full)
            if start < len(texts.before):
                history = render_without_prompt(texts.turn) if callable(render_without_prompt) else ""
                intact = _intact_length(history, full, special_tokens)
                if intact is None or start < intact:
                    at = common_prefix_length(history, full) if intact is None else start
                    shown = history if intact is None else texts.before
                    raise _differs(texts.turn - 1, "the turns before an assistant turn", shown, full, at)
        if not previous_end <= start < end:
            raise TemplateMismatch(
                f"message {texts.turn} (assistant) renders to no text of its own between characters {start} and "
                f"{end} of the conversation; check that the chat template prints assistant messages"
            )
        spans.append((start, end))
        previous_end = end
    return spans


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], turns: list[int]) -> list[int]:
    """1 for the tokens inside `spans`, 0 elsewhere; every span boundary must fall between two tokens."""
    starts = [start for start, _ in offsets]
    mask = [0] * len(offsets)
    for (start, end), turn in zip(spans, turns):
        first = bisect.bisect_left(starts, start)  # tokens [first, stop) start inside the span
        stop = bisect.bisect_left(starts, end)
        if (first > 0 and offsets[first - 1][1] > start) or (stop > first and offsets[stop - 1][1] > end):
            raise TemplateMismatch(
                f"message {turn} (assistant) starts or ends inside a token of the conversation, so it cannot be "
                "masked exactly; use a chat template that separates turns with special tokens or newlines"
            )
        mask[first:stop] = [1] * (stop - first)
    return mask
