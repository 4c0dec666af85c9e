"""Dump layouts: pod from path, kubectl prefixes, CRI joining, shipper envelopes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from observe import layouts
from observe.layouts import PodRef, pod_from_path

ENVOY = Path(__file__).parent.parent / "data" / "envoy-logs"


def real_lines(name: str) -> list[str]:
    return (ENVOY / name).read_text().splitlines()


SLEEP = real_lines("istio-docs-access-log-sleep-httpbin.log")
WAYPOINT = real_lines("kiali-waypoint.log")
HEX = "a" * 64
UID = "0b9ad7a2-5b5d-4d1e-9c1e-3f6f8b0c2d11"


@pytest.mark.parametrize(
    ("path", "root", "known", "expected"),
    [
        # kubelet node files: syntax proves ns and pod (note pod_ns order in containers/).
        (
            f"/var/log/containers/httpbin-7d9_foo_istio-proxy-{HEX}.log",
            None,
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        (
            f"/var/log/pods/foo_httpbin-7d9_{UID}/istio-proxy/0.log",
            None,
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        (
            f"node1/pods/foo_httpbin-7d9_{UID}/istio-proxy/3.log.20250130-121013.gz",
            None,
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        # must-gather
        (
            "mg/namespaces/foo/pods/httpbin-7d9/istio-proxy/istio-proxy/logs/current.log",
            None,
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        # <ns>_<pod>_<container>.log anywhere
        (
            "/tmp/dump/foo_httpbin-7d9_istio-proxy.log",
            None,
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        # <ns>/<pod>/<container>.log inside the named directory
        (
            "dump/foo/httpbin-7d9/istio-proxy.log",
            "dump",
            (),
            PodRef("httpbin-7d9", "foo", "istio-proxy"),
        ),
        # <ns>/<pod>.log inside the named directory
        ("dump/foo/httpbin-7d9.log", "dump", (), PodRef("httpbin-7d9", "foo", None)),
        # ... also deeper under it (the parent directory is the namespace)
        ("dump/kubectl/foo/httpbin-7d9.log", "dump", (), PodRef("httpbin-7d9", "foo", None)),
        # a file directly in the named directory: the directory is the user's, not a namespace
        ("dump/httpbin-7d9.log", "dump", (), PodRef("httpbin-7d9", None, None)),
        # ... unless the inventory knows the pod in exactly one namespace
        (
            "dump/httpbin-7d9.log",
            "dump",
            (("foo", "httpbin-7d9"),),
            PodRef("httpbin-7d9", "foo", None),
        ),
        # explicitly named file: parent directory is not trusted as a namespace ...
        ("/home/me/logs/httpbin-7d9.log", None, (), PodRef("httpbin-7d9", None, None)),
        # ... but the inventory confirms it
        (
            "/home/me/foo/httpbin-7d9.log",
            None,
            (("foo", "httpbin-7d9"),),
            PodRef("httpbin-7d9", "foo", None),
        ),
        # the inventory picks the 3-level reading for a non-proxy container name
        (
            "d/foo/httpbin-7d9/sidecar.log",
            "d",
            (("foo", "httpbin-7d9"),),
            PodRef("httpbin-7d9", "foo", "sidecar"),
        ),
    ],
)
def test_pod_from_path(
    path: str, root: str | None, known: tuple[tuple[str, str], ...], expected: PodRef
) -> None:
    assert pod_from_path(path, root=root, known_pods=frozenset(known)) == expected


def test_reporter_needs_namespace() -> None:
    assert PodRef("p", "ns").reporter == "ns/p"
    assert PodRef("p", None).reporter is None


def test_pod_name_in_two_namespaces_stays_unknown() -> None:
    known = frozenset({("a", "web-1"), ("b", "web-1")})
    assert pod_from_path("logs/web-1.log", root="logs", known_pods=known).namespace is None


def test_strip_kubectl_prefix_and_timestamps() -> None:
    lines = pa.array(
        [
            WAYPOINT[0],  # --timestamps (real)
            f"[pod/httpbin-7d9/istio-proxy] {SLEEP[1]}",  # --prefix
            f"[pod/sleep-1/istio-proxy] 2020-11-25T21:26:18.409123456Z {SLEEP[0]}",  # both
            SLEEP[0],  # plain
        ],
        type=pa.string(),
    )
    inner, pods = layouts.strip_kubectl(lines)
    assert inner.to_pylist() == [WAYPOINT[0].split(" ", 1)[1], SLEEP[1], SLEEP[0], SLEEP[0]]
    assert pods is not None
    assert pods.to_pylist() == [None, "httpbin-7d9", "sleep-1", None]


def test_strip_kubectl_leaves_plain_lines_alone() -> None:
    lines = pa.array(SLEEP, type=pa.string())
    inner, pods = layouts.strip_kubectl(lines)
    assert inner.to_pylist() == SLEEP
    assert pods is None


def test_classify_lines_access_vs_diagnostics() -> None:
    istio_json = json.dumps({"start_time": "2020-11-25T21:26:18.409Z", "response_code": 200})
    lines = pa.array(
        [
            SLEEP[0],
            istio_json,
            '2025-01-30T10:00:00.000000Z\tinfo\tFLAG: --concurrency="2"',
            "[2025-01-30 10:00:00.123][15][info][main] initializing epoch 0",
            '{"level":"info","time":"2025-01-30T10:00:00Z","msg":"Envoy proxy is ready"}',
            "",
        ],
        type=pa.string(),
    )
    text, js = layouts.classify_lines(lines)
    assert text.tolist() == [True, False, False, False, False, False]
    assert js.tolist() == [False, True, False, False, False, False]
    # A custom format: any line that is not a known diagnostic is a text candidate.
    text, js = layouts.classify_lines(
        pa.array(["GET /x 200 10.0.0.1", lines[2].as_py(), ""], type=pa.string()),
        custom_format=True,
    )
    assert text.tolist() == [True, False, False]


def cri(ts: str, stream: str, tag: str, msg: str) -> str:
    return f"{ts} {stream} {tag} {msg}"


def test_cri_fast_path_strips_prefix_and_counts_garbage() -> None:
    ts = "2025-01-30T12:10:13.682034460Z"
    lines = pa.array(
        [cri(ts, "stdout", "F", SLEEP[0]), "garbage", cri(ts, "stderr", "F", "x")],
        type=pa.string(),
    )
    joiner = layouts.CriJoiner()
    inner, nos = joiner.feed(lines, 10)
    assert inner.to_pylist() == [SLEEP[0], "x"]
    assert nos.tolist() == [10, 12]
    assert joiner.malformed == [11]


def test_cri_partial_lines_join_across_chunks_and_streams() -> None:
    ts = "2025-01-30T12:10:13.682034460Z"
    a, b, c = SLEEP[0][:40], SLEEP[0][40:90], SLEEP[0][90:]
    joiner = layouts.CriJoiner()
    first = pa.array(
        [
            cri(ts, "stdout", "P", a),
            cri(ts, "stderr", "F", "warning: something"),  # interleaved other stream
            cri(ts, "stdout", "P", b),
        ],
        type=pa.string(),
    )
    inner1, nos1 = joiner.feed(first, 1)
    assert inner1.to_pylist() == ["warning: something"]
    assert nos1.tolist() == [2]
    second = pa.array([cri(ts, "stdout", "F", c), cri(ts, "stdout", "F", SLEEP[1])])
    inner2, nos2 = joiner.feed(second, 4)
    assert inner2.to_pylist() == [SLEEP[0], SLEEP[1]]
    assert nos2.tolist() == [1, 5]  # the joined line keeps its first fragment's number
    tail, tail_nos = joiner.flush()
    assert len(tail) == 0 and len(tail_nos) == 0


def test_cri_flush_returns_unterminated_partial() -> None:
    joiner = layouts.CriJoiner()
    joiner.feed(pa.array([cri("2025-01-30T12:10:13Z", "stdout", "P", "abc")]), 7)
    tail, nos = joiner.flush()
    assert tail.to_pylist() == ["abc"] and nos.tolist() == [7]


FLUENT_BIT = {
    "date": 1738239013.682034,
    "time": "2025-01-30T12:10:13.682034460Z",
    "stream": "stdout",
    "_p": "F",
    "log": SLEEP[1] + "\n",
    "kubernetes": {
        "pod_name": "httpbin-7d9",
        "namespace_name": "foo",
        "container_name": "istio-proxy",
        "pod_id": UID,
    },
}
VECTOR = {
    "message": SLEEP[0],
    "kubernetes": {"pod_name": "sleep-1", "pod_namespace": "foo", "container_name": "istio-proxy"},
    "source_type": "kubernetes_logs",
    "stream": "stdout",
    "timestamp": "2020-11-25T21:26:18.409555308Z",
}
LOKI = {
    "labels": {"namespace": "foo", "pod": "sleep-1", "container": "istio-proxy"},
    "line": SLEEP[0],
    "timestamp": "2020-11-25T21:26:18.409555308Z",
}


@pytest.mark.parametrize(
    ("record", "line", "pod", "ns"),
    [
        (FLUENT_BIT, SLEEP[1], "httpbin-7d9", "foo"),
        (VECTOR, SLEEP[0], "sleep-1", "foo"),
        (LOKI, SLEEP[0], "sleep-1", "foo"),
        # Vector with flattened keys
        (
            {"message": SLEEP[0], "kubernetes.pod_name": "s", "kubernetes.pod_namespace": "n"},
            SLEEP[0],
            "s",
            "n",
        ),
        # fluent-bit without a CRI parser: the log field is a raw CRI line
        (
            {"log": "2025-01-30T12:10:13Z stdout F " + SLEEP[0], "kubernetes": {"pod_name": "p"}},
            SLEEP[0],
            "p",
            None,
        ),
    ],
)
def test_unwrap_envelope(record: dict[str, object], line: str, pod: str, ns: str | None) -> None:
    env = layouts.unwrap_envelope(record)
    assert env is not None
    assert (env.line, env.pod, env.namespace) == (line, pod, ns)


def test_unwrap_envelope_rejects_plain_json() -> None:
    assert layouts.unwrap_envelope({"start_time": "x", "response_code": 200}) is None
    assert layouts.unwrap_envelope(["not", "a", "dict"]) is None
    assert not layouts.looks_like_envelope(SLEEP[0])
    assert layouts.looks_like_envelope(json.dumps(LOKI))


def test_unwrap_envelopes_chunk() -> None:
    istio_json = {"start_time": "2020-11-25T21:26:18.409Z", "response_code": 418}
    fb_json = dict(FLUENT_BIT, log=json.dumps(istio_json))
    lines = pa.array(
        [
            json.dumps(FLUENT_BIT),
            "{broken",
            json.dumps({"kubernetes": {"pod_name": "x"}}),
            json.dumps(fb_json),
            SLEEP[0],
            json.dumps(dict(LOKI, labels={"pod": "sleep-1"})),
        ],
        type=pa.string(),
    )
    out = layouts.unwrap_envelopes(
        lines,
        1,
        fallback=PodRef("file-pod", "file-ns"),
        known_pods=frozenset({("foo", "sleep-1")}),
    )
    assert out.lines.to_pylist() == [SLEEP[1], json.dumps(istio_json), SLEEP[0], SLEEP[0]]
    assert out.linenos.tolist() == [1, 4, 5, 6]
    assert out.pods.to_pylist() == ["httpbin-7d9", "httpbin-7d9", "file-pod", "sleep-1"]
    # the last record has no namespace label; the inventory knows sleep-1 only in foo
    assert out.reporters.to_pylist() == [
        "foo/httpbin-7d9",
        "foo/httpbin-7d9",
        "file-ns/file-pod",
        "foo/sleep-1",
    ]
    assert [no for no, _ in out.bad] == [2, 3]
    assert "not JSON" in out.bad[0][1] and "without a log line" in out.bad[1][1]


def test_reporters_for_prefixed_pods() -> None:
    pods = pa.array(["a-1", "b-1", "a-1", None], type=pa.string())
    got = layouts.reporters_for_pods(pods, namespace=None, known_pods={("ns1", "a-1")})
    assert got.to_pylist() == ["ns1/a-1", None, "ns1/a-1", None]
    got = layouts.reporters_for_pods(pods, namespace="x", known_pods=set())
    assert got.to_pylist() == ["x/a-1", "x/b-1", "x/a-1", None]


def test_byte_level_classification_matches_the_documented_patterns() -> None:
    """classify_lines/strip_kubectl look at leading bytes; they must agree with the regexes."""
    import random
    import re

    from observe.layouts import ACCESS_JSON, ACCESS_TEXT, classify_lines, strip_kubectl

    rng = random.Random(7)
    seeds = ["[2024-05-14T00:00:00.117Z] \"GET", "[2024-5-14T00", "[2024-05-14 00:00",
             '{"start_time": "x"}', ' \t{"upstream_cluster": 1}', "\f{\"response_code\": 2}",
             '{"other": 1}', "2025-01-30T12:10:13Z [2024", "[pod/a/b] x", "[po", "", "{",
             "2025-01-30T10:00:00.000000Z\tinfo\tFLAG", "[2024-05-14T", "[2024-05-14"]
    alphabet = "[]{}0123456789-T: \t\"apod/sr_"
    lines: list[str | None] = [*seeds, None]
    for _ in range(3000):
        base = rng.choice(seeds)
        cut = rng.randrange(len(base) + 1)
        noise = "".join(rng.choice(alphabet) for _ in range(rng.randrange(6)))
        lines.append(base[:cut] + noise + base[cut:] if rng.random() < 0.5 else base[:cut])
    arr = pa.array(lines, pa.string())
    is_text, is_json = classify_lines(arr)
    for i, line in enumerate(lines):
        value = line or ""
        assert is_text[i] == bool(line is not None and re.match(ACCESS_TEXT, value)), line
        assert is_json[i] == bool(line is not None and re.search(ACCESS_JSON, value)), line
    inner, _ = strip_kubectl(arr)
    timestamped = [ln for ln in lines if ln and (re.match(r"^\d{4}-", ln) or
                                                 ln.startswith("[pod/"))]
    assert (inner is arr) == (not timestamped)


def raw(lines: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    text = "\n".join(lines).encode()
    data = np.frombuffer(text, dtype=np.uint8)
    nl = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(data)]]).astype(np.int64)
    return data, starts, ends


@pytest.mark.parametrize(
    "lines",
    [
        ['[2020-11-25T21:26:18.409Z] "GET / HTTP/1.1" 200', "", "[2020-11-25T", "[2020-11-25"],
        ["[2020-11-25 21:20:01.123][15][warning][main] x", "[2020-1a-25T21:26", "[202"],
        ["plain", "x", "[2020-11-25T21:26:18Z] tail", "[9999-99-99T"],
        ["[2020-11-25T"],  # shorter than a word: read from the zero-padded end
        [""],
    ],
)
def test_classify_raw_matches_classify_lines(lines: list[str]) -> None:
    data, starts, ends = raw(lines)
    arr = pa.array(lines, pa.string())
    inner, pods = layouts.strip_kubectl(arr)
    assert pods is None and inner is arr
    text, js = layouts.classify_lines(arr)
    assert not js.any()
    got = layouts.classify_raw(data, starts, ends)
    assert got is not None and got.tolist() == text.tolist()


@pytest.mark.parametrize(
    "other",
    ["2020-11-25T21:26:18.409123456Z [2020-11-25T21:26:18.409Z] x", "[pod/a/istio-proxy] x",
     '{"start_time": "x"}', "  indented"],
)
def test_classify_raw_leaves_prefixed_and_json_lines_to_the_string_path(other: str) -> None:
    data, starts, ends = raw(['[2020-11-25T21:26:18.409Z] "GET / HTTP/1.1" 200', other])
    assert layouts.classify_raw(data, starts, ends) is None
