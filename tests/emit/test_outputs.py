"""emit/outputs.py: policy files, graph.json and findings.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from emit.istio import istio_manifests
from emit.outputs import (
    dump_json,
    findings_json,
    graph_json,
    policy_relpath,
    write_json,
    write_policies,
)
from learn.model import Finding, Graph
from observe.errors import MeshwrightError

Make = Callable[[int | None], Graph]


def test_write_policies_layout_and_stale_removal(make_bookinfo: Make, tmp_path: Path) -> None:
    ms = istio_manifests(make_bookinfo(None))
    stale = tmp_path / "policies" / "gone" / "authorizationpolicy-old.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("old\n")
    keep = tmp_path / "policies" / "README.txt"
    keep.write_text("mine\n")
    paths = write_policies(ms, tmp_path)
    assert len(paths) == len(ms) == len(set(paths))
    rel = sorted(p.relative_to(tmp_path).as_posix() for p in paths)
    assert "policies/default/authorizationpolicy-allow-nothing.yaml" in rel
    assert "policies/default/peerauthentication-details-v1.yaml" in rel
    assert "policies/istio-system/authorizationpolicy-istio-ingressgateway.yaml" in rel
    assert not stale.exists() and not stale.parent.exists()
    assert keep.read_text() == "mine\n"
    for p, m in zip(sorted(paths), sorted(ms, key=lambda m: str(policy_relpath(m))),
                    strict=True):
        docs = list(yaml.safe_load_all(p.read_text("utf-8")))
        assert docs == [m]  # one object per file
    assert not list(tmp_path.rglob("*.tmp"))
    # a second run with fewer manifests removes the files it no longer writes
    before = {p: p.read_bytes() for p in paths}
    write_policies(ms[:2], tmp_path)
    left = sorted(p for p in (tmp_path / "policies").rglob("*.yaml"))
    assert left == sorted(paths[:2]) and all(p.read_bytes() == before[p] for p in left)


def test_write_policies_rejects_collisions_and_unsafe_names(tmp_path: Path) -> None:
    m = {"kind": "AuthorizationPolicy", "metadata": {"name": "a", "namespace": "ns"},
         "spec": {}}
    with pytest.raises(MeshwrightError):
        write_policies([m, m], tmp_path)
    bad = {"kind": "AuthorizationPolicy", "metadata": {"name": "../x", "namespace": "ns"}}
    with pytest.raises(MeshwrightError):
        write_policies([bad], tmp_path)


def test_write_errors_are_meshwright_errors(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(MeshwrightError) as info:
        write_json(blocker / "sub" / "graph.json", {"a": 1})
    assert info.value.origin is not None and "graph.json" in info.value.origin


def test_graph_json_shape_and_order(make_bookinfo: Make) -> None:
    gj = graph_json(make_bookinfo(None))
    assert set(gj) == {"nodes", "edges"}
    ids = [n["id"] for n in gj["nodes"]]
    assert ids == sorted(ids)
    for key in ("id", "namespace", "workload", "kind", "service_account", "principal",
                "meshed", "selector"):
        assert key in gj["nodes"][0]
    keys = [(e["source"], e["destination"], e["port"], e["protocol"]) for e in gj["edges"]]
    assert keys == sorted(keys)
    e = next(e for e in gj["edges"] if e["source"] == "default/legacy-client"
             and e["destination"] == "default/details-v1")
    for key in ("requests", "bytes", "methods", "paths", "operations", "response_classes",
                "denied_requests"):
        assert key in e
    assert e["mtls"] == "none" and e["methods"] == ["GET", "HEAD"]
    assert e["paths"] == ["/details/*", "/health"]
    assert e["first_seen"] == "2024-05-01T12:00:00Z" and e["source_ips"] == ["10.1.2.3",
                                                                               "10.1.2.4"]
    assert e["operations"][0] == {"method": "GET", "path": "/details/*", "requests": 5}
    assert {x["mtls"] for x in gj["edges"]} >= {"full", "none"}
    # shuffled input, identical bytes
    text = dump_json(gj)
    assert text.endswith("}\n") and text.startswith('{\n  "edges"')
    for seed in (1, 2):
        assert dump_json(graph_json(make_bookinfo(seed))) == text
    assert json.loads(text) == gj


def test_findings_json_sorted_by_severity_then_id(findings: list[Finding]) -> None:
    extra = Finding("a:x", "weird", "low", None, None, None, "x")
    rows = findings_json([*reversed(findings), extra])
    assert [r["severity"] for r in rows] == ["high", "medium", "low", "info"]
    assert set(rows[0]) == {"id", "kind", "severity", "source", "destination", "port",
                            "summary", "evidence"}
    assert rows[0]["evidence"] == ["logs/d.log:7"]


def test_write_json_format(tmp_path: Path) -> None:
    p = write_json(tmp_path / "x.json", {"b": [1, 2], "a": "é"})
    assert p.read_text("utf-8") == '{\n  "a": "é",\n  "b": [\n    1,\n    2\n  ]\n}\n'
