"""learn_graph: two streaming passes over a flows file give the graph and resolved flows."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from learn.pipeline import learn_graph
from observe.flows_io import write_flows
from observe.inventory import load_inventory
from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "bookinfo"


def test_counts_add_up_and_resolved_flows_are_written(tmp_path: Path) -> None:
    plan = plan_inputs([str(SAMPLE / "logs")])
    stats = ObserveStats()
    flows = tmp_path / "flows.parquet"
    records = write_flows(iter_flows(plan, ObserveOptions(), stats), flows)
    inventory = load_inventory([SAMPLE / "inventory.json"])
    resolved = tmp_path / "resolved.parquet"
    learned = learn_graph(flows, inventory, resolved_out=resolved)
    s = learned.stats
    assert s["records_counted"] + s["records_mirrored"] + s["records_unattributed"] == records
    assert s["records_mirrored"] > 0  # both sidecars log meshed requests
    assert sum(e.requests for e in learned.graph.edges) == s["records_counted"]
    table = pq.read_table(resolved)
    assert table.num_rows == records
    assert table["dst_workload"].null_count < records // 100
    # Without an inventory, workloads are still inferred from the reporters' pod names.
    bare = learn_graph(flows, load_inventory([]))
    assert "bookinfo/details-v1" in bare.graph.nodes
