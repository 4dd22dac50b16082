"""Rows -> `(input_ids, prompt_length, target_mask | None)`, in batches, with the exact rules of each format.

- prompt/completion: prompt tokenized with the tokenizer's special tokens, completion without, ids concatenated,
  EOS appended if missing; `prompt_length` is the prompt's id count, so the mask boundary is exact by construction.
- alpaca: instruction/input rendered into a prompt by a template, output is the completion.
- text: the whole sequence is the target.
- messages: rendered with the tokenizer's chat template and tokenized once; assistant turns, end-of-turn token
  included, are the targets (located and checked by `lora_causal.data.chat`).
A batch is tokenized with one tokenizer call per text kind. A row with a problem raises `UserError` naming it;
when a batch holds several bad rows, the first in file order is the one reported.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError, first_line
from lora_causal.core.recipe import FORMAT_FIELDS, DataSource, EvalSection
from lora_causal.data.chat import TemplateMismatch, Tokens, TurnTexts, assistant_char_spans, token_mask

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant", "tool")
BOUNDARY_WINDOW = 2000  # characters each side of a long row's prompt/completion boundary that the check tokenizes

Tokenized = tuple[list[int], int, "list[int] | None"]


def fill_alpaca_template(instruction: str, extra: str, template: str | None = None) -> str:
    """The alpaca prompt for an instruction and optional input (Stanford Alpaca templates by default)."""
    template = template or (ALPACA_TEMPLATE if extra else ALPACA_TEMPLATE_NO_INPUT)
    values = {"instruction": instruction, "input": extra}
    return re.sub(r"\{(instruction|input)\}", lambda match: values[match.group(1)], template)


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of messages rendered by the tokenizer's chat template (which carries its own special tokens)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, fmt: str | None, text: str, template: str | None = None) -> list[int]:
    """Token ids of a user prompt rendered the way training rendered prompts of format `fmt`.

    messages: a user turn plus the generation prompt; alpaca: the instruction in the template; others: the text
    with the tokenizer's special tokens.
    """
    if fmt == "messages":
        return chat_ids(tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    if fmt == "alpaca":
        text = fill_alpaca_template(text, "", template)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def special_token_texts(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Every special token's text (named ones and added special tokens)."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return tuple(sorted(texts))


class RowTokenizer:
    """Turns rows of one format into (input_ids, prompt_length, target_mask | None)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, source: DataSource | EvalSection, fmt: str, where: str):
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.where = where
        self.columns = {name: (source.columns or {}).get(name, name) for name in FORMAT_FIELDS[fmt]}
        self.template = getattr(source, "template", None)
        self.eos = tokenizer.eos_token_id
        if fmt == "messages" and not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"{where}: format 'messages' needs a tokenizer with a chat template, and this one has none; "
                "use a chat model's tokenizer or convert the data to prompt_completion"
            )
        self.specials = special_token_texts(tokenizer) if fmt == "messages" else ()
        if fmt == "messages":
            self._check_template_shows_text()

    # -- one row or a batch ------------------------------------------------------------------------------

    def __call__(self, location: str, row: Any) -> Tokenized:
        return self.batch([(location, row)])[0]

    def batch(self, items: list[tuple[str, Any]]) -> list[Tokenized]:
        """Tokenize rows together; a problem is reported for the first bad row in order."""
        try:
            return self._batch(items)
        except UserError:
            if len(items) == 1:
                raise
        for item in items:  # find the first bad row (only reached when some row is bad)
            self._batch([item])
        raise AssertionError("a batch failed but none of its rows does")  # pragma: no cover

    def _batch(self, items: list[tuple[str, Any]]) -> list[Tokenized]:
        for location, row in items:
            if not isinstance(row, dict):
                raise UserError(f"{self.where}: {location}: expected an object with fields, got {type(row).__name__}")
        if self.fmt == "messages":
            return self._conversations(items)
        if self.fmt == "text":
            texts = [self._field(location, row, "text", required_text=True) for location, row in items]
            return [(self._with_eos(ids), 0, None) for ids in self._encode(texts, special=True)]
        pairs = [self._prompt_and_completion(location, row) for location, row in items]
        prompts = self._encode([prompt for prompt, _ in pairs], special=True)
        completions = self._encode([completion for _, completion in pairs], special=False)
        return [(self._with_eos(p + c), len(p), None) for p, c in zip(prompts, completions)]

    def boundary_agrees(self, row: dict) -> bool | None:
        """Whether tokenizing prompt + completion as one text gives the same ids as tokenizing them apart.

        Training uses the split tokenization (the one inference sees: the prompt is tokenized alone); a
        disagreement means the completion's first token is one the tokenizer would merge with the prompt.
        Long rows are compared on BOUNDARY_WINDOW characters each side of the boundary, so a huge row costs
        no more than a short one. None for formats without a prompt/completion boundary.
        """
        if self.fmt not in ("prompt_completion", "alpaca"):
            return None
        prompt, completion = self._prompt_and_completion("", row)
        if len(prompt) + len(completion) > 2 * BOUNDARY_WINDOW:
            prompt, completion = prompt[-BOUNDARY_WINDOW:], completion[:BOUNDARY_WINDOW]
            joined, first, second = self._encode([prompt + completion, prompt, completion], special=False)
            return joined == first + second
        joined, alone = self._encode([prompt + completion, prompt], special=True)
        return joined == alone + self._encode([completion], special=False)[0]

    # -- fields --------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str], special: bool) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def _field(self, location: str, row: dict, name: str, optional: bool = False, required_text: bool = False) -> str:
        column = self.columns[name]
        if column in row and row[column] is None and not optional:
            raise UserError(f"{self.where}: {location}: '{column}' is null; give it text or remove the row")
        if column not in row or row[column] is None:
            if optional:
                return ""
            fields = ", ".join(FORMAT_FIELDS[self.fmt])
            present = ", ".join(map(str, list(row)[:8])) or "none"
            raise UserError(
                f"{self.where}: {location}: no '{column}' field (format {self.fmt} reads {fields}; this row has "
                f"{present}); map your column names with data.train.columns"
            )
        value = row[column]
        if not isinstance(value, str):
            raise UserError(f"{self.where}: {location}: '{column}' must be text, got {type(value).__name__}")
        if required_text and not value.strip():
            raise UserError(f"{self.where}: {location}: '{column}' is empty; fill it or remove the row")
        return value

    def _prompt_and_completion(self, location: str, row: dict) -> tuple[str, str]:
        if self.fmt == "alpaca":
            instruction = self._field(location, row, "instruction", required_text=True)
            extra = self._field(location, row, "input", optional=True)
            return fill_alpaca_template(instruction, extra, self.template), self._field(location, row, "output", required_text=True)
        return self._field(location, row, "prompt"), self._field(location, row, "completion", required_text=True)

    # -- chat ----------------------------------------------------------------------------------------------

    def _messages(self, location: str, row: dict) -> list[dict[str, str]]:
        column = self.columns["messages"]
        messages = row.get(column)
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{self.where}: {location}: '{column}' must be a non-empty list of messages")
        clean = []
        for turn, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise UserError(f"{self.where}: {location}: message {turn} must be an object with role and content")
            if message["role"] not in CHAT_ROLES:
                raise UserError(
                    f"{self.where}: {location}: message {turn} has unknown role '{message['role']}' "
                    f"(expected one of {', '.join(CHAT_ROLES)})"
                )
            if not isinstance(message.get("content"), str):
                raise UserError(f"{self.where}: {location}: message {turn} content must be text")
            if message["role"] in ("user", "assistant") and not message["content"].strip():
                raise UserError(
                    f"{self.where}: {location}: message {turn} ({message['role']}) has empty content; fill it or "
                    "remove the conversation"
                )
            clean.append({"role": message["role"], "content": message["content"]})
        if not any(message["role"] == "assistant" for message in clean):
            raise UserError(
                f"{self.where}: {location}: the conversation has no assistant turn, so none of its tokens is a target; "
                "add the assistant's answer or remove the row"
            )
        if clean[0]["role"] == "assistant":  # transformers renders no empty conversation, so no header to mask
            raise UserError(
                f"{self.where}: {location}: the conversation opens with an assistant message, whose role header cannot "
                "be told apart from its answer (it would be trained); start it with a system or user message"
            )
        return clean

    def _check_template_shows_text(self) -> None:
        """Refuse a chat template that renders none of a message's text content (multimodal templates such as
        idefics3 and smolvlm read content as a list of parts and print nothing of a string), checked once on a
        probe conversation: trained, it would teach only the end-of-turn token, without a word of the answers."""
        probe = [{"role": "user", "content": "probe question 7"}, {"role": "assistant", "content": "probe answer 7"}]
        try:
            text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 - a template that refuses this probe is judged on the real rows
            return
        missing = [m["role"] for m in probe if m["content"] not in text]
        if missing:
            name = getattr(self.tokenizer, "name_or_path", "") or "this tokenizer"
            raise UserError(
                f"{self.where}: the chat template of {name} renders none of the text of a {' or '.join(missing)} "
                "message given as a string (it expects content as a list of parts, like multimodal templates such "
                "as idefics3 and smolvlm); put a text-only chat_template in the tokenizer's tokenizer_config.json, "
                "or convert the data to prompt_completion"
            )

    def _render(self, location: str, conversations: list[list[dict]], add_generation_prompt: bool) -> list[str]:
        if not conversations:
            return []
        try:
            texts = self.tokenizer.apply_chat_template(conversations, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - templates raise what they like (jinja's raise_exception, TypeError)
            raise UserError(f"{self.where}: {location}: the chat template refused the conversation ({first_line(exc)})") from None
        return list(texts)

    def _conversations(self, items: list[tuple[str, Any]]) -> list[Tokenized]:
        location = items[0][0] if len(items) == 1 else f"rows {items[0][0]} to {items[-1][0]}"
        conversations = [self._messages(where, row) for where, row in items]
        turns = [[t for t, m in enumerate(c) if m["role"] == "assistant"] for c in conversations]
        fulls = self._render(location, conversations, False)
        # a conversation that ends with an assistant turn is its own `through` for that turn: not rendered again
        throughs = iter(self._render(location, [c[: t + 1] for c, ts in zip(conversations, turns) for t in ts
                                                if t < len(c) - 1], False))
        befores = iter(self._render(location, [c[:t] for c, ts in zip(conversations, turns) for t in ts if t], True))
        encoded = self.tokenizer(fulls, add_special_tokens=False, return_offsets_mapping=self.tokenizer.is_fast)
        results = []
        for index, (conversation, full, (where, _)) in enumerate(zip(conversations, fulls, items)):
            texts = [TurnTexts(t, next(befores) if t else "", full if t == len(conversation) - 1 else next(throughs),
                               conversation[t]["content"]) for t in turns[index]]
            ids = list(encoded["input_ids"][index])
            tokens = None
            if self.tokenizer.is_fast:
                tokens = Tokens(ids, [tuple(pair) for pair in encoded["offset_mapping"][index]],
                                lambda text: self._encode([text], special=False)[0])

            def history(turn: int, conversation: list[dict] = conversation, where: str = where) -> str:
                return self._render(where, [conversation[:turn]], False)[0]

            try:
                spans = assistant_char_spans(full, texts, self.specials, history, tokens)
                offsets = tokens.offsets if tokens else self._offsets_by_prefixes(full, ids, spans)
                mask = token_mask(offsets, spans, turns[index])
            except TemplateMismatch as exc:
                raise UserError(f"{self.where}: {where}: {exc}") from None
            prompt_length = mask.index(1) if 1 in mask else len(ids)
            results.append((ids, prompt_length, mask))
        return results

    def _offsets_by_prefixes(self, full: str, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Token offsets for tokenizers without an offset mapping: each span boundary is tokenized on its own and
        must be a prefix of the whole conversation's ids. Only the boundaries are real offsets; enough for masks."""
        cuts: dict[int, int] = {0: 0}
        for boundary in sorted({b for span in spans for b in span}):
            prefix = self._encode([full[:boundary]], special=False)[0]
            if ids[: len(prefix)] != prefix:
                raise TemplateMismatch(f"the conversation tokenizes differently at character {boundary} on its own")
            cuts[len(prefix)] = boundary
        offsets, last = [], 0
        for position in range(len(ids)):
            last = cuts.get(position, last)
            offsets.append((last, cuts.get(position + 1, last)))
        return offsets
