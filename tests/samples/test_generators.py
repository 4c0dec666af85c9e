"""The sample generators write faithful Istio lines, deterministically.

Line shapes are checked against a regex built from Istio's real format string
(tests/data/envoy-logs/istio-default-text-format.txt) and value patterns written from
Envoy's command-operator semantics, never from the generator's own code. The same regex must
accept the real lines of the istio.io access-log task first.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from benchmarks import gen_dump
from samples import envoy_lines as el
from samples import generate_bookinfo as gb

DATA = Path(__file__).resolve().parent.parent / "data" / "envoy-logs"
SHIPPED = Path(__file__).resolve().parents[2] / "samples" / "bookinfo"

IP_PORT = r"\d{1,3}(?:\.\d{1,3}){3}:\d+"
#: What each command operator may print (``-`` when absent), from Envoy's docs.
VALUE = {
    "START_TIME": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",
    "REQ(:METHOD)": r"[A-Z]+|-",
    "REQ(X-ENVOY-ORIGINAL-PATH?:PATH)": r"/\S*|-",
    "PROTOCOL": r"HTTP/1\.[01]|HTTP/2|HTTP/3|-",
    "RESPONSE_CODE": r"\d{1,3}",
    "RESPONSE_FLAGS": r"-|[A-Z]+(?:,[A-Z]+)*",
    "RESPONSE_CODE_DETAILS": r"-|[a-z_]+(?:\[[^\s\]]*(?:\][^\s\]]*)*\])?",
    "CONNECTION_TERMINATION_DETAILS": r"-|\S+",
    "UPSTREAM_TRANSPORT_FAILURE_REASON": r"-|.+",
    "BYTES_RECEIVED": r"\d+",
    "BYTES_SENT": r"\d+",
    "DURATION": r"\d+",
    "RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)": r"\d+|-",
    "REQ(X-FORWARDED-FOR)": r"-|[0-9.]+(?:, ?[0-9.]+)*",
    "REQ(USER-AGENT)": r".+",
    "REQ(X-REQUEST-ID)": r"-|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
    "REQ(:AUTHORITY)": r"-|[\w.-]+(?::\d+)?",
    "UPSTREAM_HOST": rf"-|{IP_PORT}",
    "UPSTREAM_CLUSTER_RAW": r"-|outbound\|\d+\|[\w-]*\|[\w.-]+|inbound\|\d+\|\||"
                            r"PassthroughCluster|BlackHoleCluster",
    "UPSTREAM_LOCAL_ADDRESS": rf"-|{IP_PORT}",
    "DOWNSTREAM_LOCAL_ADDRESS": rf"-|{IP_PORT}",
    "DOWNSTREAM_REMOTE_ADDRESS": rf"-|{IP_PORT}",
    "REQUESTED_SERVER_NAME": r"-|[\w.-]+",
    "ROUTE_NAME": r"-|\S+",
}
OPERATOR = re.compile(r"%([A-Z_]+(?:\([^)]*\))?)%")


def _format_regex() -> tuple[re.Pattern[str], list[str], list[bool]]:
    """A regex from the real format string: one named group per operator."""
    fmt = (DATA / "istio-default-text-format.txt").read_text().rstrip("\n")
    parts = OPERATOR.split(fmt)
    literals, ops = parts[0::2], parts[1::2]
    pattern, quoted = "^", []
    for i, op in enumerate(ops):
        alone = literals[i].endswith('"') and literals[i + 1].startswith('"')
        quoted.append(alone)
        # Unquoted values cannot hold spaces or quotes; the literals delimit every field.
        value = VALUE[op] if alone else VALUE[op].replace(".+", '[^\\s"]+')
        pattern += re.escape(literals[i]) + f"(?P<f{i}>{value})"
    pattern += re.escape(literals[-1]) + "$"
    return re.compile(pattern), ops, quoted


LINE, OPS, QUOTED = _format_regex()
FIELD = {op: f"f{i}" for i, op in enumerate(OPS)}


def fields(line: str) -> dict[str, str]:
    m = LINE.match(line)
    assert m, f"not an Istio default TEXT line: {line!r}"
    return {op: m.group(FIELD[op]) for op in OPS}


def test_format_regex_is_the_real_format() -> None:
    # 24 operators in 22 fields (the quoted request line holds 3); 7 quoted fields.
    assert len(OPS) == 24 and sum(QUOTED) == 6
    real = (DATA / "istio-docs-access-log-sleep-httpbin.log").read_text().splitlines()
    client, server = (fields(x) for x in real)
    assert client["UPSTREAM_CLUSTER_RAW"].startswith("outbound|8000||")
    assert server["REQUESTED_SERVER_NAME"] == "outbound_.8000_._.httpbin.foo.svc.cluster.local"
    assert client["UPSTREAM_LOCAL_ADDRESS"] == server["DOWNSTREAM_REMOTE_ADDRESS"]


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, gb.Summary]:
    out = tmp_path_factory.mktemp("bookinfo")
    return out, gb.generate(out)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_bookinfo_is_deterministic_and_shipped_copy_is_current(
        bookinfo: tuple[Path, gb.Summary], tmp_path: Path) -> None:
    first, summary = bookinfo
    gb.generate(tmp_path)
    a, b = _tree(first), _tree(tmp_path)
    assert a == b
    assert sorted(a) == summary.files
    assert _tree(SHIPPED) == a, "samples/bookinfo is stale: rerun samples/generate_bookinfo.py"
    # A different seed changes the traffic, so the seed is really what drives it.
    other = tmp_path / "other"
    gb.generate(other, seed=7)
    assert _tree(other) != a


def _access_lines(root: Path) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    agent = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z\t(info|warn|error)\t\S")
    for log in sorted(root.glob("logs/*/*/istio-proxy.log")):
        pod = f"{log.parent.parent.name}/{log.parent.name}"
        for line in log.read_text(encoding="utf-8").splitlines():
            if line.startswith("["):
                out.setdefault(pod, []).append(fields(line))
            else:
                assert agent.match(line), f"{pod}: neither access nor agent line: {line!r}"
    return out


def test_every_bookinfo_access_line_matches_the_real_format(
        bookinfo: tuple[Path, gb.Summary]) -> None:
    root, summary = bookinfo
    lines = _access_lines(root)
    total = sum(len(v) for v in lines.values())
    assert total == sum(summary.counts.values()) > 2000
    pods = {p.split("/")[1].rsplit("-", 2)[0] for p in lines}
    assert {"productpage-v1", "details-v1", "ratings-v1", "reviews-v1", "reviews-v2",
            "reviews-v3", "istio-ingressgateway"} <= pods
    assert not any(p.startswith("legacy/") for p in lines)  # not meshed: no proxy log


def test_client_and_server_lines_pair_up(bookinfo: tuple[Path, gb.Summary]) -> None:
    lines = _access_lines(bookinfo[0])
    inbound = {}
    for entries in lines.values():
        for f in entries:
            if f["UPSTREAM_CLUSTER_RAW"].startswith("inbound|"):
                inbound[(f["REQ(X-REQUEST-ID)"], f["DOWNSTREAM_REMOTE_ADDRESS"])] = f
    pairs = 0
    for entries in lines.values():
        for f in entries:
            if not f["UPSTREAM_CLUSTER_RAW"].startswith("outbound|") or f["RESPONSE_CODE"] == "503":
                continue
            server = inbound[(f["REQ(X-REQUEST-ID)"], f["UPSTREAM_LOCAL_ADDRESS"])]
            assert server["UPSTREAM_HOST"] == f["UPSTREAM_HOST"]
            assert server["DOWNSTREAM_LOCAL_ADDRESS"] == f["UPSTREAM_HOST"]
            assert server["UPSTREAM_LOCAL_ADDRESS"].startswith("127.0.0.6:")
            svc = f["UPSTREAM_CLUSTER_RAW"].split("|")[3]
            assert server["REQUESTED_SERVER_NAME"] == f"outbound_.9080_._.{svc}"
            pairs += 1
    assert pairs > 1000


def test_bookinfo_scenario_lines(bookinfo: tuple[Path, gb.Summary]) -> None:
    lines = _access_lines(bookinfo[0])
    flat = [f for v in lines.values() for f in v]
    denied = [f for f in flat if f["RESPONSE_CODE"] == "403"]
    assert len(denied) == 3
    for f in denied:
        assert f["RESPONSE_CODE_DETAILS"] == "rbac_access_denied_matched_policy[none]"
        assert (f["UPSTREAM_HOST"], f["REQUESTED_SERVER_NAME"]) == ("-", "-")
    plaintext = [f for f in flat if f["UPSTREAM_CLUSTER_RAW"] == "inbound|9080||"
                 and f["REQUESTED_SERVER_NAME"] == "-" and f["RESPONSE_CODE"] == "200"]
    assert plaintext and all(f["DOWNSTREAM_REMOTE_ADDRESS"].startswith("10.244.1.14:")
                             and f["START_TIME"] > "2024-05-14T09:04:51" for f in plaintext)
    tcp = [f for f in flat if f["UPSTREAM_CLUSTER_RAW"] == "PassthroughCluster"]
    assert tcp and all(f["REQ(:METHOD)"] == "-" and f["RESPONSE_CODE"] == "0"
                       and f["REQUESTED_SERVER_NAME"] == "api.example.com" for f in tcp)
    gw = lines["istio-system/istio-ingressgateway-6d9f8b7c5d-8kzjm"]
    assert all(f["DOWNSTREAM_LOCAL_ADDRESS"] == "10.244.2.5:8080"
               and f["REQ(X-FORWARDED-FOR)"] == f["DOWNSTREAM_REMOTE_ADDRESS"].split(":")[0]
               and f["DOWNSTREAM_REMOTE_ADDRESS"].startswith("203.0.113.") for f in gw)
    old = lines["bookinfo/ratings-v1-5dc7d8b4c9-vgfnq"]
    assert old and all(f["START_TIME"] < "2024-05-14T09:00:00" for f in old)
    cron = [p for p in lines if p.startswith("bookinfo/nightly-report-")]
    assert len(cron) == 1 and len(lines[cron[0]]) == 1


def test_inventory_shapes(bookinfo: tuple[Path, gb.Summary]) -> None:
    inv = json.loads((bookinfo[0] / "inventory.json").read_text())
    assert inv["kind"] == "List" and inv["metadata"] == {"resourceVersion": ""}
    kinds = Counter(i["kind"] for i in inv["items"])
    assert {"Namespace", "Pod", "Service", "ServiceAccount", "ReplicaSet", "Deployment",
            "Job", "CronJob"} <= set(kinds)
    pods = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Pod"}
    assert "ratings-v1-5dc7d8b4c9-vgfnq" not in pods  # deleted mid-window
    by_ip = {p["status"]["podIP"]: n for n, p in pods.items()}
    assert by_ip["10.244.1.14"].startswith("legacy-client-")
    uids = {i["metadata"]["uid"] for i in inv["items"]}
    for name, p in pods.items():
        (owner,) = p["metadata"]["ownerReferences"]
        assert owner["controller"] is True and owner["uid"] in uids
        names = [c["name"] for c in p["spec"]["containers"]]
        meshed = "istio-proxy" in names
        assert meshed == (not name.startswith(("legacy-client-", "istiod-"))), name
        if meshed and not name.startswith("istio-ingressgateway"):
            assert "sidecar.istio.io/status" in p["metadata"]["annotations"]
            assert p["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
        assert p["status"]["podIPs"] == [{"ip": p["status"]["podIP"]}]
    assert pods[next(n for n in pods if n.startswith("nightly-"))]["status"]["phase"] == \
        "Succeeded"
    svc = {i["metadata"]["name"]: i for i in inv["items"] if i["kind"] == "Service"}
    gw_ports = {p["port"]: p["targetPort"] for p in svc["istio-ingressgateway"]["spec"]["ports"]}
    assert gw_ports[80] == 8080
    ns = [i for i in inv["items"] if i["kind"] == "Namespace"]
    assert all(n["metadata"]["labels"]["kubernetes.io/metadata.name"] == n["metadata"]["name"]
               for n in ns)


T0 = datetime(2024, 5, 14, 9, 0, 0, 123000, tzinfo=UTC)
CALL = el.HttpCall(start=T0, method="GET", path="/ratings/0", status=200,
                   client_ip="10.244.1.15", app_port=40000, conn_port=41000, service="ratings",
                   namespace="bookinfo", service_ip="10.96.0.9", service_port=80,
                   server_ip="10.244.2.21", target_port=9080, inbound_port=9080,
                   request_id="0b2fe477-376c-97bb-ae8e-e9e6e052bfba", user_agent="curl/8.7.1",
                   authority="ratings:80", bytes_sent=48, duration=4, upstream_local_port=50000)


def test_json_encoding_has_istios_keys_sorted_and_typed() -> None:
    keys = set(json.loads((DATA / "istio-default-json-format.json").read_text()))
    line = el.render_json(el.outbound_entry(CALL))
    record = json.loads(line)
    assert set(record) == keys and list(record) == sorted(record)
    assert record["response_code"] == 200 and record["bytes_sent"] == 48
    assert record["requested_server_name"] is None and record["x_forwarded_for"] is None
    assert " " not in line.replace("curl/8.7.1", "")


def test_renderers_for_each_line_kind() -> None:
    client, server = (fields(el.render_text(e)) for e in el.http_pair(CALL))
    # Service port 80 is dialled; the pod's targetPort 9080 serves it.
    assert client["DOWNSTREAM_LOCAL_ADDRESS"] == "10.96.0.9:80"
    assert client["UPSTREAM_CLUSTER_RAW"] == "outbound|80||ratings.bookinfo.svc.cluster.local"
    assert server["UPSTREAM_CLUSTER_RAW"] == "inbound|9080||"
    assert server["REQUESTED_SERVER_NAME"] == "outbound_.80_._.ratings.bookinfo.svc.cluster.local"
    denied = fields(el.render_text(el.inbound_entry(
        replace(CALL, denied_details=el.rbac_denied_details("bookinfo", "deny-all")))))
    assert denied["RESPONSE_CODE_DETAILS"] == \
        "rbac_access_denied_matched_policy[ns[bookinfo]-policy[deny-all]-rule[0]]"
    grpc = fields(el.render_text(el.outbound_entry(el.grpc_call(CALL))))
    assert (grpc["REQ(:METHOD)"], grpc["PROTOCOL"]) == ("POST", "HTTP/2")
    tcp = el.render_text(el.tcp_outbound_entry(el.TcpConn(
        T0, "10.244.1.15", 40000, 41000, "10.96.0.20:5432", "10.244.2.40:5432",
        "outbound|5432||db.bookinfo.svc.cluster.local", 100, 200, 30)))
    assert '"- - -" 0 - - - "-" 100 200 30 -' in tcp and fields(tcp)["ROUTE_NAME"] == "-"


def test_dump_layouts() -> None:
    kiali = (DATA / "kiali-waypoint.log").read_text().splitlines()[0]
    real_prefix = re.match(r"^(\S+) \[", kiali)
    assert real_prefix
    ours = el.layout_timestamps("[x]", T0)
    assert len(ours.split(" ")[0]) == len(real_prefix.group(1))  # fixed 9 digits
    assert el.layout_cri("[x]", T0) == "2024-05-14T09:00:00.123Z stdout F [x]"
    assert el.layout_cri("[x]", T0, nanos=5) == "2024-05-14T09:00:00.123000005Z stdout F [x]"
    assert el.layout_plain("[x]") == "[x]"


def _dump(n: int, fmt: str, share: float, layout: str = "plain") -> list[str]:
    return "".join(gen_dump.generate(n, fmt, share, layout, seed=3)).splitlines()


@pytest.mark.parametrize("layout", ["plain", "cri"])
def test_gen_dump_text_malformed_share_is_as_asked(layout: str) -> None:
    lines = _dump(20000, "text", 0.01, layout)
    assert len(lines) == 20000
    if layout == "cri":
        cri = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?Z stdout F ")
        assert all(cri.match(x) for x in lines)
        lines = [cri.sub("", x) for x in lines]
    bad = [x for x in lines if not LINE.match(x)]
    assert len(bad) == 200
    kinds = Counter(fields(x)["UPSTREAM_CLUSTER_RAW"].split("|")[0] for x in lines
                    if LINE.match(x))
    assert {"outbound", "inbound", "PassthroughCluster"} <= set(kinds)


def test_gen_dump_json_malformed_share_and_clean_default() -> None:
    keys = set(json.loads((DATA / "istio-default-json-format.json").read_text()))
    lines = _dump(10000, "json", 0.005)
    bad = 0
    for x in lines:
        try:
            record = json.loads(x)
        except ValueError:
            bad += 1
            continue
        assert set(record) == keys
    assert bad == 50
    clean = _dump(5000, "text", 0.0)
    assert all(LINE.match(x) for x in clean)
    assert clean == _dump(5000, "text", 0.0)  # same seed, same bytes
