"""Streaming aggregation of resolved flow records into the communication graph.

One edge per (source identity, destination workload, workload port, protocol). Batches are
aggregated with pandas as they arrive and merged into per-edge accumulators, so memory grows
with the number of edges and distinct path families, not with the number of flows.

Both sides of a meshed request log it: the client's sidecar (outbound) and the server's
(inbound). Counting both would double every request, so an outbound record is counted only
when the server pod it reached wrote no inbound records in this dump (``inbound_reporters``);
the server's view is preferred because only it can tell whether the request arrived over mTLS.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from learn.model import EXTERNAL, INTERNET, UNKNOWN, Edge, Graph, Node, Operation
from observe.schema import FAILED_STATES, KIND_CONNECTION

#: Per-edge cap on remembered client addresses; beyond it the edge is flagged as truncated.
MAX_SOURCE_IPS = 1024
#: Evidence samples (file:line) kept per edge.
EVIDENCE_SAMPLES = 3

EdgeKey = tuple[str, str, int, str]
_EPOCH = pd.Timestamp(0, tz="UTC")
#: Sorts records without a time after every timed one (evidence samples).
_LAST = datetime.max.replace(tzinfo=UTC)
_KEYS = ("src_workload", "dst_workload", "dst_port", "protocol")
#: Host names remembered per edge.
MAX_HOSTS = 16

_COLUMNS = [
    "time", "src_ip", "dst_port", "direction", "reporter", "src_workload", "dst_workload",
    "protocol", "method", "path", "authority", "service_host", "status", "bytes_in",
    "bytes_out", "mtls", "denied", "origin", "kind", "tcp_state", "itemized",
]


@dataclass
class _EdgeAcc:
    """Mutable per-edge totals while batches stream in."""

    requests: int = 0
    """Records that are requests (proxy log lines, requests seen in packets)."""
    connections: int = 0
    """Records that are connections (packet evidence)."""
    bytes: int = 0
    mtls: Counter[str] = field(default_factory=Counter)
    conn_mtls: Counter[str] = field(default_factory=Counter)
    not_itemized: int = 0
    """Connections whose requests may not all have records."""
    denied: int = 0
    operations: Counter[tuple[str, str]] = field(default_factory=Counter)
    classes: Counter[str] = field(default_factory=Counter)
    first: datetime | None = None
    last: datetime | None = None
    hours: set[int] = field(default_factory=set)
    minutes: set[int] = field(default_factory=set)
    source_ips: set[str] = field(default_factory=set)
    source_ips_truncated: bool = False
    hosts: set[str] = field(default_factory=set)
    evidence: list[tuple[datetime, str]] = field(default_factory=list)


def _status_class(status: pd.Series) -> pd.Series:
    cls = (status.fillna(0).astype("int64") // 100).astype(str) + "xx"
    return cls.where(status.fillna(0) > 0, "0")


class GraphBuilder:
    """Accumulates resolved flow batches (see ``learn.identity.IdentityResolver.resolve``)."""

    def __init__(
        self,
        *,
        inbound_reporters: Iterable[str] = (),
        path_family: Callable[[str, str], str] | None = None,
        families: Callable[[Mapping[str, int], str], dict[str, str]] | None = None,
    ) -> None:
        self.inbound_reporters = frozenset(inbound_reporters)
        self._path_family = path_family or (lambda path, protocol: path)
        self._families = families
        self._family_cache: dict[tuple[str, str], str] = {}
        self._edges: dict[EdgeKey, _EdgeAcc] = {}
        self.records_seen = 0
        self.records_counted = 0
        #: Outbound records skipped because the server's own inbound record counts the request.
        self.records_mirrored = 0
        #: Records with no destination identity at all (not even unknown:<ip>).
        self.records_unattributed = 0
        #: Connection attempts that never carried traffic (refused, no answer): evidence for
        #: findings, never traffic to allow.
        self.records_failed = 0
        #: Connections between two loopback addresses (packets on lo, eBPF): both ends in one
        #: network namespace (one pod, or the node), so no mesh or NetworkPolicy rule applies.
        self.records_local = 0

    # -- streaming -------------------------------------------------------------------------
    def add(self, batch: pa.RecordBatch | pa.Table) -> None:
        self.records_seen += batch.num_rows
        if batch.num_rows == 0:
            return
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        keep = self._counted_mask(table)
        self.records_mirrored += int(table.num_rows - pc.sum(keep).as_py())
        table = table.filter(keep)
        if "tcp_state" in table.column_names:
            failed = pc.fill_null(pc.is_in(table["tcp_state"], pa.array(FAILED_STATES)), False)
            self.records_failed += int(pc.sum(failed).as_py() or 0)
            table = table.filter(pc.invert(failed))
        if "kind" in table.column_names:
            local = pc.fill_null(pc.and_(pc.equal(table["kind"], KIND_CONNECTION), pc.and_(
                _loopback(table["src_ip"]), _loopback(table["dst_ip"]))), False)
            self.records_local += int(pc.sum(local).as_py() or 0)
            table = table.filter(pc.invert(local))
        cols = [c for c in _COLUMNS if c in table.column_names]
        frame = table.select(cols).to_pandas()
        if "kind" not in frame:
            frame = frame.assign(kind=None, itemized=None)
        unattributed = frame["dst_workload"].isna() | (frame["dst_port"].isna())
        self.records_unattributed += int(unattributed.sum())
        frame = frame[~unattributed]
        if frame.empty:
            return
        self.records_counted += len(frame)
        frame = frame.assign(
            src_workload=frame["src_workload"].fillna(
                "unknown:" + frame["src_ip"].fillna("?").astype(str)
            ),
            dst_port=frame["dst_port"].astype("int64"),
            protocol=frame["protocol"].fillna("tcp"),
            bytes=frame["bytes_in"].fillna(0).astype("int64")
            + frame["bytes_out"].fillna(0).astype("int64"),
            mtls=frame["mtls"].fillna("unknown"),
            denied=frame["denied"].fillna(False).astype(bool),
            status_class=_status_class(frame["status"]),
            is_conn=(frame["kind"] == KIND_CONNECTION),
            not_itemized=frame["itemized"].astype(object).eq(False),
            hour=frame["time"].dt.hour,
            minute=(frame["time"].fillna(_EPOCH).astype("int64") // 60_000_000),
        )
        self._aggregate(frame)

    def _acc(self, key: tuple[object, ...]) -> _EdgeAcc:
        edge_key = (str(key[0]), str(key[1]), int(key[2]), str(key[3]))  # type: ignore[call-overload]
        acc = self._edges.get(edge_key)
        if acc is None:
            acc = self._edges[edge_key] = _EdgeAcc()
        return acc

    def _aggregate(self, frame: pd.DataFrame) -> None:
        """Fold one batch into the accumulators: one grouped pass per statistic, so the
        Python work scales with distinct (edge, value) pairs, not with records."""
        keys = list(_KEYS)
        # One integer per edge of this batch: later groupings key on it, and Python loops
        # walk plain numpy arrays instead of pandas rows.
        edge = frame.groupby(keys, sort=False).ngroup().to_numpy()
        frame = frame.assign(_edge=edge)
        firsts = frame.drop_duplicates("_edge")
        accs: dict[int, _EdgeAcc] = {
            int(code): self._acc(tuple(key))
            for code, *key in zip(firsts["_edge"].to_numpy(),
                                  *(firsts[k].to_numpy(dtype=object) for k in keys),
                                  strict=True)
        }
        totals = frame.assign(is_req=~frame["is_conn"]).groupby("_edge", sort=False).agg(
            requests=("is_req", "sum"), connections=("is_conn", "sum"),
            not_itemized=("not_itemized", "sum"), bytes=("bytes", "sum"),
            denied=("denied", "sum"), first=("time", "min"), last=("time", "max"),
        )
        for code, row in zip(totals.index, totals.itertuples(index=False), strict=True):
            acc = accs[int(code)]
            acc.requests += int(row.requests)
            acc.connections += int(row.connections)
            acc.not_itemized += int(row.not_itemized)
            acc.bytes += int(row.bytes)
            acc.denied += int(row.denied)
            if pd.isna(row.first):
                continue  # no record of this edge carried a time
            first, last = row.first.to_pydatetime(), row.last.to_pydatetime()
            acc.first = first if acc.first is None else min(acc.first, first)
            acc.last = last if acc.last is None else max(acc.last, last)
        conns, reqs = frame[frame["is_conn"]], frame[~frame["is_conn"]]
        for part, column, target in ((reqs, "mtls", "mtls"), (conns, "mtls", "conn_mtls"),
                                     (reqs, "status_class", "classes")):
            counts = part.groupby(["_edge", column], sort=False).size()
            for (code, value), count in counts.items():
                getattr(accs[int(code)], target)[str(value)] += int(count)
        timed = frame[frame["time"].notna()]
        for column, target in (("hour", "hours"), ("minute", "minutes")):
            pairs = timed[["_edge", column]].drop_duplicates()
            for code, value in zip(pairs["_edge"].to_numpy(), pairs[column].to_numpy(),
                                   strict=True):
                getattr(accs[int(code)], target).add(int(value))
        self._aggregate_operations(frame, accs)
        weak = frame[(frame["mtls"] != "mtls") & frame["src_ip"].notna()]
        pairs = weak[["_edge", "src_ip"]].drop_duplicates()
        for code, ip in zip(pairs["_edge"].to_numpy(), pairs["src_ip"].to_numpy(dtype=object),
                            strict=True):
            acc = accs[int(code)]
            if len(acc.source_ips) >= MAX_SOURCE_IPS and ip not in acc.source_ips:
                acc.source_ips_truncated = True
            else:
                acc.source_ips.add(str(ip))
        for column in ("authority", "service_host"):
            pairs = frame[frame[column].notna()][["_edge", column]].drop_duplicates()
            for code, host in zip(pairs["_edge"].to_numpy(),
                                  pairs[column].to_numpy(dtype=object), strict=True):
                acc = accs[int(code)]
                if len(acc.hosts) < MAX_HOSTS:
                    acc.hosts.add(str(host))
        samples = frame.sort_values(["time", "origin"]).groupby("_edge", sort=False).head(
            EVIDENCE_SAMPLES)
        for code, t, origin in zip(samples["_edge"].to_numpy(), samples["time"],
                                   samples["origin"].to_numpy(dtype=object), strict=True):
            acc = accs[int(code)]
            when = _LAST if pd.isna(t) else t.to_pydatetime()
            acc.evidence = heapq.nsmallest(EVIDENCE_SAMPLES, [*acc.evidence, (when, str(origin))])

    def _aggregate_operations(self, frame: pd.DataFrame, accs: dict[int, _EdgeAcc]) -> None:
        http = frame[frame["protocol"].isin(("http", "grpc")) & ~frame["denied"]
                     & ~frame["is_conn"]]
        if http.empty:
            return
        paths = http["path"].fillna("/")
        family = pd.Series("", index=http.index, dtype=object)
        for protocol in http["protocol"].unique():
            mask = http["protocol"] == protocol
            some = paths[mask]
            mapping = {p: self._family(str(p), str(protocol)) for p in some.unique()}
            family[mask] = some.map(mapping)
        http = http.assign(method=http["method"].fillna("-"), family=family)
        counts = http.groupby(["_edge", "method", "family"], sort=False).size()
        for (code, method, fam), count in counts.items():
            accs[int(code)].operations[(str(method), str(fam))] += int(count)

    def _counted_mask(self, table: pa.Table) -> pa.ChunkedArray:
        if "dst_pod" not in table.column_names or not self.inbound_reporters:
            return pa.chunked_array([pa.array([True] * table.num_rows)])
        outbound = pc.equal(table["direction"], "outbound")
        mirrored = pc.and_(
            outbound, pc.is_in(table["dst_pod"], value_set=pa.array(sorted(self.inbound_reporters)))
        )
        return pc.invert(pc.fill_null(mirrored, False))

    def _family(self, path: str, protocol: str) -> str:
        key = (path, protocol)
        fam = self._family_cache.get(key)
        if fam is None:
            fam = self._path_family(path, protocol)
            if len(self._family_cache) < 200_000:
                self._family_cache[key] = fam
        return fam

    # -- result ----------------------------------------------------------------------------
    def build(self, nodes: Callable[[str], Node], *, idle: Iterable[str] = (),
              ambiguities: Iterable[str] = (), trust_domain: str = "cluster.local") -> Graph:
        """The graph; ``nodes(id)`` describes each endpoint (``IdentityResolver.node``)."""
        graph = Graph(trust_domain=trust_domain)
        for (src, dst, port, protocol), acc in sorted(self._collapse_public_clients(nodes).items()):
            graph.edges.append(self._edge(src, dst, port, protocol, acc))
            for node_id in (src, dst):
                if node_id not in graph.nodes:
                    graph.nodes[node_id] = (
                        Node(id=INTERNET, kind=EXTERNAL) if node_id == INTERNET else nodes(node_id)
                    )
        for edge in graph.edges:
            for node_id, ips in ((edge.source, edge.source_ips),):
                node = graph.nodes[node_id]
                if node.kind in (EXTERNAL, UNKNOWN) or node.meshed is False:
                    node.ips = sorted(set(node.ips) | set(ips))
        firsts = [e.first_seen for e in graph.edges if e.first_seen]
        lasts = [e.last_seen for e in graph.edges if e.last_seen]
        graph.first_seen = min(firsts) if firsts else None
        graph.last_seen = max(lasts) if lasts else None
        receiving = {e.destination for e in graph.edges if e.requests > e.denied_requests}
        graph.idle_workloads = sorted(set(idle) - receiving)
        graph.ambiguities = sorted(set(ambiguities))
        graph.namespaces = sorted(
            {n.namespace for n in graph.nodes.values() if n.namespace}
        )
        return graph

    def _collapse_public_clients(self, nodes: Callable[[str], Node]) -> dict[EdgeKey, _EdgeAcc]:
        """Public clients of an ingress gateway become one ``external:internet`` source.

        An internet-facing listener cannot be pinned to the client addresses of one window,
        and one node per address would drown the graph; the addresses stay in ``source_ips``.
        """
        gateways = {dst for (_, dst, _, _) in self._edges if nodes(dst).ingress_gateway}
        merged: dict[EdgeKey, _EdgeAcc] = {}
        for (src, dst, port, protocol), acc in self._edges.items():
            if dst in gateways and src.startswith(f"{EXTERNAL}:"):
                key = (INTERNET, dst, port, protocol)
                merged[key] = _merge_acc(merged[key], acc) if key in merged else acc
            else:
                merged[(src, dst, port, protocol)] = acc
        return merged

    def _edge(self, src: str, dst: str, port: int, protocol: str, acc: _EdgeAcc) -> Edge:
        operations = acc.operations
        if self._families is not None and operations:
            # Second pass over the families of this edge: collapse crowded prefixes.
            per_path: Counter[str] = Counter()
            for (_, path), count in operations.items():
                per_path[path] += count
            mapping = self._families(per_path, protocol)
            collapsed: Counter[tuple[str, str]] = Counter()
            for (method, path), count in operations.items():
                collapsed[(method, mapping.get(path, path))] += count
            operations = collapsed
        # The edge's unit: its requests where records show them, else its connections
        # (packet evidence of TLS or opaque TCP), like a proxy's one line per TCP stream.
        units, mtls = (acc.requests, acc.mtls) if acc.requests else (acc.connections,
                                                                     acc.conn_mtls)
        return Edge(
            source=src,
            destination=dst,
            port=int(port),
            protocol=protocol,
            requests=units,
            connections=acc.connections,
            mtls_connections=acc.conn_mtls.get("mtls", 0),
            requests_itemized=acc.not_itemized == 0,
            bytes=acc.bytes,
            mtls_requests=mtls.get("mtls", 0),
            plaintext_requests=mtls.get("plaintext", 0),
            tls_requests=mtls.get("tls", 0),
            unknown_tls_requests=mtls.get("unknown", 0),
            denied_requests=acc.denied,
            operations=[
                Operation(method=m, path=p, requests=c) for (m, p), c in sorted(operations.items())
            ],
            response_classes=dict(sorted(acc.classes.items())),
            first_seen=acc.first,
            last_seen=acc.last,
            hours=sorted(acc.hours),
            active_minutes=len(acc.minutes),
            source_ips=sorted(acc.source_ips),
            hosts=sorted(acc.hosts),
            evidence=[o for _, o in acc.evidence],
        )


def _merge_acc(a: _EdgeAcc, b: _EdgeAcc) -> _EdgeAcc:
    """Sum two edge accumulators (for merged sources)."""
    firsts = [t for t in (a.first, b.first) if t is not None]
    lasts = [t for t in (a.last, b.last) if t is not None]
    ips = sorted(a.source_ips | b.source_ips)
    return _EdgeAcc(
        requests=a.requests + b.requests,
        connections=a.connections + b.connections,
        bytes=a.bytes + b.bytes,
        mtls=a.mtls + b.mtls,
        conn_mtls=a.conn_mtls + b.conn_mtls,
        not_itemized=a.not_itemized + b.not_itemized,
        denied=a.denied + b.denied,
        operations=a.operations + b.operations,
        classes=a.classes + b.classes,
        first=min(firsts) if firsts else None,
        last=max(lasts) if lasts else None,
        hours=a.hours | b.hours,
        minutes=a.minutes | b.minutes,
        source_ips=set(ips[:MAX_SOURCE_IPS]),
        source_ips_truncated=(
            a.source_ips_truncated or b.source_ips_truncated or len(ips) > MAX_SOURCE_IPS
        ),
        hosts=a.hosts | b.hosts,
        evidence=heapq.nsmallest(EVIDENCE_SAMPLES, a.evidence + b.evidence),
    )


def _loopback(ips: pa.ChunkedArray) -> pa.ChunkedArray:
    """Whether each address is a loopback one (127.0.0.0/8, ::1; mapped IPv4 is unmapped by
    the readers)."""
    return pc.or_(pc.starts_with(ips, "127."), pc.equal(ips, "::1"))
