"""`lora-causal inspect`: exactly which tokens are trained, dataset statistics, and the label guardrails.

For each position of an example the view shows the seed article's picture: the context the model sees and the
token it is trained to predict there, or "masked" when that position is not a target.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_causal.core.recipe import Recipe
from lora_causal.data.checks import Finding, run_checks
from lora_causal.data.collator import CausalLMCollator
from lora_causal.data.dataset import PreparedData, padding_fraction
from lora_causal.data.prepare import prepare_data
from lora_causal.model.loading import load_tokenizer

if TYPE_CHECKING:
    from rich.console import Console

WINDOW = 3  # positions shown around each masked/target transition in long examples
FULL_TABLE = 48  # examples up to this length show every position


@dataclass
class Stats:
    examples: int
    tokens: int
    target_tokens: int
    dropped_no_targets: int
    dropped_too_long: int
    truncated: int
    padding_fraction: float
    lengths: list[int]
    batching: str = ""  # how the examples become micro-batches, in words

    @property
    def supervised_fraction(self) -> float:
        return self.target_tokens / max(self.tokens, 1)


def dataset_stats(prepared: PreparedData, recipe: Recipe) -> Stats:
    from lora_causal.training.plan import resolved

    report = prepared.train_report
    lengths = prepared.train.lengths()
    as_run = resolved(recipe)
    train = as_run.train
    padding = 0.0 if train.padding_free else padding_fraction(
        lengths, train.micro_batch_size, train.seed, train.pad_to_multiple_of)
    return Stats(
        examples=report.examples,
        tokens=report.tokens,
        target_tokens=report.target_tokens,
        dropped_no_targets=report.dropped_no_targets,
        dropped_too_long=report.dropped_too_long,
        truncated=report.truncated,
        padding_fraction=padding,
        lengths=lengths,
        batching=_batching_words(as_run, lengths, padding),
    )


def _batching_words(as_run: Recipe, lengths: list[int], padding: float) -> str:
    """The micro-batches the recipe makes of these lengths (one process), in words."""
    train = as_run.train
    if not train.token_budget or not lengths:
        return f"padding {padding:.1%} at micro_batch_size {train.micro_batch_size}"
    from lora_causal.training.trainer import budget_steps

    steps = budget_steps(as_run, lengths, processes=1)
    return (f"token budget {train.token_budget}, one process: "
            f"{steps.describe(train.micro_batch_size, train.gradient_accumulation)}; no padding")


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token as visible text: newlines as ↵, tabs as ⇥, a leading space as ·."""
    text = tokenizer.decode([token_id])
    text = text.replace("\n", "↵").replace("\t", "⇥")
    return "·" + text[1:] if text.startswith(" ") else text


def positions_to_show(labels: list[int]) -> list[int]:
    """Every position for short examples; else the positions around each masked/target switch and the end."""
    if len(labels) <= FULL_TABLE:
        return list(range(1, len(labels)))
    keep: set[int] = set(range(1, min(1 + WINDOW, len(labels))))
    for position in range(2, len(labels)):
        if (labels[position] == -100) != (labels[position - 1] == -100):
            keep.update(range(max(1, position - WINDOW), min(len(labels), position + WINDOW)))
    keep.update(range(max(1, len(labels) - WINDOW), len(labels)))
    return sorted(keep)


def example_labels(prepared: PreparedData, recipe: Recipe, pad_token_id: int, count: int) -> list[list[int]]:
    collator = CausalLMCollator(pad_token_id=pad_token_id, mask_prompt=recipe.data.mask_prompt)
    return [collator([example])["labels"][0].tolist() for example in prepared.train[:count]]


# ---------------------------------------------------------------------------------------------------------
# Terminal


def print_example(console: Console, tokenizer: Any, example: dict, labels: list[int], index: int, total: int) -> None:
    from rich.table import Table
    from rich.text import Text

    ids = example["input_ids"]
    targets = sum(1 for label in labels[1:] if label != -100)
    console.rule(f"example {index + 1} of {total} · {example['row']} · {len(ids)} tokens · {targets} targets")
    stream = Text()
    for position, token_id in enumerate(ids):
        style = "bold green" if position > 0 and labels[position] != -100 else "grey50"
        stream.append(token_text(tokenizer, token_id), style=style)
        stream.append(" ", style="grey23")
    console.print(stream)
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("pos", justify="right")
    table.add_column("context (what the model sees)", overflow="ellipsis", no_wrap=True, max_width=44)
    table.add_column("trained to predict", overflow="ellipsis", no_wrap=True, max_width=24)
    shown = positions_to_show(labels)
    previous = 0
    for position in shown:
        if position != previous + 1 and previous:
            table.add_row("…", "", "")
        context = "".join(token_text(tokenizer, t) for t in ids[max(0, position - 12) : position])
        context = ("…" if position > 12 else "") + context
        if labels[position] == -100:
            table.add_row(str(position), Text(context, style="grey50"), Text("masked", style="grey50"))
        else:
            table.add_row(str(position), context, Text(repr(token_text(tokenizer, ids[position])), style="bold green"))
        previous = position
    console.print(table)


def histogram_rows(lengths: list[int], bins: int = 10, width: int = 40) -> list[tuple[str, int, str]]:
    if not lengths:
        return []
    low, high = min(lengths), max(lengths)
    step = max(1, -(-(high - low + 1) // bins))
    counts: dict[int, int] = {}
    for length in lengths:
        counts[(length - low) // step] = counts.get((length - low) // step, 0) + 1
    peak = max(counts.values())
    rows = []
    for bucket in range(0, (high - low) // step + 1):
        start = low + bucket * step
        count = counts.get(bucket, 0)
        end = min(start + step - 1, high)  # the last bin ends at the longest length, not past it
        rows.append((f"{start}-{end}", count, "█" * max(1 if count else 0, round(width * count / peak))))
    return rows


def print_stats(console: Console, stats: Stats, recipe: Recipe) -> None:
    console.rule("dataset")
    console.print(
        f"examples {stats.examples} · tokens {stats.tokens} · supervised {stats.supervised_fraction:.1%} · "
        f"truncated {stats.truncated} · dropped {stats.dropped_no_targets} (no targets) + "
        f"{stats.dropped_too_long} (too long) · {stats.batching}"
    )
    console.print("length histogram (tokens: examples)")
    for label, count, bar in histogram_rows(stats.lengths):
        console.print(f"  {label:>11} {count:6d} {bar}")


def print_findings(console: Console, findings: list[Finding]) -> None:
    console.rule("checks")
    for finding in findings:
        style = "yellow" if finding.skipped else ("green" if finding.passed else "bold red")
        console.print(finding.line(), style=style)


# ---------------------------------------------------------------------------------------------------------
# Files


def histogram_png(lengths: list[int], path: Path | None = None) -> bytes:
    """A PNG histogram of example lengths (also written to `path` when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 3.2), dpi=100)
    axes.hist(lengths, bins=min(40, max(5, len(set(lengths)))), color="#3a7d44")
    axes.set_xlabel("tokens per example")
    axes.set_ylabel("examples")
    axes.set_title("example lengths")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    data = buffer.getvalue()
    if path is not None:
        from lora_causal.core.rundir import write_bytes_atomic

        write_bytes_atomic(path, data)
    return data


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}
.tok{font-family:ui-monospace,monospace;padding:1px 2px;margin:1px;border-radius:3px;display:inline-block}
.target{background:#c8f0c8;color:#064406;font-weight:600}.masked{background:#eee;color:#888}
table{border-collapse:collapse;font-family:ui-monospace,monospace;font-size:90%}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}.fail{color:#b00;font-weight:600}
.ok{color:#064406}.skipped{color:#a60}
"""


def render_html(tokenizer: Any, prepared: PreparedData, labels: list[list[int]], stats: Stats,
                findings: list[Finding], recipe: Recipe, png: bytes) -> str:
    """A self-contained page: statistics, checks, histogram and every token of the first examples, marked."""
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>lora_causal inspect</title>"
             f"<style>{_STYLE}</style></head><body><h1>What {esc(Path(recipe.data.train.path).name)} trains</h1>"]
    parts.append(
        f"<p>examples {stats.examples} · tokens {stats.tokens} · supervised {stats.supervised_fraction:.1%} · "
        f"truncated {stats.truncated} · dropped {stats.dropped_no_targets} (no targets) + {stats.dropped_too_long} "
        f"(too long) · {esc(stats.batching)}</p>"
    )
    parts.append("<h2>Checks</h2><ul>")
    for finding in findings:
        state = "skipped" if finding.skipped else ("ok" if finding.passed else "fail")
        parts.append(f"<li class='{state}'>{esc(finding.line())}</li>")
    parts.append("</ul>")
    parts.append(f"<img alt='length histogram' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
    parts.append("<p><span class='tok target'>target</span> the position is trained to predict this token · "
                 "<span class='tok masked'>masked</span> label -100 (context only)</p>")
    for index, (example, example_labels) in enumerate(zip(prepared.train[: len(labels)], labels)):
        ids = example["input_ids"]
        parts.append(f"<h2>Example {index + 1} · {esc(example['row'])}</h2><p>")
        for position, token_id in enumerate(ids):
            state = "target" if position > 0 and example_labels[position] != -100 else "masked"
            title = f"pos {position} · id {token_id} · {state}"
            parts.append(f"<span class='tok {state}' data-pos='{position}' title='{title}'>"
                         f"{esc(token_text(tokenizer, token_id))}</span>")
        parts.append("</p><table><tr><th>pos</th><th>context</th><th>trained to predict</th></tr>")
        for position in range(1, len(ids)):
            context = ("…" if position > 12 else "") + "".join(
                token_text(tokenizer, t) for t in ids[max(0, position - 12) : position]
            )
            if example_labels[position] == -100:
                target = "<td class='masked'>masked</td>"
            else:
                target = f"<td class='target'>{esc(repr(token_text(tokenizer, ids[position])))}</td>"
            parts.append(f"<tr><td>{position}</td><td>{esc(context)}</td>{target}</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)


def inspect_recipe(recipe: Recipe, count: int, console: Console, html_path: Path | None = None,
                   png_path: Path | None = None) -> list[Finding]:
    """Print the first `count` examples, statistics and checks; write the HTML page and PNG when asked.

    The recipe first passes the pre-flight `validate` and `train` run (lora_causal.training.preflight): the same
    recipe gets the same verdict from every command, before any data is tokenized."""
    import sys

    from lora_causal.training.preflight import plan_run

    as_run = plan_run(recipe).as_run  # batching refusals too (a token budget on a padded-only family, ...)
    tokenizer = load_tokenizer(recipe.model)
    prepared = prepare_data(recipe.data, tokenizer, recipe.train.seed, say=lambda text: sys.stderr.write(f"{text}\n"))
    findings = run_checks(prepared, recipe.data, recipe.checks, tokenizer, recipe.train.micro_batch_size, recipe.train.seed)
    labels = example_labels(prepared, recipe, tokenizer.pad_token_id, count)
    for index, example in enumerate(prepared.train[:count]):
        print_example(console, tokenizer, example, labels[index], index, min(count, len(prepared.train)))
    stats = dataset_stats(prepared, as_run)
    print_stats(console, stats, recipe)
    print_findings(console, findings)
    if html_path is not None or png_path is not None:
        png = histogram_png(stats.lengths, png_path)
        if png_path is not None:
            console.print(f"length histogram written to {png_path}")
        if html_path is not None:
            from lora_causal.core.rundir import write_text_atomic

            write_text_atomic(html_path, render_html(tokenizer, prepared, labels, stats, findings, recipe, png))
            console.print(f"HTML written to {html_path}")
    return findings
