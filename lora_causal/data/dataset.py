"""Prepared training data: examples backed by memory-mapped Arrow tables, their reports and helpers.

Reading rows is `lora_causal.data.sources`, tokenizing them `lora_causal.data.tokenizing` (the rules of each format),
caching and sharing the result `lora_causal.data.prepare`. Truncation is explicit, and examples left with no target
token are dropped and counted.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError

if TYPE_CHECKING:

    from lora_causal.core.recipe import DataSection
    from lora_causal.data.sources import Source
    from lora_causal.data.tokenizing import RowTokenizer

MODEL_FIELDS = ("input_ids", "prompt_length", "target_mask")  # what reaches the collator; "row" stays behind
ITER_BATCH = 1024

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
    truncated_rows: list[str] = field(default_factory=list)  # locations, first 20

    def summary(self) -> str:
        share = self.target_tokens / max(self.tokens, 1)
        return (
            f"{self.examples} examples of {self.rows} rows, {self.tokens} tokens ({share:.0%} supervised), "
            f"longest {self.longest}, truncated {self.truncated}, dropped {self.dropped_no_targets} (no targets) "
            f"+ {self.dropped_too_long} (too long)"
        )


class Examples(Sequence[Example]):
    """Tokenized examples as a read-only sequence of dicts, backed by a (memory-mapped) `datasets.Dataset`.

    Columns: input_ids, prompt_length, target_mask (chat), row (location), row_index, length, targets.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    @classmethod
    def from_list(cls, examples: list[Example]) -> Examples:
        """In-memory examples (bench, tests); `length` is filled in when missing."""
        from datasets import Dataset

        rows = [{**example, "length": len(example["input_ids"])} for example in examples]
        return cls(Dataset.from_list(rows))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self.dataset[position] for position in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        return self.dataset[index]

    def __iter__(self) -> Iterator[Example]:
        for batch in self.dataset.iter(batch_size=ITER_BATCH):
            names = list(batch)
            yield from (dict(zip(names, values)) for values in zip(*(batch[name] for name in names)))

    def column(self, name: str) -> list[Any]:
        """One column as a list (e.g. `length`), without decoding the others."""
        return list(self.dataset.select_columns([name]).with_format("arrow")[name].to_pylist())

    def lengths(self) -> list[int]:
        return self.column("length")

    def select(self, indices: list[int]) -> Examples:
        return Examples(self.dataset.select(indices))

    def model_dataset(self) -> Any:
        """The dataset with only the columns the collator reads."""
        return self.dataset.select_columns([name for name in MODEL_FIELDS if name in self.dataset.column_names])

    def measure(self, base: DataReport) -> DataReport:
        """`base` with the example, token and target counts of these examples."""
        lengths = self.lengths()
        base.examples = len(lengths)
        base.tokens = sum(lengths)
        base.target_tokens = sum(self.column("targets"))
        base.longest = max(lengths, default=0)
        return base


class RawRows:
    """The rows of a source as stored by `Source.write_rows` (memory-mapped), for checks that need the text."""

    def __init__(self, path: Path, file_names: list[str], where: str) -> None:
        import pyarrow as pa

        self.path, self.file_names, self.where = path, file_names, where
        self.table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()

    @classmethod
    def write(cls, source: Source, path: Path) -> RawRows:
        source.write_rows(path)
        return cls(path, source.file_names, source.where)

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, index: int) -> tuple[str, Any]:
        """(location, parsed row) of row `index`."""
        from lora_causal.data.sources import parse_row

        record = self.table.slice(index, 1).to_pylist()[0]
        return record["location"], parse_row(self.file_names[record["file"]], record["location"], record["json"], self.where)


@dataclass
class PreparedData:
    train: Examples
    eval: Examples | None
    train_report: DataReport
    eval_report: DataReport | None
    fingerprint: str
    train_rows: RawRows | None = None  # the training rows as read, for the boundary check
    row_tokenizer: RowTokenizer | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fingerprint": self.fingerprint, "train": asdict(self.train_report)}
        if self.eval_report is not None:
            out["eval"] = asdict(self.eval_report)
        return out


def check_not_empty(report: DataReport, data: DataSection, where: str) -> None:
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


def target_count(ids: list[int], prompt_length: int, target_mask: list[int] | None, mask_prompt: bool) -> int:
    """Positions the loss scores: t >= 1 (position 0 is never predicted) that are not masked."""
    if not mask_prompt:
        return max(len(ids) - 1, 0)
    start = max(prompt_length, 1)
    if target_mask is None:
        return max(len(ids) - start, 0)
    return sum(target_mask[start:])


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


def model_columns(examples: Sequence[Example]) -> list[Example]:
    """The examples with only the fields the collator reads (drops bookkeeping such as "row")."""
    return [{key: example[key] for key in MODEL_FIELDS if key in example} for example in examples]


def split_indices(count: int, ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of `count` examples: ceil(ratio * count) (at least one) go to eval, order kept."""
    if count < 2:
        raise UserError("data.eval.split_ratio: needs at least 2 training examples to split off an eval set")
    size = min(max(math.ceil(ratio * count), 1), count - 1)
    chosen = set(random.Random(seed).sample(range(count), size))
    return [i for i in range(count) if i not in chosen], sorted(chosen)


def split_examples(examples: list[Example], ratio: float, seed: int) -> tuple[list[Example], list[Example]]:
    """`split_indices` applied to a list."""
    kept, held_out = split_indices(len(examples), ratio, seed)
    return [examples[i] for i in kept], [examples[i] for i in held_out]
