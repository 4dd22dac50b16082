"""Read training data and tokenize it into `{"input_ids", "prompt_length"[, "target_mask"]}` examples.

Tokenization rules:
- prompt/completion: prompt tokenized with the tokenizer's special tokens, completion without, ids concatenated,
  EOS appended if missing; `prompt_length` is the prompt's id count, so the mask boundary is exact by construction.
- alpaca: instruction/input rendered into a prompt by a template, output is the completion.
- text: the whole sequence is the target.
- messages: rendered with the tokenizer's chat template; assistant turns, end-of-turn token included, are the
  targets. The template must keep earlier turns unchanged as the conversation grows (checked turn by turn).
Truncation is explicit, and examples left with no target token are dropped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.config import FORMAT_FIELDS, DataSection, DataSource, EvalSection, looks_local
from lora_causal.errors import UserError, first_line

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
MODEL_FIELDS = ("input_ids", "prompt_length", "target_mask")  # what reaches the collator; "row" stays behind
MAX_LISTED = 20  # row locations kept per finding
BOUNDARY_SAMPLE = 256  # rows whose prompt/completion boundary is compared with joint tokenization
PROGRESS_FROM_ROWS = 2000  # tokenizing fewer rows is quick enough to need no progress bar

Example = dict[str, Any]


@dataclass
class DataReport:
    """What happened to the rows of one dataset on their way to training examples."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0
    tokens: int = 0
    target_tokens: int = 0
    longest: int = 0
    truncated_rows: list[str] = field(default_factory=list)  # locations, first MAX_LISTED
    boundary_checked: int = 0  # prompt/completion rows whose boundary tokenization was compared
    boundary_mismatches: int = 0
    boundary_mismatch_rows: list[str] = field(default_factory=list)

    def summary(self) -> str:
        share = self.target_tokens / max(self.tokens, 1)
        return (
            f"{self.examples} examples of {self.rows} rows, {self.tokens} tokens ({share:.0%} supervised), "
            f"longest {self.longest}, truncated {self.truncated}, dropped {self.dropped_no_targets} (no targets) "
            f"+ {self.dropped_too_long} (too long)"
        )


@dataclass
class PreparedData:
    train: list[Example]
    eval: list[Example] | None
    train_report: DataReport
    eval_report: DataReport | None
    fingerprint: str

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fingerprint": self.fingerprint, "train": asdict(self.train_report)}
        if self.eval_report is not None:
            out["eval"] = asdict(self.eval_report)
        return out


# ---------------------------------------------------------------------------------------------------------
# Reading rows: each row comes with a location ("line 7", "row 3") for error messages.


def read_rows(path: str, split: str, where: str) -> list[tuple[str, Any]]:
    """Rows of a local JSONL/JSON/CSV/Parquet file or of a Hub dataset, each with its location."""
    file = Path(path)
    if file.is_dir():
        raise UserError(f"{where}: '{path}' is a folder; give a .jsonl, .json, .csv or .parquet file")
    if not file.exists():
        if looks_local(path):
            raise UserError(f"{where}: file not found: {path}")
        return _read_hub(path, split, where)
    suffix = file.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise UserError(f"{where}: '{file.name}' has an unsupported type; use .jsonl, .json, .csv or .parquet")
    try:
        return readers[suffix](file, where)
    except UnicodeDecodeError:
        raise UserError(f"{where}: {file} is not UTF-8 text (is it a binary file?)") from None
    except PermissionError:
        raise UserError(f"{where}: {file} cannot be read (permission denied)") from None


def _read_jsonl(file: Path, where: str) -> list[tuple[str, Any]]:
    rows = []
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: {file.name} line {number}: not valid JSON ({exc.msg})") from None
    return rows


def _read_json(file: Path, where: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: {file.name} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, list):
        raise UserError(f"{where}: {file.name} must hold a JSON list of objects (for one object a line, use .jsonl)")
    return [(f"item {index}", row) for index, row in enumerate(data)]


def _read_csv(file: Path, where: str) -> list[tuple[str, Any]]:
    rows = []
    with file.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return []
        while True:
            start = reader.line_num + 1  # a quoted field may span lines: report where the record starts
            record = next(reader, None)
            if record is None:
                break
            if not any(cell.strip() for cell in record):
                continue
            if len(record) != len(header):
                raise UserError(
                    f"{where}: {file.name} line {start}: {len(record)} fields, but the header has "
                    f"{len(header)}; quote fields that contain commas"
                )
            rows.append((f"line {start}", dict(zip(header, record))))
    return rows


def _read_parquet(file: Path, where: str) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet as parquet

    try:
        table = parquet.read_table(file)
    except (pyarrow.ArrowException, OSError) as exc:
        raise UserError(f"{where}: {file.name} is not a readable Parquet file ({exc})") from None
    return [(f"row {index}", row) for index, row in enumerate(table.to_pylist())]


def _read_hub(name: str, split: str, where: str) -> list[tuple[str, Any]]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types; all mean "cannot get it"
        raise UserError(
            f"{where}: '{name}' is not a local file and could not be loaded from the Hub ({first_line(exc)})"
        ) from None
    return [(f"row {index}", row) for index, row in enumerate(dataset)]


# ---------------------------------------------------------------------------------------------------------
# Tokenizing one row


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


class _Tokenize:
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

    def boundary_agrees(self, row: dict) -> bool | None:
        """Whether tokenizing prompt + completion as one text gives the same ids as tokenizing them apart.

        Training uses the split tokenization (the one inference sees: the prompt is tokenized alone); a
        disagreement means the completion's first token is one the tokenizer would merge with the prompt.
        None for formats without a prompt/completion boundary.
        """
        if self.fmt not in ("prompt_completion", "alpaca"):
            return None
        if self.fmt == "alpaca":
            prompt, completion = self._alpaca_prompt("", row), self._field("", row, "output")
        else:
            prompt, completion = self._field("", row, "prompt"), self._field("", row, "completion")
        split = self._ids(prompt, special=True) + self._ids(completion, special=False)
        return self._ids(prompt + completion, special=True) == split

    def __call__(self, location: str, row: Any) -> tuple[list[int], int, list[int] | None]:
        if not isinstance(row, dict):
            raise UserError(f"{self.where}: {location}: expected an object with fields, got {type(row).__name__}")
        if self.fmt == "messages":
            return self._messages(location, row)
        if self.fmt == "text":
            ids = self._ids(self._field(location, row, "text", required_text=True), special=True)
            return self._with_eos(ids), 0, None
        if self.fmt == "alpaca":
            prompt = self._alpaca_prompt(location, row)
            completion = self._field(location, row, "output", required_text=True)
        else:
            prompt = self._field(location, row, "prompt")
            completion = self._field(location, row, "completion", required_text=True)
        prompt_ids = self._ids(prompt, special=True)
        return self._with_eos(prompt_ids + self._ids(completion, special=False)), len(prompt_ids), None

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids if ids and ids[-1] == self.eos else ids + [self.eos]

    def _field(self, location: str, row: dict, name: str, optional: bool = False, required_text: bool = False) -> str:
        column = self.columns[name]
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

    def _alpaca_prompt(self, location: str, row: dict) -> str:
        instruction = self._field(location, row, "instruction", required_text=True)
        extra = self._field(location, row, "input", optional=True)
        return fill_alpaca_template(instruction, extra, self.template)

    def _messages(self, location: str, row: dict) -> tuple[list[int], int, list[int] | None]:
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
        full = chat_ids(self.tokenizer, clean, add_generation_prompt=False)
        target_mask = [0] * len(full)
        for turn, message in enumerate(clean):
            if message["role"] != "assistant":
                continue
            before = chat_ids(self.tokenizer, clean[:turn], add_generation_prompt=True) if turn else []
            through = chat_ids(self.tokenizer, clean[: turn + 1], add_generation_prompt=False)
            if full[: len(before)] != before or full[: len(through)] != through or len(through) <= len(before):
                raise UserError(
                    f"{self.where}: {location}: the chat template renders assistant turn {turn} differently once "
                    "later turns follow (it rewrites history), so its tokens cannot be masked exactly; use a "
                    "template that keeps earlier turns unchanged, or split the conversation"
                )
            for position in range(len(before), len(through)):
                target_mask[position] = 1
        prompt_length = target_mask.index(1) if 1 in target_mask else len(full)
        return full, prompt_length, target_mask


# ---------------------------------------------------------------------------------------------------------
# Whole datasets


def target_count(ids: list[int], prompt_length: int, target_mask: list[int] | None, mask_prompt: bool) -> int:
    """Positions the loss scores: t >= 1 (position 0 is never predicted) that are not masked."""
    if not mask_prompt:
        return max(len(ids) - 1, 0)
    start = max(prompt_length, 1)
    if target_mask is None:
        return max(len(ids) - start, 0)
    return sum(target_mask[start:])


def tokenize_rows(
    rows: list[tuple[str, Any]], tokenize: _Tokenize, data: DataSection
) -> tuple[list[Example], DataReport]:
    """Tokenize, truncate and filter rows into training examples, with a report of what happened."""
    from tqdm.auto import tqdm

    report = DataReport(rows=len(rows))
    examples: list[Example] = []
    # a context manager: an error in the middle of the rows still ends the progress line before it is reported
    with tqdm(rows, desc=f"tokenizing {tokenize.where}", unit="rows", disable=len(rows) < PROGRESS_FROM_ROWS) as progress:
        for index, (location, row) in enumerate(progress):
            ids, prompt_length, target_mask = tokenize(location, row)
            if index < BOUNDARY_SAMPLE:
                agrees = tokenize.boundary_agrees(row)
                if agrees is not None:
                    report.boundary_checked += 1
                    if not agrees:
                        report.boundary_mismatches += 1
                        if len(report.boundary_mismatch_rows) < MAX_LISTED:
                            report.boundary_mismatch_rows.append(location)
            if len(ids) > data.max_length:
                if data.truncation == "drop":
                    report.dropped_too_long += 1
                    continue
                report.truncated += 1
                if len(report.truncated_rows) < MAX_LISTED:
                    report.truncated_rows.append(location)
                if data.truncation == "keep_start":
                    ids = ids[: data.max_length]
                    target_mask = target_mask[: data.max_length] if target_mask is not None else None
                    prompt_length = min(prompt_length, data.max_length)
                else:
                    cut = len(ids) - data.max_length
                    ids = ids[cut:]
                    target_mask = target_mask[cut:] if target_mask is not None else None
                    prompt_length = max(prompt_length - cut, 0)
            targets = target_count(ids, prompt_length, target_mask, data.mask_prompt)
            if targets == 0:
                report.dropped_no_targets += 1
                continue
            example: Example = {"input_ids": ids, "prompt_length": prompt_length, "row": location}
            if target_mask is not None:
                example["target_mask"] = target_mask
            examples.append(example)
            report.examples += 1
            report.tokens += len(ids)
            report.target_tokens += targets
            report.longest = max(report.longest, len(ids))
    return examples, report


def _check_not_empty(report: DataReport, data: DataSection, where: str) -> None:
    if report.rows == 0:
        raise UserError(f"{where}: the dataset has no rows; add examples or point to another file")
    if report.examples == 0:
        reasons = []
        if report.dropped_no_targets:
            reasons.append(f"{report.dropped_no_targets} had zero target tokens")
        if report.dropped_too_long:
            reasons.append(f"{report.dropped_too_long} were longer than max_length with truncation: drop")
        raise UserError(
            f"{where}: none of the {report.rows} examples is left to train on ({', '.join(reasons)} at "
            f"data.max_length={data.max_length}); raise data.max_length, use data.truncation: keep_end, or check "
            "that completions are not empty"
        )


def padding_fraction(lengths: list[int], batch_size: int, seed: int | None = None, multiple: int | None = None) -> float:
    """Share of computed positions that are padding when `lengths` are right-padded in batches of `batch_size`,
    in the given order or (with `seed`) in a seeded shuffle like the trainer's, rounded up to `multiple`."""
    order = list(range(len(lengths)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    padded = real = 0
    for start in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[start : start + batch_size]]
        width = max(batch)
        if multiple:
            width = -(-width // multiple) * multiple
        padded += width * len(batch)
        real += sum(batch)
    return (padded - real) / padded if padded else 0.0


def model_columns(examples: list[Example]) -> list[Example]:
    """The examples with only the fields the collator reads (drops bookkeeping such as "row")."""
    return [{key: example[key] for key in MODEL_FIELDS if key in example} for example in examples]


def dataset_fingerprint(*parts: list[Example] | None) -> str:
    """sha256 over the tokenized examples (ids, boundaries and masks), in order."""
    digest = hashlib.sha256()
    for examples in parts:
        for example in examples or []:
            digest.update(json.dumps(example, separators=(",", ":"), sort_keys=True).encode())
            digest.update(b"\n")
        digest.update(b"\x00")
    return digest.hexdigest()


def prepare_data(data: DataSection, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreparedData:
    """Read, tokenize and split the recipe's data. Raises `UserError` before anything is written."""
    train_rows = read_rows(data.train.path, data.train.split, "data.train")
    train, train_report = tokenize_rows(train_rows, _Tokenize(tokenizer, data.train, data.train.format, "data.train"), data)
    _check_not_empty(train_report, data, "data.train")
    evaluation: list[Example] | None = None
    eval_report: DataReport | None = None
    if data.eval is not None and data.eval.split_ratio is not None:
        train, evaluation = split_examples(train, data.eval.split_ratio, seed)
        train_report, eval_report = _split_reports(train_report, train, evaluation, data.mask_prompt)
    elif data.eval is not None and data.eval.path is not None:
        fmt = data.eval.format or data.train.format
        eval_rows = read_rows(data.eval.path, data.eval.split, "data.eval")
        evaluation, eval_report = tokenize_rows(eval_rows, _Tokenize(tokenizer, data.eval, fmt, "data.eval"), data)
        _check_not_empty(eval_report, data, "data.eval")
    return PreparedData(
        train=train,
        eval=evaluation,
        train_report=train_report,
        eval_report=eval_report,
        fingerprint=dataset_fingerprint(train, evaluation),
    )


def split_examples(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded split: ceil(ratio * n) examples (at least one) go to eval, the rest stay in train, order kept."""
    if len(examples) < 2:
        raise UserError("data.eval.split_ratio: needs at least 2 training examples to split off an eval set")
    size = min(max(math.ceil(ratio * len(examples)), 1), len(examples) - 1)
    chosen = set(random.Random(seed).sample(range(len(examples)), size))
    train = [example for index, example in enumerate(examples) if index not in chosen]
    held_out = [example for index, example in enumerate(examples) if index in chosen]
    return train, held_out


def _split_reports(
    full: DataReport, train: list[Example], held_out: list[Example], mask_prompt: bool
) -> tuple[DataReport, DataReport]:
    def measure(examples: list[Example], base: DataReport) -> DataReport:
        base.examples = len(examples)
        base.tokens = sum(len(example["input_ids"]) for example in examples)
        base.target_tokens = sum(
            target_count(e["input_ids"], e["prompt_length"], e.get("target_mask"), mask_prompt) for e in examples
        )
        base.longest = max((len(example["input_ids"]) for example in examples), default=0)
        return base

    train_report = measure(train, DataReport(**asdict(full)))
    eval_report = measure(held_out, DataReport(rows=len(held_out)))
    return train_report, eval_report
