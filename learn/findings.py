"""Findings: rules over the learned graph, rules against a baseline, and learned anomalies.

Each rule is deterministic and names its evidence; ids are stable
(``<kind>:<source>-><destination>:<port>``; ``scan:<source>``; ``permissive:<dst>:<port>``;
``new-edge:...#operations`` for new operations on an old edge) so the same input yields the
same findings and a pull request only shows real changes.

:func:`find` needs only the graph. :func:`find_all` adds, given the new records and a
:class:`~learn.baseline.Baseline`, ``mtls-downgrade``, ``new-edge``, ``scan``,
``exfiltration``, new ``external-egress`` and learned ``anomaly`` findings, then
deduplicates and ranks (:func:`rank`). :func:`exclusions` / :func:`apply_exclusions` say
which traffic the proposals must leave out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from learn.baseline import Baseline, window_start
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


# --- findings against a baseline ---------------------------------------------------------


@dataclass(eq=True)
class Flag(Finding):
    """A finding with a ranking score and the edges whose traffic is behind it."""

    score: float = 0.0
    """Ranks findings of the same severity (higher first); not comparable across kinds."""
    edges: list[tuple[str, str, int]] = field(default_factory=list)
    """(source, destination, port) of the traffic behind it: what proposals leave out."""
    details: dict[str, Any] = field(default_factory=dict)
    """Numbers behind the summary (JSON-ready), e.g. for SARIF result properties."""


#: Finding kinds whose traffic is left out of the proposed policies when high severity.
EXCLUDING_KINDS = ("scan", "exfiltration", "mtls-downgrade", "new-edge")
#: Destination names and namespaces that hold data or credentials: a new edge to them is high.
SENSITIVE_HINTS = ("postgres", "mysql", "mariadb", "redis", "mongo", "elastic", "cassandra",
                   "etcd", "vault", "secret", "payment", "billing", "auth", "db")
SENSITIVE_NAMESPACES = frozenset({"kube-system", "istio-system", "vault", "data", "database"})
SENSITIVE_PORTS = frozenset({22, 2379, 3306, 5432, 6379, 6443, 8200, 9042, 9200, 10250, 27017})


def is_sensitive(node: str, port: int) -> bool:
    """Whether a destination holds data or credentials (by port, namespace or name)."""
    if node.startswith((f"{EXTERNAL}:", f"{UNKNOWN}:")):
        return False
    ns, _, name = node.partition("/")
    name = name.lower()
    return (port in SENSITIVE_PORTS or ns in SENSITIVE_NAMESPACES
            or any(h == name or name.startswith(h + "-") or name.endswith("-" + h)
                   or (len(h) > 3 and h in name) for h in SENSITIVE_HINTS))


@dataclass(frozen=True)
class Thresholds:
    """When baseline rules fire (defaults measured on benchmarks/scenario.py)."""

    scan_min_targets: int = 12
    """Distinct (destination, port) pairs a source must reach in one scan window..."""
    scan_factor: float = 3.0
    """...and this many times its baseline peak..."""
    scan_min_failures: int = 5
    """...with at least this many failed, refused, reset or rejected attempts."""
    exfil_factor: float = 10.0
    """Upload to one destination in a window: this many times the baseline peak..."""
    exfil_min_bytes: int = 100_000_000
    """...and at least this much to a destination inside the cluster..."""
    exfil_min_bytes_external: int = 20_000_000
    """...or this much to one outside it (external destinations weigh more)."""
    exfil_factor_external: float = 5.0
    downgrade_min_mtls_share: float = 0.95
    """An edge counts as mTLS in the baseline above this share of its requests."""


def _origins(frame: pd.DataFrame, n: int = 3) -> list[str]:
    return [o for o in frame["origin"].iloc[:n].tolist() if o]


def _hhmm(t: pd.Timestamp) -> str:
    return f"{t.strftime('%Y-%m-%d %H:%M')} UTC"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def find_downgrades(new: pd.DataFrame, baseline: Baseline,
                    thresholds: Thresholds = Thresholds()) -> list[Finding]:
    """``mtls-downgrade``: edges that were mTLS in the baseline and now carry plaintext."""
    out: list[Finding] = []
    plain = new[(new["mtls"] == "plaintext") & ~new["failed"]]
    if plain.empty:
        return out
    totals = new.groupby(["src", "dst", "port"]).size()
    for (src, dst, port), rows in plain.groupby(["src", "dst", "port"], sort=True):
        key = (str(src), str(dst), int(port))
        base = baseline.edges.get(key)
        if base is None or base.requests == 0:
            continue
        share = base.mtls / base.requests
        if share < thresholds.downgrade_min_mtls_share:
            continue
        total = int(totals[(src, dst, port)])
        out.append(Flag(
            id=f"mtls-downgrade:{src}->{dst}:{port}", kind="mtls-downgrade", severity="high",
            source=key[0], destination=key[1], port=key[2],
            summary=(f"{src} -> {dst}:{port} was mTLS for {100 * share:.0f}% of its "
                     f"{base.requests:,} baseline requests; now {len(rows):,} of {total:,} "
                     f"requests ({100 * len(rows) / total:.1f}%) arrived in plaintext, first at "
                     f"{_hhmm(rows['time'].iloc[0])} (a client without its sidecar, or mTLS "
                     "turned off)."),
            evidence=_origins(rows), score=float(len(rows)), edges=[key],
            details={"plaintext_requests": len(rows), "requests": total,
                     "baseline_mtls_share": round(share, 3)},
        ))
    return out


def find_new_edges(new: pd.DataFrame, baseline: Baseline,
                   sensitive: Callable[[str, int], bool] = is_sensitive) -> list[Finding]:
    """``new-edge``: a source->destination:port the baseline never saw (high to a sensitive
    destination, else medium), and new operation families on an old edge (low)."""
    out: list[Finding] = []
    ok = new[~new["failed"] & ~new["denied"]]
    for (src, dst, port), rows in ok.groupby(["src", "dst", "port"], sort=True):
        key = (str(src), str(dst), int(port))
        if key[0].startswith((f"{UNKNOWN}:", f"{EXTERNAL}:")) or key[1].startswith(
                (f"{EXTERNAL}:", f"{UNKNOWN}:")):
            continue  # unknown-source and external-egress speak for these
        base = baseline.edges.get(key)
        if base is None:
            high = sensitive(key[1], key[2])
            out.append(Flag(
                id=f"new-edge:{src}->{dst}:{port}", kind="new-edge",
                severity="high" if high else "medium", source=key[0], destination=key[1],
                port=key[2],
                summary=(f"{src} reached {dst}:{port} {len(rows):,} times from "
                         f"{_hhmm(rows['time'].iloc[0])}; the baseline never saw this edge"
                         + (f", and {dst}:{port} holds data or credentials." if high
                            else ".")),
                evidence=_origins(rows), score=float(len(rows)), edges=[key],
                details={"requests": len(rows), "sensitive": high},
            ))
            continue
        ops = sorted(set(rows["op"].unique()) - base.ops - {"-"})
        if ops:
            fresh = rows[rows["op"].isin(ops)]
            out.append(Flag(
                id=f"new-edge:{src}->{dst}:{port}#operations", kind="new-edge", severity="low",
                source=key[0], destination=key[1], port=key[2],
                summary=(f"{src} -> {dst}:{port} used {len(ops)} method/path famil"
                         f"{'y' if len(ops) == 1 else 'ies'} the baseline never saw "
                         f"({', '.join(ops[:5])}{', ...' if len(ops) > 5 else ''}) in "
                         f"{len(fresh):,} requests."),
                evidence=_origins(fresh), score=float(len(fresh)), edges=[],
                details={"operations": ops[:20], "requests": len(fresh)},
            ))
    return out


def find_scans(new: pd.DataFrame, baseline: Baseline,
               thresholds: Thresholds = Thresholds()) -> list[Finding]:
    """``scan``: a source reaching many distinct destinations/ports in one window, far above
    its baseline peak, with failed, refused, reset or rejected attempts."""
    out: list[Finding] = []
    if new.empty:
        return out
    f = new.assign(w=window_start(new["time"], baseline.scan_window),
                   target=np.where(new["dst"].str.startswith(f"{UNKNOWN}:"), new["dst_ip"],
                                   new["dst"]))
    g = f.groupby(["src", "w"], sort=True)
    stats = g.agg(fails=("error", "sum")).join(
        f.drop_duplicates(["src", "w", "target", "port"]).groupby(["src", "w"]).size()
        .rename("targets"))
    minutes = int(baseline.scan_window.total_seconds() // 60)
    for src, rows in stats.reset_index().groupby("src", sort=True):
        peak = baseline.source_peak_targets.get(str(src), 0)
        need = max(thresholds.scan_min_targets, int(thresholds.scan_factor * peak) + 1)
        hits = rows[(rows["targets"] >= need) & (rows["fails"] >= thresholds.scan_min_failures)]
        if hits.empty:
            continue
        windows = set(hits["w"])
        mine = f[f["src"] == src]
        inside = mine["w"].isin(windows)
        recs = mine[inside]
        failed = recs[recs["error"]]
        # The scan's edges: new ones whose traffic is mostly the scan (a legitimate new edge
        # the scanner happened to touch keeps its own traffic outside the scan windows).
        share = inside.groupby([mine["dst"], mine["port"]]).mean()
        edges = sorted({(str(src), str(d), int(p)) for (d, p), v in share.items()
                        if v >= 0.5 and (str(src), str(d), int(p)) not in baseline.edges})
        best = hits.sort_values(["targets", "w"], ascending=[False, True]).iloc[0]
        ports = sorted({int(p) for p in recs["port"]})
        out.append(Flag(
            id=f"scan:{src}", kind="scan", severity="high", source=str(src), destination=None,
            port=None,
            summary=(f"{src} reached {int(best['targets'])} distinct destination/port pairs in "
                     f"{minutes} min from {_hhmm(best['w'])} ({len(failed):,} attempts failed, "
                     f"were refused, reset or rejected; ports "
                     f"{', '.join(map(str, ports[:12]))}{', ...' if len(ports) > 12 else ''}); "
                     f"its baseline peak is {peak} in {minutes} min."),
            evidence=_origins(failed if not failed.empty else recs),
            score=float(hits["targets"].max()), edges=edges,
            details={"targets": int(best["targets"]), "failed": len(failed),
                     "baseline_peak_targets": peak, "windows": len(windows),
                     "from": min(windows).isoformat(),
                     "until": (max(windows) + pd.Timedelta(baseline.scan_window)).isoformat()},
        ))
    return out


def find_exfiltration(new: pd.DataFrame, baseline: Baseline,
                      thresholds: Thresholds = Thresholds()) -> list[Finding]:
    """``exfiltration``: upload from a source to one destination in one window far above
    that source's baseline (external destinations at lower thresholds)."""
    out: list[Finding] = []
    if new.empty:
        return out
    f = new.assign(w=window_start(new["time"], baseline.window))
    per = f.groupby(["src", "dst", "port", "w"], sort=True)["up"].sum().reset_index()
    minutes = int(baseline.window.total_seconds() // 60)
    hours = baseline.hours
    for (src, dst, port), rows in per.groupby(["src", "dst", "port"], sort=True):
        external = str(dst).startswith(f"{EXTERNAL}:")
        known_ref = baseline.peak_up.get((str(src), str(dst)))
        known = known_ref is not None
        ref = known_ref if known_ref is not None else baseline.source_peak_up.get(str(src), 0)
        factor = thresholds.exfil_factor_external if external else thresholds.exfil_factor
        floor = (thresholds.exfil_min_bytes_external if external
                 else thresholds.exfil_min_bytes)
        need = max(factor * ref, floor)
        hits = rows[rows["up"] >= need]
        if hits.empty:
            continue
        key = (str(src), str(dst), int(port))
        best = hits.sort_values(["up", "w"], ascending=[False, True]).iloc[0]
        total = int(rows["up"].sum())
        base_total = sum(e.up_bytes for k, e in baseline.edges.items()
                         if k[0] == key[0] and k[1] == key[1])
        recs = f[(f["src"] == src) & (f["dst"] == dst) & (f["port"] == port)
                 & f["w"].isin(set(hits["w"]))]
        out.append(Flag(
            id=f"exfiltration:{src}->{dst}:{port}", kind="exfiltration", severity="high",
            source=key[0], destination=key[1], port=key[2],
            summary=(f"{src} sent {_mb(float(best['up']))} to {dst}:{port} in {minutes} min "
                     f"from {_hhmm(best['w'])} ({_mb(total)} in all); "
                     + (f"its baseline to this destination is {_mb(base_total / hours)}/h "
                        f"(peak {_mb(ref)} per {minutes} min)" if known else
                        f"the baseline never saw it send there, and its largest upload to any "
                        f"one destination was {_mb(ref)} per {minutes} min")
                     + ("; the destination is outside the cluster." if external else ".")),
            evidence=_origins(recs.sort_values("up", ascending=False, kind="stable")),
            score=float(best["up"]) / max(float(need), 1.0) * (2.0 if external else 1.0),
            edges=[key],
            details={"bytes_window": int(best["up"]), "bytes_total": total,
                     "baseline_peak_window": int(ref), "external": external},
        ))
    return out


def _anomaly_findings(new: pd.DataFrame, baseline: Baseline, **kwargs: Any) -> list[Finding]:
    from learn.anomaly import detect_anomalies  # sklearn loads only when asked for

    return [Flag(
        id=f"anomaly:{a.source}->{a.destination}:{a.port}", kind="anomaly", severity="medium",
        source=a.source, destination=a.destination, port=a.port,
        summary=f"Unusual traffic: {a.explanation}", evidence=a.evidence, score=a.score,
        edges=[], details={"deviations": a.deviations, "window_start": _hhmm(a.start),
                           "model_score": round(a.score, 4)},
    ) for a in detect_anomalies(new, baseline, **kwargs)]


def find_against_baseline(graph: Graph, new: pd.DataFrame, baseline: Baseline, *,
                          thresholds: Thresholds = Thresholds(),
                          sensitive: Callable[[str, int], bool] = is_sensitive,
                          anomalies: bool = True, method: str = "lof",
                          contamination: float | str = "auto",
                          random_state: int | None = 0) -> list[Finding]:
    """Findings of ``new`` (prepared records, :func:`learn.baseline.prepare`) against
    ``baseline``: downgrades, new edges, scans, exfiltration, new external destinations
    (``external-egress`` of ``graph`` raised to medium) and, with ``anomalies``, the learned
    model's outlier windows. Not ranked: see :func:`find_all`."""
    out: list[Finding] = [
        *find_downgrades(new, baseline, thresholds),
        *find_new_edges(new, baseline, sensitive),
        *find_scans(new, baseline, thresholds),
        *find_exfiltration(new, baseline, thresholds),
    ]
    seen = baseline.destinations
    for edge in graph.edges:
        if edge.destination.startswith(f"{EXTERNAL}:") and edge.destination not in seen:
            mask = (new["src"] == edge.source) & (new["dst"] == edge.destination)
            rows = new[mask & (new["port"] == edge.port)]
            if rows.empty:
                continue
            out.append(Flag(
                id=_fid("external-egress", edge), kind="external-egress", severity="medium",
                source=edge.source, destination=edge.destination, port=edge.port,
                summary=(f"{edge.source} reached a new external destination "
                         f"{edge.destination[len(EXTERNAL) + 1:]}:{edge.port} {len(rows):,} "
                         f"times from {_hhmm(rows['time'].iloc[0])} (sent "
                         f"{_mb(float(rows['up'].sum()))}); the baseline never saw it."),
                evidence=_origins(rows), score=float(len(rows)), edges=[],
                details={"requests": len(rows), "bytes_up": int(rows["up"].sum())},
            ))
    if anomalies:
        # A scanning source's other edges look odd while it scans: the scan speaks for them.
        quiet = [(str(f.source), pd.Timestamp(f.details["from"]), pd.Timestamp(f.details["until"]))
                 for f in out if f.kind == "scan" and isinstance(f, Flag)]
        out += _anomaly_findings(new, baseline, method=method, contamination=contamination,
                                 random_state=random_state, quiet=quiet)
    return out


def _severity(f: Finding) -> int:
    return SEVERITY_ORDER.get(f.severity, len(SEVERITY_ORDER))


def rank(findings: Iterable[Finding]) -> list[Finding]:
    """Deduplicated and ranked: one finding per id (the more severe, then higher-scored one;
    evidence merged), new edges and anomalies a scan already covers folded into the scan,
    then sorted by
    severity, score (high first) and id."""
    by_id: dict[str, Finding] = {}
    for f in findings:
        old = by_id.get(f.id)
        if old is None:
            by_id[f.id] = f
            continue
        keep, other = (f, old) if (_severity(f), -_score(f)) < (_severity(old),
                                                                 -_score(old)) else (old, f)
        merged = list(dict.fromkeys([*keep.evidence, *other.evidence]))[:5]
        by_id[f.id] = replace(keep, evidence=merged)
    scanned = {e for f in by_id.values() if f.kind == "scan" and isinstance(f, Flag)
               for e in f.edges}
    kept = [f for f in by_id.values()
            if not (f.kind in ("new-edge", "anomaly")
                    and (f.source, f.destination, f.port) in scanned)]
    return sorted(kept, key=lambda f: (_severity(f), -_score(f), f.id))


def _score(f: Finding) -> float:
    return f.score if isinstance(f, Flag) else 0.0


def find_all(graph: Graph, new: pd.DataFrame | None = None, baseline: Baseline | None = None,
             **kwargs: Any) -> list[Finding]:
    """Every finding, deduplicated and ranked: the graph's rule findings (:func:`find`)
    and, given the new records and a baseline, :func:`find_against_baseline` (``kwargs``
    go there: ``thresholds``, ``sensitive``, ``anomalies``, ``method``, ``contamination``,
    ``random_state``). A new external destination replaces the graph's low
    ``external-egress`` finding with the same id."""
    findings = find(graph)
    if new is not None and baseline is not None:
        extra = find_against_baseline(graph, new, baseline, **kwargs)
        upgraded = {f.id for f in extra if f.kind == "external-egress"}
        findings = [f for f in findings if f.id not in upgraded] + extra
    return rank(findings)


def exclusions(findings: Iterable[Finding]) -> set[tuple[str, str, int]]:
    """(source, destination, port) of traffic the proposals must leave out: the edges
    behind high-severity scan, exfiltration, mtls-downgrade and new-edge findings.

    For ``mtls-downgrade`` the edge stands for its *plaintext* part only: see
    :func:`apply_exclusions`, which keeps the edge's mTLS traffic.
    """
    out: set[tuple[str, str, int]] = set()
    for f in findings:
        if f.severity != "high" or f.kind not in EXCLUDING_KINDS:
            continue
        if isinstance(f, Flag) and f.edges:
            out.update(f.edges)
        elif f.source is not None and f.destination is not None and f.port is not None:
            out.add((f.source, f.destination, f.port))
    return out


@dataclass(frozen=True)
class Excluded:
    """One edge (or its plaintext part) left out of the proposals, and why."""

    source: str
    destination: str
    port: int
    finding: str
    """Id of the finding behind it."""
    what: str
    """``edge`` (all of its traffic) or ``plaintext`` (only its unencrypted requests)."""
    requests: int


def apply_exclusions(graph: Graph, findings: Iterable[Finding]) -> tuple[Graph, list[Excluded]]:
    """A copy of ``graph`` without the traffic behind high-severity findings
    (:func:`exclusions`), and the list of what was left out (for the report).

    Scan, exfiltration and new-edge traffic removes the edge; an mTLS downgrade removes only
    the edge's plaintext requests and addresses, so the proposal keeps its mTLS clients and
    does not open a plaintext exception for the downgraded one.
    """
    findings = list(findings)
    why: dict[tuple[str, str, int], tuple[str, str]] = {}
    for f in findings:
        for key in exclusions([f]):
            what = "plaintext" if f.kind == "mtls-downgrade" else "edge"
            if key not in why or (why[key][1] == "plaintext" and what == "edge"):
                why[key] = (f.id, what)
    edges: list[Edge] = []
    left: list[Excluded] = []
    for e in graph.edges:
        key = (e.source, e.destination, e.port)
        if key not in why:
            edges.append(e)
            continue
        fid, what = why[key]
        if what == "edge":
            left.append(Excluded(*key, fid, "edge", e.requests))
            continue
        left.append(Excluded(*key, fid, "plaintext", e.plaintext_requests))
        edges.append(replace(e, requests=e.requests - e.plaintext_requests,
                             plaintext_requests=0, source_ips=[]))
    return replace(graph, edges=edges), sorted(left, key=lambda x: (x.source, x.destination,
                                                                     x.port))
