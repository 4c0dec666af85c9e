"""Linkerd proxy access logs: parsing, mapping and the pipeline's dump layouts.

Expected values are read off the real lines in tests/data/linkerd-logs/ (Linkerd's access
logging docs) by hand, following the format of linkerd2-proxy's access-log writer
(linkerd/tracing/src/access_log.rs, linkerd/http/access-log/src/lib.rs).
"""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from observe import linkerd
from observe.inputs import LOGS, TEXT, detect
from observe.pipeline import ObserveOptions, ObserveStats, iter_flows, plan_inputs
from observe.schema import FLOW_SCHEMA

DATA = Path(__file__).resolve().parents[1] / "data" / "linkerd-logs"
APACHE = DATA / "linkerd-docs-access-log-apache.log"
JSONL = DATA / "linkerd-docs-access-log-json.jsonl"
TRAFFIC = "traffic.booksapp.serviceaccount.identity.linkerd.cluster.local"


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _flows(lines: list[str], source: str, reporter: str | None = "booksapp/webapp-1"
           ) -> tuple[list[dict[str, object]], list[tuple[int, str]]]:
    parsed = linkerd.parse(lines, source)
    n = parsed.fields.num_rows
    batch = linkerd.to_flows(
        parsed.fields, reporter=pa.array([reporter] * n, pa.string()),
        origin=pa.array([f"f:{i}" for i in range(n)], pa.string()), source=source)
    assert batch.schema == FLOW_SCHEMA
    return batch.to_pylist(), parsed.errors


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# (src_port, principal, time, method, path, status, http_version, mtls) per apache line.
APACHE_EXPECTED = [
    (51160, TRAFFIC, "2022-08-23T20:28:20.071809", "GET", "/", 200, "HTTP/2", "mtls"),
    (51160, TRAFFIC, "2022-08-23T20:28:20.187706", "POST", "/authors", 303, "HTTP/2", "mtls"),
    (51160, TRAFFIC, "2022-08-23T20:28:20.301798", "GET", "/authors/104", 200, "HTTP/2", "mtls"),
    (51160, TRAFFIC, "2022-08-23T20:28:20.409177", "POST", "/books", 303, "HTTP/2", "mtls"),
    (43682, None, "2022-08-23T20:28:23.049685", "GET", "/ping", 200, "HTTP/1.1", "plaintext"),
]


def test_every_apache_line_maps_to_its_fields() -> None:
    rows, errors = _flows(_lines(APACHE), linkerd.SOURCE_APACHE)
    assert errors == []
    assert len(rows) == 5
    for row, (port, principal, t, method, path, status, version, mtls) in zip(
            rows, APACHE_EXPECTED, strict=True):
        assert row["src_ip"] == ("10.42.0.1" if principal is None else "10.42.0.63")
        assert row["src_port"] == port
        assert row["src_principal"] == principal
        assert row["time"] == _t(t)  # nanoseconds truncated to the schema's microseconds
        assert (row["method"], row["path"], row["status"]) == (method, path, status)
        assert (row["http_version"], row["mtls"]) == (version, mtls)
        assert row["direction"] == "inbound" and row["kind"] == "request"
        assert row["reporter"] == "booksapp/webapp-1"
        assert row["source"] == "linkerd-apache" and row["protocol"] == "http"
        # No server address in Linkerd's log: learn derives the workload port.
        assert row["dst_ip"] is None and row["dst_port"] is None
        # apache carries no sizes, durations or user agent.
        assert row["bytes_in"] is None and row["duration_ms"] is None
        assert row["user_agent"] is None
    meshed, probe = rows[0], rows[4]
    # 'http://webapp:7000/': the client dialled the webapp Service on port 7000.
    assert (meshed["authority"], meshed["service_host"]) == ("webapp:7000", "webapp")
    assert (meshed["dialed_ip"], meshed["dialed_port"]) == (None, 7000)
    # 'GET /ping HTTP/1.1' (origin form): apache logs no Host, so no port at all.
    assert probe["authority"] is None and probe["dialed_port"] is None


def test_every_json_line_maps_to_its_fields() -> None:
    rows, errors = _flows(_lines(JSONL), linkerd.SOURCE_JSON)
    assert errors == []
    got = [(r["src_ip"], r["src_port"], r["time"], r["method"], r["path"], r["status"],
            r["bytes_in"], r["bytes_out"], r["duration_ms"], r["user_agent"]) for r in rows]
    go = "Go-http-client/1.1"
    assert got == [
        ("10.42.0.70", 32996, _t("2022-08-23T20:33:42.321746"), "GET", "/", 200, None, 19627,
         14, go),
        ("10.42.0.70", 32996, _t("2022-08-23T20:33:42.436964"), "POST", "/authors", 303, 33, 0,
         14, go),
        ("10.42.0.70", 32996, _t("2022-08-23T20:33:42.551768"), "GET", "/authors/105", 200,
         None, 2350, 6, go),
        ("10.42.0.70", 32996, _t("2022-08-23T20:33:42.659401"), "POST", "/books", 303, 46, 0,
         9, go),
        ("10.42.0.1", 56300, _t("2022-08-23T20:33:49.254262"), "GET", "/ping", 200, None, 4,
         1, "kube-probe/1.24"),
    ]
    assert [r["src_principal"] for r in rows] == [TRAFFIC] * 4 + [None]
    assert [r["mtls"] for r in rows] == ["mtls"] * 4 + ["plaintext"]
    assert [r["http_version"] for r in rows] == ["HTTP/2"] * 4 + ["HTTP/1.1"]
    probe = rows[4]
    # The kubelet dialled the pod IP: host "10.42.0.69:7000" is the pod's own address.
    assert (probe["authority"], probe["dialed_ip"], probe["dialed_port"]) == (
        "10.42.0.69:7000", "10.42.0.69", 7000)
    assert probe["service_host"] is None
    assert {r["source"] for r in rows} == {"linkerd-json"}


def test_json_fast_path_equals_per_line_reading() -> None:
    # 40 lines take Arrow's reader; one bad line in the block sends a part per line.
    lines = _lines(JSONL) * 8
    fast = linkerd.parse_json(lines)
    per_line = linkerd.parse_json(lines[:1])
    assert fast.fields.slice(0, 1).equals(per_line.fields)
    broken = list(lines)
    broken[17] = broken[17][:60]  # truncated mid-object
    broken[20] = broken[20].replace('"status":200', '"status":"200"')  # a string status
    assert broken[20] != lines[20]
    parsed = linkerd.parse_json(broken)
    assert parsed.errors == [(17, linkerd.NOT_JSON)]
    assert parsed.fields.num_rows == 39
    assert parsed.fields.column("status").to_pylist()[19] == "200"
    assert parsed.fields.drop(["status"]).equals(fast.fields.drop(["status"]).filter(
        pa.array([i != 17 for i in range(40)])))


def test_garbage_and_truncated_lines_are_counted_with_reasons() -> None:
    good = _lines(APACHE)[0]
    lines = [
        good[:70],  # truncated inside the timestamp
        good.replace("[2022-08-23T20:28:20.071809491Z]", "[2022-02-30T20:28:20Z]"),
        good.replace("10.42.0.63:51160", "10.42.0.63:5x"),
        "",
        good,
    ]
    _, errors = _flows(lines, linkerd.SOURCE_APACHE)
    assert errors == [(0, linkerd.NOT_APACHE), (1, linkerd.BAD_TIME), (2, linkerd.BAD_ADDR),
                      (3, linkerd.EMPTY)]
    js = _lines(JSONL)[0]
    jlines = [js[:-10], '{"level":"INFO","fields":{}}', js.replace('"10.42.0.70:32996"', '"x"'),
              js.replace('"version":"HTTP/2.0"', '"version":"nope"'), js]
    _, jerrors = _flows(jlines, linkerd.SOURCE_JSON)
    assert jerrors == [(0, linkerd.NOT_JSON), (1, linkerd.NOT_LINKERD), (2, linkerd.BAD_ADDR),
                       (3, linkerd.BAD_REQUEST)]


def test_uri_forms_and_ipv6_clients() -> None:
    base = '{ip} - - [2024-01-02T03:04:05Z] "{m} {uri} {v}"{status}'
    lines = [
        base.format(ip="[fd00::7]:4100", m="GET", uri="http://web-svc.emojivoto/api/list?x=1",
                    v="HTTP/1.1", status=" 200"),
        base.format(ip="10.1.2.3:1", m="CONNECT", uri="db.example.com:5432", v="HTTP/1.1",
                    status=""),  # no response: linkerd2-proxy never records a status
        base.format(ip="10.1.2.3:2", m="GET", uri="https://[fd00::9]:8443", v="HTTP/2.0",
                    status=" 503"),
    ]
    rows, errors = _flows(lines, linkerd.SOURCE_APACHE)
    assert errors == []
    first, connect, v6 = rows
    assert (first["src_ip"], first["src_port"]) == ("fd00::7", 4100)
    assert (first["path"], first["authority"], first["dialed_port"]) == (
        "/api/list?x=1", "web-svc.emojivoto", 80)  # http:// without a port: 80
    assert first["service_host"] == "web-svc.emojivoto"
    assert (connect["path"], connect["authority"], connect["dialed_port"], connect["status"]) == (
        None, "db.example.com:5432", 5432, None)
    assert (v6["path"], v6["dialed_ip"], v6["dialed_port"], v6["http_version"]) == (
        "/", "fd00::9", 8443, "HTTP/2")


def test_grpc_requests_are_recognised() -> None:
    line = ('10.244.0.9:5000 web.emojivoto.serviceaccount.identity.linkerd.cluster.local - '
            '[2024-01-02T03:04:05.5Z] "POST http://emoji-svc.emojivoto:8080/emojivoto.v1.'
            'EmojiService/ListAll HTTP/2.0" 200')
    rows, _ = _flows([line], linkerd.SOURCE_APACHE)
    assert rows[0]["protocol"] == "grpc"
    assert rows[0]["path"] == "/emojivoto.v1.EmojiService/ListAll"


def test_identities_are_parsed_not_assumed() -> None:
    ident = linkerd.parse_identity(TRAFFIC)
    assert ident is not None
    assert (ident.service_account, ident.namespace, ident.control_plane, ident.trust_domain) == (
        "traffic", "booksapp", "linkerd", "cluster.local")
    other = linkerd.parse_identity("web.emojivoto.serviceaccount.identity.l5d.corp.example.org")
    assert other is not None and (other.control_plane, other.trust_domain) == (
        "l5d", "corp.example.org")
    assert other.name == "web.emojivoto.serviceaccount.identity.l5d.corp.example.org"
    assert linkerd.parse_identity("-") is None
    assert linkerd.parse_identity("cluster.local/ns/default/sa/web") is None
    assert linkerd.identity_name("web", "emojivoto") == (
        "web.emojivoto.serviceaccount.identity.linkerd.cluster.local")


# --------------------------------------------------------------------------- detection + layouts


def test_detect_recognises_linkerd_logs_by_content() -> None:
    for path in (APACHE, JSONL):
        det = detect(path.read_bytes(), complete=True)
        assert (det.kind, det.layout) == (LOGS, TEXT)
    diag = b"[     0.002580s]  INFO ThreadId(01) linkerd2_proxy: release stable-2.14\n"
    assert detect(diag, complete=True).kind == LOGS


def _observe(paths: list[str]) -> tuple[list[dict[str, object]], ObserveStats]:
    stats = ObserveStats()
    batches = list(iter_flows(plan_inputs(paths), ObserveOptions(workers=1), stats))
    rows = pa.Table.from_batches(batches, schema=FLOW_SCHEMA).to_pylist() if batches else []
    return rows, stats


def _proxy_output(access: list[str]) -> list[str]:
    """What `kubectl logs <pod> -c linkerd-proxy` shows: diagnostics and access lines."""
    return [
        "[     0.002580s]  INFO ThreadId(01) linkerd2_proxy: release stable-2.12.0 by linkerd",
        "[     0.004010s]  INFO ThreadId(01) linkerd2_proxy: Admin interface on 0.0.0.0:4191",
        *access,
        "[   112.305091s]  INFO ThreadId(02) daemon:identity: linkerd_app: Certified identity",
    ]


def test_kubectl_logs_dump(tmp_path: Path) -> None:
    pod = tmp_path / "booksapp" / "webapp-6b8c6f6d9c-7wbrn"
    pod.mkdir(parents=True)
    apache = _lines(APACHE)
    (pod / "linkerd-proxy.log").write_text(
        "\n".join([*_proxy_output(apache), apache[0][:50]]) + "\n", encoding="utf-8")
    other = tmp_path / "booksapp" / "webapp-6b8c6f6d9c-x2qkz"
    other.mkdir()
    (other / "linkerd-proxy.log").write_text(
        "\n".join(_proxy_output(_lines(JSONL))) + "\n", encoding="utf-8")
    rows, stats = _observe([str(tmp_path)])
    assert stats.by_source == {"linkerd-apache": 5, "linkerd-json": 5}
    assert stats.ignored_lines == 6  # the proxy's own diagnostics
    assert stats.malformed == 1
    assert stats.malformed_samples == [
        f"{pod / 'linkerd-proxy.log'}:9: {linkerd.NOT_APACHE}"]  # after 2+5+1 lines
    assert [r["reporter"] for r in rows] == (
        ["booksapp/webapp-6b8c6f6d9c-7wbrn"] * 5 + ["booksapp/webapp-6b8c6f6d9c-x2qkz"] * 5)
    assert rows[0]["origin"] == f"{pod / 'linkerd-proxy.log'}:3"
    # One file alone takes the raw (no-copy) path for plain lines: Linkerd lines still found.
    single, alone = _observe([str(pod / "linkerd-proxy.log")])
    assert alone.by_source == {"linkerd-apache": 5} and alone.malformed == 1
    assert single == rows[:5]


def test_kubectl_prefix_and_timestamps(tmp_path: Path) -> None:
    log = tmp_path / "booksapp_webapp-6b8c6f6d9c-7wbrn_linkerd-proxy.log"
    stamped = [f"2022-08-23T20:28:2{i}.000000001Z {ln}" for i, ln in
               enumerate(_lines(APACHE) + _lines(JSONL))]
    log.write_text("\n".join(stamped) + "\n", encoding="utf-8")
    rows, stats = _observe([str(log)])
    assert stats.by_source == {"linkerd-apache": 5, "linkerd-json": 5}
    assert stats.malformed == 0
    assert {r["reporter"] for r in rows} == {"booksapp/webapp-6b8c6f6d9c-7wbrn"}


def test_cri_node_file_with_partial_lines(tmp_path: Path) -> None:
    d = tmp_path / "booksapp_webapp-6b8c6f6d9c-7wbrn_0b7c2a59-5b1e-4d3c-9a43-3d2b1f0e8c71"
    (d / "linkerd-proxy").mkdir(parents=True)
    js = _lines(JSONL)
    out = ["2022-08-23T20:33:40.000000000Z stdout F [     0.002580s]  INFO ThreadId(01) x"]
    for i, line in enumerate(js):
        ts = f"2022-08-23T20:33:4{i}.100000000Z"
        if i == 1:  # the runtime split this one into a partial and a final fragment
            out += [f"{ts} stderr P {line[:40]}", f"{ts} stderr F {line[40:]}"]
        else:
            out.append(f"{ts} stderr F {line}")
    (d / "linkerd-proxy" / "0.log").write_text("\n".join(out) + "\n", encoding="utf-8")
    rows, stats = _observe([str(tmp_path)])
    assert stats.by_source == {"linkerd-json": 5}
    assert stats.malformed == 0 and stats.ignored_lines == 1
    assert rows[1]["path"] == "/authors" and rows[1]["bytes_in"] == 33
    assert {r["reporter"] for r in rows} == {"booksapp/webapp-6b8c6f6d9c-7wbrn"}


def test_shipper_envelopes(tmp_path: Path) -> None:
    records = []
    for line in _lines(APACHE):  # fluent-bit: the line as a string
        records.append({"log": line + "\n", "stream": "stderr", "kubernetes": {
            "pod_name": "webapp-6b8c6f6d9c-7wbrn", "namespace_name": "booksapp",
            "container_name": "linkerd-proxy"}})
    for line in _lines(JSONL):  # fluent-bit with Merge_Log: the access record parsed
        records.append({"log": json.loads(line), "kubernetes": {
            "pod_name": "webapp-6b8c6f6d9c-x2qkz", "namespace_name": "booksapp",
            "container_name": "linkerd-proxy"}})
    records.append({"log": _lines(APACHE)[0][:30], "kubernetes": {
        "pod_name": "webapp-6b8c6f6d9c-x2qkz", "namespace_name": "booksapp"}})
    path = tmp_path / "export.jsonl.gz"
    path.write_bytes(gzip.compress(
        "\n".join(json.dumps(r) for r in records).encode() + b"\n"))
    rows, stats = _observe([str(path)])
    assert stats.by_source == {"linkerd-apache": 5, "linkerd-json": 5}
    assert stats.malformed == 1
    assert [r["reporter"] for r in rows] == (
        ["booksapp/webapp-6b8c6f6d9c-7wbrn"] * 5 + ["booksapp/webapp-6b8c6f6d9c-x2qkz"] * 5)
    assert rows[5]["bytes_out"] == 19627


def test_same_lines_in_two_layouts_are_deduplicated(tmp_path: Path) -> None:
    a = tmp_path / "booksapp" / "webapp-6b8c6f6d9c-7wbrn"
    a.mkdir(parents=True)
    (a / "linkerd-proxy.log").write_text(APACHE.read_text(encoding="utf-8"), encoding="utf-8")
    d = tmp_path / "booksapp_webapp-6b8c6f6d9c-7wbrn_0b7c2a59-5b1e-4d3c-9a43-3d2b1f0e8c71"
    (d / "linkerd-proxy").mkdir(parents=True)
    (d / "linkerd-proxy" / "0.log").write_text("".join(
        f"2022-08-23T20:28:2{i}.0Z stderr F {ln}\n" for i, ln in enumerate(_lines(APACHE))),
        encoding="utf-8")
    _, stats = _observe([str(tmp_path)])
    assert stats.by_source == {"linkerd-apache": 5}
    assert stats.duplicates == 5


def test_mixed_istio_and_linkerd_lines_keep_istio_parsing() -> None:
    istio = (Path(__file__).resolve().parents[1] / "data" / "envoy-logs"
             / "istio-docs-access-log-sleep-httpbin.log").read_text(encoding="utf-8")
    lines = istio.splitlines() + _lines(APACHE)
    from observe import layouts
    arr = pa.array(lines, pa.string())
    text, js = layouts.classify_lines(arr)
    lk_apache, lk_json = layouts.classify_linkerd(arr, not_rows=text | js)
    assert text.tolist() == [True, True] + [False] * 5
    assert lk_apache.tolist() == [False, False] + [True] * 5
    assert not js.any() and not lk_json.any()


@pytest.mark.parametrize("line", [
    "2024-05-01T10:00:00.000000Z\tinfo\tpilot-agent started",
    "[2024-05-01 10:00:00.000][15][info][main] envoy started",
    "[     0.002580s]  INFO ThreadId(01) linkerd2_proxy: release",
])
def test_proxy_diagnostics_are_not_linkerd_candidates(line: str) -> None:
    from observe import layouts
    apache, js = layouts.classify_linkerd(pa.array([line], pa.string()))
    assert not apache.any() and not js.any()
    raw = line.encode()
    import numpy as np
    data = np.frombuffer(raw, dtype=np.uint8)
    assert not layouts.maybe_linkerd_raw(data, np.array([0]), np.array([len(raw)]),
                                         np.array([True]))
