"""From a learned graph to the output directory: findings, manifests, graph.json,
findings.json and report.md (the contract documented in the README)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from emit import outputs, report
from emit.istio import DEFAULT_SYSTEM_NAMESPACES, plan_istio
from emit.linkerd import plan_linkerd
from emit.netpol import plan_netpol
from emit.sarif import emit_findings_outputs
from learn.findings import find, rank
from learn.model import Finding, Graph
from learn.workloads import cluster_facts

if TYPE_CHECKING:
    from observe.inventory import Inventory


MESHES = ("istio", "linkerd", "netpol")


@dataclass(frozen=True)
class EmitOptions:
    meshes: tuple[str, ...] = ("istio",)
    """Policy flavours to propose: ``istio``, ``linkerd``, ``netpol`` (Kubernetes)."""
    plaintext: Literal["allow", "deny"] = "allow"
    """Clients without mTLS: allow by address with a PERMISSIVE exception, or leave out."""
    dry_run: bool = False
    """Add ``istio.io/dry-run: "true"`` to AuthorizationPolicies."""
    trust_domain: str = "cluster.local"
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES
    """Namespaces that never get namespace-wide policies."""
    linkerd_allow_unmeshed: bool = False
    """Linkerd: allow clients without a mesh identity by address (NetworkAuthentication)."""
    linkerd_audit: bool = False
    """Linkerd: ``accessPolicy: audit`` on the proposed Servers (staging)."""
    egress: bool = False
    """NetworkPolicy: also propose egress policies (DNS and observed egress kept)."""


@dataclass
class Emitted:
    findings: list[Finding] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)


def emit_outputs(out: Path, graph: Graph, options: EmitOptions, *,
                 stats: dict[str, Any], inventory: Inventory | None = None,
                 findings: list[Finding] | None = None,
                 left_out: list[dict[str, Any]] | None = None) -> Emitted:
    """Write everything but flows.parquet into ``out`` (which must exist).

    ``inventory`` gives the Linkerd and NetworkPolicy proposals what the graph does not carry
    (port names, probes, the cluster DNS pods, namespace labels). ``findings``: ranked
    findings (:func:`learn.findings.find_all`; default: the graph's rule findings);
    ``graph`` is then the graph the proposals are made from (flagged traffic already left
    out) and ``left_out`` says what was left out and why, for the report.
    """
    findings = rank(find(graph)) if findings is None else findings
    facts = cluster_facts(inventory) if inventory is not None and (
        "linkerd" in options.meshes or "netpol" in options.meshes) else None
    # One plan per mesh: the manifests, what was left out and the report's explanations.
    plan = plan_istio(
        graph, plaintext=options.plaintext, dry_run=options.dry_run,
        system_namespaces=options.system_namespaces,
    ) if "istio" in options.meshes else None
    others: list[tuple[str, Any]] = []
    manifests = list(plan.manifests) if plan is not None else []
    if "linkerd" in options.meshes:
        linkerd = plan_linkerd(graph, facts, trust_domain=options.trust_domain,
                               allow_unmeshed=options.linkerd_allow_unmeshed,
                               audit=options.linkerd_audit)
        others.append(("Proposed Linkerd policies", linkerd))
        manifests += linkerd.manifests
        findings = [*findings, *linkerd.findings]
    if "netpol" in options.meshes:
        netpol = plan_netpol(graph, facts, egress=options.egress,
                             system_namespaces=options.system_namespaces)
        others.append(("Proposed NetworkPolicies", netpol))
        manifests += netpol.manifests
    outputs.write_policies(manifests, out)
    outputs.write_json(out / "graph.json", outputs.graph_json(graph))
    emit_findings_outputs(out, findings)
    text = report.render_report(
        graph, findings, manifests,
        stats=stats,
        excluded=list(left_out or []),
        options={"trust_domain": options.trust_domain, "plaintext": options.plaintext,
                 "dry_run": options.dry_run, "system_namespaces": options.system_namespaces,
                 **({"mesh": ",".join(options.meshes)} if options.meshes != ("istio",)
                    else {}),
                 **({"egress": True} if options.egress else {}),
                 **({"linkerd_allow_unmeshed": True} if options.linkerd_allow_unmeshed
                    else {}),
                 **({"linkerd_audit": True} if options.linkerd_audit else {})},
        plan=plan,
        others=others,
        istio=plan is not None,
    )
    outputs.write_text_atomic(out / "report.md", text)
    return Emitted(findings=findings, manifests=manifests)
