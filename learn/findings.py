"""Rule-based findings over the learned graph.

Each rule is deterministic and names its evidence; ids are stable
(``<kind>:<source>-><destination>:<port>``) so the same input yields the same findings and a
pull request only shows real changes.
"""

from __future__ import annotations

from learn.model import EXTERNAL, UNKNOWN, Edge, Finding, Graph

SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2, "info": 3}


def _is_workload(graph: Graph, node_id: str) -> bool:
    node = graph.nodes.get(node_id)
    return node is not None and node.kind not in (EXTERNAL, UNKNOWN, "service")


def _fid(kind: str, edge: Edge | None = None, node: str | None = None) -> str:
    if edge is not None:
        return f"{kind}:{edge.source}->{edge.destination}:{edge.port}"
    return f"{kind}:{node}"


def _on_edge(kind: str, severity: str, edge: Edge, summary: str) -> Finding:
    """A finding about one edge, with the edge's evidence samples."""
    return Finding(id=_fid(kind, edge), kind=kind, severity=severity, source=edge.source,
                   destination=edge.destination, port=edge.port, summary=summary,
                   evidence=list(edge.evidence))


def _share(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0%"


def find(graph: Graph) -> list[Finding]:
    """All rule-based findings, sorted by severity then id."""
    findings: list[Finding] = []
    permissive: dict[tuple[str, int], list[Edge]] = {}
    for edge in graph.edges:
        allowed = edge.requests - edge.denied_requests
        dst_node = graph.nodes.get(edge.destination)
        if edge.plaintext_requests and dst_node is not None and dst_node.ingress_gateway:
            clients = len(graph.nodes[edge.source].ips) or 1
            findings.append(_on_edge(
                "plaintext", "low", edge,
                (
                    f"{edge.plaintext_requests} requests from {clients} client address(es) "
                    f"reached the ingress gateway {edge.destination} on port {edge.port} over "
                    "plaintext; serve this listener over TLS if it faces the internet."
                ),
            ))
        elif edge.plaintext_requests and allowed and _is_workload(graph, edge.destination):
            src = graph.nodes[edge.source]
            who = "an unmeshed client" if src.meshed is False or src.kind in (
                EXTERNAL, UNKNOWN) else "a client"
            findings.append(_on_edge(
                "plaintext", "high" if _is_workload(graph, edge.source) else "medium", edge,
                (
                    f"{edge.plaintext_requests} of {edge.requests} requests "
                    f"({_share(edge.plaintext_requests, edge.requests)}) from {who} "
                    f"{edge.source} to {edge.destination}:{edge.port} were unencrypted; "
                    f"only its source addresses ({', '.join(edge.source_ips[:5]) or 'none'}) "
                    "can authorize it (weak)."
                ),
            ))
            permissive.setdefault((edge.destination, edge.port), []).append(edge)
        if edge.source.startswith(f"{UNKNOWN}:") and allowed > 0:
            findings.append(_on_edge(
                "unknown-source", "medium", edge,
                (
                    f"{allowed} requests to {edge.destination}:{edge.port} came from "
                    f"{edge.source[len(UNKNOWN) + 1:]}, an address no pod, node or service in the "
                    "inventory or the logs accounts for at that time."
                ),
            ))
        if edge.destination.startswith(f"{EXTERNAL}:"):
            findings.append(_on_edge(
                "external-egress", "low", edge,
                (
                    f"{edge.source} reached {edge.destination[len(EXTERNAL) + 1:]}:{edge.port} "
                    f"outside the cluster {edge.requests} times "
                    f"(hosts: {', '.join(edge.hosts[:5]) or 'unknown'})."
                ),
            ))
        if edge.denied_requests:
            findings.append(_on_edge(
                "denied", "info", edge,
                (
                    f"{edge.denied_requests} of {edge.requests} requests from {edge.source} to "
                    f"{edge.destination}:{edge.port} were already rejected by an existing policy; "
                    "the proposal does not allow them."
                ),
            ))
    for (destination, port), edges in sorted(permissive.items()):
        sources = sorted({e.source for e in edges})
        findings.append(Finding(
            id=f"permissive:{destination}:{port}",
            kind="permissive",
            severity="medium",
            source=None,
            destination=destination,
            port=port,
            summary=(
                f"{destination} accepts plaintext on port {port} (from {', '.join(sources)}); "
                "the proposal keeps a port-level PERMISSIVE exception so this traffic keeps "
                "working: move these clients into the mesh, then drop the exception."
            ),
            evidence=sorted({ev for e in edges for ev in e.evidence})[:3],
        ))
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, 9), f.id))
