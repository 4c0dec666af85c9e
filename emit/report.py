"""report.md: what a pull-request reviewer needs to accept or question the proposed policies.

Deterministic: everything comes from the graph, findings, manifests and the given stats and
options; nothing from the clock or the machine.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from emit.istio import DEFAULT_SYSTEM_NAMESPACES, IstioPlan, PolicyExplanation, plan_istio
from emit.outputs import SEVERITY_ORDER, findings_json, policy_relpath
from emit.yamlio import dump_yaml, rfc3339
from learn.model import Edge, Finding, Graph

#: An edge seen fewer times (requests, or distinct active minutes) is "a handful".
FEW_REQUESTS = 5
FEW_MINUTES = 3


def _cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: Iterable[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return out


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


# --- mermaid ------------------------------------------------------------------------------


def _mermaid_ids(node_ids: Iterable[str]) -> dict[str, str]:
    ids: dict[str, str] = {}
    taken: set[str] = set()
    for nid in sorted(set(node_ids)):
        base = "n_" + re.sub(r"[^A-Za-z0-9]", "_", nid)
        cand, i = base, 2
        while cand in taken:
            cand, i = f"{base}_{i}", i + 1
        taken.add(cand)
        ids[nid] = cand
    return ids


def _mermaid_label(text: str) -> str:
    return text.replace('"', "#quot;")


def mermaid(graph: Graph) -> list[str]:
    """``flowchart LR``; ids derived from node ids (stable across runs and additions)."""
    edges = sorted(graph.edges, key=lambda e: (e.source, e.destination, e.port, e.protocol))
    used = {e.source for e in edges} | {e.destination for e in edges} | set(graph.nodes)
    ids = _mermaid_ids(used)
    lines = ["```mermaid", "flowchart LR"]
    for nid in sorted(used):
        shape = ("([", "])") if nid.startswith(("external:", "unknown:")) else ('[', ']')
        lines.append(f'  {ids[nid]}{shape[0]}"{_mermaid_label(nid)}"{shape[1]}')
    weak_links = []
    for i, e in enumerate(edges):
        label = _mermaid_label(f"{e.port}/{e.protocol}")
        plain = e.plaintext_requests > 0
        arrow = "-.->" if plain else "-->"
        lines.append(f'  {ids[e.source]} {arrow}|"{label}"| {ids[e.destination]}')
        if plain:
            weak_links.append(str(i))
    if weak_links:
        lines.append(f"  linkStyle {','.join(weak_links)} stroke:#d62728,stroke-width:2px")
    idle = [ids[n] for n in sorted(graph.idle_workloads) if n in ids]
    if idle:
        lines.append("  classDef idle stroke-dasharray: 3 3,color:#888")
        lines.append(f"  class {','.join(idle)} idle")
    lines.append("```")
    return lines


# --- sections -----------------------------------------------------------------------------


def _summary(graph: Graph, findings: list[Finding], manifests: list[dict[str, Any]],
             stats: dict[str, Any]) -> list[str]:
    total = sum(e.requests for e in graph.edges)
    mtls = sum(e.mtls_requests for e in graph.edges)
    connections = sum(e.connections for e in graph.edges)
    conn_mtls = sum(e.mtls_connections for e in graph.edges)
    workloads = [n for n in graph.nodes.values() if n.workload]
    sev = Counter(f.severity for f in findings)
    sev_text = ", ".join(f"{s}: {sev[s]}" for s in sorted(sev, key=lambda s: (
        SEVERITY_ORDER.get(s, 9), s))) or "none"
    lines = ["## Summary", ""]
    lines += _table(["what", "value"], [
        ["time window", f"{rfc3339(graph.first_seen) or '?'} .. {rfc3339(graph.last_seen) or '?'}"],
        ["input files", stats.get("files", 0)],
        ["lines read", stats.get("lines", 0)],
        ["flow records", stats.get("records", 0)],
        ["ignored lines", stats.get("ignored_lines", 0)],
        ["malformed lines", stats.get("malformed", 0)],
        ["duplicates dropped", stats.get("duplicates", 0)],
        ["client-side copies of server-logged requests (counted once)",
         stats.get("records_mirrored", 0)],
        ["records with no destination identity (not in the graph)",
         stats.get("records_unattributed", 0)],
        *([["loopback connections (both ends in one network namespace: no policy applies; "
            "not in the graph)", stats["records_local"]]] if stats.get("records_local") else []),
        ["workloads", len(workloads)],
        ["edges", len(graph.edges)],
        ["requests/connections", total],
        ["mTLS coverage", f"{_pct(mtls, total)} of requests"],
        *([["mTLS coverage of connections (packet evidence)",
            f"{_pct(conn_mtls, connections)} of {connections} connections"]]
          if connections else []),
        ["findings", sev_text],
        ["manifests proposed", len(manifests)],
    ])
    if stats.get("packets") or stats.get("connections"):
        lines += ["", "Packet evidence:", ""]
        skipped = stats.get("packets_skipped") or {}
        lines += _table(["what", "value"], [
            ["packets decoded", stats.get("packets", 0)],
            ["packets not decoded", sum(skipped.values())],
            ["connections", stats.get("connections", 0)],
            ["failed attempts (refused, unanswered; kept out of the graph and the policies)",
             stats.get("records_failed", 0)],
            ["connections with only part of their requests seen (their edges get port-level "
             "rules)", stats.get("not_itemized", 0)],
            *([["packet copies from another interface (counted once)",
                stats["duplicate_copies"]]] if stats.get("duplicate_copies") else []),
            *([["connections already in another capture (counted once)",
                stats["duplicate_connections"]]] if stats.get("duplicate_connections") else []),
        ])
        for reason in sorted(skipped):
            lines.append(f"- not decoded: {skipped[reason]} x {_cell(reason)}")
        for warning in stats.get("capture_warnings") or []:
            lines.append(f"- capture damage: {_cell(str(warning))}")
    by_source = stats.get("by_source") or {}
    if by_source:
        lines += ["", "Records by source:", ""]
        lines += _table(["source", "records"], [[k, by_source[k]] for k in sorted(by_source)])
    skipped = stats.get("skipped_files") or []
    if skipped:
        lines += ["", "Skipped input files:", ""]
        for entry in sorted(skipped, key=str):
            path, reason = (entry[0], entry[1]) if isinstance(entry, list | tuple) else (entry, "")
            lines.append(f"- `{_cell(str(path))}`" + (f": {_cell(str(reason))}" if reason else ""))
    return lines


def _findings(findings: list[Finding]) -> list[str]:
    lines = ["## Findings", ""]
    if not findings:
        return [*lines, "None."]
    rows = [[f["severity"], f["kind"], f["source"], f["destination"], f["port"], f["summary"],
             ", ".join(f"`{x}`" for x in f["evidence"][:3])] for f in findings_json(findings)]
    return lines + _table(["severity", "kind", "source", "destination", "port", "summary",
                           "evidence"], rows)


def _rule_lines(m: dict[str, Any], expl: PolicyExplanation | None) -> list[str]:
    lines: list[str] = []
    rules = m["spec"].get("rules", [])
    by_index = {r.index: r for r in expl.rules} if expl else {}
    for i, rule in enumerate(rules):
        rexpl = by_index.get(i)
        weak = " **WEAK**" if rexpl and rexpl.weak else ""
        kind = f" ({rexpl.kind})" if rexpl else ""
        lines.append(f"Rule {i + 1}{kind}{weak}:")
        lines.append("")
        froms = []
        for f in rule.get("from", []):
            src = f["source"]
            froms += [f"principal `{p}`" for p in src.get("principals", [])]
            froms += [f"IP `{ip}`" for ip in src.get("ipBlocks", [])]
        lines.append(f"- from: {', '.join(froms) if froms else 'ANY source'}")
        for t in rule.get("to", []):
            op = t["operation"]
            parts = [f"ports {', '.join(op.get('ports', []))}"]
            if op.get("methods"):
                parts.append(f"methods {', '.join(op['methods'])}")
            if op.get("paths"):
                parts.append("paths " + ", ".join(f"`{p}`" for p in op["paths"]))
            lines.append(f"- to: {'; '.join(parts)}")
        if rexpl and rexpl.edges:
            lines.append("")
            lines += _table(
                ["source", "port", "protocol", "requests", "first seen", "last seen", "mTLS",
                 "weak"],
                [[x.source, x.port, x.protocol, x.requests, x.first_seen, x.last_seen,
                  f"{x.mtls} ({x.mtls_share * 100:.1f}%)"
                  if x.mtls_share is not None else x.mtls, "yes" if x.weak else "no"]
                 for x in rexpl.edges])
        lines.append("")
    return lines


def _policies(manifests: list[dict[str, Any]],
              explanations: dict[tuple[str, str, str], PolicyExplanation]) -> list[str]:
    lines = ["## Proposed policies", ""]
    if not manifests:
        return [*lines, "None.", ""]
    for m in sorted(manifests, key=lambda m: str(policy_relpath(m))):
        meta = m["metadata"]
        key = (m["kind"], meta["namespace"], meta["name"])
        expl = explanations.get(key)
        lines.append(f"### `{policy_relpath(m).as_posix()}`")
        lines.append("")
        ann = meta.get("annotations", {})
        dry = " (dry-run)" if ann.get("istio.io/dry-run") == "true" else ""
        lines.append(f"{m['kind']} `{meta['namespace']}/{meta['name']}`{dry}: "
                     f"{expl.reason if expl else 'no explanation available'}. "
                     f"{ann.get('meshwright.io/requests', '?')} requests from "
                     f"{ann.get('meshwright.io/sources', '?')} sources, "
                     f"{ann.get('meshwright.io/first-seen', '?')} .. "
                     f"{ann.get('meshwright.io/last-seen', '?')}.")
        lines.append("")
        spec = m.get("spec", {})
        if m["kind"] == "PeerAuthentication":
            mode = spec.get("mtls", {}).get("mode", "UNSET")
            lines.append(f"- mTLS mode: {mode}")
            for port in sorted(spec.get("portLevelMtls", {}), key=int):
                lines.append(f"- port {port}: **{spec['portLevelMtls'][port]['mode']}** "
                             "(WEAK: plaintext accepted)")
            lines.append("")
        elif not spec:
            lines += ["- allows nothing: every workload in the namespace without its own "
                      "policy rejects all requests.", ""]
        else:
            lines += _rule_lines(m, expl)
        for note in (expl.notes if expl else []):
            lines.append(f"> {note}")
        if expl and expl.notes:
            lines.append("")
    return lines


def _is_istio(manifest: dict[str, Any]) -> bool:
    return str(manifest.get("apiVersion", "")).startswith("security.istio.io/")


def _other_policies(title: str, plan: Any) -> list[str]:
    """A non-Istio proposal: its notes, then each object with why it exists and its spec."""
    lines = [f"## {title}", ""]
    for note in plan.notes:
        lines.append(f"- {note}")
    if plan.notes:
        lines.append("")
    if not plan.manifests:
        return [*lines, "None.", ""]
    explanations = {(e.kind, e.namespace, e.name): e for e in plan.explanations}
    for m in sorted(plan.manifests, key=lambda m: str(policy_relpath(m))):
        meta = m["metadata"]
        expl = explanations.get((m["kind"], meta["namespace"], meta["name"]))
        ann = meta.get("annotations", {})
        lines += [f"### `{policy_relpath(m).as_posix()}`", ""]
        evidence = ""
        if "meshwright.io/requests" in ann:
            evidence = (f" {ann['meshwright.io/requests']} requests, "
                        f"{ann.get('meshwright.io/first-seen', '?')} .. "
                        f"{ann.get('meshwright.io/last-seen', '?')}.")
        lines += [f"{m['kind']} `{meta['namespace']}/{meta['name']}`: "
                  f"{expl.reason if expl else 'see its spec'}.{evidence}", ""]
        lines += ["```yaml", dump_yaml(m.get("spec", {})).rstrip("\n"), "```", ""]
        for note in (expl.notes if expl else []):
            lines.append(f"> {note}")
        if expl and expl.notes:
            lines.append("")
    return lines


def _prefix_families(manifests: list[dict[str, Any]]) -> list[list[str]]:
    rows: dict[str, set[str]] = {}
    for m in manifests:
        for rule in m.get("spec", {}).get("rules", []):
            for t in rule.get("to", []):
                for path in t["operation"].get("paths", []):
                    if path.endswith("*") or path.startswith("*") or "{" in path:
                        name = f"{m['metadata']['namespace']}/{m['metadata']['name']}"
                        rows.setdefault(path, set()).add(name)
    return [[f"`{p}`", ", ".join(sorted(rows[p]))] for p in sorted(rows)]


def _limits(graph: Graph, excluded: list[dict[str, Any]], stats: dict[str, Any],
            manifests: list[dict[str, Any]]) -> list[str]:
    lines = ["## What the evidence cannot vouch for", ""]
    lines += ["### Idle workloads", ""]
    if graph.idle_workloads:
        guarded = {m["metadata"]["namespace"] for m in manifests
                   if m.get("kind") == "AuthorizationPolicy" and not m.get("spec")}
        lines += ["No traffic was seen to these. Where their namespace gets `allow-nothing`, "
                  "they are denied everything: if they serve anything outside the window, it "
                  "will break.", ""]
        for w in sorted(graph.idle_workloads):
            ns = w.split("/", 1)[0]
            effect = ("denied everything by `allow-nothing`" if ns in guarded
                      else "no policy proposed in this namespace: left as it is")
            lines.append(f"- `{w}`: {effect}")
    else:
        lines.append("None.")
    lines.append("")

    def rare(e: Edge) -> bool:
        return e.requests < FEW_REQUESTS or (0 < e.active_minutes < FEW_MINUTES)

    edges = sorted(graph.edges, key=lambda e: (e.source, e.destination, e.port, e.protocol))
    lines += ["### Seen only a handful of times", ""]
    rows = [[e.source, e.destination, e.port, e.protocol, e.requests, e.active_minutes,
             rfc3339(e.first_seen), rfc3339(e.last_seen)] for e in edges if rare(e)]
    if rows:
        lines += [f"Fewer than {FEW_REQUESTS} requests or active in fewer than {FEW_MINUTES} "
                  "distinct minutes: may be one-offs (allowed anyway), or periodic jobs whose "
                  "other calls were not captured.", ""]
        lines += _table(["source", "destination", "port", "protocol", "requests",
                         "active minutes", "first seen", "last seen"], rows)
    else:
        lines.append("None.")
    lines.append("")
    lines += ["### Seen at a single hour of day", ""]
    rows = [[e.source, e.destination, e.port, f"{e.hours[0]:02d}:00 UTC", e.requests]
            for e in edges if len(set(e.hours)) == 1]
    if rows:
        lines += ["Possibly a batch/cron pattern: a window that misses that hour misses it.",
                  ""]
        lines += _table(["source", "destination", "port", "hour", "requests"], rows)
    else:
        lines.append("None.")
    lines.append("")
    lines += ["### Ambiguities", ""]
    lines += [f"- {_cell(a)}" for a in sorted(graph.ambiguities)] or ["None."]
    lines.append("")
    lines += ["### Left out of the policies", ""]
    if excluded:
        lines += _table(["source", "destination", "port", "reason"],
                        [[x.get("source"), x.get("destination"), x.get("port"), x.get("reason")]
                         for x in excluded])
    else:
        lines.append("Nothing.")
    lines.append("")
    lines += ["### Path families", "",
              "A path ending in `*` is a prefix family: it allows every path under that "
              "prefix, including ones never seen, because Istio cannot express 'one id "
              "segment here' without path templates (Istio >= 1.22).", ""]
    fams = _prefix_families(manifests)
    lines += (_table(["family", "policies"], fams) if fams else ["None."]) + [""]
    samples = stats.get("malformed_samples") or []
    lines += ["### Malformed input lines", ""]
    if samples:
        lines += [f"{stats.get('malformed', len(samples))} malformed lines; samples:", ""]
        lines += [f"- `{_cell(s)}`" for s in samples]
    else:
        lines.append("None.")
    lines.append("")
    return lines


def _opt(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def _dedupe(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (str(r.get("destination")), str(r.get("source")), str(r.get("port")),
               str(r.get("reason")))
        seen.setdefault(key, r)
    return [seen[k] for k in sorted(seen)]


def excluded_items(
    graph: Graph,
    *,
    plaintext: str = "allow",
    system_namespaces: frozenset[str] = DEFAULT_SYSTEM_NAMESPACES,
) -> list[dict[str, Any]]:
    """Traffic the Istio proposal leaves out (source, destination, port, reason)."""
    return plan_istio(graph, plaintext="deny" if plaintext == "deny" else "allow",
                      system_namespaces=system_namespaces).excluded


def render_report(
    graph: Graph,
    findings: list[Finding],
    manifests: list[dict[str, Any]],
    *,
    stats: dict[str, Any],
    excluded: list[dict[str, Any]],
    options: dict[str, Any],
    plan: IstioPlan | None = None,
    others: Sequence[tuple[str, Any]] = (),
    istio: bool = True,
) -> str:
    """The Markdown report. ``plan`` is the :func:`emit.istio.plan_istio` result behind
    ``manifests``; without it the plan is recomputed from ``options`` (``plaintext``,
    ``dry_run``, ``system_namespaces``, as given to :func:`emit.istio.istio_manifests`).
    ``others``: (title, plan) of the other meshes' proposals (Linkerd, NetworkPolicy), each
    with ``manifests``, ``explanations``, ``excluded`` and ``notes``; ``istio`` False: no
    Istio proposal was asked for."""
    if not istio:
        plan = IstioPlan(manifests=[], explanations=[], excluded=[])
    elif plan is None:
        plan = plan_istio(
            graph,
            plaintext="deny" if options.get("plaintext") == "deny" else "allow",
            dry_run=bool(options.get("dry_run", False)),
            system_namespaces=frozenset(options.get("system_namespaces",
                                                    DEFAULT_SYSTEM_NAMESPACES)),
        )
    explanations = {(e.kind, e.namespace, e.name): e for e in plan.explanations}
    lines = ["# meshwright policy proposal", ""]
    if options:
        shown = [f"`{k}={_cell(_opt(options[k]))}`" for k in sorted(options)]
        lines += ["Options: " + ", ".join(shown), ""]
    lines += _summary(graph, findings, manifests, stats)
    lines += ["", "## Communication graph", "",
              "Dashed red edges carried plaintext (all or part of their requests).", ""]
    lines += mermaid(graph)
    lines.append("")
    lines += _findings(findings)
    lines.append("")
    istio_manifests_ = [m for m in manifests if _is_istio(m)]
    if istio:
        lines += _policies(istio_manifests_, explanations)
    other_excluded: list[dict[str, Any]] = []
    for title, other in others:
        lines += _other_policies(title, other)
        other_excluded += other.excluded
    lines += _limits(graph, _dedupe([*excluded, *plan.excluded, *other_excluded]), stats,
                     istio_manifests_)
    return "\n".join(lines).rstrip("\n") + "\n"
