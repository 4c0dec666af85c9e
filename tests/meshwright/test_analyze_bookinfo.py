"""End to end on the shipped Bookinfo sample: the CLI, the output contract, golden YAML, and a
replay of every observed request against the emitted policies (all allowed) and of requests
that were never observed (all denied)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from support.manifests import validate

from emit.evaluate import Request, evaluate
from meshwright.cli import main
from observe.inventory import load_inventory

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = "samples/bookinfo"


def _analyze(out: Path, *extra: str) -> None:
    assert main(["analyze", SAMPLE, "-o", str(out), "-q", *extra]) == 0


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Relative input paths keep file:line evidence (and so the goldens) machine-independent.
    target = tmp_path_factory.mktemp("bookinfo") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        _analyze(target)
    return target


def _manifests(out: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted((out / "policies").rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text("utf-8")) if d)
    return docs


def _policies_text(out: Path) -> str:
    parts = []
    for path in sorted((out / "policies").rglob("*.yaml")):
        parts.append(f"# {path.relative_to(out).as_posix()}\n{path.read_text('utf-8')}")
    return "---\n".join(parts)


def test_output_contract(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == [
        "findings.json", "findings.sarif", "flows.parquet", "graph.json", "policies",
        "report.md",
    ]
    for path in (out / "policies").rglob("*.yaml"):
        [doc] = [d for d in yaml.safe_load_all(path.read_text("utf-8")) if d]
        meta = doc["metadata"]
        assert path.parent.name == meta["namespace"]
        assert path.name == f"{doc['kind'].lower()}-{meta['name']}.yaml"
        assert int(meta["annotations"]["meshwright.io/requests"]) >= 0
    graph = json.loads((out / "graph.json").read_text("utf-8"))
    assert set(graph) == {"nodes", "edges"}
    for edge in graph["edges"]:
        assert {"source", "destination", "port", "protocol", "requests", "bytes", "mtls",
                "methods", "paths", "first_seen", "last_seen"} <= set(edge)
        assert edge["mtls"] in {"full", "partial", "none", "unknown"}
    findings = json.loads((out / "findings.json").read_text("utf-8"))
    for finding in findings:
        assert set(finding) - {"details"} == {"id", "kind", "severity", "source", "destination",
                                              "port", "summary", "evidence", "rank"}
    assert [f["rank"] for f in findings] == list(range(1, len(findings) + 1))
    sarif = json.loads((out / "findings.sarif").read_text("utf-8"))
    assert sarif["version"] == "2.1.0"
    assert len(sarif["runs"][0]["results"]) == len(findings)


def test_every_manifest_validates_against_the_crds(out: Path) -> None:
    manifests = _manifests(out)
    assert {m["kind"] for m in manifests} == {"AuthorizationPolicy", "PeerAuthentication"}
    for manifest in manifests:
        validate(manifest)


def test_golden_policies_and_report(out: Path, golden: Callable[[str, str], None]) -> None:
    golden("bookinfo/policies.yaml", _policies_text(out))
    golden("bookinfo/report.md", (out / "report.md").read_text("utf-8"))
    golden("bookinfo/findings.json", (out / "findings.json").read_text("utf-8"))


def test_second_run_is_byte_identical(out: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    again = tmp_path / "again"
    _analyze(again)
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix != ".parquet"):
        twin = again / path.relative_to(out)
        assert twin.read_bytes() == path.read_bytes(), path.name
    assert pq.read_table(again / "flows.parquet").equals(pq.read_table(out / "flows.parquet"))


def test_what_a_correct_analysis_finds(out: Path) -> None:
    """The sample's README lists the edges; check the ones a naive analysis gets wrong."""
    graph = json.loads((out / "graph.json").read_text("utf-8"))
    edges = {(e["source"], e["destination"], e["port"]): e for e in graph["edges"]}
    # Both sidecars logged each request: counted once.
    assert edges[("bookinfo/productpage-v1", "bookinfo/details-v1", 9080)]["requests"] == 278
    # IP reuse: 10.244.1.14 was ratings-v1 until 09:00, then legacy-client.
    legacy = edges[("legacy/legacy-client", "bookinfo/ratings-v1", 9080)]
    assert legacy["requests"] == 27 and legacy["mtls"] == "none"
    assert not any(s == "legacy/legacy-client" and d != "bookinfo/ratings-v1"
                   and e["requests"] > e.get("denied_requests", 0)
                   for (s, d, _), e in edges.items())
    assert not any(s.startswith("unknown:") for s, _, _ in edges)
    # reviews-v1 never calls ratings.
    assert ("bookinfo/reviews-v1", "bookinfo/ratings-v1", 9080) not in edges
    # The gateway's Service port 80 is targetPort 8080: policies use the workload port.
    assert ("external:internet", "istio-system/istio-ingressgateway", 8080) in edges
    assert edges[("bookinfo/reviews-v3", "external:api.example.com", 443)]["protocol"] == "tcp"
    kinds = {f["kind"] for f in json.loads((out / "findings.json").read_text("utf-8"))}
    assert {"plaintext", "permissive", "external-egress", "denied"} <= kinds


# --- replay --------------------------------------------------------------------------------


def _labels_by_pod(out: Path) -> dict[str, dict[str, str]]:
    inventory = load_inventory([ROOT / SAMPLE / "inventory.json"])
    labels = {p.key: dict(p.labels) for p in inventory.pods}
    return labels


def _workload_labels(out: Path) -> dict[str, dict[str, str]]:
    inventory = load_inventory([ROOT / SAMPLE / "inventory.json"])
    return {w.id: dict(w.labels) for w in inventory.workloads.values()}


def _observed_requests(out: Path) -> list[tuple[Request, bool, str]]:
    graph = json.loads((out / "graph.json").read_text("utf-8"))
    nodes = {n["id"]: n for n in graph["nodes"]}
    pod_labels = _labels_by_pod(out)
    wl_labels = _workload_labels(out)
    flows = pq.read_table(out / "flows.parquet").to_pylist()
    reporters = {f["reporter"] for f in flows if f["direction"] == "inbound"}
    requests = []
    for f in flows:
        dst = nodes.get(f["dst_workload"] or "")
        if dst is None or dst["kind"] in ("external", "unknown", "Service"):
            continue
        if f["direction"] == "outbound" and f.get("dst_pod") in reporters:
            continue  # the server's own line is replayed instead
        labels = pod_labels.get(f.get("dst_pod") or "") or wl_labels[f["dst_workload"]]
        src = nodes.get(f["src_workload"] or "", {})
        principal = src.get("principal") if f["mtls"] in ("mtls", "unknown") else None
        req = Request(
            namespace=dst["namespace"], labels=labels, port=f["dst_port"],
            protocol="tcp" if f["protocol"] == "tcp" else "http",
            method=f["method"], path=f["path"], host=f["authority"],
            source_principal=principal, source_ip=f["src_ip"],
        )
        requests.append((req, bool(f["denied"]), f["origin"]))
    return requests


def test_replay_every_observed_request_is_allowed(out: Path) -> None:
    manifests = _manifests(out)
    requests = _observed_requests(out)
    graph = json.loads((out / "graph.json").read_text("utf-8"))
    kinds = {n["id"]: n["kind"] for n in graph["nodes"]}
    counted = sum(e["requests"] for e in graph["edges"]
                  if kinds[e["destination"]] not in ("external", "unknown", "Service"))
    assert len(requests) == counted
    allowed = [r for r in requests if not r[1]]
    refused = [(origin, evaluate(manifests, req).reason)
               for req, _, origin in allowed if not evaluate(manifests, req).allowed]
    assert refused == []
    # Requests an existing policy rejected stay rejected under the proposal.
    denied = [r for r in requests if r[1]]
    assert len(denied) == 3
    assert not any(evaluate(manifests, req).allowed for req, _, _ in denied)


def test_replay_never_observed_requests_are_denied(out: Path) -> None:
    manifests = _manifests(out)
    td = "cluster.local/ns"
    details = {"app": "details", "version": "v1"}
    ratings = {"app": "ratings", "version": "v1"}
    productpage = {"app": "productpage", "version": "v1"}
    reviews1 = {"app": "reviews", "version": "v1"}
    pp, rv = f"{td}/bookinfo/sa/bookinfo-productpage", f"{td}/bookinfo/sa/bookinfo-reviews"
    never = {
        "unseen method": Request("bookinfo", details, 9080, method="DELETE",
                                 path="/details/1", source_principal=pp),
        "unseen path": Request("bookinfo", details, 9080, method="GET", path="/admin",
                               source_principal=pp),
        "unseen port": Request("bookinfo", details, 9090, method="GET", path="/details/1",
                               source_principal=pp),
        "unseen caller": Request("bookinfo", details, 9080, method="GET", path="/details/1",
                                 source_principal=rv),
        "reviews-v1 never called ratings, but shares its SA with v2/v3: allowed by SA": None,
        "other namespace caller": Request("bookinfo", ratings, 9080, method="GET",
                                          path="/ratings/1",
                                          source_principal=f"{td}/default/sa/sleep"),
        "plaintext from a new address": Request("bookinfo", ratings, 9080, method="GET",
                                                path="/ratings/1", source_ip="10.244.9.9"),
        "plaintext where never seen": Request("bookinfo", details, 9080, method="GET",
                                              path="/details/1", source_ip="10.244.1.14"),
        "gateway POST to a GET-only path": Request("bookinfo", productpage, 9080,
                                                   method="POST", path="/productpage",
                                                   source_principal=f"{td}/istio-system/sa/"
                                                   "istio-ingressgateway-service-account"),
        "legacy client to reviews (was denied)": Request("bookinfo", reviews1, 9080,
                                                         method="GET", path="/reviews/1",
                                                         source_ip="10.244.1.14"),
        "unobserved workload in the namespace": Request("bookinfo", {"app": "mongodb"}, 27017,
                                                        protocol="tcp", source_principal=pp),
    }
    allowed = {name: evaluate(manifests, req).reason for name, req in never.items()
               if req is not None and evaluate(manifests, req).allowed}
    assert allowed == {}


def test_plaintext_deny_and_dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    _analyze(tmp_path / "deny", "--plaintext", "deny", "--dry-run-annotation")
    manifests = _manifests(tmp_path / "deny")
    assert not any("ipBlocks" in json.dumps(m) for m in manifests)
    assert not any("portLevelMtls" in m["spec"] for m in manifests)
    authz = [m for m in manifests if m["kind"] == "AuthorizationPolicy"]
    assert all(m["metadata"]["annotations"]["istio.io/dry-run"] == "true" for m in authz)
    report = (tmp_path / "deny" / "report.md").read_text("utf-8")
    assert "legacy/legacy-client" in report


def test_flows_file_reanalysed_gives_the_same_policies(out: Path, tmp_path: Path) -> None:
    flows = tmp_path / "flows.parquet"
    shutil.copy(out / "flows.parquet", flows)
    again = tmp_path / "again"
    code = main(["analyze", str(flows), "--inventory", str(ROOT / SAMPLE / "inventory.json"),
                 "-o", str(again), "-q"])
    assert code == 0
    assert _policies_text(again) == _policies_text(out)


def test_same_dump_in_two_layouts_counts_each_request_once(out: Path, tmp_path: Path) -> None:
    """kubectl-logs files plus the node's CRI files (one gzipped) of the same pods."""
    import gzip

    dump = tmp_path / "dump"
    shutil.copytree(ROOT / SAMPLE, dump)
    containers = dump / "node" / "var" / "log" / "containers"
    containers.mkdir(parents=True)
    for i, log in enumerate(sorted((dump / "logs").rglob("istio-proxy.log"))):
        ns, pod = log.parent.parent.name, log.parent.name
        cri = [f"2024-05-14T10:00:00.{n:09d}Z stdout F {line}"
               for n, line in enumerate(log.read_text("utf-8").splitlines())]
        target = containers / f"{pod}_{ns}_istio-proxy-{i:064x}.log"
        data = ("\n".join(cri) + "\n").encode()
        if i % 2:
            target.write_bytes(gzip.compress(data))
        else:
            target.write_bytes(data)
    again = tmp_path / "again"
    assert main(["analyze", str(dump), "-o", str(again), "-q"]) == 0
    def edges(root: Path) -> dict[tuple[str, str, int], int]:
        graph = json.loads((root / "graph.json").read_text("utf-8"))
        return {(e["source"], e["destination"], e["port"]): e["requests"]
                for e in graph["edges"]}
    assert edges(again) == edges(out)
    assert "duplicates dropped | 2787" in (again / "report.md").read_text("utf-8")


def test_json_encoded_logs_give_the_same_policies(out: Path, tmp_path: Path) -> None:
    """The same traffic logged with meshConfig.accessLogEncoding: JSON."""
    from samples import generate_bookinfo

    dump = tmp_path / "json-dump"
    generate_bookinfo.generate(dump, encoding="json")
    first = next((dump / "logs").rglob("istio-proxy.log")).read_text("utf-8")
    assert any(line.startswith('{"authority"') for line in first.splitlines())
    again = tmp_path / "again"
    assert main(["analyze", str(dump), "-o", str(again), "-q"]) == 0
    assert _policies_text(again) == _policies_text(out)
    report = (again / "report.md").read_text("utf-8")
    assert "| istio-json | 3421 |" in report


def test_plaintext_deny_breaks_only_the_plaintext_client(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--plaintext deny: every mTLS request still allowed, the unmeshed client's all denied."""
    monkeypatch.chdir(ROOT)
    deny = tmp_path / "deny"
    _analyze(deny, "--plaintext", "deny")
    manifests = _manifests(deny)
    requests = [r for r in _observed_requests(deny) if not r[1]]
    refused = [(req, origin) for req, _, origin in requests
               if not evaluate(manifests, req).allowed]
    assert refused, "the plaintext client must be cut off"
    assert all(req.source_principal is None and req.source_ip == "10.244.1.14"
               and req.labels.get("app") == "ratings" for req, _ in refused)
    assert len(refused) == 27
