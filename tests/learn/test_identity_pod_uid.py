"""learn.identity.reporters_from_pod_uids: the pod named by UID is its side, whatever its IP.

Kept apart from test_identity.py (which another change owns); it mirrors
``learn/identity.py``'s ``reporters_from_pod_uids``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from learn.identity import IdentityResolver, reporters_from_pod_uids
from observe.inventory import Inventory
from observe.schema import FLOW_SCHEMA, conform

NODE_IP = "10.0.0.5"


def _pod(name: str, uid: str, ip: str, *, host_network: bool = False, start: str,
         end: str | None = None, app: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "shop", "uid": uid, "labels": {"app": app},
                            "creationTimestamp": start}
    if end:
        meta["deletionTimestamp"] = end
    return {"kind": "Pod", "metadata": meta,
            "spec": {"hostNetwork": host_network, "nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"podIP": ip, "hostIP": NODE_IP, "startTime": start, "phase": "Running"}}


def _inventory() -> Inventory:
    inv = Inventory()
    # A host-network agent shares the node's address; two pods held 10.244.1.7 in turn.
    inv.add_object(_pod("agent", "uid-agent", NODE_IP, host_network=True,
                        start="2024-05-01T08:00:00Z", app="agent"))
    inv.add_object(_pod("old-web", "uid-old", "10.244.1.7", start="2024-05-01T08:00:00Z",
                        end="2024-05-01T09:00:00Z", app="old-web"))
    inv.add_object(_pod("api", "uid-api", "10.244.1.7", start="2024-05-01T09:30:00Z",
                        app="api"))
    inv.add_object(_pod("db", "uid-db", "10.244.1.9", start="2024-05-01T08:00:00Z", app="db"))
    return inv


def _batch(rows: list[dict[str, Any]]) -> pa.RecordBatch:
    keys = [f.name for f in FLOW_SCHEMA if any(f.name in row for row in rows)]
    return conform(pa.Table.from_pylist(rows, schema=pa.schema(
        [FLOW_SCHEMA.field(k) for k in keys])))


T = datetime(2024, 5, 1, 8, 30, tzinfo=UTC)  # old-web held 10.244.1.7 then, not api


def test_pod_uid_decides_the_local_side_whatever_the_address() -> None:
    inv = _inventory()
    batch = _batch([
        # the host-network agent's connection: its address is the node's
        {"time": T, "direction": "outbound", "src_ip": NODE_IP, "src_port": 40000,
         "dst_ip": "10.244.1.9", "dst_port": 5432, "pod_uid": "uid-agent", "source": "ebpf"},
        # api's server side, recorded with a time at which the IP still belonged to old-web
        {"time": T, "direction": "inbound", "src_ip": "10.244.1.9", "src_port": 40001,
         "dst_ip": "10.244.1.7", "dst_port": 8080, "pod_uid": "uid-api", "source": "ebpf"},
        # a UID the inventory does not know, and no UID: the address decides
        {"time": T, "direction": "outbound", "src_ip": "10.244.1.9", "src_port": 40002,
         "dst_ip": "10.244.1.7", "dst_port": 8080, "pod_uid": "0123abcd" * 4, "source": "ebpf"},
        {"time": T, "direction": "outbound", "src_ip": "10.244.1.9", "src_port": 40003,
         "dst_ip": "10.244.1.7", "dst_port": 8080, "reporter": "shop/db", "pod_uid": "uid-api"},
    ])
    before = IdentityResolver(inv).resolve(batch).to_pylist()
    assert before[0]["src_workload"] == f"unknown:{NODE_IP}"  # a node address is not pinned
    assert before[1]["dst_workload"] == "shop/old-web"  # by address and time

    named = reporters_from_pod_uids(batch, inv)
    assert named.schema == batch.schema
    assert named.column("reporter").to_pylist() == ["shop/agent", "shop/api", None, "shop/db"]
    after = IdentityResolver(inv).resolve(named).to_pylist()
    assert (after[0]["src_workload"], after[0]["src_pod"]) == ("shop/agent", "shop/agent")
    assert after[0]["dst_workload"] == "shop/db"
    assert (after[1]["dst_workload"], after[1]["dst_pod"]) == ("shop/api", "shop/api")
    assert after[2]["src_workload"] == "shop/db"  # unknown UID: the address decided


def test_batches_without_pod_uids_are_returned_as_they_are() -> None:
    inv = _inventory()
    batch = _batch([{"time": T, "direction": "inbound", "dst_ip": "10.244.1.9"}])
    assert reporters_from_pod_uids(batch, inv) is batch
    plain = pa.record_batch({"src_ip": ["10.244.1.9"]})
    assert reporters_from_pod_uids(plain, inv) is plain
