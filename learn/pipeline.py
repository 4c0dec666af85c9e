"""Learn a communication graph from a flows file: resolve identities, aggregate edges.

Two streaming passes over the flows (Parquet), so memory stays bounded by the batch size plus
what grows with the cluster (leases, edges): the first learns which pod held which address when
(and which pods reported inbound lines), the second resolves each batch and folds it into the
graph, optionally writing the resolved flows out.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from learn import paths
from learn.graph import GraphBuilder
from learn.identity import IdentityResolver, reporters_from_pod_uids
from learn.model import Graph
from observe.flows_io import FlowWriter, read_flows
from observe.inventory import Inventory
from observe.schema import without_learned

_LEASE_COLUMNS = ["time", "direction", "reporter", "src_ip", "dst_ip", "pod_uid"]


@dataclass
class Learned:
    """The graph and how the records were counted."""

    graph: Graph
    stats: dict[str, int] = field(default_factory=dict)
    """records_counted, records_mirrored (client copies of server-logged requests),
    records_unattributed, records_failed (connection attempts that carried no traffic),
    records_local (loopback connections: within one network namespace)."""


def learn_graph(flows: Path, inventory: Inventory, *, trust_domain: str = "cluster.local",
                resolved_out: Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> Learned:
    """The graph learned from ``flows``; with ``resolved_out``, the resolved flows too.

    ``progress(records done, records total)`` is called after each batch of the second pass.
    """
    resolver = IdentityResolver(inventory, trust_domain=trust_domain)
    inbound_reporters: set[str] = set()
    total = 0
    for batch in read_flows(flows, columns=_LEASE_COLUMNS):
        total += batch.num_rows
        # eBPF records name their own pod by UID: that pod is their reporter.
        batch = reporters_from_pod_uids(batch, inventory)
        resolver.learn_leases(batch)
        inbound = batch.filter(pc.fill_null(pc.equal(batch["direction"], "inbound"), False))
        inbound_reporters.update(r for r in pc.unique(inbound["reporter"]).to_pylist() if r)
    builder = GraphBuilder(
        inbound_reporters=inbound_reporters,
        path_family=paths.path_family,
        families=paths.families,
    )
    with ExitStack() as stack:
        writer = stack.enter_context(FlowWriter(resolved_out)) if resolved_out else None
        for batch in read_flows(flows):
            # Identities are learned afresh: the inventory may differ from the last run's.
            resolved = resolver.resolve(without_learned(reporters_from_pod_uids(batch,
                                                                                inventory)))
            builder.add(resolved)
            if writer is not None:
                writer.write(resolved)
            if progress is not None:
                progress(builder.records_seen, total)
    graph = builder.build(
        resolver.node,
        idle=[n.id for n in resolver.workloads()],
        ambiguities=[*resolver.ambiguities, *resolver.inferred],
        trust_domain=trust_domain,
    )
    return Learned(graph=graph, stats={
        "records_counted": builder.records_counted,
        "records_mirrored": builder.records_mirrored,
        "records_unattributed": builder.records_unattributed,
        "records_failed": builder.records_failed,
        "records_local": builder.records_local,
    })
