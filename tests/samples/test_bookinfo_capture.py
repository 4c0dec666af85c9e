"""End to end on the Bookinfo packet capture (samples/bookinfo-capture): the file is what the
generator meant (checked with tshark, the independent reader), and meshwright's analysis of
it agrees with its analysis of the same traffic's proxy logs and with the generator's model.

References: tshark for the packets; the generator's own model (``capture_connections``: the
TCP connections and UDP flows it put on the wire, with the workloads it put them between) for
connection counts; the logs analysis for the edges.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import subprocess
from collections import Counter
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
from samples import envoy_lines as el
from samples import generate_bookinfo as gb

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "bookinfo"
CAPTURE = ROOT / "samples" / gb.CAPTURE_DIR / gb.CAPTURE_FILE
TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(TSHARK is None, reason="tshark is installed by .ci/run")

EdgeKey = tuple[str, str, int]
#: Edges only packets can show: the DNS lookup goes from the app straight to kube-dns
#: (Istio's sidecar does not proxy UDP by default), so no proxy logs it.
ONLY_IN_CAPTURE = {("bookinfo/reviews-v3", "unknown:10.96.0.10", 53)}
#: Edges only logs can show: none. (The 503 no_healthy_upstream never left reviews-v2's pod,
#: but reviews-v2 -> ratings-v1 is on the wire at other times.)
ONLY_IN_LOGS: set[EdgeKey] = set()


def _run(out: Path, *args: str) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        # Relative input paths keep packet/line evidence (and so the goldens) portable.
        mp.chdir(ROOT)
        assert main(["analyze", *args, "-o", str(out), "-q"]) == 0
    return out


@pytest.fixture(scope="module")
def capture_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("capture") / "out", "samples/bookinfo-capture",
                "--inventory", "samples/bookinfo/inventory.json")


@pytest.fixture(scope="module")
def logs_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("logs") / "out", "samples/bookinfo/logs",
                "samples/bookinfo/inventory.json")


@pytest.fixture(scope="module")
def model() -> list[gb.WireConn]:
    return gb.capture_connections()


def _graph(out: Path) -> dict[str, Any]:
    graph: dict[str, Any] = json.loads((out / "graph.json").read_text("utf-8"))
    return graph


def _edges(out: Path) -> dict[EdgeKey, dict[str, Any]]:
    return {(e["source"], e["destination"], e["port"]): e for e in _graph(out)["edges"]}


def _manifests(out: Path) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted((out / "policies").rglob("*.yaml")):
        docs.extend(d for d in yaml.safe_load_all(path.read_text("utf-8")) if d)
    return docs


def _tshark(*args: str) -> str:
    assert TSHARK is not None
    done = subprocess.run([TSHARK, "-r", str(CAPTURE), *args], capture_output=True,
                          text=True, check=True)
    return done.stdout


# --- the file ------------------------------------------------------------------------------


def test_regenerating_changes_nothing(tmp_path: Path) -> None:
    gb.generate(tmp_path, capture_dir=tmp_path / "capture")
    assert (tmp_path / "capture" / gb.CAPTURE_FILE).read_bytes() == CAPTURE.read_bytes(), \
        "samples/bookinfo-capture is stale: rerun samples/generate_bookinfo.py"
    assert (tmp_path / "README.md").read_bytes() == (SAMPLE / "README.md").read_bytes()
    # The logs do not depend on the capture (its RNG is separate).
    for log in sorted((SAMPLE / "logs").rglob("*.log")):
        assert (tmp_path / log.relative_to(SAMPLE)).read_bytes() == log.read_bytes()


def test_file_is_pcap_sll2_in_the_window() -> None:
    raw = gzip.decompress(CAPTURE.read_bytes())
    assert CAPTURE.stat().st_size < 700_000
    # pcap header (tcpdump.org pcap-savefile): magic, 2.4, snaplen, link type 276 (SLL2).
    magic, major, minor, _, _, snaplen, linktype = struct.unpack("<IHHiIII", raw[:24])
    assert (magic, major, minor, snaplen, linktype) == (0xA1B2C3D4, 2, 4, 512, 276)


@needs_tshark
def test_tshark_reads_it_whole_and_clean() -> None:
    assert _tshark("-Y", "_ws.malformed") == ""
    times = [float(x) for x in _tshark("-T", "fields", "-e", "frame.time_epoch").split()]
    assert times == sorted(times)
    assert gb.WINDOW_START.timestamp() <= times[0] and times[-1] <= gb.WINDOW_END.timestamp()
    assert set(_tshark("-T", "fields", "-e", "sll.etype").split()) == {"0x0800"}


def _conversations(kind: str) -> set[tuple[str, int, str, int]]:
    out = set()
    for line in _tshark("-q", "-z", f"conv,{kind}").splitlines():
        if "<->" not in line:
            continue
        a, _, b = line.split()[:3]
        (ai, ap), (bi, bp) = a.rsplit(":", 1), b.rsplit(":", 1)
        out.add((ai, int(ap), bi, int(bp)))
    return out


@needs_tshark
def test_tshark_sees_the_connections_the_generator_made(model: list[gb.WireConn]) -> None:
    # tshark lists each conversation once, in either orientation.
    def norm(t: tuple[str, int, str, int]) -> tuple[tuple[str, int], ...]:
        return tuple(sorted(((t[0], t[1]), (t[2], t[3]))))

    for transport in ("tcp", "udp"):
        want = Counter(norm((c.client_ip, c.client_port, c.server_ip, c.server_port))
                       for c in model if c.transport == transport)
        assert max(want.values()) == 1  # no 5-tuple reused: conversations == connections
        assert {norm(t) for t in _conversations(transport)} == set(want)
    assert len([c for c in model if c.transport == "tcp"]) == 719


@needs_tshark
def test_tshark_sees_istio_sni_alpn_and_cleartext_requests(model: list[gb.WireConn]) -> None:
    hellos = Counter(tuple(line.split("\t")) for line in _tshark(
        "-Y", "tls.handshake.type == 1", "-T", "fields",
        "-e", "tls.handshake.extensions_server_name",
        "-e", "tls.handshake.extensions_alpn_str").splitlines())
    mesh = [c for c in model if c.kind == "mesh"]
    fqdn = {c.sni for c in mesh}
    assert fqdn == {el.mtls_sni(9080, el.service_fqdn(s, "bookinfo"))
                    for s in ("productpage", "details", "reviews", "ratings")}
    expected = Counter((str(c.sni), "istio-http/1.1,istio,http/1.1") for c in mesh)
    expected[("api.example.com", "")] = 8
    assert hellos == expected
    requests = _tshark("-Y", "http.request", "-T", "fields", "-e", "ip.src",
                       "-e", "http.request.method", "-e", "http.host").splitlines()
    # 634 from the internet through the gateway, 27 + 3 from legacy-client.
    assert len(requests) == sum(c.requests for c in model if c.kind in ("ingress", "plain"))
    assert Counter(r.split("\t")[0] for r in requests)["10.244.1.14"] == 30
    answers = _tshark("-Y", "dns.flags.response == 1", "-T", "fields", "-e", "dns.qry.name",
                      "-e", "dns.a").splitlines()
    assert answers == ["api.example.com\t198.51.100.23"] * 8


# --- the analysis --------------------------------------------------------------------------


def test_edges_equal_the_logs_edges(capture_out: Path, logs_out: Path) -> None:
    packets, logs = set(_edges(capture_out)), set(_edges(logs_out))
    assert packets - logs == ONLY_IN_CAPTURE
    assert logs - packets == ONLY_IN_LOGS


def test_mtls_states(capture_out: Path) -> None:
    edges = _edges(capture_out)
    for (src, dst, port), e in edges.items():
        if dst.startswith("bookinfo/") and src.startswith(("bookinfo/", "istio-system/")):
            assert e["mtls"] == "full", (src, dst, port, e["mtls"])
    assert edges[("legacy/legacy-client", "bookinfo/ratings-v1", 9080)]["mtls"] == "none"
    assert edges[("external:internet", "istio-system/istio-ingressgateway", 8080)]["mtls"] == \
        "none"


def test_connection_counts_match_the_generator(capture_out: Path,
                                               model: list[gb.WireConn]) -> None:
    want: Counter[EdgeKey] = Counter()
    for c in model:
        if c.kind not in ("refused", "no-answer"):
            want[(c.client, c.server, c.server_port)] += 1
    got = {k: e["connections"] for k, e in _edges(capture_out).items()}
    assert got == dict(want)


def test_failed_attempts_are_kept_out_of_edges(capture_out: Path,
                                               model: list[gb.WireConn]) -> None:
    flows = pq.read_table(capture_out / "flows.parquet").to_pylist()
    states = Counter(f["tcp_state"] for f in flows if f["kind"] == "connection")
    assert states["refused"] == 2 and states["no-answer"] == 1
    failed = {(c.server_ip, c.server_port) for c in model if c.kind in ("refused", "no-answer")}
    assert failed == {("10.244.1.5", 9080), ("10.244.2.40", 9080)}
    assert not any(d in ("istio-system/istiod", "unknown:10.244.2.40")
                   for _, d, _ in _edges(capture_out))


def test_every_manifest_validates_against_the_crds(capture_out: Path) -> None:
    manifests = _manifests(capture_out)
    assert {m["kind"] for m in manifests} == {"AuthorizationPolicy", "PeerAuthentication"}
    for manifest in manifests:
        validate(manifest)


def _observed(out: Path) -> list[tuple[Request, str]]:
    """Every connection and request record that reached a workload, as the server sees it."""
    graph = _graph(out)
    nodes = {n["id"]: n for n in graph["nodes"]}
    inventory = load_inventory([SAMPLE / "inventory.json"])
    pod_labels = {p.key: dict(p.labels) for p in inventory.pods}
    wl_labels = {w.id: dict(w.labels) for w in inventory.workloads.values()}
    out_reqs = []
    for f in pq.read_table(out / "flows.parquet").to_pylist():
        dst = nodes.get(f["dst_workload"] or "")
        if f["tcp_state"] in ("refused", "no-answer") or f["transport"] == "udp":
            continue
        if f["kind"] == "connection" and f["protocol"] in ("http", "grpc") and f["itemized"]:
            continue  # its requests are replayed one by one
        if dst is None or dst["kind"] in ("external", "unknown", "Service"):
            continue
        labels = pod_labels.get(f["dst_pod"] or "") or wl_labels[f["dst_workload"]]
        src = nodes.get(f["src_workload"] or "", {})
        out_reqs.append((Request(
            namespace=dst["namespace"], labels=labels, port=f["dst_port"],
            protocol="tcp" if f["protocol"] == "tcp" else "http",
            method=f["method"], path=f["path"], host=f["authority"],
            source_principal=src.get("principal") if f["mtls"] == "mtls" else None,
            source_ip=f["src_ip"]), f["origin"]))
    return out_reqs


def test_policies_allow_every_observed_connection(capture_out: Path,
                                                  model: list[gb.WireConn]) -> None:
    manifests = _manifests(capture_out)
    observed = _observed(capture_out)
    # Cleartext requests one by one, mTLS connections whole.
    assert len(observed) == sum(c.requests for c in model if c.kind in ("plain", "ingress")) \
        + sum(c.kind == "mesh" for c in model)
    # legacy-client -> reviews was rejected by reviews' policy: see the next tests.
    refused = [(origin, evaluate(manifests, r).reason) for r, origin in observed
               if not (r.labels.get("app") == "reviews" and r.source_ip == "10.244.1.14")
               and not evaluate(manifests, r).allowed]
    assert refused == []


def test_policies_deny_what_was_never_observed(capture_out: Path) -> None:
    manifests = _manifests(capture_out)
    td = "cluster.local/ns"
    pp, rv = f"{td}/bookinfo/sa/bookinfo-productpage", f"{td}/bookinfo/sa/bookinfo-reviews"
    details = {"app": "details", "version": "v1"}
    ratings = {"app": "ratings", "version": "v1"}
    never = {
        "unseen caller": Request("bookinfo", details, 9080, protocol="tcp",
                                 source_principal=rv),
        "unseen port": Request("bookinfo", details, 9090, protocol="tcp", source_principal=pp),
        "other namespace caller": Request("bookinfo", ratings, 9080, protocol="tcp",
                                          source_principal=f"{td}/default/sa/sleep"),
        "plaintext from a new address": Request("bookinfo", ratings, 9080, method="GET",
                                                path="/ratings/1", source_ip="10.244.9.9"),
        "plaintext where never seen": Request("bookinfo", details, 9080, method="GET",
                                              path="/details/1", source_ip="10.244.1.14"),
        "legacy client on an unseen path": Request("bookinfo", ratings, 9080, method="DELETE",
                                                   path="/ratings/1", source_ip="10.244.1.14"),
        "unobserved workload": Request("bookinfo", {"app": "mongodb"}, 27017, protocol="tcp",
                                       source_principal=pp),
    }
    allowed = {name: evaluate(manifests, req).reason for name, req in never.items()
               if evaluate(manifests, req).allowed}
    assert allowed == {}


def test_requests_an_existing_policy_denied_stay_denied(capture_out: Path) -> None:
    """legacy-client -> reviews got `403 RBAC: access denied` from reviews' sidecar (the
    logs say rbac_access_denied); a proposal must not allow it."""
    manifests = _manifests(capture_out)
    denied = [r for r, _ in _observed(capture_out)
              if r.labels.get("app") == "reviews" and r.source_ip == "10.244.1.14"]
    assert len(denied) == 3
    assert not any(evaluate(manifests, r).allowed for r in denied)


def _policies_text(out: Path) -> str:
    parts = []
    for path in sorted((out / "policies").rglob("*.yaml")):
        parts.append(f"# {path.relative_to(out).as_posix()}\n{path.read_text('utf-8')}")
    return "---\n".join(parts)


def test_golden_policies_report_findings(capture_out: Path,
                                         golden: Callable[[str, str], None]) -> None:
    golden("bookinfo-capture/policies.yaml", _policies_text(capture_out))
    golden("bookinfo-capture/report.md", (capture_out / "report.md").read_text("utf-8"))
    golden("bookinfo-capture/findings.json", (capture_out / "findings.json").read_text("utf-8"))
