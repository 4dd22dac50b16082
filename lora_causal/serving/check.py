"""`lora-causal check-serving ADAPTER_OR_RECIPE --engine ...`: will vLLM, SGLang or llama.cpp serve this adapter as
trained? Offline: it reads configs and the safetensors header only, and prints per engine what would be refused or
silently ignored, with the fix, or the server command line that fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lora_causal.core.errors import UserError
from lora_causal.serving.rules import ENGINES, FINDERS, Finding, serve_flags

if TYPE_CHECKING:
    from lora_causal.serving.facts import AdapterFacts


@dataclass
class EngineResult:
    engine: str
    findings: list[Finding] = field(default_factory=list)
    command: str = ""

    @property
    def ok(self) -> bool:
        return not any(finding.severity == "error" for finding in self.findings)


def parse_engines(values: list[str]) -> list[str]:
    """Engine names from repeated or comma-separated --engine values ("all" = every engine)."""
    names = [name.strip().lower() for value in values for name in value.split(",") if name.strip()]
    if not names:
        raise UserError(f"--engine: name an engine ({', '.join(ENGINES)}, or all)")
    if "all" in names:
        return list(ENGINES)
    unknown = [name for name in names if name not in ENGINES]
    if unknown:
        raise UserError(f"--engine: unknown engine '{unknown[0]}'; choose from {', '.join(ENGINES)} (or all)")
    return list(dict.fromkeys(names))


def check_facts(facts: AdapterFacts, engines: list[str]) -> list[EngineResult]:
    return [EngineResult(engine, FINDERS[engine](facts), serve_flags(engine, facts)) for engine in engines]


def check_serving(path: str, engines: list[str], overrides: list[str] | tuple[str, ...] = (),
                  base_model: str | None = None) -> tuple[AdapterFacts, list[EngineResult]]:
    from lora_causal.serving.facts import gather_facts

    facts = gather_facts(path, overrides, base_model)
    return facts, check_facts(facts, engines)


def format_results(facts: AdapterFacts, results: list[EngineResult]) -> str:
    kind = "recipe (predicted from its lora section)" if facts.is_recipe else "adapter"
    ranks = facts.ranks
    lines = [f"serving check of {kind} {facts.where}: rank {max(ranks) if ranks else '?'}, base "
             f"{facts.model_type or 'unknown'} ({facts.base or 'not named'})"]
    for result in results:
        errors = sum(finding.severity == "error" for finding in result.findings)
        warnings = len(result.findings) - errors
        verdict = "servable" if result.ok else f"NOT servable ({errors} error{'s' if errors != 1 else ''})"
        lines.append(f"{result.engine}: {verdict}" + (f", {warnings} warning{'s' if warnings != 1 else ''}" if warnings else ""))
        lines += [f"  {finding.line()}" for finding in result.findings]
        if result.ok:
            lines.append(f"  serve with: {result.command}")
    return "\n".join(lines)
