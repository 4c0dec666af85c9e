"""A node that ships flow records in its own process (so it can be SIGKILLed and restarted),
and what its spool holds: for the shipper and ingest tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from observe.ship import decode_shipment

ROOT = Path(__file__).resolve().parents[2]

#: argv: URL, spool dir, first src_port, drain seconds, node name, token file ('' for none).
#: Ships 10 rows every 20 ms (src_port counting up from the first) until SIGTERM; prints
#: "started", then "<delivered> <duplicates> <left in the spool>" at the end.
NODE = textwrap.dedent("""
    import signal, sys, threading, time
    import pyarrow as pa
    from pathlib import Path
    from observe.schema import conform
    from observe.ship import Shipper, Spool
    from observe.watch import Backoff

    url, spool, first, drain, node, token = sys.argv[1:7]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def source():
        n = int(first)
        while not stop.is_set():
            yield conform(pa.table({"src_port": pa.array(range(n, n + 10), pa.int32()),
                                    "source": ["ebpf"] * 10}))
            n += 10
            time.sleep(0.02)

    shipper = Shipper(url, Spool(Path(spool)), node=node,
                      token_file=Path(token) if token else None, flush_every=0.1,
                      backoff=lambda: Backoff(base=0.05, cap=0.2))
    print("started", flush=True)
    stats = shipper.run(source(), stop, drain_timeout=float(drain))
    print(stats.delivered, stats.duplicates, len(Spool(Path(spool)).pending()), flush=True)
""")


def start_node(url: str, spool: Path, first: int, *, drain: float = 5.0,
               node: str = "node-k", token_file: Path | None = None
               ) -> subprocess.Popen[str]:
    """The :data:`NODE` process, once it has started shipping."""
    proc = subprocess.Popen([sys.executable, "-c", NODE, url, str(spool), str(first),
                             str(drain), node, str(token_file or "")], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
    return proc


def spooled_ports(spool: Path) -> set[int]:
    """``src_port`` of the rows in a node's undelivered shipments."""
    return {p for f in spool.glob("ship-*")
            for b in decode_shipment(f.read_bytes(), f.name,
                                     encoding="zstd" if f.suffix == ".zst" else None)
            for p in b.column("src_port").to_pylist()}
