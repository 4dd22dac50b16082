"""Label guardrails: catch the silent failures of LoRA fine-tuning before they cost GPU hours.

Checked on a seeded sample of `checks.sample_size` examples drawn from the whole dataset (a bad tail of a
concatenated file is found as readily as a bad head), with the labels the real collator builds:
- eos: EOS is a target (non-chat formats), so the model learns to stop;
- end_of_turn: chat assistant turns end with a supervised special token (their end-of-turn);
- boundary: tokenizing prompt + completion as one text agrees with tokenizing them apart (else the prompt's end
  and the completion's start are tokens inference never produces, e.g. a trailing space in the prompt);
- truncation: not too many examples were cut by max_length.
Zero supervised tokens and chat templates that rewrite history are hard errors raised while tokenizing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import ChecksSection, DataSection
from lora_causal.data.collator import CausalLMCollator

if TYPE_CHECKING:
    from lora_causal.data.dataset import PreparedData

LISTED_ROWS = 5


@dataclass
class Finding:
    """The outcome of one check: what was measured, and the fix when it failed."""

    check: str
    passed: bool
    detail: str
    fix: str = ""
    skipped: bool = False

    def line(self) -> str:
        if self.passed or self.skipped:
            state = "skipped" if self.skipped else "ok"
            return f"{self.check}: {state} ({self.detail})"
        return f"check {self.check} failed: {self.detail}; {self.fix}"


def _rows(locations: list[str]) -> str:
    shown = ", ".join(locations[:LISTED_ROWS])
    return shown + (f" and {len(locations) - LISTED_ROWS} more" if len(locations) > LISTED_ROWS else "")


def _labels(examples: list[dict[str, Any]], data: DataSection, pad_token_id: int, batch_size: int) -> list[list[int]]:
    """Labels as training builds them: the real collator, in batches (so padding and pad == eos are exercised)."""
    collator = CausalLMCollator(pad_token_id=pad_token_id, mask_prompt=data.mask_prompt)
    examples = [{key: example[key] for key in ("input_ids", "prompt_length", "target_mask") if key in example}
                for example in examples]
    labels: list[list[int]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = collator(chunk)
        for row, example in enumerate(chunk):
            labels.append(batch["labels"][row, : len(example["input_ids"])].tolist())
    return labels


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special)
    return ids


def _check_eos(examples: list[dict], labels: list[list[int]], eos_id: int, eos_text: str) -> Finding:
    missing = [e["row"] for e, lab in zip(examples, labels) if eos_id not in lab[1:]]
    supervised = len(examples) - len(missing)
    detail = f"EOS {eos_text} is a target in {supervised} of {len(examples)} checked examples"
    if supervised == 0:
        return Finding("eos", False, f"{detail} (rows {_rows(missing)})",
                       "the model would never learn to stop: raise data.max_length if completions are cut, or set "
                       "checks.skip: [eos] if the data is deliberately open-ended")
    return Finding("eos", True, detail)


def _check_end_of_turn(examples: list[dict], labels: list[list[int]], tokenizer: Any) -> Finding:
    special = _special_ids(tokenizer)
    spans, closed, open_rows = 0, 0, []
    for example, lab in zip(examples, labels):
        ids, row_closed, row_spans = example["input_ids"], 0, 0
        position = 1
        while position < len(lab):
            if lab[position] == -100:
                position += 1
                continue
            end = position
            while end + 1 < len(lab) and lab[end + 1] != -100:
                end += 1
            row_spans += 1
            tail = [t for t in ids[position : end + 1] if tokenizer.decode([t]).strip()]  # skip trailing newlines
            row_closed += bool(tail) and tail[-1] in special
            position = end + 1
        spans += row_spans
        closed += row_closed
        if row_closed < row_spans:
            open_rows.append(example["row"])
    detail = f"{closed} of {spans} assistant turns end with a supervised special token"
    if spans and closed == 0:
        return Finding("end_of_turn", False, f"{detail} (rows {_rows(open_rows)})",
                       "the chat template leaves the end-of-turn token outside the assistant turn, so the model "
                       "would never learn to stop; use a template that closes assistant turns with it, or set "
                       "checks.skip: [end_of_turn]")
    return Finding("end_of_turn", True, detail)


def sample_positions(count: int, size: int, seed: int) -> list[int]:
    """`size` positions out of `count`, drawn with `seed` across all of them, in ascending order."""
    return sorted(random.Random(seed).sample(range(count), min(size, count)))


def _check_boundary(prepared: PreparedData, sample: list[dict], checks: ChecksSection) -> Finding | None:
    """Joint vs split tokenization of the sampled prompt/completion rows (read back from the prepared rows)."""
    if prepared.train_rows is None or prepared.row_tokenizer is None:
        return None
    checked, mismatched = 0, []
    for example in sample:
        _, row = prepared.train_rows.row(example["row_index"])
        agrees = prepared.row_tokenizer.boundary_agrees(row)
        if agrees is None:
            return None
        checked += 1
        if not agrees:
            mismatched.append(example["row"])
    if not checked:
        return None
    detail = f"{len(mismatched)} of {checked} prompt/completion pairs tokenize differently joined"
    if len(mismatched) / checked > checks.max_boundary_mismatch_share:
        return Finding("boundary", False, f"{detail} (rows {_rows(mismatched)})",
                       "move separators to the end of the completion side: prompts should not end with a space the "
                       "completion's first word would carry (e.g. 'A:' + ' Paris', not 'A: ' + 'Paris'), or raise "
                       "checks.max_boundary_mismatch_share")
    return Finding("boundary", True, detail)


def run_checks(prepared: PreparedData, data: DataSection, checks: ChecksSection, tokenizer: Any,
               batch_size: int = 8, seed: int = 0) -> list[Finding]:
    """Every guardrail on `checks.sample_size` training examples drawn with `seed`; nothing is raised here."""
    sample = [prepared.train[position] for position in sample_positions(len(prepared.train), checks.sample_size, seed)]
    labels = _labels(sample, data, tokenizer.pad_token_id, batch_size)
    findings: list[Finding] = []
    if data.train.format == "messages":
        findings.append(_check_end_of_turn(sample, labels, tokenizer))
    else:
        findings.append(_check_eos(sample, labels, tokenizer.eos_token_id, repr(tokenizer.eos_token)))

    boundary = _check_boundary(prepared, sample, checks)
    if boundary is not None:
        findings.append(boundary)

    report = prepared.train_report
    share = report.truncated / max(report.rows, 1)
    detail = f"{report.truncated} of {report.rows} examples ({share:.0%}) were cut to max_length {data.max_length}"
    if share > checks.max_truncated_share:
        findings.append(Finding("truncation", False, f"{detail} (rows {_rows(report.truncated_rows)})",
                                "raise data.max_length, use data.truncation: drop, or raise checks.max_truncated_share"))
    else:
        findings.append(Finding("truncation", True, detail))

    for finding in findings:
        if finding.check in checks.skip:
            finding.skipped = True
    return findings


def enforce(findings: list[Finding]) -> None:
    """Raise the first failed, not skipped check as a one-line `UserError`."""
    for finding in findings:
        if not finding.passed and not finding.skipped:
            raise UserError(finding.line())
