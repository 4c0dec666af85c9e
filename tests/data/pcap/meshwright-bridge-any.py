"""Record meshwright-bridge-any.pcap: a node's ``-i any`` view of pod-to-pod traffic.

Run as root on Linux: ``python tests/data/pcap/meshwright-bridge-any.py OUT.pcap``. Two
network namespaces stand in for pods (mwA 10.77.0.2 / fd77::2, mwB 10.77.0.3 / fd77::3),
their veths plugged into a bridge mwbr0 (10.77.0.1) like a CNI's cni0. meshwright's live
capture (observe.live, SLL2 on ``any``) records, in the root namespace, while:

- pod A makes 3 HTTP/1.1 requests to pod B's port 8080 on one keep-alive connection, over
  IPv4 and over IPv6; sends 2 UDP datagrams to port 5353 (each echoed), then the same
  datagram twice in a row (two transmissions with identical headers: IPv6 has no IP id);
  and connects to port 9, where nothing listens (SYN answered by RST);
- the node itself makes one HTTP request to pod B (seen on the bridge and on pod B's veth).

Every pod-to-pod packet is recorded twice: on pod A's veth (as it enters the bridge) and on
pod B's veth (as it leaves it), with different SLL2 interface indexes.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

SETUP = [
    "ip netns add mwA", "ip netns add mwB", "ip link add mwbr0 type bridge",
    "ip link set mwbr0 up", "ip addr add 10.77.0.1/24 dev mwbr0",
    "ip link add mwvA type veth peer name eth0 netns mwA",
    "ip link add mwvB type veth peer name eth0 netns mwB",
    "ip link set mwvA master mwbr0", "ip link set mwvB master mwbr0",
    "ip link set mwvA up", "ip link set mwvB up",
    "ip -n mwA addr add 10.77.0.2/24 dev eth0", "ip -n mwB addr add 10.77.0.3/24 dev eth0",
    "ip -n mwA addr add fd77::2/64 dev eth0 nodad", "ip -n mwB addr add fd77::3/64 dev eth0 nodad",
    "ip -n mwA link set eth0 up", "ip -n mwB link set eth0 up",
    "ip -n mwA link set lo up", "ip -n mwB link set lo up",
]
TEARDOWN = ["ip link del mwvA", "ip link del mwvB", "ip link del mwbr0", "ip netns del mwA",
            "ip netns del mwB"]


def sh(cmd: str, check: bool = True) -> str:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True).stdout


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"ok " + self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server6(HTTPServer):
    address_family = socket.AF_INET6


def echo(family: int, addr: str) -> None:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((addr, 5353))
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"re:" + data, peer)


def server() -> None:
    for family, addr in ((socket.AF_INET, "10.77.0.3"), (socket.AF_INET6, "fd77::3")):
        threading.Thread(target=echo, args=(family, addr), daemon=True).start()
    threading.Thread(target=Server6(("fd77::3", 8080), Handler).serve_forever,
                     daemon=True).start()
    HTTPServer(("10.77.0.3", 8080), Handler).serve_forever()


def client() -> None:
    import http.client

    for host in ("10.77.0.3", "fd77::3"):
        conn = http.client.HTTPConnection(host, 8080)
        for i in range(3):
            conn.request("GET", f"/item/{i}?h={host}")
            conn.getresponse().read()
        conn.close()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        u = socket.socket(family, socket.SOCK_DGRAM)
        u.settimeout(2)
        for i in range(2):
            u.sendto(b"ping %d" % i, (host, 5353))
            u.recvfrom(100)
        u.sendto(b"same", (host, 5353))
        u.sendto(b"same", (host, 5353))
        u.recvfrom(100)
        u.recvfrom(100)
        s = socket.socket(family)
        with contextlib.suppress(OSError):
            s.connect((host, 9))
        s.close()


def record(out: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))
    from observe.live import capture_live

    for cmd in TEARDOWN:
        sh(cmd, check=False)
    for cmd in SETUP:
        sh(cmd)
    try:
        srv = subprocess.Popen(["ip", "netns", "exec", "mwB", sys.executable, __file__, "server"])
        time.sleep(1.0)
        stop = threading.Event()
        with open(out, "wb") as save:
            chunks = capture_live("any", bpf="net 10.77.0.0/24 or net fd77::/64", stop=stop,
                                  save=save, flush_every_s=60)
            worker = threading.Thread(target=lambda: list(chunks))
            worker.start()
            time.sleep(0.5)
            sh(f"ip netns exec mwA {sys.executable} {__file__} client")
            print(urllib.request.urlopen("http://10.77.0.3:8080/from-node").read())
            time.sleep(0.5)
            stop.set()
            worker.join()
        srv.terminate()
        srv.wait()
    finally:
        for cmd in TEARDOWN:
            sh(cmd, check=False)


if __name__ == "__main__":
    {"server": server, "client": client}.get(sys.argv[1], lambda: record(sys.argv[1]))()
