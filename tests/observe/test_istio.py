"""Tests for observe/istio.py: real Istio lines (and lines edited field by field) -> flows."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from observe import istio
from observe.envoy_format import parse_text
from observe.istio import to_flows
from observe.schema import FLOW_SCHEMA

LOGS = Path(__file__).parents[1] / "data" / "envoy-logs"
KUBECTL_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ")


def read_lines(name: str) -> list[str]:
    lines = (LOGS / name).read_text(encoding="utf-8").splitlines()
    return [KUBECTL_TS.sub("", line) for line in lines]  # input layer's job in production


OUT_LINE, IN_LINE = read_lines("istio-docs-access-log-sleep-httpbin.log")


def flows(lines: list[str], reporter: list[str | None] | None = None) -> list[dict[str, Any]]:
    parsed = parse_text(pa.array(lines))
    assert parsed.errors == []
    origin = pa.array([f"test.log:{i + 1}" for i in range(len(lines))])
    batch = to_flows(
        parsed.fields,
        reporter=pa.array(reporter, pa.string()) if reporter is not None else None,
        origin=origin,
        source="istio-text",
    )
    assert batch.schema == FLOW_SCHEMA
    return batch.to_pylist()


def test_sleep_to_httpbin_both_sides() -> None:
    out, inb = flows([OUT_LINE, IN_LINE], reporter=["foo/sleep-1", "foo/httpbin-1"])
    common = {
        "time": datetime(2020, 11, 25, 21, 26, 18, 409000, tzinfo=UTC),
        "src_ip": "10.44.1.23", "src_port": 37652,  # the same connection seen from both sides
        "dst_ip": "10.44.1.27", "dst_port": 80,  # the pod and its targetPort
        "service_host": "httpbin.foo.svc.cluster.local", "transport": "tcp",
        "protocol": "http", "http_version": "HTTP/1.1", "method": "GET",
        "path": "/status/418", "authority": "httpbin:8000", "status": 418,
        "response_flags": "-", "response_detail": "via_upstream", "bytes_in": 0,
        "bytes_out": 135, "request_id": "84961386-6d84-929d-98bd-c5aee93b5c88",
        "user_agent": "curl/7.73.0-DEV", "denied": False, "denied_by": None,
        "src_workload": None, "dst_workload": None, "src_principal": None,
        "dst_principal": None, "src_pod": None, "dst_pod": None, "source": "istio-text",
        "kind": "request", "packets_in": None, "packets_out": None, "tcp_state": None,
        "tcp_end": None, "itemized": None, "pid": None, "comm": None, "container_id": None,
        "pod_uid": None,
    }
    assert out == {
        **common, "duration_ms": 4, "dialed_ip": "10.0.45.184", "dialed_port": 8000,
        "direction": "outbound", "reporter": "foo/sleep-1", "mtls": "unknown", "sni": None,
        "upstream_cluster": "outbound|8000||httpbin.foo.svc.cluster.local",
        "origin": "test.log:1",
    }
    assert inb == {
        **common, "duration_ms": 3, "dialed_ip": "10.44.1.27", "dialed_port": 80,
        "direction": "inbound", "reporter": "foo/httpbin-1", "mtls": "mtls",
        "sni": "outbound_.8000_._.httpbin.foo.svc.cluster.local",
        "upstream_cluster": "inbound|8000||", "origin": "test.log:2",
    }


def test_inbound_without_sni_is_plaintext_and_other_sni_is_tls() -> None:
    plain = IN_LINE.replace(" outbound_.8000_._.httpbin.foo.svc.cluster.local ", " - ")
    tls = IN_LINE.replace(" outbound_.8000_._.httpbin.foo.svc.cluster.local ", " httpbin.example ")
    got = flows([plain, tls])
    assert [f["mtls"] for f in got] == ["plaintext", "tls"]
    assert [f["service_host"] for f in got] == [None, None]


def test_2019_tcp_passthrough_line() -> None:
    http, tcp = flows(read_lines("istio-docs-egress-control-2019-legacy-format.log"))
    assert tcp["direction"] == "outbound" and tcp["protocol"] == "tcp"
    assert tcp["method"] is None and tcp["path"] is None and tcp["http_version"] is None
    assert (tcp["src_ip"], tcp["src_port"]) == ("172.30.109.82", 59480)
    assert (tcp["dst_ip"], tcp["dst_port"]) == ("172.217.161.36", 443)
    assert (tcp["dialed_ip"], tcp["dialed_port"]) == ("172.217.161.36", 443)
    assert tcp["status"] == 0 and tcp["bytes_in"] == 601 and tcp["bytes_out"] == 17766
    assert tcp["mtls"] == "tls" and tcp["sni"] == "www.google.com"  # app-originated TLS
    assert tcp["service_host"] == "www.google.com"
    # upstream_local '-': the client is the downstream remote.
    assert (http["src_ip"], http["src_port"]) == ("172.30.109.82", 55314)
    assert http["mtls"] == "unknown" and http["service_host"] == "httpbin.org"


def test_egress_gateway_lines() -> None:
    got = flows(read_lines("istio-docs-egress-gateway-2019.log"))
    assert len(got) == 3  # the TCP line comes from a gateway: two legs
    http, tcp_up, tcp_down = got
    # upstream_local '-' on the HTTP line: a gateway cannot be told apart, one record only.
    assert http["direction"] == "outbound" and http["protocol"] == "http"
    assert http["http_version"] == "HTTP/2" and http["status"] == 301
    assert (http["src_ip"], http["dst_ip"]) == ("10.244.2.10", "151.101.65.67")
    assert http["dst_port"] == 80
    assert (http["dialed_ip"], http["dialed_port"]) == ("10.244.1.5", 80)
    assert http["mtls"] == "unknown" and http["service_host"] == "edition.cnn.com"
    assert tcp_up["direction"] == "outbound" and tcp_up["origin"] == "test.log:2"
    assert (tcp_up["src_ip"], tcp_up["src_port"]) == ("172.30.109.80", 41122)
    assert (tcp_up["dst_ip"], tcp_up["dst_port"]) == ("151.101.129.67", 443)
    assert tcp_up["mtls"] == "tls"
    assert tcp_down["direction"] == "inbound" and tcp_down["origin"] == "test.log:2"
    assert (tcp_down["src_ip"], tcp_down["src_port"]) == ("172.30.109.112", 59970)
    assert (tcp_down["dst_ip"], tcp_down["dst_port"]) == ("172.30.109.80", 443)
    assert (tcp_down["dialed_ip"], tcp_down["dialed_port"]) == ("172.30.109.80", 443)
    assert tcp_down["mtls"] == "tls" and tcp_down["service_host"] == "edition.cnn.com"
    assert tcp_down["bytes_out"] == tcp_up["bytes_out"] == 1879689


def test_waypoint_lines() -> None:
    lines = read_lines("kiali-waypoint.log")
    got = flows(lines)
    assert len(got) == len(lines) == 16
    assert all(f["direction"] == "inbound" and f["mtls"] == "unknown" for f in got)
    first = got[0]
    assert (first["src_ip"], first["src_port"]) == ("10.244.0.37", 52134)
    assert (first["dst_ip"], first["dst_port"]) == ("10.244.0.32", 9080)  # connect_originate
    assert (first["dialed_ip"], first["dialed_port"]) == ("10.96.185.196", 9080)  # the VIP
    assert first["service_host"] == "details.bookinfo.svc.cluster.local"
    gw = got[4]
    assert gw["upstream_cluster"].startswith("inbound-vip|80|http|bookinfo-gateway-istio")
    assert (gw["dst_ip"], gw["dst_port"], gw["src_ip"]) == ("10.244.0.39", 80, "10.244.0.45")
    assert gw["service_host"] == "bookinfo-gateway-istio.bookinfo.svc.cluster.local"


@pytest.mark.parametrize(
    ("details", "denied_by"),
    [
        ("rbac_access_denied_matched_policy[ns[foo]-policy[deny-all]-rule[0]]",
         "ns[foo]-policy[deny-all]-rule[0]"),
        ("rbac_access_denied_matched_policy[none]", "none"),
    ],
)
def test_rbac_403_line(details: str, denied_by: str) -> None:
    line = IN_LINE.replace(" 418 - via_upstream - ", f" 403 - {details} - ").replace(
        " 0 135 3 1 ", " 0 19 0 - "
    )
    (f,) = flows([line])
    assert f["denied"] is True and f["denied_by"] == denied_by
    assert f["status"] == 403 and f["response_detail"] == details and f["bytes_out"] == 19


def test_rbac_tcp_termination() -> None:
    # Envoy's network RBAC filter sets CONNECTION_TERMINATION_DETAILS (envoyproxy/envoy#13305).
    line = IN_LINE.replace('"GET /status/418 HTTP/1.1" 418 - via_upstream - ', '"- - -" 0 - - '
                           "rbac_access_denied_matched_policy[none] ").replace(
        '"curl/7.73.0-DEV" "84961386-6d84-929d-98bd-c5aee93b5c88" "httpbin:8000"',
        '"-" "-" "-"',
    )
    (f,) = flows([line])
    assert f["protocol"] == "tcp" and f["status"] == 0
    assert f["denied"] is True and f["denied_by"] == "none"
    assert f["response_detail"] == "rbac_access_denied_matched_policy[none]"
    assert f["mtls"] == "mtls"


def test_grpc_line() -> None:
    line = IN_LINE.replace(
        '"GET /status/418 HTTP/1.1" 418', '"POST /helloworld.Greeter/SayHello HTTP/2" 200'
    )
    rest_h2 = IN_LINE.replace('"GET /status/418 HTTP/1.1" 418', '"POST /api/items HTTP/2" 201')
    by_agent = rest_h2.replace('"curl/7.73.0-DEV"', '"grpc-java-netty/1.60.0"')
    got = flows([line, rest_h2, by_agent])
    assert [f["protocol"] for f in got] == ["grpc", "http", "grpc"]
    assert got[0]["http_version"] == "HTTP/2" and got[0]["path"] == "/helloworld.Greeter/SayHello"


def test_blackhole_and_passthrough_lines() -> None:
    blackhole = OUT_LINE.replace(
        '418 - via_upstream - "-"', '502 - direct_response - "-"'
    ).replace(
        '"httpbin:8000" "10.44.1.27:80" outbound|8000||httpbin.foo.svc.cluster.local '
        "10.44.1.23:37652 10.0.45.184:8000",
        '"api.example.com" "-" BlackHoleCluster - 93.184.216.34:80',
    )
    passthrough = OUT_LINE.replace(
        '"httpbin:8000" "10.44.1.27:80" outbound|8000||httpbin.foo.svc.cluster.local',
        '"api.example.com:8080" "93.184.216.34:8080" PassthroughCluster',
    )
    bh, pt = flows([blackhole, passthrough])
    assert bh["direction"] == "outbound" and bh["upstream_cluster"] == "BlackHoleCluster"
    assert (bh["dst_ip"], bh["dst_port"]) == ("93.184.216.34", 80)  # upstream_host '-': dialed
    assert bh["src_ip"] == "10.44.1.23" and bh["src_port"] == 46520  # no upstream_local
    assert bh["service_host"] == "api.example.com" and bh["status"] == 502
    assert pt["service_host"] == "api.example.com" and pt["mtls"] == "unknown"
    assert (pt["dst_ip"], pt["dst_port"]) == ("93.184.216.34", 8080)


def test_ipv6_line() -> None:
    line = (
        IN_LINE.replace('"127.0.0.1:80"', '"[::1]:80"')
        .replace("127.0.0.1:41854", "[::6]:41854")
        .replace("10.44.1.27:80 10.44.1.23:37652", "[fd00:10:244::1b]:80 [fd00:10:244::17]:37652")
    )
    (f,) = flows([line])
    assert (f["src_ip"], f["src_port"]) == ("fd00:10:244::17", 37652)
    assert (f["dst_ip"], f["dst_port"]) == ("fd00:10:244::1b", 80)
    assert f["mtls"] == "mtls"


def test_unknown_cluster_and_epoch_times() -> None:
    parsed = parse_text(pa.array(read_lines("envoy-docs-default-format-example.log")))
    (f,) = to_flows(parsed.fields, reporter=None, origin=pa.array(["e.log:1"]),
                    source="envoy-text").to_pylist()
    assert f["direction"] == "unknown" and f["mtls"] == "unknown"
    assert (f["dst_ip"], f["dst_port"]) == ("10.0.2.1", 80)
    assert f["src_ip"] is None and f["reporter"] is None
    epoch = pa.table({"start_time": ["1606339578.409", "junk", None]})
    times = to_flows(epoch, reporter=None, origin=pa.array(["a", "b", "c"]), source="x")
    assert times.column("time").to_pylist() == [
        datetime(2020, 11, 25, 21, 26, 18, 409000, tzinfo=UTC), None, None
    ]


def test_row_count_mismatch_is_rejected() -> None:
    parsed = parse_text(pa.array([OUT_LINE]))
    with pytest.raises(ValueError, match="one entry per row"):
        to_flows(parsed.fields, reporter=None, origin=pa.array(["a", "b"]), source="x")


ADDRESSES = [
    "10.0.0.1:80", "10.0.0.1", "[::1]:8080", "[::1]", "[fe80::1%eth0]:80",
    "envoy://connect_originate/10.1.2.3:80", "envoy://internal_client_address/", "unix://@foo",
    "1.2.3.4:123456", "1.2.3.4:", "1.2.3.4::80", "a1.2.3.4:80", "1234.1.1.1:80", "1.2.3.4:08",
    "10.0.0.1:0", None, "", ":80", "x:1:23", "[::1]:99999", "[::1]:1x", "tcp://1.1.1.1:5",
    "1.1.1.1:5 ", "é1.1.1.1:5", "1.1.1.1:٣", "[2001:db8::5]:15008",
]


@pytest.mark.parametrize("distinct", [False, True])
def test_address_split_matches_the_reference_regex(distinct: bool) -> None:
    # Few distinct values take the per-distinct-value path, many the numpy port split.
    values = ADDRESSES * 5
    if distinct:
        values += [f"10.{i % 256}.{i // 256}.7:{i}" for i in range(400)]
    arr = pa.array(values, pa.string())
    for a in (arr, arr.slice(3, len(arr) - 5)):
        ip, port = istio._address(a)
        ref_ip, ref_port = istio._address_plain(a)
        assert ip.to_pylist() == ref_ip.to_pylist()
        assert port.to_pylist() == ref_port.to_pylist()
    ip, port = istio._address(pa.array(ADDRESSES, pa.string()))
    got = dict(zip(ADDRESSES, zip(ip.to_pylist(), port.to_pylist(), strict=True), strict=True))
    assert got["envoy://connect_originate/10.1.2.3:80"] == ("10.1.2.3", 80)
    assert got["[2001:db8::5]:15008"] == ("2001:db8::5", 15008)
    assert got["1.2.3.4:123456"] == (None, None) and got["[::1]"] == ("::1", None)


def test_flow_batches_hold_the_same_records_as_to_flows() -> None:
    lines = read_lines("istio-docs-egress-gateway-2019.log") * 3
    parsed = parse_text(pa.array(lines))
    origin = pa.array([f"t.log:{i + 1}" for i in range(parsed.fields.num_rows)])
    main, legs, rows = istio.flow_batches(
        parsed.fields, reporter=None, origin=origin, source="istio-text", checked=True
    )
    assert legs is not None and legs.num_rows == len(rows) == 3
    assert main.schema == legs.schema == FLOW_SCHEMA
    joined = to_flows(parsed.fields, reporter=None, origin=origin, source="istio-text")
    assert joined.num_rows == main.num_rows + legs.num_rows
    # to_flows puts each leg right after its outbound record; flow_batches keeps them apart.
    assert joined.column("origin").to_pylist() == [
        o for i, o in enumerate(main.column("origin").to_pylist())
        for _ in range(2 if i in set(rows.tolist()) else 1)
    ]
    pairs = sorted(zip(joined.column("origin").to_pylist(),
                       joined.column("direction").to_pylist(), strict=True))
    both = pa.concat_batches([main, legs])
    assert pairs == sorted(zip(both.column("origin").to_pylist(),
                               both.column("direction").to_pylist(), strict=True))


@pytest.mark.parametrize(
    ("address", "ip", "port"),
    [
        ("10.44.1.23:37652", "10.44.1.23", 37652),
        ("10.44.1.23:", None, None),
        ("10.44.1.23", "10.44.1.23", None),
        ("[fe80::1]:15008", "fe80::1", 15008),
        ("[fe80::1]", "fe80::1", None),
        ("envoy://connect_originate/10.0.0.1:8080", "10.0.0.1", 8080),
        ("envoy://internal_client_address/", None, None),
        ("10.44.1.23:123456", None, None),  # six digits: not a port, and no IP before it
        ("10.44.1.23:80:81", None, None),
        ("10.44.1.23:8a", None, None),
        ("10.44.1.23:080", "10.44.1.23", 80),
        (":80", None, None),
        (None, None, None),
    ],
)
def test_address_ip_and_port(address: str | None, ip: str | None, port: int | None) -> None:
    # Ephemeral-port shaped column (all distinct) so the numpy path runs, not the dictionary one.
    col = pa.array([address] + [f"10.9.{i // 250}.{i % 250}:{1000 + i}" for i in range(400)])
    ips, ports = istio._address(col)
    assert (ips[0].as_py(), ports[0].as_py()) == (ip, port)
    assert (ips[399].as_py(), ports[399].as_py()) == ("10.9.1.148", 1398)


def test_address_columns_of_empty_strings_do_not_crash() -> None:
    """JSON input can carry "" where Envoy would print '-'."""
    from observe.istio import _address

    ip, port = _address(pa.array(["", "", None], pa.string()))
    assert ip.to_pylist() == [None, None, None] and port.to_pylist() == [None, None, None]


def test_numbers_too_large_for_their_column_never_crash() -> None:
    # Found by feeding an 11-digit status and a 23-digit byte count: Arrow's cast raised.
    fields = pa.table({
        "response_code": pa.array(["200", "99999999999", "2147483648", "-"]),
        "bytes_received": pa.array(["1", "999999999999999999", "9" * 23, "x1"]),
    })
    for checked in (False, True):
        if checked:  # the TEXT parser never hands over the 23-digit value or 'x1'
            fields = fields.slice(0, 2)
        status = istio._int(fields.column("response_code").chunk(0), pa.int32(), checked)
        size = istio._int(fields.column("bytes_received").chunk(0), pa.int64(), checked)
        assert status.type == pa.int32() and size.type == pa.int64()
        assert status.to_pylist() == [200, None, None, None][: len(status)]
        assert size.to_pylist() == [1, 999999999999999999, None, None][: len(size)]


def test_text_lines_with_overlong_numbers_are_malformed_not_fatal() -> None:
    status_11 = OUT_LINE.replace('" 418 ', '" 99999999999 ', 1)
    bytes_23 = re.sub(r'(" 418 \S+ \S+ \S+ "[^"]*" )(\d+)', r"\g<1>" + "9" * 23, OUT_LINE, count=1)
    assert status_11 != OUT_LINE and bytes_23 != OUT_LINE
    parsed = parse_text(pa.array([status_11, bytes_23]))
    assert parsed.good.tolist() == [True, False]
    assert "number" in parsed.errors[0][1]
    batch = to_flows(parsed.fields, reporter=None, origin=pa.array(["t.log:1"]),
                     source="istio-text", checked=True)
    assert batch.column("status").to_pylist() == [None]
