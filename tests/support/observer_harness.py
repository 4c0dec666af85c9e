"""An in-process observer (``meshwright observe --kube`` minus the CLI) against the fake API
server, for the ingest and TLS tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from meshwright.observer import Observer, ObserverConfig
from observe.kube import KubeApi
from support.kube_watch_api import WatchApiServer, _kubeconfig


def wait(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``cond`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def running_observer(srv: WatchApiServer, tmp: Path, port: int = 0, **config: Any
                     ) -> Iterator[Observer]:
    """An Observer in a thread watching namespace ``foo``, listening on 127.0.0.1:``port``
    (``config``: more ObserverConfig fields, e.g. ``tls_cert``/``tls_key``); stopped the way
    SIGTERM stops it on exit, which must return 0."""
    api = KubeApi.connect(kubeconfig=_kubeconfig(tmp, srv.url))
    stop = threading.Event()
    obs = Observer(ObserverConfig(state=tmp / "state", namespaces=["foo"], emit_every=None,
                                  flush_every=0.2, read_timeout=0.5, slice_seconds=0.5,
                                  backoff_base=0.05, listen=("127.0.0.1", port), **config),
                   stop, api)
    codes: list[int] = []
    t = threading.Thread(target=lambda: codes.append(obs.run()))
    t.start()
    try:
        wait(lambda: obs.address is not None and obs.watcher.stats.lists > 0, 30,
             "the observer")
        yield obs
    finally:
        stop.set()
        t.join(30)
    assert codes == [0]
