"""Record the tracer's raw output for tests/observe/test_ebpf.py (run as root, see README.md).

Runs bpftrace with meshwright's program (``observe.ebpf.program``), makes known loopback
traffic on fixed ports, stops bpftrace with SIGINT (so it prints its maps) and writes
bpftrace's stdout, unchanged, to the file named on the command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from observe.ebpf import program, sk_flags_field

SERVER, SERVER6, CLOSED = 47100, 47102, 47101
#: (client port, bytes the client sends, bytes the server answers)
EXCHANGES = [(47110, 1000, 2001), (47111, 2001, 4003), (47112, 3002, 6005)]
REFUSED_FROM, OPEN_FROM, V6_FROM = 47120, 47121, 47122


def serve(family: socket.AddressFamily, host: str, port: int, count: int) -> None:
    with socket.socket(family) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen()
        os.write(1, b"ready\n")
        for _ in range(count):
            conn, _ = srv.accept()
            with conn:
                head = conn.recv(4, socket.MSG_WAITALL)
                if len(head) < 4:
                    continue  # connected and closed without a request
                want = int.from_bytes(head, "big")
                conn.recv(want - 4, socket.MSG_WAITALL)
                answer = int.from_bytes(conn.recv(4, socket.MSG_WAITALL), "big")
                conn.sendall(b"b" * answer)


def client(family: socket.AddressFamily, host: str, port: int, src: int, send: int,
           answer: int) -> None:
    with socket.socket(family) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind((host, src))
        c.connect((host, port))
        c.sendall(send.to_bytes(4, "big") + b"a" * (send - 4))
        c.sendall(answer.to_bytes(4, "big"))
        assert len(c.recv(answer, socket.MSG_WAITALL)) == answer


def main() -> None:
    out = open(sys.argv[1], "wb")  # noqa: SIM115 - written to until the very end
    proc = subprocess.Popen(["bpftrace", "-e", program(sk_flags=sk_flags_field())],
                            stdout=subprocess.PIPE, env={**os.environ,
                                                         "BPFTRACE_MAP_KEYS_MAX": "65536",
                                                         "BPFTRACE_STRLEN": "16"})
    assert proc.stdout is not None
    first = proc.stdout.readline()
    while first != b"R\n":
        out.write(first)
        first = proc.stdout.readline()
    out.write(first)
    code = ("import sys; sys.path.insert(0, %r); import record; record.serve(%s, %r, %d, %d)")
    here = os.path.dirname(os.path.abspath(__file__))
    v4 = subprocess.Popen([sys.executable, "-c", code % (here, "record.socket.AF_INET",
                                                          "127.0.0.1", SERVER, 4)],
                          stdout=subprocess.PIPE)
    v6 = subprocess.Popen([sys.executable, "-c", code % (here, "record.socket.AF_INET6",
                                                          "::1", SERVER6, 1)],
                          stdout=subprocess.PIPE)
    for p in (v4, v6):
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    for src, send, answer in EXCHANGES:
        client(socket.AF_INET, "127.0.0.1", SERVER, src, send, answer)
    client(socket.AF_INET6, "::1", SERVER6, V6_FROM, 700, 900)
    closed = socket.socket()
    closed.bind(("127.0.0.1", CLOSED))  # bound, not listening: a SYN gets RST
    refused = socket.socket()
    refused.bind(("127.0.0.1", REFUSED_FROM))
    assert refused.connect_ex(("127.0.0.1", CLOSED)) != 0
    refused.close()
    still_open = socket.socket()
    still_open.bind(("127.0.0.1", OPEN_FROM))
    still_open.connect(("127.0.0.1", SERVER))
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out.write(proc.stdout.read())
    proc.wait()
    still_open.close()
    closed.close()
    v4.wait()
    v6.wait()
    out.close()


if __name__ == "__main__":
    main()
