"""Dump layouts: where a proxy log line came from, and the access-log line inside it.

Users hand meshwright whatever their cluster tooling wrote. This module knows those shapes:

* **Paths** (:func:`pod_from_path`): the pod (and, when the layout proves it, the namespace)
  of a per-pod log file, for ``kubectl logs`` dumps (``<ns>/<pod>/<container>.log``,
  ``<ns>/<pod>.log``, ``<ns>_<pod>_<container>.log``), kubelet node files
  (``/var/log/pods/<ns>_<pod>_<uid>/<container>/0.log`` and
  ``/var/log/containers/<pod>_<ns>_<container>-<id>.log``, pod *before* namespace) and
  must-gather (``namespaces/<ns>/pods/<pod>/<container>/<container>/logs/current.log``).
* **Line prefixes** (:func:`strip_kubectl`): ``kubectl logs --prefix`` (``[pod/<pod>/<c>] ``)
  and ``--timestamps`` (``<RFC3339Nano> ``), stripped vectorized with pyarrow compute.
* **CRI node files** (:class:`CriJoiner`): ``<RFC3339Nano> stdout|stderr F|P <line>``, with
  ``P`` (partial) lines joined to the following lines of the same stream up to the ``F`` line.
* **Shipper envelopes** (:func:`unwrap_envelopes`): fluent-bit (``log`` + ``kubernetes``
  with ``namespace_name``), Vector ``kubernetes_logs`` (``message`` + ``kubernetes`` with
  ``pod_namespace``), Loki ``logcli query -o jsonl`` (``line`` + ``labels``).
* **Line kinds** (:func:`classify_lines`): which lines are access-log candidates (Istio TEXT
  starts with ``[<ISO date>T``, Istio JSON is an object with access-log keys) and which are
  the proxy's own diagnostics (ignored, counted separately from malformed lines).
  :func:`classify_linkerd` does the same for linkerd-proxy access lines (``apache``: starts
  with the client's ``ip:port`` and a space; ``json``: an object with ``client.addr`` and
  ``uri``); linkerd-proxy's own log (``[  12.345678s]  INFO ...``) is a diagnostic.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from observe import arrowlite
from observe.compiled import textcut as _textcut
from observe.linkerd import APACHE_HEAD as LINKERD_APACHE
from observe.linkerd import JSON_HEAD as LINKERD_JSON

#: Container names a sidecar/gateway proxy runs as; a file named after one is per-container.
PROXY_CONTAINERS = frozenset({"istio-proxy", "proxy", "envoy", "linkerd-proxy"})

# Kubernetes object names: DNS-1123 labels/subdomains; '_' never occurs, so it separates.
_NAME = r"[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?"
_UID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_CONTAINERS_FILE = re.compile(
    rf"^(?P<pod>{_NAME})_(?P<ns>{_NAME})_(?P<c>{_NAME})-[0-9a-f]{{64}}\.log"
)
_PODS_DIR = re.compile(rf"^(?P<ns>{_NAME})_(?P<pod>{_NAME})_(?P<uid>{_UID}|[0-9a-f]{{32}})$")
_ROTATED = re.compile(r"^\d+\.log(?:\.\d{8}-\d{6})?(?:\.gz)?$")
_NS_POD_C_FILE = re.compile(rf"^(?P<ns>{_NAME})_(?P<pod>{_NAME})_(?P<c>{_NAME})$")
_LOG_SUFFIXES = (".log", ".txt", ".gz", ".out")

# RFC3339 / RFC3339Nano as kubectl --timestamps and CRI write it.
_TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)"
_KUBECTL_PREFIX = r"\[pod/[^/\]\s]+/[^\]\s]+\] "
_KUBECTL_STRIP = rf"^(?:{_KUBECTL_PREFIX})?(?:{_TS} )?"
_KUBECTL_POD = r"^\[pod/(?P<pod>[^/\]\s]+)/(?P<container>[^\]\s]+)\] "
_CRI = re.compile(rf"^{_TS} (?P<stream>stdout|stderr) (?P<tag>[FP])(?::\S*)? ?(?P<msg>.*)\Z", re.S)
_CRI_PC = rf"^{_TS} (?:stdout|stderr) [FP](?::\S*)? ?"
_CRI_PARTIAL_PC = rf"^{_TS} (?:stdout|stderr) P"

# Istio TEXT access lines start with '[%START_TIME%]'; Envoy's own log starts '[YYYY-MM-DD hh:'.
ACCESS_TEXT = r"^\[\d{4}-\d\d-\d\dT"
# Istio JSON access lines: an object carrying keys every Istio JSON format has.
ACCESS_JSON = r'^\s*\{.*"(?:start_time|response_code|upstream_cluster|downstream_remote_address)"'
# The proxy's own diagnostics: pilot-agent/istio ('<ts>\t<level>\t'), Envoy ('[date time]['),
# linkerd-proxy's plain log ('[ <uptime seconds>.<micros>s] ', linkerd/tracing/src/uptime.rs).
PROXY_DIAG = (
    rf"^(?:{_TS}\t|\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+\]\[|\[ *\d+\.\d{{6}}s\] )"
)


@dataclass(frozen=True)
class PodRef:
    """Which pod's proxy wrote a file (namespace None when the layout doesn't prove it)."""

    pod: str | None = None
    namespace: str | None = None
    container: str | None = None

    @property
    def reporter(self) -> str | None:
        """``<ns>/<pod>`` for the flow record, or None when either part is unknown."""
        if self.pod and self.namespace:
            return f"{self.namespace}/{self.pod}"
        return None


def _stem(name: str) -> str:
    for suffix in (".gz", ".log", ".txt", ".out"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _known(known_pods: Collection[tuple[str, str]], ns: str, pod: str) -> bool:
    return (ns, pod) in known_pods


def _unique_ns(known_pods: Collection[tuple[str, str]], pod: str) -> str | None:
    namespaces = {ns for ns, p in known_pods if p == pod}
    return namespaces.pop() if len(namespaces) == 1 else None


def pod_from_path(
    path: str | PurePath,
    *,
    root: str | PurePath | None = None,
    known_pods: Collection[tuple[str, str]] = frozenset(),
) -> PodRef:
    """The pod a per-pod log file belongs to, read from its path.

    ``root`` is the directory the user named (the file was found under it); path components
    above it are the user's own and never taken as a namespace. Layouts whose syntax proves
    the namespace (kubelet, must-gather, ``<ns>_<pod>_<container>.log``) are trusted as is;
    directory-based ones are trusted inside ``root`` or when ``known_pods`` (``(ns, pod)``
    from the inventory) confirms them. A pod name the inventory knows in exactly one
    namespace gets that namespace.
    """
    p = PurePath(path)
    parts = p.parts
    name = parts[-1] if parts else ""

    m = _CONTAINERS_FILE.match(name)
    if m:
        return PodRef(m["pod"], m["ns"], m["c"])
    if len(parts) >= 3 and _ROTATED.match(name):
        m = _PODS_DIR.match(parts[-3])
        if m:
            return PodRef(m["pod"], m["ns"], parts[-2])
    for i in range(len(parts) - 3):
        if parts[i] == "namespaces" and parts[i + 2] == "pods":
            container = parts[i + 4] if len(parts) > i + 5 else None
            return PodRef(parts[i + 3], parts[i + 1], container)

    stem = _stem(name)
    m = _NS_POD_C_FILE.match(stem)
    if m:
        return PodRef(m["pod"], m["ns"], m["c"])

    rel: tuple[str, ...] = parts
    if root is not None:
        try:
            rel = p.relative_to(PurePath(root)).parts
        except ValueError:
            rel = parts
    inside = root is not None and rel != parts
    # Candidate readings, most specific first: (ns, pod, container).
    candidates: list[tuple[str, str, str | None]] = []
    if len(rel) >= 3:
        candidates.append((rel[-3], rel[-2], stem))
    if len(rel) >= 2:
        candidates.append((rel[-2], stem, None))
    for ns, pod, container in candidates:
        if _known(known_pods, ns, pod):
            return PodRef(pod, ns, container)
    for ns, pod, container in candidates:
        if container is not None and container in PROXY_CONTAINERS and (inside or len(rel) >= 3):
            return PodRef(pod, ns, container)
        if container is None and inside:
            # '<ns>/<pod>.log' somewhere under the named directory.
            return PodRef(pod, ns, None)
    # Only the pod name is certain-ish: it is the file's stem (or its directory for a
    # per-container file); the inventory may still know its namespace.
    pod = parts[-2] if stem in PROXY_CONTAINERS and len(parts) >= 2 else stem
    if not re.fullmatch(_NAME, pod):
        return PodRef()
    return PodRef(pod, _unique_ns(known_pods, pod), None)


def strip_kubectl(lines: pa.StringArray) -> tuple[pa.StringArray, pa.Array | None]:
    """Strip ``kubectl logs --prefix`` / ``--timestamps`` prefixes (either, both, neither).

    Returns the inner lines and, when any line had a ``--prefix``, the per-line pod name
    (null where a line had none). Lines without a prefix pass through unchanged.
    """
    if len(lines) == 0:
        return lines, None
    head, ok = _heads(lines, 5)
    digits = (head[:, :4] >= 48) & (head[:, :4] <= 57)
    timestamped = digits.all(axis=1) & (head[:, 4] == 45)  # '2025-...'
    prefixed = (head == np.frombuffer(b"[pod/", dtype=np.uint8)).all(axis=1)
    if not ((timestamped | prefixed) & ok).any():
        return lines, None
    pods: pa.Array | None = None
    if pc.any(pc.starts_with(lines, "[pod/")).as_py():
        pods = pc.struct_field(pc.extract_regex(lines, _KUBECTL_POD), [0])
    inner = pc.replace_substring_regex(lines, _KUBECTL_STRIP, "", max_replacements=1)
    return inner, pods


_JSON_FIRST = np.frombuffer(b"{ \t\r\n\x0b\x0c", dtype=np.uint8)
_DIGIT_COLUMNS = np.array([1, 2, 3, 4, 6, 7, 9, 10])


def _heads(lines: pa.StringArray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``width`` bytes of every line as an (n, width) uint8 array, and a mask of the
    lines at least ``width`` bytes long (only those rows are meaningful: the bytes of a shorter
    line run into the next one, which no caller's pattern can match anyway)."""
    n = len(lines)
    bufs = lines.buffers()
    offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=lines.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else None
    long_enough = (offs[1:] - offs[:-1]) >= width
    if lines.null_count:
        long_enough &= arrowlite.validity(lines)
    if data is None or len(data) == 0:
        return np.zeros((n, width), dtype=np.uint8), long_enough
    pos = np.add.outer(offs[:-1], np.arange(width, dtype=np.int32)).astype(np.intp)
    return np.take(data, pos, mode="clip"), long_enough


def _text_shape(head: np.ndarray) -> np.ndarray:
    """Rows whose first bytes are '[YYYY-MM-DDT' (:data:`ACCESS_TEXT`)."""
    digits = head[:, _DIGIT_COLUMNS]
    return (
        (head[:, 0] == 91) & (head[:, 5] == 45) & (head[:, 8] == 45) & (head[:, 11] == 84)
        & ((digits >= 48) & (digits <= 57)).all(axis=1)
    )


def classify_lines(
    inner: pa.StringArray, *, custom_format: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of access-log candidates: ``(text, json)``; the rest is proxy diagnostics.

    With a user's ``--envoy-format`` the text test can't rely on the Istio layout, so every
    non-empty line that is not a known proxy diagnostic line is a text candidate.
    """
    if len(inner) == 0:
        empty = np.zeros(0, dtype=bool)
        return empty, empty
    head, ok = _heads(inner, 12)
    nonempty = arrowlite.to_int(pc.binary_length(inner)) > 0  # null: length 0
    # The JSON regex runs only where a line may open an object: '{' or leading whitespace.
    json_maybe = np.isin(head[:, 0], _JSON_FIRST) & nonempty
    is_json = np.zeros(len(inner), dtype=bool)
    if json_maybe.any():
        rows = np.flatnonzero(json_maybe)
        hits = pc.match_substring_regex(inner.take(arrowlite.int_array(rows)), ACCESS_JSON)
        is_json[rows] = arrowlite.to_bool(hits)
    if custom_format:
        diag = arrowlite.to_bool(pc.match_substring_regex(inner, PROXY_DIAG))
        blank = arrowlite.to_int(pc.utf8_length(pc.utf8_trim_whitespace(inner))) == 0
        other = diag | blank | ~arrowlite.validity(inner)  # a null line counts as other
        return ~(other | is_json), is_json
    # ACCESS_TEXT ('[YYYY-MM-DDT') checked on the first 12 bytes of every line at once.
    return _text_shape(head) & ok, is_json


def classify_linkerd(
    inner: pa.StringArray, *, not_rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Masks of linkerd-proxy access-log candidates: ``(apache, json)``.

    ``not_rows``: lines already claimed (Istio candidates), never Linkerd ones. The regexes run
    only on lines whose first byte allows them (a digit or ``[`` for apache, ``{`` or
    whitespace for JSON), so Istio-only chunks pay a numpy pass over the first bytes.
    """
    n = len(inner)
    apache = np.zeros(n, dtype=bool)
    js = np.zeros(n, dtype=bool)
    if n == 0:
        return apache, js
    head, ok = _heads(inner, 1)
    first = head[:, 0]
    free = ok if not_rows is None else ok & ~not_rows
    maybe_apache = free & (((first >= 48) & (first <= 57)) | (first == 91))
    maybe_json = free & np.isin(first, _JSON_FIRST)
    for maybe, pattern, out in ((maybe_apache, LINKERD_APACHE, apache),
                                (maybe_json, LINKERD_JSON, js)):
        if maybe.any():
            rows = np.flatnonzero(maybe)
            hits = pc.match_substring_regex(inner.take(arrowlite.int_array(rows)), pattern)
            out[rows] = arrowlite.to_bool(hits)
    return apache, js


_IP6_BYTES = np.frombuffer(b"0123456789abcdefABCDEF:.]", dtype=np.uint8)


def maybe_linkerd_raw(data: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                      rows: np.ndarray) -> bool:
    """True if any of ``rows`` (byte ranges of ``data``) may be a Linkerd apache line: it
    starts like an IPv4 address (a digit, then a '.' within 4 bytes) or a bracketed IPv6 one
    ('[' and 5 address bytes or ']'). The raw Istio path reads no such line; Envoy's and
    pilot-agent's diagnostics never start that way."""
    idx = np.flatnonzero(rows)
    idx = idx[(ends[idx] - starts[idx]) >= 7]
    if len(idx) == 0:
        return False
    pos = np.add.outer(starts[idx], np.arange(6)).astype(np.intp)
    head = np.take(data, pos, mode="clip")
    digit = (head[:, 0] >= 48) & (head[:, 0] <= 57)
    ip4 = digit & (head[:, 1:5] == 46).any(axis=1)
    ip6 = (head[:, 0] == 91) & np.isin(head[:, 1:6], _IP6_BYTES).all(axis=1)
    return bool((ip4 | ip6).any())


def _swar(fixed: dict[int, int], digits: Sequence[int]) -> tuple[int, int, int, int, int]:
    """Constants testing bytes of a little-endian word at once: ``(fixed mask, fixed value,
    digit mask 0xF0.., digit mask 0x0F.., digit bytes)`` (see :func:`_word_match`)."""
    fm = fv = hi = lo = one = 0
    for k, c in fixed.items():
        fm |= 0xFF << (8 * k)
        fv |= c << (8 * k)
    for k in digits:
        hi |= 0xF0 << (8 * k)
        lo |= 0x0F << (8 * k)
        one |= 0x01 << (8 * k)
    return fm, fv, hi, lo, one


def _word_match(w: np.ndarray, spec: tuple[int, int, int, int, int]) -> np.ndarray:
    fm, fv, hi, lo, one = (np.asarray(v, dtype=w.dtype) for v in spec)
    ok = (w & fm) == fv
    if hi:
        # A digit is 0x3N with N <= 9: N + 6 stays below 0x10 (no carry between bytes).
        ok &= (w & hi) == (hi & (one * 0x30))
        ok &= ((w & lo) + one * 6) & (one * 0x10) == 0
    return ok


# '[YYYY-MM-DDT' (ACCESS_TEXT) as bytes 0-7 and 8-11; kubectl '2025-' and '[pod/' heads.
_TEXT_8 = _swar({0: 91, 5: 45}, (1, 2, 3, 4, 6, 7))
_TEXT_4 = _swar({0: 45, 3: 84}, (1, 2))
_STAMP_8 = _swar({4: 45}, (0, 1, 2, 3))
_POD_8 = _swar(dict(enumerate(b"[pod/")), ())


def _head_words(data: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes 0-7 and 8-11 after each start as little-endian ints (zero past ``data``'s end)."""
    n = len(data)
    w8 = np.empty(len(starts), dtype=np.uint64)
    w4 = np.empty(len(starts), dtype=np.uint32)
    cut = int(np.searchsorted(starts, n - 12, side="right")) if n >= 12 else 0
    if cut:
        # Unaligned words at every byte offset: one gather per word instead of per byte.
        at8 = np.ndarray((n - 7,), dtype="<u8", buffer=data, strides=(1,))
        at4 = np.ndarray((n - 3,), dtype="<u4", buffer=data, strides=(1,))
        head = starts[:cut]
        w8[:cut] = at8[head]
        w4[:cut] = at4[head + 8]
    if cut < len(starts):  # the last few starts: read from a zero-padded copy of the end
        base = max(n - 12, 0)
        tail = np.zeros(32, dtype=np.uint8)
        tail[: n - base] = data[base:]
        rel = starts[cut:] - base
        w8[cut:] = np.ndarray((25,), dtype="<u8", buffer=tail, strides=(1,))[rel]
        w4[cut:] = np.ndarray((29,), dtype="<u4", buffer=tail, strides=(1,))[rel + 8]
    return w8, w4


def classify_raw(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray | None:
    """:func:`classify_lines`' text mask for plain lines given as byte ranges of ``data``
    (``starts`` increasing, ``data`` contiguous).

    None when the lines need the StringArray path: some carry a ``kubectl logs`` prefix or
    timestamp (see :func:`strip_kubectl`), or may be JSON.
    """
    n = len(starts)
    if n == 0:
        return np.zeros(0, dtype=bool)
    if _textcut is not None:
        mask = _textcut.classify_heads(data, np.ascontiguousarray(starts, dtype=np.int64),
                                       np.ascontiguousarray(ends, dtype=np.int64))
        return None if mask is None else np.frombuffer(mask, dtype=bool)
    return _classify_raw_numpy(data, starts, ends)


def _classify_raw_numpy(
    data: np.ndarray, starts: np.ndarray, ends: np.ndarray
) -> np.ndarray | None:
    """:func:`classify_raw` without the compiled kernel."""
    lens = ends - starts
    w8, w4 = _head_words(data, starts)
    # Bytes past a short line's end are masked out by the length checks.
    kubectl = _word_match(w8, _STAMP_8) | _word_match(w8, _POD_8)
    if (kubectl & (lens >= 5)).any():
        return None
    first = (w8 & np.uint64(0xFF)).astype(np.uint8)
    if (np.isin(first, _JSON_FIRST) & (lens > 0)).any():
        return None
    return _word_match(w8, _TEXT_8) & _word_match(w4, _TEXT_4) & (lens >= 12)


def looks_like_cri(line: str) -> bool:
    """True for a CRI node-file line (``<ts> stdout|stderr F|P ...``)."""
    return _CRI.match(line) is not None


@dataclass
class CriJoiner:
    """Joins CRI partial (``P``) lines across chunks of one file; one per file.

    Each stream (stdout, stderr) keeps its own pending fragments, since the runtime
    interleaves them. A joined line keeps the line number of its first fragment.
    """

    _pending: dict[str, tuple[int, list[str]]] = field(default_factory=dict)
    malformed: list[int] = field(default_factory=list)
    """Line numbers of lines that are not CRI lines (reset by the caller)."""

    def feed(self, lines: pa.StringArray, first_line: int) -> tuple[pa.StringArray, np.ndarray]:
        """Complete inner lines in this chunk and their (first) line numbers."""
        n = len(lines)
        linenos = np.arange(first_line, first_line + n, dtype=np.int64)
        if n == 0:
            return lines, linenos
        is_cri = pc.fill_null(pc.match_substring_regex(lines, _CRI_PC),
                              arrowlite.bool_scalar(False))
        partial = pc.match_substring_regex(lines, _CRI_PARTIAL_PC)
        if not self._pending and not pc.any(partial).as_py():
            # Fast path: every line is complete; strip the prefix vectorized.
            ok = arrowlite.to_bool(is_cri)
            if not ok.all():
                self.malformed.extend(int(x) for x in linenos[~ok])
            kept = lines.filter(is_cri)
            inner = pc.replace_substring_regex(kept, _CRI_PC, "", max_replacements=1)
            return inner, linenos[ok]
        out: list[str] = []
        out_no: list[int] = []
        for i, line in enumerate(lines.to_pylist()):
            lineno = int(linenos[i])
            m = _CRI.match(line or "")
            if m is None:
                self.malformed.append(lineno)
                continue
            stream, tag, msg = m["stream"], m["tag"], m["msg"]
            start, parts = self._pending.pop(stream, (lineno, []))
            parts.append(msg)
            if tag == "P":
                self._pending[stream] = (start, parts)
                continue
            out.append("".join(parts))
            out_no.append(start)
        return arrowlite.string_array(out), np.array(out_no, dtype=np.int64)

    def flush(self) -> tuple[pa.StringArray, np.ndarray]:
        """Fragments still pending at end of file (a truncated record), as lines."""
        items = sorted(self._pending.values())
        self._pending.clear()
        return (
            arrowlite.string_array(["".join(parts) for _, parts in items]),
            np.array([start for start, _ in items], dtype=np.int64),
        )


@dataclass(frozen=True)
class Envelope:
    """One unwrapped shipper record."""

    line: str | None
    """The inner log line (None when the record has none)."""
    pod: str | None
    namespace: str | None
    container: str | None


def _dig(obj: dict[str, object], *keys: str) -> str | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def unwrap_envelope(obj: object) -> Envelope | None:
    """The log line and pod of one shipper record, or None if ``obj`` isn't an envelope."""
    if not isinstance(obj, dict):
        return None
    kube = obj.get("kubernetes")
    meta: dict[str, object] | None = kube if isinstance(kube, dict) else None
    if meta is None and any(k.startswith("kubernetes.") for k in obj):
        # Vector's flattened form ('kubernetes.pod_name': ...).
        meta = {k[len("kubernetes.") :]: v for k, v in obj.items() if k.startswith("kubernetes.")}
    labels = obj.get("labels")
    if meta is not None:
        raw = obj.get("log", obj.get("message"))
        pod = _dig(meta, "pod_name")
        ns = _dig(meta, "namespace_name", "pod_namespace", "namespace")
        container = _dig(meta, "container_name")
    elif isinstance(labels, dict) and "line" in obj:
        raw = obj.get("line")
        pod = _dig(labels, "pod", "pod_name", "k8s_pod_name")
        ns = _dig(labels, "namespace", "namespace_name", "k8s_namespace_name")
        container = _dig(labels, "container", "container_name", "k8s_container_name")
    else:
        return None
    line: str | None
    if isinstance(raw, str):
        line = raw.rstrip("\r\n")
        m = _CRI.match(line)
        if m is not None:
            line = m["msg"]
    elif isinstance(raw, dict):
        # Shippers that already parsed the JSON access line (fluent-bit Merge_Log): re-serialize.
        line = orjson.dumps(raw, option=orjson.OPT_SORT_KEYS).decode()
    else:
        line = None
    return Envelope(line, pod, ns, container)


def looks_like_envelope(line: str) -> bool:
    """True if ``line`` is one JSON shipper record."""
    if not line.lstrip().startswith("{"):
        return False
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return unwrap_envelope(obj) is not None


@dataclass
class Unwrapped:
    """A chunk of envelope lines, unwrapped."""

    lines: pa.StringArray
    linenos: np.ndarray
    pods: pa.Array
    reporters: pa.Array
    bad: list[tuple[int, str]]
    """(line number, reason) of records that could not be unwrapped."""


def unwrap_envelopes(
    lines: pa.StringArray,
    first_line: int,
    *,
    fallback: PodRef,
    known_pods: Collection[tuple[str, str]] = frozenset(),
) -> Unwrapped:
    """Unwrap one chunk of a shipper export (per-line Python: envelopes are the slow path).

    Non-JSON lines pass through unchanged with the file's ``fallback`` pod, so a mixed file
    still yields its plain lines.
    """
    out: list[str] = []
    nos: list[int] = []
    pods: list[str | None] = []
    reporters: list[str | None] = []
    bad: list[tuple[int, str]] = []
    for i, line in enumerate(lines.to_pylist()):
        lineno = first_line + i
        if not line:
            continue
        env: Envelope | None = None
        if line.lstrip().startswith("{"):
            try:
                env = unwrap_envelope(orjson.loads(line))
            except orjson.JSONDecodeError as exc:
                bad.append((lineno, f"not JSON: {exc}"))
                continue
        if env is None:
            out.append(line)
            nos.append(lineno)
            pods.append(fallback.pod)
            reporters.append(fallback.reporter)
            continue
        if env.line is None:
            bad.append((lineno, "shipper record without a log line"))
            continue
        ns = env.namespace or (env.pod and _unique_ns(known_pods, env.pod))
        out.append(env.line)
        nos.append(lineno)
        pods.append(env.pod)
        reporters.append(f"{ns}/{env.pod}" if ns and env.pod else None)
    return Unwrapped(
        arrowlite.string_array(out),
        np.array(nos, dtype=np.int64),
        arrowlite.string_array(pods),
        arrowlite.string_array(reporters),
        bad,
    )


def reporters_for_pods(
    pods: pa.Array, *, namespace: str | None, known_pods: Collection[tuple[str, str]]
) -> pa.Array:
    """``<ns>/<pod>`` per row for ``--prefix`` pod names (null where the namespace is unknown).

    Works on the distinct pods of the chunk (a handful), then takes back per row.
    """
    distinct = pc.unique(pods)
    mapped: list[str | None] = []
    for pod in distinct.to_pylist():
        ns = namespace or (_unique_ns(known_pods, pod) if pod else None)
        mapped.append(f"{ns}/{pod}" if pod and ns else None)
    return pc.take(arrowlite.string_array(mapped), pc.index_in(pods, value_set=distinct))
