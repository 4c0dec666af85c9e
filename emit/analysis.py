"""From a learned graph to the output directory: findings, manifests, graph.json,
findings.json and report.md (the contract documented in the README)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from emit import outputs, report
from emit.istio import DEFAULT_SYSTEM_NAMESPACES, plan_istio
from learn.findings import find
from learn.model import Finding, Graph


@dataclass(frozen=True)
class EmitOptions:
    plaintext: Literal["allow", "deny"] = "allow"
    """Clients without mTLS: allow by address with a PERMISSIVE exception, or leave out."""
    dry_run: bool = False
    """Add ``istio.io/dry-run: "true"`` to AuthorizationPolicies."""
    trust_domain: str = "cluster.local"
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES
    """Namespaces that never get namespace-wide policies."""


@dataclass
class Emitted:
    findings: list[Finding] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)


def emit_outputs(out: Path, graph: Graph, options: EmitOptions, *,
                 stats: dict[str, Any]) -> Emitted:
    """Write everything but flows.parquet into ``out`` (which must exist)."""
    findings = find(graph)
    # One plan: the manifests, what was left out and the report's rule explanations.
    plan = plan_istio(
        graph, plaintext=options.plaintext, dry_run=options.dry_run,
        system_namespaces=options.system_namespaces,
    )
    manifests = plan.manifests
    outputs.write_policies(manifests, out)
    outputs.write_json(out / "graph.json", outputs.graph_json(graph))
    outputs.write_json(out / "findings.json", outputs.findings_json(findings))
    text = report.render_report(
        graph, findings, manifests,
        stats=stats,
        excluded=plan.excluded,
        options={"trust_domain": options.trust_domain, "plaintext": options.plaintext,
                 "dry_run": options.dry_run, "system_namespaces": options.system_namespaces},
        plan=plan,
    )
    outputs.write_text_atomic(out / "report.md", text)
    return Emitted(findings=findings, manifests=manifests)
