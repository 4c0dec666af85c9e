"""observe.ship: the node's spool and shipper, against a real local HTTP server.

The receiver here is a small stand-in for the observer's ``/v1/flows`` (the real one is tested
in tests/meshwright/test_observe_ingest.py and, over TLS, test_observe_tls.py), plain HTTP or
HTTPS with certificates the ``openssl`` command makes (:func:`make_pki`): it decodes every body
with
:func:`observe.ship.decode_shipment`, stores a shipment once per (stream, seq) and answers as the
test scripts it - statuses, a dropped answer after the shipment was taken, nothing at all. The
node side runs in this process, or as a subprocess where the behaviour is about processes
(SIGKILL, SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import zstandard
from support.pki import make_pki
from support.shipping_node import spooled_ports, start_node

from observe.errors import FormatError, InputError
from observe.schema import FLOW_SCHEMA, conform
from observe.ship import (
    CONTENT_TYPE,
    HEADER_NODE,
    HEADER_ROWS,
    HEADER_SEQ,
    HEADER_STREAM,
    Shipper,
    Spool,
    check_url,
    client_context,
    decode_shipment,
    encode_shipment,
    http_post,
    is_loopback,
)
from observe.watch import Backoff

ROOT = Path(__file__).resolve().parents[2]


def flows(first: int, n: int, source: str = "ebpf") -> pa.RecordBatch:
    """``n`` connection records with ``src_port`` ``first`` .. ``first + n - 1`` (their ids)."""
    return conform(pa.table({
        "src_ip": pa.array(["10.0.0.1"] * n), "src_port": pa.array(range(first, first + n),
                                                                   pa.int32()),
        "dst_ip": pa.array(["10.0.0.2"] * n), "dst_port": pa.array([80] * n, pa.int32()),
        "kind": pa.array(["connection"] * n), "source": pa.array([source] * n),
        "origin": pa.array([f"ebpf:test:event {first + i}" for i in range(n)]),
    }))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Receiver:
    """An HTTP server taking shipments: stored once per (stream, seq), answered as scripted.
    ``tls``: (certificate, key) files: HTTPS (its ``url`` says so).

    ``script``: per request, in order, one of ``("status", code)`` (answer that, store
    nothing), ``("drop",)`` (store it, then close without an answer: the answer is lost) or
    ``("hang", seconds)``; when empty, store and answer 200.
    """

    def __init__(self, port: int = 0, tls: tuple[Path, Path] | None = None) -> None:
        self.script: list[tuple[Any, ...]] = []
        self.requests: list[dict[str, Any]] = []
        self.stored: dict[tuple[str, int], list[int]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    action = receiver.script.pop(0) if receiver.script else ("store",)
                    receiver.requests.append({
                        "headers": {k: v for k, v in self.headers.items()}, "size": len(body),
                        "action": action[0]})
                if action[0] == "status":
                    self._answer(action[1], {"error": f"scripted {action[1]}"},
                                 action[2] if len(action) > 2 else {})
                    return
                if action[0] == "hang":
                    time.sleep(action[1])
                    return
                ports = [p for b in decode_shipment(body, "test",
                                                    encoding=self.headers["Content-Encoding"])
                         for p in b.column("src_port").to_pylist()]
                key = (self.headers[HEADER_STREAM], int(self.headers[HEADER_SEQ]))
                with receiver.lock:
                    duplicate = key in receiver.stored
                    if not duplicate:
                        receiver.stored[key] = ports
                if action[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._answer(200, {"result": "duplicate" if duplicate else "stored"})

            def _answer(self, status: int, doc: dict[str, Any],
                        headers: dict[str, str] | None = None) -> None:
                data = json.dumps(doc).encode()
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass

        self.httpd = Server(("127.0.0.1", port), Handler)
        self.port = int(self.httpd.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}/v1/flows"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.url = f"https://127.0.0.1:{self.port}/v1/flows"

    def __enter__(self) -> Receiver:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def ports(self) -> list[int]:
        with self.lock:
            return [p for k in sorted(self.stored) for p in self.stored[k]]

    def seqs(self, stream: str) -> list[int]:
        with self.lock:
            return sorted(s for st, s in self.stored if st == stream)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fast() -> Backoff:
    return Backoff(base=0.02, cap=0.1)


def paced(batches: list[pa.RecordBatch], pause: float) -> Iterator[pa.RecordBatch]:
    for b in batches:
        yield b
        time.sleep(pause)


# -- the body ------------------------------------------------------------------------------------
def test_a_shipment_round_trips_compressed_and_conformed() -> None:
    batches = [flows(1, 500), flows(501, 300)]
    body = encode_shipment(batches)
    plain = encode_shipment(batches, zstd=False)
    assert len(body) * 5 < len(plain)
    for data, coding in ((body, "zstd"), (plain, None)):
        back = decode_shipment(data, "t", encoding=coding)
        assert all(b.schema == FLOW_SCHEMA for b in back)
        assert pa.Table.from_batches(back).equals(pa.Table.from_batches(batches))
    # Standard formats: a zstd frame holding an Arrow IPC stream any Arrow reader reads.
    assert zstandard.ZstdDecompressor().decompress(body) == plain
    assert pa.ipc.open_stream(plain).read_all().num_rows == 800
    # Arrow's own buffer compression is taken too.
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, FLOW_SCHEMA,
                           options=pa.ipc.IpcWriteOptions(compression="lz4")) as w:
        w.write_batch(batches[0])
    assert decode_shipment(sink.getvalue().to_pybytes(), "t")[0].num_rows == 500
    # A sender with fewer columns and an extra one: missing become null, the extra is dropped.
    sink = pa.BufferOutputStream()
    narrow = pa.table({"src_port": pa.array([7], pa.int64()), "source": ["ebpf"],
                       "gossip": ["x"]})
    with pa.ipc.new_stream(sink, narrow.schema) as w:
        w.write_table(narrow)
    (b,) = decode_shipment(sink.getvalue().to_pybytes(), "t")
    assert b.schema == FLOW_SCHEMA and b.column("src_port").to_pylist() == [7]
    assert b.column("dst_ip").to_pylist() == [None]


@pytest.mark.parametrize(("body", "coding"), [
    (b"", None), (b"garbage, not arrow", None), (b"garbage, not zstd", "zstd"),
    (encode_shipment([flows(1, 5)], zstd=False)[:60], None),
    (encode_shipment([flows(1, 5)])[:-9], "zstd"), (encode_shipment([flows(1, 5)]), "gzip"),
])
def test_garbage_is_a_one_line_format_error(body: bytes, coding: str | None) -> None:
    with pytest.raises(FormatError) as err:
        decode_shipment(body, "node-a/s/3", encoding=coding)
    assert "\n" not in str(err.value) and str(err.value).startswith("node-a/s/3: ")


def test_a_body_that_decompresses_too_far_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(50 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(FormatError, match="decompresses to more than"):
        decode_shipment(bomb, "t", encoding="zstd", max_bytes=1 << 20)


def test_a_column_of_the_wrong_type_is_a_format_error() -> None:
    sink = pa.BufferOutputStream()
    bad = pa.table({"src_port": pa.array([[1, 2]], pa.list_(pa.int64()))})
    with pa.ipc.new_stream(sink, bad.schema) as w:
        w.write_table(bad)
    with pytest.raises(FormatError):
        decode_shipment(sink.getvalue().to_pybytes(), "t")


# -- the spool -----------------------------------------------------------------------------------
def test_the_stream_and_its_numbers_survive_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a, b = spool.add(b"one", 1), spool.add(b"two", 2)
    assert (a.seq, b.seq) == (1, 2)
    spool.delivered(spool.oldest())  # type: ignore[arg-type]
    spool.delivered(spool.oldest())  # type: ignore[arg-type]
    again = Spool(tmp_path)
    # Everything was delivered, yet the next number is 3, not 1 (1 would be a duplicate).
    assert again.stream == spool.stream and again.add(b"three", 3).seq == 3
    assert again.stats.found == 0


def test_a_crash_between_shipment_and_number_is_healed(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.add(b"one", 1)
    # Killed after the file of shipment 2 was renamed into place, before spool.json said 2.
    (tmp_path / "ship-000000000002-5.arrows").write_bytes(b"two")
    (tmp_path / ".ship-000000000003-5.arrows.x.tmp").write_bytes(b"half")
    again = Spool(tmp_path)
    assert [s.seq for s in again.pending()] == [1, 2] and again.stats.found == 2
    assert again.add(b"three", 1).seq == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_corrupt_spool_state_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "spool.json").write_text("{not json")
    with pytest.raises(InputError) as err:
        Spool(tmp_path)
    assert err.value.hint and "remove the spool directory" in err.value.hint


def test_a_full_spool_drops_the_oldest_loudly(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    for i in range(3):
        spool.add(bytes(300), 10 + i)
    in_flight = spool.oldest()  # being sent: not dropped under the sender's feet
    assert in_flight is not None and in_flight.seq == 1
    with caplog.at_level(logging.ERROR, logger="observe.ship"):
        for rows in (20, 30, 40):
            spool.add(bytes(300), rows)
    assert [s.seq for s in spool.pending()] == [1, 5, 6]
    assert (spool.stats.dropped, spool.stats.dropped_rows, spool.stats.dropped_bytes) == (
        3, 11 + 12 + 20, 900)
    assert sum("dropped undelivered shipment" in r.getMessage() for r in caplog.records) == 3
    assert sorted(p.name for p in tmp_path.glob("ship-*")) == [
        "ship-000000000001-10.arrows.zst", "ship-000000000005-30.arrows.zst",
        "ship-000000000006-40.arrows.zst"]
    # Delivered meanwhile: it goes; the bound holds for what is left.
    spool.delivered(in_flight)
    assert spool.pending_bytes() == 600


# -- the shipper ---------------------------------------------------------------------------------
def test_delivered_in_order_exactly_once_with_its_headers(tmp_path: Path,
                                                         receiver: Receiver) -> None:
    token = tmp_path / "token"
    token.write_text("first-token\n")
    spool = Spool(tmp_path / "spool")
    batches = [flows(i * 100, 100) for i in range(12)]

    def source() -> Iterator[pa.RecordBatch]:
        for i, b in enumerate(batches):
            if i == 6:
                token.write_text("rotated-token\n")  # the kubelet rotates it in place
            yield b
            time.sleep(0.05)

    shipper = Shipper(receiver.url, spool, node="node-a", token_file=token, flush_every=0.15,
                      backoff=fast)
    stats = shipper.run(source())
    assert receiver.ports() == list(range(1200))
    assert receiver.seqs(spool.stream) == list(range(1, stats.shipments + 1))
    assert 3 <= stats.shipments <= 12 and stats.delivered == stats.shipments
    assert stats.rows_delivered == 1200 and stats.duplicates == 0 and spool.pending() == []
    heads = [r["headers"] for r in receiver.requests]
    assert [int(h[HEADER_SEQ]) for h in heads] == list(range(1, stats.shipments + 1))
    assert {h[HEADER_NODE] for h in heads} == {"node-a"}
    assert {h[HEADER_STREAM] for h in heads} == {spool.stream}
    assert {h["Content-Type"] for h in heads} == {CONTENT_TYPE}
    assert sum(int(h[HEADER_ROWS]) for h in heads) == 1200
    tokens = [h["Authorization"] for h in heads]
    assert tokens[0] == "Bearer first-token" and tokens[-1] == "Bearer rotated-token"
    assert stats.latency_count == stats.shipments and stats.latency_max < 5


def test_shipments_are_cut_by_size_too(tmp_path: Path, receiver: Receiver) -> None:
    spool = Spool(tmp_path)
    big = flows(0, 20_000)
    shipper = Shipper(receiver.url, spool, node="n", flush_every=60,
                      max_shipment_bytes=big.nbytes // 5, backoff=fast)
    stats = shipper.run(iter([big]))
    assert stats.shipments >= 5 and receiver.ports() == list(range(20_000))
    assert max(r["size"] for r in receiver.requests) <= big.nbytes // 5


def test_observer_down_at_start_spooled_then_delivered_once(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1/flows"
    spool = Spool(tmp_path)
    first = Shipper(url, Spool(tmp_path), node="n", flush_every=0.1, backoff=fast)
    stats = first.run(paced([flows(0, 50), flows(50, 50), flows(100, 50)], 0.15),
                      drain_timeout=0.5)
    assert stats.delivered == 0 and stats.failures["unreachable"] >= 1
    left = Spool(tmp_path).pending()
    assert sum(s.rows for s in left) == 150
    with Receiver(port) as receiver:
        again = Shipper(url, Spool(tmp_path), node="n", flush_every=0.1, backoff=fast)
        stats = again.run(iter([flows(150, 10)]))
        assert receiver.ports() == list(range(160))
        # Same stream, numbers continued: the earlier run's shipments first.
        assert receiver.seqs(spool.stream) == list(range(1, len(left) + 2))
    assert stats.delivered == len(left) + 1 and Spool(tmp_path).pending() == []


def test_5xx_429_and_timeouts_are_retried_in_order(tmp_path: Path, receiver: Receiver) -> None:
    receiver.script = [("status", 503), ("status", 429, {"Retry-After": "0"}),
                       ("status", 500), ("hang", 1.5)]
    spool = Spool(tmp_path)
    shipper = Shipper(receiver.url, spool, node="n", flush_every=0.1, timeout=0.5,
                      backoff=fast)
    stats = shipper.run(paced([flows(0, 10), flows(10, 10)], 0.3))
    assert receiver.ports() == list(range(20))
    assert stats.failures == {"http-5xx": 2, "http-429": 1, "unreachable": 1}
    assert stats.delivered == 2 and stats.rejected == 0
    # Shipment 1 was tried until it went through; 2 only after it.
    seqs = [int(r["headers"][HEADER_SEQ]) for r in receiver.requests]
    assert seqs == sorted(seqs) and seqs[-1] == 2 and seqs.count(1) == 5


def test_a_401_reads_the_token_again_and_keeps_the_shipment(tmp_path: Path,
                                                            receiver: Receiver) -> None:
    token = tmp_path / "token"
    token.write_text("expired")
    receiver.script = [("status", 401), ("status", 401)]
    spool = Spool(tmp_path / "spool")

    def fix() -> None:
        while len(receiver.requests) < 2:
            time.sleep(0.01)
        token.write_text("fresh")

    threading.Thread(target=fix).start()
    shipper = Shipper(receiver.url, spool, node="n", token_file=token, flush_every=0.1,
                      backoff=lambda: Backoff(base=0.2, cap=0.3))
    stats = shipper.run(iter([flows(0, 5)]))
    assert receiver.ports() == list(range(5))
    assert stats.failures == {"http-401": 2} and stats.rejected == 0
    assert receiver.requests[-1]["headers"]["Authorization"] == "Bearer fresh"


def test_a_permanent_4xx_sets_the_shipment_aside_and_goes_on(tmp_path: Path,
                                                             receiver: Receiver,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    receiver.script = [("status", 400), ("status", 413)]
    spool = Spool(tmp_path)
    shipper = Shipper(receiver.url, spool, node="n", flush_every=0.1, backoff=fast)
    with caplog.at_level(logging.ERROR, logger="observe.ship"):
        stats = shipper.run(paced([flows(0, 3), flows(3, 4), flows(7, 5)], 0.3))
    assert stats.rejected == 2 and stats.rows_rejected == 7 and stats.delivered == 1
    assert receiver.ports() == list(range(7, 12))
    aside = sorted(p.name for p in tmp_path.glob("rejected-*"))
    assert aside == ["rejected-000000000001-3.arrows.zst", "rejected-000000000001-3.reason",
                     "rejected-000000000002-4.arrows.zst", "rejected-000000000002-4.reason"]
    assert (tmp_path / "rejected-000000000002-4.reason").read_text() == (
        "HTTP 413: scripted 413\n")
    # The set-aside body is the shipment, intact, for a human to look at.
    (kept,) = decode_shipment((tmp_path / "rejected-000000000001-3.arrows.zst").read_bytes(),
                              "t", encoding="zstd")
    assert kept.column("src_port").to_pylist() == [0, 1, 2]
    assert sum("rejected by the observer" in r.getMessage() for r in caplog.records) == 2


def test_a_lost_answer_is_resent_and_acknowledged_as_duplicate(tmp_path: Path,
                                                               receiver: Receiver) -> None:
    receiver.script = [("drop",)]
    spool = Spool(tmp_path)
    shipper = Shipper(receiver.url, spool, node="n", flush_every=0.1, backoff=fast)
    stats = shipper.run(paced([flows(0, 5), flows(5, 5)], 0.3))
    assert receiver.ports() == list(range(10))  # stored once
    assert [int(r["headers"][HEADER_SEQ]) for r in receiver.requests] == [1, 1, 2]
    assert stats.duplicates == 1 and stats.delivered == 2
    assert stats.failures == {"unreachable": 1}


def test_http_post_against_nothing_raises_oserror() -> None:
    with pytest.raises(OSError):
        http_post(f"http://127.0.0.1:{free_port()}/v1/flows", b"x", {}, 2.0)


def test_bad_urls_are_refused(tmp_path: Path) -> None:
    for url in ("ftp://x/y", "http:///nohost", "observer:9090"):
        with pytest.raises(InputError):
            Shipper(url, Spool(tmp_path), node="n")


# -- TLS -----------------------------------------------------------------------------------------
def test_https_shipments_are_verified_with_the_ca_file(tmp_path: Path, pki: Path) -> None:
    with Receiver(tls=(pki / "server.pem", pki / "server.key")) as receiver:
        for n, url in enumerate((receiver.url,  # the certificate's IP SAN, then its DNS SAN
                                 f"https://localhost:{receiver.port}/v1/flows")):
            stats = Shipper(url, Spool(tmp_path / str(n)), node="n", ca_file=pki / "ca.pem",
                            flush_every=0.1, backoff=fast).run(iter([flows(n * 10, 10)]))
            assert stats.delivered == 1 and stats.failures == {}
        assert sorted(receiver.ports()) == list(range(20))
        # Without --ca-file the system's CAs are used: they do not know this test CA.
        system = Shipper(receiver.url, Spool(tmp_path / "system"), node="n", flush_every=0.1,
                         backoff=fast).run(iter([flows(0, 1)]), drain_timeout=0.3)
        assert system.delivered == 0 and system.failures["tls"] >= 1
        assert system.last_tls_error is not None and "local issuer" in system.last_tls_error


def test_an_untrusted_certificate_is_retried_logged_once_then_a_rotated_ca_file_is_used(
        tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture) -> None:
    ca_file = tmp_path / "ca.crt"
    shutil.copy(pki / "other-ca.pem", ca_file)  # not the CA that signed the receiver's
    spool = Spool(tmp_path / "spool")
    with Receiver(tls=(pki / "server.pem", pki / "server.key")) as receiver:
        shipper = Shipper(receiver.url, spool, node="n", ca_file=ca_file, flush_every=0.1,
                          backoff=fast)
        done: list[Any] = []
        with caplog.at_level(logging.DEBUG, logger="observe.ship"):
            t = threading.Thread(target=lambda: done.append(
                shipper.run(iter([flows(0, 5)]), drain_timeout=30)))
            t.start()
            deadline = time.monotonic() + 30
            while shipper.stats.failures.get("tls", 0) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            failed = shipper.stats.failures.get("tls", 0)
            assert failed >= 4
            # Retried, never delivered, kept in the spool.
            assert receiver.ports() == [] and [s.rows for s in spool.pending()] == [5]
            # The CA bundle is replaced in place (a ConfigMap update): used at the next try.
            tmp = tmp_path / ".ca.tmp"
            shutil.copy(pki / "ca.pem", tmp)
            os.replace(tmp, ca_file)
            t.join(30)
    (stats,) = done
    assert stats.delivered == 1 and receiver.ports() == list(range(5))
    assert stats.failures == {"tls": stats.failures["tls"]} and stats.failures["tls"] >= failed
    assert shipper.tls is not None and shipper.tls.reloads == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors  # once, not once per retry
    assert "unable to get local issuer certificate" in errors[0]
    assert "not in --ca-file" in errors[0] and f"127.0.0.1:{receiver.port}" in errors[0]


def test_a_certificate_for_another_name_is_a_tls_failure(tmp_path: Path, pki: Path) -> None:
    spool = Spool(tmp_path)
    with Receiver(tls=(pki / "wrong-name.pem", pki / "wrong-name.key")) as receiver:
        for url in (receiver.url, f"https://localhost:{receiver.port}/v1/flows"):
            stats = Shipper(url, spool, node="n", ca_file=pki / "ca.pem", flush_every=0.1,
                            backoff=fast).run(iter([flows(0, 3)]), drain_timeout=0.5)
            assert stats.delivered == 0 and stats.failures["tls"] >= 2
            assert stats.last_tls_error is not None
            assert "mismatch" in stats.last_tls_error and "subjectAltName" in (
                stats.last_tls_error)
        assert receiver.ports() == [] and receiver.requests == []
    assert [s.rows for s in spool.pending()] == [3, 3]


def test_https_to_a_plain_http_observer_is_a_tls_failure_that_says_so(
        tmp_path: Path, receiver: Receiver, pki: Path) -> None:
    url = receiver.url.replace("http://", "https://")
    stats = Shipper(url, Spool(tmp_path), node="n", ca_file=pki / "ca.pem", flush_every=0.1,
                    backoff=fast).run(iter([flows(0, 2)]), drain_timeout=0.3)
    assert stats.delivered == 0 and stats.failures["tls"] >= 1
    assert stats.last_tls_error is not None and "plain HTTP" in stats.last_tls_error
    assert receiver.ports() == []


def test_plain_http_leaves_the_machine_only_when_asked() -> None:
    for host in ("127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST.", "[::1]",
                 "[::ffff:127.0.0.1]"):
        assert check_url(f"http://{host}:9090/v1/flows")
        assert is_loopback(host)
    for host in ("10.0.0.7", "meshwright-observer.meshwright.svc", "localhost.example.com",
                 "[::ffff:10.0.0.7]", "[fe80::1]", "0.0.0.0"):
        assert not is_loopback(host)
        with pytest.raises(InputError) as err:
            check_url(f"http://{host}:9090/v1/flows")
        assert "clear text" in str(err.value) and err.value.hint is not None
        assert "--insecure-http" in err.value.hint and "https://" in err.value.hint
        assert check_url(f"http://{host}:9090/v1/flows", insecure_http=True)
        assert check_url(f"https://{host}:9090/v1/flows")


def test_the_shipper_refuses_plain_http_and_a_ca_file_without_https(tmp_path: Path,
                                                                    pki: Path) -> None:
    with pytest.raises(InputError, match="clear text"):
        Shipper("http://10.0.0.7:9090/v1/flows", Spool(tmp_path), node="n")
    assert Shipper("http://10.0.0.7:9090/v1/flows", Spool(tmp_path), node="n",
                   insecure_http=True).tls is None
    with pytest.raises(InputError) as err:
        Shipper("http://127.0.0.1:9090/v1/flows", Spool(tmp_path), node="n",
                ca_file=pki / "ca.pem")
    assert err.value.origin == "--ca-file"


@pytest.mark.parametrize(("content", "message"), [
    (None, "cannot read the CA file"), (b"not pem", "no PEM certificate"),
    (b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
     "not a usable PEM CA bundle"),
])
def test_a_bad_ca_file_is_an_input_error_naming_it(tmp_path: Path, content: bytes | None,
                                                   message: str) -> None:
    path = tmp_path / "ca.crt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        Shipper("https://observer.example:9090/v1/flows", Spool(tmp_path / "s"), node="n",
                ca_file=path)
    assert err.value.origin == str(path) and message in err.value.message
    assert "\n" not in str(err.value)


def test_the_client_context_is_tls_1_2_or_later_with_names_checked(pki: Path) -> None:
    for context in (client_context(), client_context(pki / "ca.pem")):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    # --ca-file replaces the system's CAs (pinned to the cluster's CA), it does not add to them.
    assert len(client_context(pki / "ca.pem").get_ca_certs()) == 1


def test_a_failing_source_is_raised_after_shipping_what_came(tmp_path: Path,
                                                             receiver: Receiver) -> None:
    def source() -> Iterator[pa.RecordBatch]:
        yield flows(0, 4)
        raise InputError("tracer failed", origin="ebpf")

    with pytest.raises(InputError, match="tracer failed"):
        Shipper(receiver.url, Spool(tmp_path), node="n", flush_every=5,
                backoff=fast).run(source())
    assert receiver.ports() == [0, 1, 2, 3]


# -- processes -----------------------------------------------------------------------------------
def test_node_sigkilled_and_restarted_resends_its_spool_without_double_counting(
        tmp_path: Path, receiver: Receiver) -> None:
    spool = tmp_path / "spool"
    # The observer answers 503 for a while: shipments pile up in the spool.
    receiver.script = [("status", 503)] * 6 + [("drop",)]
    proc = start_node(receiver.url, spool, 0)
    deadline = time.monotonic() + 30
    while len(list(spool.glob("ship-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait(10)
    at_kill = spooled_ports(spool)
    stored_before = set(receiver.ports())
    assert len(at_kill) >= 40
    proc = start_node(receiver.url, spool, 1_000_000)
    deadline = time.monotonic() + 30
    while not at_kill <= set(receiver.ports()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    ports = receiver.ports()
    assert len(ports) == len(set(ports))  # nothing stored twice
    assert at_kill <= set(ports) and stored_before <= set(ports)
    stream = json.loads((spool / "spool.json").read_text())["stream"]
    seqs = receiver.seqs(stream)
    assert seqs == list(range(1, len(seqs) + 1))  # one stream, no number lost or reused
    # The restarted node's own rows all arrived, as the SIGTERM drained its spool.
    assert int(out.split()[2]) == 0 and not list(spool.glob("ship-*"))


def test_sigterm_with_the_observer_down_exits_within_the_drain_bound(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    proc = start_node(f"http://127.0.0.1:{free_port()}/v1/flows", spool, 0, drain=1.0)
    time.sleep(0.8)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    took = time.monotonic() - began
    assert proc.returncode == 0 and took < 5.0
    delivered, _, left = map(int, out.split())
    assert delivered == 0 and left >= 1 and len(spooled_ports(spool)) >= 30
