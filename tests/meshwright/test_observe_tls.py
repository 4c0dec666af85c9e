"""The observer's ``--listen`` over TLS (meshwright.ingest.ServerTLS), with certificates the
``openssl`` command makes (tests/support/pki.py ``make_pki``: a CA, another CA, server
certificates for 127.0.0.1/localhost with serials 1001 and 1002, one for another name), real
shippers (observe.ship) and the local API server answering TokenReviews.

What is checked: a shipment over HTTPS is stored once; /metrics and /healthz answer over HTTPS
only, and plain HTTP, old TLS and clients refusing the certificate are counted, never fatal; a
node that does not trust the certificate (other CA, other name) retries, counts, keeps its
spool and never sends its token (no TokenReview is made); certificate files rotated the way a
Kubernetes Secret volume rotates them are served to new connections (the served serial
changes) and a broken pair keeps the previous one; bad files are one-line errors; the node
refuses plain http:// to another host without --insecure-http.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.kube_watch_api import WatchApiServer, _kubeconfig
from support.observer_harness import running_observer, wait
from support.pki import make_pki

from meshwright.ingest import DEFAULT_ALLOW, HANDSHAKE_REASONS, ServerTLS, load_server_context
from meshwright.observer import Observer
from observe.errors import InputError
from observe.schema import conform
from observe.ship import Shipper, Spool, client_context
from observe.state import FlowStore
from observe.watch import Backoff

ROOT = Path(__file__).resolve().parents[2]
NODE_SA = DEFAULT_ALLOW[0]
TOKEN = "node-a-token-0f3c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(make_pki(tmp_path_factory.mktemp("pki")))


def flows(first: int, n: int) -> pa.RecordBatch:
    """``n`` eBPF connection records whose ``src_port`` is ``first`` ... (their ids)."""
    return conform(pa.table({
        "src_ip": pa.array(["10.0.0.1"] * n), "src_port": pa.array(range(first, first + n),
                                                                   pa.int32()),
        "dst_ip": pa.array(["10.0.0.2"] * n), "dst_port": pa.array([5432] * n, pa.int32()),
        "kind": pa.array(["connection"] * n), "source": pa.array(["ebpf"] * n),
        "origin": pa.array([f"ebpf:node-a:event {first + i}" for i in range(n)]),
    }))


def paced(batches: list[pa.RecordBatch], pause: float) -> Iterator[pa.RecordBatch]:
    for b in batches:
        yield b
        time.sleep(pause)


def fast() -> Backoff:
    return Backoff(base=0.05, cap=0.2)


def stored_ports(state: Path) -> list[int]:
    out: list[int] = []
    for f in sorted((state / "flows").rglob("*.parquet")):
        if not f.name.startswith("."):
            out += pq.read_table(f, columns=["src_port"]).column("src_port").to_pylist()
    return sorted(out)


def token_file(tmp: Path) -> Path:
    path = tmp / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def cluster() -> Iterator[WatchApiServer]:
    with WatchApiServer(hold_seconds=2.0) as srv:
        srv.put({"apiVersion": "v1", "kind": "Namespace",
                 "metadata": {"name": "foo", "uid": "ns-foo"}})
        srv.add_token(TOKEN, NODE_SA, node="node-a")
        yield srv


def observer(srv: WatchApiServer, tmp: Path, cert: Path, key: Path, **config: Any
             ) -> contextlib.AbstractContextManager[Observer]:
    """An Observer in a thread listening with TLS on 127.0.0.1; stopped on exit."""
    return running_observer(srv, tmp, tls_cert=cert, tls_key=key, **config)


def port_of(obs: Observer) -> int:
    assert obs.address is not None
    return obs.address[1]


def get(port: int, path: str, ca: Path, *, check_name: bool = True) -> tuple[int, bytes]:
    """GET over HTTPS, the certificate verified with ``ca``; its name too, unless told (a
    test serving one made for another name on purpose)."""
    context = client_context(ca)
    context.check_hostname = check_name
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def metrics(port: int, ca: Path, *, check_name: bool = True
            ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(port, "/metrics", ca, check_name=check_name)
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode()) for s in f.samples}


def failures(port: int, ca: Path, *, check_name: bool = True) -> dict[str, float]:
    m = metrics(port, ca, check_name=check_name)
    return {r: m[("meshwright_tls_handshake_failures_total", (("reason", r),))]
            for r in HANDSHAKE_REASONS}


def served_serial(port: int, ca: Path, host: str = "127.0.0.1") -> str:
    """The serial number of the certificate a new connection is served (verified)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            client_context(ca).wrap_socket(raw, server_hostname=host) as conn:
        cert = conn.getpeercert()
    assert cert is not None
    return str(cert["serialNumber"])


# -- delivered ---------------------------------------------------------------------------------
def test_a_shipment_over_https_is_stored_once_and_everything_answers_over_https_only(
        cluster: WatchApiServer, tmp_path: Path, pki: Path) -> None:
    ca = pki / "ca.pem"
    with observer(cluster, tmp_path, pki / "server.pem", pki / "server.key") as obs:
        port = port_of(obs)
        spool = Spool(tmp_path / "spool")
        shipper = Shipper(f"https://localhost:{port}/v1/flows", spool, node="node-a",
                          token_file=token_file(tmp_path), ca_file=ca, flush_every=0.1,
                          backoff=fast)
        stats = shipper.run(paced([flows(i * 100, 100) for i in range(5)], 0.05))
        assert stats.delivered == stats.shipments >= 2 and stats.failures == {}
        assert get(port, "/healthz", ca) == (200, b"ok\n")
        m = metrics(port, ca)
        assert m[("meshwright_ingest_shipments_total",
                  (("node", "node-a"), ("result", "stored")))] == stats.shipments
        assert m[("meshwright_tls_handshakes_total", ())] >= stats.shipments + 1
        assert failures(port, ca) == dict.fromkeys(HANDSHAKE_REASONS, 0)
        # Plain HTTP to the HTTPS port gets no answer (the server sees no TLS hello) ...
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        with pytest.raises((OSError, http.client.HTTPException)):
            conn.request("GET", "/metrics")
            conn.getresponse().read()
        conn.close()
        # ... and neither does a client that offers TLS 1.1 at most.
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with pytest.warns(DeprecationWarning):
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost")
        # Both counted, and the listener goes on.
        wait(lambda: failures(port, ca)["protocol_version"] == 1, 10, "the counters")
        assert failures(port, ca) == {**dict.fromkeys(HANDSHAKE_REASONS, 0),
                                      "plain_http": 1, "protocol_version": 1}
        assert get(port, "/healthz", ca)[0] == 200
    assert stored_ports(tmp_path / "state") == list(range(500))
    assert FlowStore(tmp_path / "state").checkpoint.ingest[spool.stream].seq == spool.last_seq


# -- not trusted -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("served", "ca_name", "says"), [
    ("server", "other-ca.pem", "unable to get local issuer certificate"),
    ("wrong-name", "ca.pem", "IP address mismatch"),
], ids=["unknown-ca", "name-mismatch"])
def test_a_node_that_cannot_verify_the_observer_retries_counts_and_keeps_its_spool(
        cluster: WatchApiServer, tmp_path: Path, pki: Path, caplog: pytest.LogCaptureFixture,
        served: str, ca_name: str, says: str) -> None:
    ca = pki / "ca.pem"
    check_name = served != "wrong-name"
    spool = Spool(tmp_path / "spool")
    with observer(cluster, tmp_path, pki / f"{served}.pem", pki / f"{served}.key") as obs:
        port = port_of(obs)
        url = f"https://127.0.0.1:{port}/v1/flows"
        with caplog.at_level(logging.WARNING, logger="observe.ship"):
            stats = Shipper(url, spool, node="node-a", token_file=token_file(tmp_path),
                            ca_file=pki / ca_name, flush_every=0.1, backoff=fast).run(
                paced([flows(0, 10), flows(10, 10)], 0.3), drain_timeout=1.5)
        assert stats.delivered == 0 and stats.failures == {"tls": stats.failures["tls"]}
        assert stats.failures["tls"] >= 4
        # Each refusal is a failed handshake on the observer's side too, counted there.
        wait(lambda: failures(port, ca, check_name=check_name)["untrusted_certificate"]
             == stats.failures["tls"], 10, "the observer's count")
    assert stats.last_tls_error is not None and says in stats.last_tls_error
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and says in errors[0], errors  # once, not once per retry
    # Never delivered: nothing stored, the spool keeps both shipments, and the token never
    # reached the observer (no TokenReview was asked for).
    assert stored_ports(tmp_path / "state") == []
    assert sum(s.rows for s in Spool(tmp_path / "spool").pending()) == 20
    assert cluster.tokenreviews == []
    assert FlowStore(tmp_path / "state").checkpoint.ingest == {}


# -- rotation --------------------------------------------------------------------------------------
def secret_volume(root: Path, cert: Path, key: Path) -> tuple[Path, Path]:
    """Point ``root/tls.crt`` and ``root/tls.key`` at copies of ``cert`` and ``key`` the way the
    kubelet updates a Secret volume: a new timestamped directory, then the ``..data`` symlink
    swapped to it in one rename (the files are links through ``..data``)."""
    root.mkdir(exist_ok=True)
    target = root / f"..{time.time_ns()}"
    target.mkdir()
    shutil.copy(cert, target / "tls.crt")
    shutil.copy(key, target / "tls.key")
    tmp = root / "..data_tmp"
    os.symlink(target.name, tmp)
    os.replace(tmp, root / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            os.symlink(f"..data/{name}", root / name)
    return root / "tls.crt", root / "tls.key"


def test_rotated_certificate_files_are_served_to_new_connections(
        cluster: WatchApiServer, tmp_path: Path, pki: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ca = pki / "ca.pem"
    volume = tmp_path / "tls"
    cert, key = secret_volume(volume, pki / "server.pem", pki / "server.key")
    spool = Spool(tmp_path / "spool")

    def ship(first: int) -> None:
        stats = Shipper(f"https://127.0.0.1:{port}/v1/flows", spool, node="node-a",
                        token_file=token_file(tmp_path), ca_file=ca, flush_every=0.1,
                        backoff=fast).run(iter([flows(first, 10)]))
        assert stats.delivered == 1 and stats.failures == {}

    with observer(cluster, tmp_path, cert, key, tls_reload_seconds=0.0) as obs:
        port = port_of(obs)
        assert served_serial(port, ca) == "1001"
        ship(0)
        secret_volume(volume, pki / "server2.pem", pki / "server2.key")  # renewed
        assert served_serial(port, ca) == "1002"
        ship(10)
        # A pair that does not load (the certificate renewed, the key not yet): the previous
        # one goes on being served, the error is logged once and counted.
        with caplog.at_level(logging.ERROR, logger="meshwright.ingest"):
            secret_volume(volume, pki / "server.pem", pki / "server2.key")
            assert served_serial(port, ca) == "1002"
            assert served_serial(port, ca, host="localhost") == "1002"
            ship(20)
        m = metrics(port, ca)
        assert m[("meshwright_tls_certificate_reloads_total", ())] == 1
        assert m[("meshwright_tls_certificate_reload_errors_total", ())] >= 2
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "does not belong to the certificate" in errors[0], errors
        # Completed: served from the next connection on.
        secret_volume(volume, pki / "server.pem", pki / "server.key")
        assert served_serial(port, ca) == "1001"
        assert metrics(port, ca)[("meshwright_tls_certificate_reloads_total", ())] == 2
    assert stored_ports(tmp_path / "state") == list(range(30))


def test_the_files_are_looked_at_most_every_reload_seconds(tmp_path: Path, pki: Path) -> None:
    now = [0.0]
    cert, key = secret_volume(tmp_path / "tls", pki / "server.pem", pki / "server.key")
    tls = ServerTLS(cert, key, reload_every=30.0, clock=lambda: now[0])
    first = tls.context()
    secret_volume(tmp_path / "tls", pki / "server2.pem", pki / "server2.key")
    now[0] = 29.0
    assert tls.context() is first and tls.reloads == 0
    now[0] = 30.5
    second = tls.context()
    assert second is not first and tls.reloads == 1
    now[0] = 70.0  # looked at again, unchanged: kept
    assert tls.context() is second and tls.reloads == 1
    assert tls.context().minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_client_that_never_says_hello_is_cut_off_and_counted(pki: Path) -> None:
    tls = ServerTLS(pki / "server.pem", pki / "server.key", handshake_timeout=0.3)
    server, client = socket.socketpair()
    began = time.monotonic()
    try:
        assert tls.handshake(server, ("192.0.2.7", 40000)) is None
        assert 0.25 < time.monotonic() - began < 5
        client.settimeout(5)
        assert client.recv(16) == b""  # the observer closed its end
    finally:
        client.close()
    assert tls.failures == {"timeout": 1} and tls.handshakes == 0


# -- bad files and options -------------------------------------------------------------------------
@pytest.mark.parametrize(("cert", "key", "at_fault", "says"), [
    ("server.pem", "missing.key", "missing.key",
     "cannot read the TLS private key file: No such file or directory"),
    ("missing.pem", "server.key", "missing.pem",
     "cannot read the TLS certificate file: No such file or directory"),
    ("garbage", "server.key", "garbage", "no PEM certificate"),
    ("server.pem", "garbage", "garbage", "no PEM private key"),
    ("server.pem", "wrong-name.key", "wrong-name.key", "does not belong to the certificate"),
    ("server.key", "server.key", "server.key", "no PEM certificate"),
    ("server.pem", "encrypted.key", "encrypted.key", "encrypted"),
])
def test_bad_certificate_files_are_one_line_errors(tmp_path: Path, pki: Path, cert: str,
                                                   key: str, at_fault: str, says: str) -> None:
    for name in ("server.pem", "server.key", "wrong-name.key"):
        shutil.copy(pki / name, tmp_path / name)
    (tmp_path / "garbage").write_text("not PEM at all\n")
    subprocess.run(["openssl", "pkey", "-in", str(pki / "server.key"), "-aes256", "-passout",
                    "pass:secret", "-out", str(tmp_path / "encrypted.key")], check=True,
                   capture_output=True, timeout=30)
    with pytest.raises(InputError) as err:
        load_server_context(tmp_path / cert, tmp_path / key)
    assert err.value.origin == str(tmp_path / at_fault) and says in err.value.message
    # The command: exit 3, one line naming the file, no traceback, before the cluster is
    # contacted (the kubeconfig does not exist).
    proc = subprocess.run(
        [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
         str(tmp_path / "no-kubeconfig"), "--state", str(tmp_path / "state"), "--listen",
         "127.0.0.1:0", "--tls-cert", str(tmp_path / cert), "--tls-key", str(tmp_path / key)],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    first, *rest = proc.stderr.splitlines()
    assert first.startswith(f"meshwright: error: {tmp_path / at_fault}: ") and says in first
    assert all(line.startswith("  hint: ") for line in rest), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--kube", "--state", "s", "--listen", ":0", "--tls-cert", "c.pem"], "go together"),
    (["--kube", "--state", "s", "--listen", ":0", "--tls-key", "k.pem"], "go together"),
    (["--kube", "--state", "s", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "--listen"),
    (["dump/", "-o", "f.parquet", "--tls-cert", "c.pem"], "apply to --kube"),
    (["--ebpf", "--send", "http://10.0.0.7:9090/v1/flows"], "--insecure-http"),
    (["--ebpf", "--send", "http://meshwright-observer.meshwright.svc:9090/v1/flows"],
     "clear text"),
    (["--ebpf", "--send", "http://127.0.0.1:9090/v1/flows", "--ca-file", "ca.crt"],
     "--ca-file verifies an https://"),
    (["--ebpf", "--send", "https://127.0.0.1:9090/v1/flows", "--insecure-http"],
     "contradict"),
    (["--ebpf", "-o", "f.parquet", "--ca-file", "ca.crt"], "apply to --ebpf --send"),
])
def test_tls_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "meshwright", "observe", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_plain_http_to_another_host_is_refused_with_a_hint(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "meshwright", "observe", "--ebpf", "--send",
                           "http://192.0.2.10:9090/v1/flows", "--spool", str(tmp_path / "s")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    error, hint = proc.stderr.splitlines()
    assert error == ("meshwright: error: --send http://192.0.2.10:9090/v1/flows: plain "
                     "http:// to 192.0.2.10 would send the node's bearer token and its flows "
                     "in clear text")
    assert hint.startswith("  hint: use https://") and "--ca-file" in hint
    assert not (tmp_path / "s").exists()  # refused before anything was set up


def test_insecure_http_is_allowed_when_asked_and_said_loudly(tmp_path: Path) -> None:
    # 192.0.2.10 (TEST-NET-1) answers nothing: what is shipped stays spooled. Whether the
    # tracer may run here does not matter: the warning comes before it starts.
    proc = subprocess.run([sys.executable, "-m", "meshwright", "observe", "--ebpf", "--send",
                           "http://192.0.2.10:9090/v1/flows", "--insecure-http", "--spool",
                           str(tmp_path / "s"), "--duration", "1", "--drain-timeout", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 2, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        "meshwright: WARNING: --insecure-http: the node's bearer token and flows go to "
        "192.0.2.10 in clear text; whoever reads the token can send flows as this node until "
        "it expires")


def test_a_missing_ca_file_is_refused_before_tracing(tmp_path: Path) -> None:
    missing = tmp_path / "ca.crt"
    proc = subprocess.run([sys.executable, "-m", "meshwright", "observe", "--ebpf", "--send",
                           "https://127.0.0.1:9/v1/flows", "--ca-file", str(missing),
                           "--spool", str(tmp_path / "s")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3
    assert proc.stderr.splitlines() == [
        f"meshwright: error: {missing}: cannot read the CA file: No such file or directory"]
    assert not (tmp_path / "s").exists()


# -- the command, end to end -----------------------------------------------------------------------
def test_the_observer_command_serves_https_and_stops_cleanly(cluster: WatchApiServer,
                                                             tmp_path: Path, pki: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    log = tmp_path / "observer.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshwright", "observe", "--kube", "--kubeconfig",
             _kubeconfig(tmp_path, cluster.url), "-n", "foo", "--state",
             str(tmp_path / "state"), "--flush-every", "0.2", "--emit-every", "0", "--listen",
             f"127.0.0.1:{port}", "--tls-cert", str(pki / "server.pem"), "--tls-key",
             str(pki / "server.key"), "--log-format", "json", "-v"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait(lambda: '"message": "listening"' in log.read_text(), 60, "the listener")
        assert '"tls": true' in log.read_text()
        stats = Shipper(f"https://localhost:{port}/v1/flows", Spool(tmp_path / "spool"),
                        node="node-a", token_file=token_file(tmp_path), ca_file=pki / "ca.pem",
                        flush_every=0.1, backoff=fast).run(iter([flows(0, 42)]))
        assert stats.delivered == 1 and stats.failures.get("tls", 0) == 0
        assert get(port, "/healthz", pki / "ca.pem")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert stored_ports(tmp_path / "state") == list(range(42))
