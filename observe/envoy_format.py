"""Envoy access-log formats: compile format strings, parse TEXT lines fast, parse JSON lines.

A format string (Envoy "command operators" such as ``%REQ(:METHOD)%`` between literal text)
compiles to an :class:`EnvoyFormat`: a token sequence, the canonical field name of each
operator (Istio's JSON key names, e.g. ``method``, ``upstream_cluster``), a compiled regex for
the per-line path and, when the format has the usual shape, a plan for the vectorized path.

Vectorized TEXT parsing (:func:`parse_text`) works on 64k-line chunks (small enough that Arrow
kernels stay in cache, which is several times faster than one pass over millions of lines):

1. split each line on ``"`` (``pc.split_pattern``); a line is a candidate only if it has exactly
   the number of pieces the format implies, so a quote-truncated line can never absorb text
   that is not its own;
2. each piece is checked against its literal prefix/suffix and, when it holds several fields,
   split on single spaces and its field count checked; quoted single-field pieces are taken
   whole, so user agents with spaces survive;
3. typed fields are validated (timestamp shape, digits-or-``-`` for numbers, unquoted values
   non-empty); ``-`` becomes null.

Lines that fail any check go to the next known variant (vectorized again, on the rest), then
to a per-line regex of each format (strict, then lenient about quotes inside quoted values),
and only then are reported in ``errors``. With ``fmt`` given, only that format is tried.

Known variants, tried in this order when no format is named (era labels are approximate):
``istio`` (1.9+ default; ``%UPSTREAM_CLUSTER_RAW%`` since 1.24, before it ``%UPSTREAM_CLUSTER%``,
same shape), ``istio-1.5`` (1.4-1.8: ``"%DYNAMIC_METADATA(istio.mixer:status)%"
"%UPSTREAM_TRANSPORT_FAILURE_REASON%"`` after the flags), ``istio-1.4-noroute`` (same without
``%ROUTE_NAME%``), ``istio-1.1`` (mixer status only, no route), ``istio-1.0`` (no extra fields)
and ``envoy`` (plain Envoy default). Sources: Istio ``pilot/pkg/model/telemetry_logging.go``
and older releases' listener configs; Envoy ``access_log/usage.rst``.

Known limit: a line cut inside its *last* field is indistinguishable from a complete line with
a shorter value (for Istio's format the route name); every other truncation is detected.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from observe import arrowlite
from observe.compiled import textcut as _textcut
from observe.errors import FormatError

log = logging.getLogger(__name__)

#: Canonical field names: the keys of Istio's JSON access-log encoding, in Istio's text order.
ISTIO_FIELDS: tuple[str, ...] = (
    "start_time",
    "method",
    "path",
    "protocol",
    "response_code",
    "response_flags",
    "response_code_details",
    "connection_termination_details",
    "upstream_transport_failure_reason",
    "bytes_received",
    "bytes_sent",
    "duration",
    "upstream_service_time",
    "x_forwarded_for",
    "user_agent",
    "request_id",
    "authority",
    "upstream_host",
    "upstream_cluster",
    "upstream_local_address",
    "downstream_local_address",
    "downstream_remote_address",
    "requested_server_name",
    "route_name",
)

# Operator (command, argument) -> canonical name, for the operators Istio's formats use.
_CANONICAL: dict[tuple[str, str | None], str] = {
    ("START_TIME", None): "start_time",
    ("REQ", ":METHOD"): "method",
    ("REQ", "X-ENVOY-ORIGINAL-PATH?:PATH"): "path",
    ("REQ", ":PATH"): "path",
    ("PROTOCOL", None): "protocol",
    ("RESPONSE_CODE", None): "response_code",
    ("RESPONSE_FLAGS", None): "response_flags",
    ("RESPONSE_CODE_DETAILS", None): "response_code_details",
    ("CONNECTION_TERMINATION_DETAILS", None): "connection_termination_details",
    ("UPSTREAM_TRANSPORT_FAILURE_REASON", None): "upstream_transport_failure_reason",
    ("BYTES_RECEIVED", None): "bytes_received",
    ("BYTES_SENT", None): "bytes_sent",
    ("DURATION", None): "duration",
    ("RESP", "X-ENVOY-UPSTREAM-SERVICE-TIME"): "upstream_service_time",
    ("REQ", "X-FORWARDED-FOR"): "x_forwarded_for",
    ("REQ", "USER-AGENT"): "user_agent",
    ("REQ", "X-REQUEST-ID"): "request_id",
    ("REQ", ":AUTHORITY"): "authority",
    ("REQ", "HOST"): "authority",
    ("UPSTREAM_HOST", None): "upstream_host",
    ("UPSTREAM_CLUSTER", None): "upstream_cluster",
    ("UPSTREAM_CLUSTER_RAW", None): "upstream_cluster",
    ("UPSTREAM_LOCAL_ADDRESS", None): "upstream_local_address",
    ("DOWNSTREAM_LOCAL_ADDRESS", None): "downstream_local_address",
    ("DOWNSTREAM_REMOTE_ADDRESS", None): "downstream_remote_address",
    ("REQUESTED_SERVER_NAME", None): "requested_server_name",
    ("ROUTE_NAME", None): "route_name",
}

# Envoy command operators taking a mandatory argument (envoy access_log/usage.rst).
_NEEDS_ARG = frozenset(
    {
        "REQ", "RESP", "TRAILER", "DYNAMIC_METADATA", "CLUSTER_METADATA", "UPSTREAM_METADATA",
        "FILTER_STATE", "UPSTREAM_FILTER_STATE", "ENVIRONMENT", "CEL", "METADATA",
        "QUERY_PARAM", "STREAM_INFO_REQ", "REQ_WITHOUT_QUERY",
    }
)
# Envoy operators accepted without the families below (HTTP/TCP/stream-level operators).
_KNOWN_OPERATORS = _NEEDS_ARG | frozenset(
    {
        "START_TIME", "START_TIME_LOCAL", "EMIT_TIME", "EMIT_TIME_LOCAL", "PROTOCOL",
        "DURATION", "COMMON_DURATION", "ROUNDTRIP_DURATION", "HOSTNAME", "CONNECTION_ID",
        "CONNECTION_TERMINATION_DETAILS", "REQUESTED_SERVER_NAME", "ROUTE_NAME",
        "VIRTUAL_CLUSTER_NAME", "FILTER_CHAIN_NAME", "LOCAL_REPLY_BODY", "ACCESS_LOG_TYPE",
        "GRPC_STATUS", "GRPC_STATUS_NUMBER", "STREAM_ID", "TRACE_ID", "UNIQUE_ID", "PATH",
        "CUSTOM_FLAGS", "BYTES_RECEIVED", "BYTES_SENT", "BYTES_RETRANSMITTED",
        "PACKETS_RETRANSMITTED", "X-ENVOY-UPSTREAM-SERVICE-TIME",
    }
)
_OPERATOR_FAMILIES = ("DOWNSTREAM_", "UPSTREAM_", "REQUEST_", "RESPONSE_")

# Operators whose value is an integer (or '-'), validated on the fast path.
_NUMERIC = frozenset(
    {
        ("RESPONSE_CODE", None), ("BYTES_RECEIVED", None), ("BYTES_SENT", None),
        ("DURATION", None), ("REQUEST_DURATION", None), ("RESPONSE_DURATION", None),
        ("REQUEST_TX_DURATION", None), ("RESPONSE_TX_DURATION", None),
        ("UPSTREAM_REQUEST_ATTEMPT_COUNT", None), ("GRPC_STATUS_NUMBER", None),
        ("RESP", "X-ENVOY-UPSTREAM-SERVICE-TIME"),
    }
)

_OPERATOR_RE = re.compile(r"%([A-Z][A-Z0-9_-]*)(?:\(([^()]*)\))?(?::(\d+))?%")
# Envoy's default %START_TIME%: RFC3339 with milliseconds; accept any fraction and offset.
ISO_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:?\d{2})$"
_ISO_TIME = ISO_TIME_PATTERN

CHUNK = 65536
#: Longest number a numeric field may hold (so that it fits an int64); longer ones make the
#: line malformed. Also in _textcut.c.
MAX_DIGITS = 18
#: Use the compiled kernel when it is built (tests switch it off to compare both paths).
USE_KERNEL = True
_NULL_STR = arrowlite.null_scalar()  # not pa.scalar: that imports pandas (0.15 s)
# Scalars for compute calls (a Python literal there imports pandas too).
_DASH = arrowlite.string_scalar("-")
_TRUE = arrowlite.bool_scalar(True)
_FALSE = arrowlite.bool_scalar(False)
_ZERO_LEN = arrowlite.int_scalar(0, pa.int32())
_MAX_DIGITS = arrowlite.int_scalar(MAX_DIGITS, pa.int32())


@dataclass(frozen=True)
class Literal:
    """Literal text between command operators."""

    text: str


@dataclass(frozen=True)
class Operator:
    """One command operator, e.g. ``%REQ(X-REQUEST-ID):36%``."""

    command: str
    arg: str | None
    max_length: int | None
    name: str
    """Canonical field name (Istio JSON key, or derived lower-case name)."""
    quoted: bool
    """True when the operator sits between double quotes in the format."""

    @property
    def text(self) -> str:
        arg = f"({self.arg})" if self.arg is not None else ""
        ml = f":{self.max_length}" if self.max_length is not None else ""
        return f"%{self.command}{arg}{ml}%"


Token = Literal | Operator


@dataclass(frozen=True)
class _Piece:
    """A stretch of the format between two double quotes, for the vectorized path."""

    prefix: str
    suffix: str
    fields: tuple[Operator, ...]
    """Fields separated by single spaces; empty for a literal-only piece."""
    quoted: bool


@dataclass(frozen=True)
class EnvoyFormat:
    """A compiled Envoy format string."""

    source: str
    tokens: tuple[Token, ...]
    name: str = "custom"
    fields: tuple[str, ...] = ()
    """Canonical names of the fields, in format order."""
    operators: dict[str, str] = field(default_factory=dict)
    """Canonical name -> operator text (``%UPSTREAM_CLUSTER_RAW%``)."""
    regex: re.Pattern[str] | None = None
    lenient_regex: re.Pattern[str] | None = None
    pieces: tuple[_Piece, ...] | None = None
    """Plan for the vectorized path; None when the format's shape does not allow it."""


@dataclass
class ParsedLines:
    """Result of parsing a batch of lines."""

    fields: pa.Table
    """One string column per canonical field; rows are the good lines, in input order."""
    good: np.ndarray
    """Boolean mask over the input lines: True where the line parsed."""
    errors: list[tuple[int, str]]
    """(index into the input, short reason) for every line that did not parse."""
    variants: pa.Array | None = None
    """Name of the format each good row matched (``istio``, ``istio-1.0``, ...)."""


# --------------------------------------------------------------------------- compiling


def _derive_name(command: str, arg: str | None) -> str:
    canonical = _CANONICAL.get((command, arg))
    if canonical:
        return canonical
    base = command.lower()
    if arg:
        base += "_" + re.sub(r"[^a-z0-9]+", "_", arg.lower()).strip("_")
    return base


def _tokenize(fmt: str) -> list[Token]:
    tokens: list[Token] = []
    pos = 0
    while pos < len(fmt):
        pct = fmt.find("%", pos)
        if pct < 0:
            tokens.append(Literal(fmt[pos:]))
            break
        if pct > pos:
            tokens.append(Literal(fmt[pos:pct]))
        m = _OPERATOR_RE.match(fmt, pct)
        if not m:
            end = fmt.find("%", pct + 1)
            bad = fmt[pct : end + 1] if end >= 0 else fmt[pct:]
            raise FormatError(
                f"invalid command operator {bad!r} at column {pct + 1} of the format string",
                hint="operators look like %NAME%, %NAME(arg)% or %NAME(arg):LEN%",
            )
        command, arg, max_len = m.group(1), m.group(2), m.group(3)
        if command not in _KNOWN_OPERATORS and not command.startswith(_OPERATOR_FAMILIES):
            raise FormatError(f"unknown Envoy command operator %{command}% in the format string")
        if command in _NEEDS_ARG and not arg:
            raise FormatError(
                f"command operator %{command}% needs an argument, e.g. %{command}(X)%"
            )
        if command in ("REQ", "RESP", "TRAILER") and arg:
            arg = arg.upper()
        tokens.append(
            Operator(command, arg, int(max_len) if max_len else None, "", quoted=False)
        )
        pos = m.end()
    return tokens


def _annotate(tokens: list[Token]) -> tuple[Token, ...]:
    """Fill canonical names (deduplicated) and the quoted flag of each operator."""
    out: list[Token] = []
    in_quotes = False
    seen: dict[str, int] = {}
    for tok in tokens:
        if isinstance(tok, Literal):
            in_quotes ^= tok.text.count('"') % 2 == 1
            out.append(tok)
            continue
        name = _derive_name(tok.command, tok.arg)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name]}"
        out.append(Operator(tok.command, tok.arg, tok.max_length, name, quoted=in_quotes))
    if in_quotes:
        raise FormatError("the format string has an unbalanced double quote")
    return tuple(out)


def _build_regex(tokens: Sequence[Token], lenient: bool) -> re.Pattern[str]:
    parts = ["^"]
    for tok in tokens:
        if isinstance(tok, Literal):
            parts.append(re.escape(tok.text))
        elif tok.quoted:
            # Lenient: a quote inside a quoted value, as long as no space follows it. No lazy
            # groups: they backtrack exponentially on lines that do not match.
            parts.append('((?:[^"]|"(?! ))*)' if lenient else '([^"]*)')
        elif tok.command.startswith("START_TIME") and tok.arg:
            parts.append("([^ ]+(?: [^ ]+)*?)")  # custom strftime formats may contain spaces
        else:
            parts.append(r"(\S+)")
    parts.append(r"\s*$")
    return re.compile("".join(parts))


def _build_pieces(tokens: Sequence[Token]) -> tuple[_Piece, ...] | None:
    """Split the format at double quotes; None if a piece is not 'prefix f1 f2 .. suffix'."""
    raw: list[list[Token]] = [[]]
    for tok in tokens:
        if isinstance(tok, Literal):
            chunks = tok.text.split('"')
            for i, chunk in enumerate(chunks):
                if i:
                    raw.append([])
                if chunk:
                    raw[-1].append(Literal(chunk))
        else:
            raw[-1].append(tok)
    pieces: list[_Piece] = []
    for idx, items in enumerate(raw):
        quoted = idx % 2 == 1
        prefix = suffix = ""
        if items and isinstance(items[0], Literal):
            prefix = items.pop(0).text
        if items and isinstance(items[-1], Literal):
            suffix = items.pop().text
        ops: list[Operator] = []
        for j, item in enumerate(items):
            if j % 2 == 0:
                if not isinstance(item, Operator):
                    return None
                ops.append(item)
            elif not (isinstance(item, Literal) and item.text == " "):
                return None
        pieces.append(_Piece(prefix, suffix, tuple(ops), quoted))
    return tuple(pieces)


def compile_format(fmt: str, name: str = "custom") -> EnvoyFormat:
    """Compile an Envoy format string; raise :class:`FormatError` if it is not valid.

    One trailing newline (real or the two characters ``\\n``, as printed in docs and YAML) is
    dropped: Envoy writes it at the end of each line.
    """
    if not isinstance(fmt, str) or not fmt.strip():
        raise FormatError("the Envoy format string is empty")
    text = fmt
    if text.endswith("\n"):
        text = text[:-1]
    elif text.endswith("\\n"):
        text = text[:-2]
    if "\n" in text or "\r" in text:
        raise FormatError(
            "the Envoy format string spans several lines",
            hint="join wrapped lines with spaces (format_from_docs() does this)",
        )
    tokens = _annotate(_tokenize(text))
    ops = [t for t in tokens if isinstance(t, Operator)]
    if not ops:
        raise FormatError("the Envoy format string has no command operators")
    return EnvoyFormat(
        source=fmt,
        tokens=tokens,
        name=name,
        fields=tuple(o.name for o in ops),
        operators={o.name: o.text for o in ops},
        regex=_build_regex(tokens, lenient=False),
        lenient_regex=_build_regex(tokens, lenient=True),
        pieces=_build_pieces(tokens),
    )


def format_from_docs(text: str, name: str = "custom") -> EnvoyFormat:
    """Compile a format as documentation and YAML show it: wrapped lines, ``\\"`` escapes."""
    joined = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return compile_format(joined.replace('\\"', '"'), name=name)


# Istio's TEXT variants (see the module docstring).
_V_HEAD = '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
_V_MID = (
    '%BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% '
    '"%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" "%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" '
    '"%UPSTREAM_HOST%"'
)
_V_TAIL = (
    " %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% "
    "%DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME%"
)
_MIXER = '"%DYNAMIC_METADATA(istio.mixer:status)%" '
_UTFR = '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" '

ISTIO_TEXT_FORMAT = (
    _V_HEAD
    + "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
    + _UTFR
    + _V_MID
    + _V_TAIL.replace("%UPSTREAM_CLUSTER%", "%UPSTREAM_CLUSTER_RAW%")
    + " %ROUTE_NAME%"
)
"""Istio's default TEXT format (1.24+), exactly as in ``telemetry_logging.go``."""

_VARIANT_SOURCES: tuple[tuple[str, str], ...] = (
    ("istio", ISTIO_TEXT_FORMAT),
    ("istio-1.5", _V_HEAD + "%RESPONSE_CODE% %RESPONSE_FLAGS% " + _MIXER + _UTFR + _V_MID
     + _V_TAIL + " %ROUTE_NAME%"),
    ("istio-1.4-noroute", _V_HEAD + "%RESPONSE_CODE% %RESPONSE_FLAGS% " + _MIXER + _UTFR
     + _V_MID + _V_TAIL),
    ("istio-1.1", _V_HEAD + "%RESPONSE_CODE% %RESPONSE_FLAGS% " + _MIXER + _V_MID + _V_TAIL),
    ("istio-1.0", _V_HEAD + "%RESPONSE_CODE% %RESPONSE_FLAGS% " + _V_MID + _V_TAIL),
    ("envoy", _V_HEAD + "%RESPONSE_CODE% %RESPONSE_FLAGS% " + _V_MID),
)

#: The known TEXT variants, in the order they are tried.
KNOWN_FORMATS: tuple[EnvoyFormat, ...] = tuple(
    compile_format(src, name=name) for name, src in _VARIANT_SOURCES
)


# --------------------------------------------------------------------------- vectorized path


def _numeric_names(fmt: EnvoyFormat) -> set[str]:
    return {
        t.name for t in fmt.tokens if isinstance(t, Operator) and (t.command, t.arg) in _NUMERIC
    }


_TIMESTAMP = pa.timestamp("us", tz="UTC")


def real_times(col: pa.Array) -> pa.Array:
    """False where an RFC3339-shaped value is no real instant (month 13, February 30)."""
    try:
        col.cast(_TIMESTAMP)
        return arrowlite.bool_array(np.ones(len(col), dtype=bool))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    good: dict[str, bool] = {}
    for value in pc.unique(col.drop_null()).to_pylist():
        try:
            arrowlite.string_array([value]).cast(_TIMESTAMP)
            good[value] = True
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            good[value] = False
    return arrowlite.bool_array(
        np.array([True if v is None else good[v] for v in col.to_pylist()], dtype=bool))


# Envoy's default %START_TIME% layout, 2024-01-02T03:04:05.678Z: 0 = a digit, else that byte.
_ISO_LAYOUT = np.frombuffer(b"0000-00-00T00:00:00.000Z", dtype=np.uint8)
_ISO_DIGIT = _ISO_LAYOUT == 48


def _iso_shaped(col: pa.Array) -> pa.Array:
    """Where ``col`` matches :data:`ISO_TIME_PATTERN` (False for null).

    Envoy's default layout is checked with numpy on the raw bytes; the regex runs only when
    some value has another length or layout.
    """
    n, w = len(col), len(_ISO_LAYOUT)
    if n and not col.null_count and col.type == pa.string():
        bufs = col.buffers()
        offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=col.offset * 4)
        if int(offs[-1]) - int(offs[0]) == n * w and bool((np.diff(offs) == w).all()):
            raw = np.frombuffer(bufs[2], dtype=np.uint8, count=n * w, offset=int(offs[0]))
            rows = raw.reshape(n, w)
            digits = (rows - np.uint8(48)) <= 9  # wraps: non-digits > 9
            if bool(np.where(_ISO_DIGIT, digits, rows == _ISO_LAYOUT).all()):
                return arrowlite.bool_array(np.ones(n, dtype=bool))
    return pc.fill_null(pc.match_substring_regex(col, _ISO_TIME), _FALSE)


def _validate(
    fmt: EnvoyFormat,
    cols: dict[str, pa.Array],
    unquoted: set[str],
    *,
    check_numbers: bool = True,
    check_times: bool = True,
) -> pa.Array | None:
    """Boolean mask of rows whose typed fields look right (None: all rows fine)."""
    ok: pa.Array | None = None

    def both(mask: pa.Array) -> None:
        nonlocal ok
        ok = mask if ok is None else pc.and_(ok, mask)

    # Columns may hold '-' or already null for it; both mean "no value".
    numeric = _numeric_names(fmt)
    for name, col in cols.items():
        if name in numeric and check_numbers:
            digits = pc.and_(pc.ascii_is_decimal(col), pc.less_equal(pc.binary_length(col),
                                                                    _MAX_DIGITS))
            both(pc.fill_null(pc.or_(digits, pc.equal(col, _DASH)), _TRUE))
        elif name in unquoted:
            both(pc.fill_null(pc.greater(pc.binary_length(col), _ZERO_LEN), _TRUE))
    if check_times:
        for name in _time_names(fmt):
            shaped = _iso_shaped(cols[name])
            both(pc.and_(shaped, real_times(pc.if_else(shaped, cols[name],
                                                       arrowlite.null_scalar(cols[name].type)))))
    if ok is not None:
        ok = pc.fill_null(ok, _FALSE)
    return ok


def _time_names(fmt: EnvoyFormat) -> list[str]:
    """Fields of ``%START_TIME%`` without a format argument (RFC3339 values)."""
    return [
        t.name for t in fmt.tokens
        if isinstance(t, Operator) and t.command == "START_TIME" and t.arg is None
    ]


@dataclass
class RawLines:
    """Lines as byte ranges ``data[starts[i]:ends[i]]`` of one buffer, not copied out.

    ``data`` is valid UTF-8; ranges are in increasing order and don't overlap. The fast parser
    cuts fields straight out of ``data``; a StringArray is built (:meth:`array`) only for
    what needs one (lines left to the per-line path, other layouts).
    """

    data: np.ndarray
    """uint8 bytes (e.g. a read buffer, which must not change while these are used)."""
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)

    def take(self, idx: np.ndarray) -> RawLines:
        """The lines at (increasing) positions ``idx``."""
        return RawLines(self.data, self.starts[idx], self.ends[idx])

    def slice(self, start: int, length: int) -> RawLines:
        return RawLines(
            self.data, self.starts[start : start + length], self.ends[start : start + length]
        )

    def array(self) -> pa.StringArray:
        """The lines as a compact StringArray (one copy)."""
        n = len(self.starts)
        if n == 0:
            return arrowlite.string_array([])
        take_even = arrowlite.int_array(np.arange(0, 2 * n - 1, 2, dtype=np.int32))
        return cut_strings(pa.py_buffer(self.data), self.starts, self.ends, np.ones(n, dtype=bool),
                    take_even)

    def to_pylist(self) -> list[str | None]:
        return self.array().to_pylist()


_SCRATCH = threading.local()
_ZERO = np.zeros(1, dtype=np.int64)


def _scratch(size: int) -> np.ndarray:
    """A per-thread byte buffer of ``size`` bytes, reused: a fresh chunk-sized array costs
    more in page faults than the pass that fills it."""
    buf: np.ndarray | None = getattr(_SCRATCH, "buf", None)
    if buf is None or len(buf) < size:
        buf = np.empty(max(size, 1 << 20), dtype=np.uint8)
        _SCRATCH.buf = buf
    return buf[:size]


def _kept_fields(fmt: EnvoyFormat, wanted: Collection[str] | None) -> list[str]:
    """The fields to cut: the wanted ones plus those :func:`_validate` checks."""
    if wanted is None:
        return list(fmt.fields)
    checked = set(_time_names(fmt))
    if not _kernel_on():  # the kernel checks numbers without cutting them out
        checked |= _numeric_names(fmt)
    return [name for name in fmt.fields if name in wanted or name in checked]


def _kernel_on() -> bool:
    return _textcut is not None and USE_KERNEL


def _fast_chunk(
    lines: pa.Array | RawLines, fmt: EnvoyFormat, kept: Sequence[str] | None = None
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """Parse one chunk with ``fmt``'s plan; return columns of good rows and the good mask.

    Only the ``kept`` fields (default: all) are cut out; every field is still checked.

    Works on byte positions: every '"' and ' ' of the chunk is located once with numpy, each
    field's (start, end) follows from the plan, and each column is cut out of the original
    data buffer with one ``take`` (offsets s0,e0,s1,e1,.. make a zero-copy array whose even
    elements are the field values).
    """
    n = len(lines)
    if isinstance(lines, RawLines):
        if n == 0 or len(lines.data) == 0:
            return {}, np.zeros(n, dtype=bool)
        data_buf = pa.py_buffer(lines.data)
        data = lines.data
        line_start = lines.starts.astype(np.int64, copy=False)
        line_end = lines.ends.astype(np.int64, copy=False)
        valid = None
    else:
        bufs = lines.buffers()
        offs = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=lines.offset * 4)
        data_buf = bufs[2]
        if data_buf is None or n == 0:
            return {}, np.zeros(n, dtype=bool)
        data = np.frombuffer(data_buf, dtype=np.uint8)
        line_start = offs[:-1].astype(np.int64)
        line_end = offs[1:].astype(np.int64)
        valid = arrowlite.validity(lines) if lines.null_count else None
    return _fast_core(data_buf, data, line_start, line_end, valid, fmt, kept)


def _fast_core(
    data_buf: pa.Buffer,
    data: np.ndarray,
    line_start: np.ndarray,
    line_end: np.ndarray,
    valid: np.ndarray | None,
    fmt: EnvoyFormat,
    kept: Sequence[str] | None,
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """:func:`_fast_chunk` on lines ``data[line_start[i]:line_end[i]]`` (increasing ranges)."""
    assert fmt.pieces is not None
    if _kernel_on():
        return _kernel_core(data, line_start, line_end, valid, fmt, kept)
    pieces = fmt.pieces
    nq = len(pieces) - 1
    lo, hi = int(line_start[0]), int(line_end[-1])
    window = data[lo:hi]
    # '"' (34) and ' ' (32) differ only in bit 1: one pass finds both, sorted together, so a
    # piece's separators are the entries right after its opening quote (no search per piece).
    scratch = _scratch(len(window))
    np.bitwise_and(window, 0xFD, out=scratch)
    hits = np.flatnonzero(np.equal(scratch, 32, out=scratch.view(bool)))
    pos = hits + lo if lo else hits  # big arrays: skip the copy when it is a no-op
    is_q = window[hits] == 34
    qj = np.flatnonzero(is_q)  # indices into pos of the quotes
    # Line i's hits: pj0[i] .. pj1[i]; its quotes: qi0[i] .. qi1[i]. Hits between lines
    # (skipped lines) are never counted.
    pj0 = np.searchsorted(pos, line_start)
    qi0 = np.searchsorted(qj, pj0)
    # Mostly only '\r\n' lies between lines: a line's hits end where the next line's begin.
    pj1 = np.append(pj0[1:], np.searchsorted(pos, hi))
    qi1 = np.append(qi0[1:], np.searchsorted(qj, pj1[-1]))
    last = np.take(pos if len(pos) else _ZERO, pj1 - 1, mode="clip")
    gap = np.flatnonzero((pj1 > pj0) & (last >= line_end))  # hits after the line's end
    if len(gap):
        pj1[gap] = np.searchsorted(pos, line_end[gap])
        qi1[gap] = np.searchsorted(qj, pj1[gap])
    good = (qi1 - qi0) == nq
    if valid is not None:
        good &= valid
    idx = np.flatnonzero(good)
    if not len(idx):
        return {}, good
    # (quote k, row) layout: each quote's row of positions is contiguous.
    qjl = np.take(qj, np.arange(nq)[:, None] + qi0[idx]) if nq else np.empty((0, len(idx)), int)
    quotes = np.take(pos, qjl)
    starts0, ends0 = line_start[idx], line_end[idx]
    first_j, end_j = pj0[idx], pj1[idx]

    def at(p: np.ndarray) -> np.ndarray:
        # Positions of rows already failing a check may point outside the data: clip them.
        return np.take(data, p, mode="clip")

    ok = np.ones(len(idx), dtype=bool)
    bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    unquoted: set[str] = set()
    for k, piece in enumerate(pieces):
        a = starts0 if k == 0 else quotes[k - 1] + 1
        b = ends0 if k == nq else quotes[k]
        pre, suf = piece.prefix.encode(), piece.suffix.encode()
        if piece.fields:
            ok &= (b - a) >= len(pre) + len(suf)
        else:
            ok &= (b - a) == len(pre)
        for j, c in enumerate(pre):
            ok &= at(a + j) == c
        for j, c in enumerate(suf):
            ok &= at(b - len(suf) + j) == c
        a2 = a + len(pre) if pre else a
        b2 = b - len(suf) if suf else b
        nf = len(piece.fields)
        if nf == 1:
            bounds[piece.fields[0].name] = (a2, b2)
        elif nf > 1:
            # Hits strictly inside the piece are its spaces: the literal ones of prefix and
            # suffix (checked above) plus exactly nf - 1 separators.
            ja = first_j - 1 if k == 0 else qjl[k - 1]
            jb = end_j if k == nq else qjl[k]
            npre = pre.count(b" ")
            ok &= (jb - ja - 1) == npre + suf.count(b" ") + nf - 1
            # ja + 1 >= 0; only rows already failing can run past the end: clip those.
            cut = np.take(pos if len(pos) else _ZERO, np.arange(nf - 1)[:, None] + (ja + 1 + npre),
                          mode="clip")
            for j, f in enumerate(piece.fields):
                s_ = a2 if j == 0 else cut[j - 1] + 1
                e_ = b2 if j == nf - 1 else cut[j]
                bounds[f.name] = (s_, e_)
        if not piece.quoted:
            unquoted.update(f.name for f in piece.fields)
    for name in unquoted:
        s_, e_ = bounds[name]
        ok &= e_ > s_  # Envoy writes '-' for an empty value, never nothing
    if not ok.all():
        good[idx[~ok]] = False
        bounds = {k: (v[0][ok], v[1][ok]) for k, v in bounds.items()}
    m = int(ok.sum())
    take_even = arrowlite.int_array(np.arange(0, max(2 * m - 1, 0), 2, dtype=np.int32))
    cols: dict[str, pa.Array] = {}
    for name in fmt.fields if kept is None else kept:
        s_, e_ = bounds[name]
        dash = (e_ - s_) == 1
        one = np.flatnonzero(dash)
        if len(one):  # only one-byte values can be '-': gather just those
            dash[one] = data[s_[one]] == 45
        cols[name] = cut_strings(data_buf, s_, e_, ~dash, take_even)
    valid = _validate(fmt, cols, set())
    if valid is not None:
        names = list(cols)
        good, kept = _keep(good, valid, [cols[c] for c in names])
        cols = dict(zip(names, kept, strict=True))
    return cols, good


def _plan(fmt: EnvoyFormat) -> tuple[tuple[tuple[bytes, bytes, int, int], ...], list[str]]:
    """The kernel's view of ``fmt.pieces``: (prefix, suffix, field count, quoted) per piece,
    and the field names in piece order."""
    assert fmt.pieces is not None
    plan = tuple(
        (p.prefix.encode(), p.suffix.encode(), len(p.fields), int(p.quoted)) for p in fmt.pieces
    )
    return plan, [f.name for p in fmt.pieces for f in p.fields]


def _kernel_core(
    data: np.ndarray,
    line_start: np.ndarray,
    line_end: np.ndarray,
    valid: np.ndarray | None,
    fmt: EnvoyFormat,
    kept: Sequence[str] | None,
) -> tuple[dict[str, pa.Array], np.ndarray]:
    """:func:`_fast_core` by the compiled kernel: same checks, same columns."""
    plan, order = _plan(fmt)
    names = list(fmt.fields if kept is None else kept)
    index = {name: order.index(name) for name in names}
    times = _time_names(fmt)
    # One RFC3339 field is checked by the kernel (Envoy's default layout; other layouts are
    # counted and checked here); several are all checked here.
    time_field = order.index(times[0]) if len(times) == 1 else -1
    good_b, raw_cols, m, odd_times = _textcut.cut(
        data,
        np.ascontiguousarray(line_start, dtype=np.int64),
        np.ascontiguousarray(line_end, dtype=np.int64),
        None if valid is None else np.ascontiguousarray(valid, dtype=np.uint8),
        plan,
        tuple(index[name] for name in names),
        tuple(order.index(name) for name in sorted(_numeric_names(fmt))),
        time_field,
    )
    good = np.frombuffer(good_b, dtype=bool).copy()
    if not m:
        return {}, good
    cols: dict[str, pa.Array] = {}
    for name, (offsets, values, bits, nulls) in zip(names, raw_cols, strict=True):
        cols[name] = pa.StringArray.from_buffers(
            m, pa.py_buffer(offsets), pa.py_buffer(values),
            None if bits is None else pa.py_buffer(bits), nulls,
        )
    if odd_times or (times and time_field < 0):
        checked = _validate(fmt, cols, set(), check_numbers=False)
        if checked is not None:
            good, arrays = _keep(good, checked, list(cols.values()))
            cols = dict(zip(cols, arrays, strict=True))
    return cols, good


def cut_strings(
    data: pa.Buffer, starts: np.ndarray, ends: np.ndarray, valid: np.ndarray,
    take_even: pa.Array | None = None,
) -> pa.Array:
    """Strings data[starts[i]:ends[i]] (null where not valid) as a compact StringArray."""
    m = len(starts)
    if m == 0:
        return arrowlite.string_array([])
    offsets = np.empty(2 * m, dtype=np.int32)
    offsets[0::2] = starts
    offsets[1::2] = ends
    bits = np.ones(2 * m - 1, dtype=bool)
    bits[0::2] = valid
    null_count = int(m - valid.sum())
    validity = pa.py_buffer(np.packbits(bits, bitorder="little")) if null_count else None
    inter = pa.StringArray.from_buffers(
        2 * m - 1, pa.py_buffer(offsets), data, validity, null_count if validity else 0
    )
    if take_even is None:
        take_even = arrowlite.int_array(np.arange(0, 2 * m - 1, 2, dtype=np.int32))
    return inter.take(take_even)


def _keep(
    good: np.ndarray, ok: pa.Array, arrays: list[pa.Array]
) -> tuple[np.ndarray, list[pa.Array]]:
    """Drop rows where ``ok`` is False from ``arrays`` and from the True entries of ``good``."""
    ok_np = arrowlite.to_bool(ok)
    if ok_np.all():
        return good, arrays
    good = good.copy()
    good[np.flatnonzero(good)[~ok_np]] = False
    return good, [a.filter(ok) for a in arrays]


def _nullify(arr: pa.Array) -> pa.Array:
    """Envoy prints '-' for an absent value."""
    return pc.if_else(pc.equal(arr, _DASH), _NULL_STR, arr)


def _fast_parse(
    lines: pa.Array | RawLines, fmt: EnvoyFormat, wanted: Collection[str] | None = None
) -> tuple[pa.Table, np.ndarray]:
    """Vectorized parse of ``lines`` (any length) with ``fmt``: (good rows table, good mask)."""
    tables: list[pa.Table] = []
    masks: list[np.ndarray] = []
    kept = _kept_fields(fmt, wanted)
    for start in range(0, len(lines), CHUNK):
        chunk = lines.slice(start, CHUNK)
        cols, mask = _fast_chunk(chunk, fmt, kept)
        masks.append(mask)
        if cols:
            tables.append(pa.table(cols))
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    schema = pa.schema([(name, pa.string()) for name in kept])
    table = pa.concat_tables(tables) if tables else arrowlite.empty_table(schema)
    return table, mask


# --------------------------------------------------------------------------- per-line path


def _regex_parse(
    lines: Sequence[str | None], fmt: EnvoyFormat
) -> tuple[dict[str, list[str | None]], list[bool]]:
    assert fmt.regex is not None and fmt.lenient_regex is not None
    cols: dict[str, list[str | None]] = {name: [] for name in fmt.fields}
    names = fmt.fields
    ok: list[bool] = []
    for line in lines:
        m = None
        if line:
            m = fmt.regex.match(line) or fmt.lenient_regex.match(line)
        ok.append(m is not None)
        if m is None:
            continue
        for name, value in zip(names, m.groups(), strict=True):
            cols[name].append(value)
    return cols, ok


def _reason(line: str | None, fmts: Sequence[EnvoyFormat], custom: bool) -> str:
    if line is None or not line.strip():
        return "empty line"
    if any(fmt.regex is not None and fmt.regex.match(line) for fmt in fmts):
        return "bad field value (timestamp or number) for the access-log format"
    if line.count('"') % 2:
        return "unbalanced double quotes (truncated line?)"
    if custom:
        return "does not match the given --envoy-format"
    return "not an Envoy/Istio access-log line"


# --------------------------------------------------------------------------- public API


def _assemble(
    parts: list[tuple[pa.Table, np.ndarray, str]], columns: list[str]
) -> tuple[pa.Table, pa.Array]:
    """Merge (table, input indices, variant) parts into one table in input order."""
    schema = pa.schema([(c, pa.string()) for c in columns])
    if not parts:
        return arrowlite.empty_table(schema), arrowlite.string_array([])
    tables = []
    for table, idx, _ in parts:
        cols = [
            table.column(c) if c in table.column_names else pa.nulls(len(idx), pa.string())
            for c in columns
        ]
        tables.append(pa.Table.from_arrays(cols, schema=schema))
    table = pa.concat_tables(tables)
    # Variant per row as dictionary codes: no Python object per row.
    names = [variant for _, _, variant in parts]
    codes = np.concatenate([np.full(len(idx), k, dtype=np.int32) for k, (_, idx, _) in
                            enumerate(parts)])
    variants = pa.DictionaryArray.from_arrays(
        arrowlite.int_array(codes, pa.int32()), arrowlite.string_array(names)).cast(pa.string())
    order_idx = np.concatenate([idx for _, idx, _ in parts])
    if len(parts) > 1 and not np.all(order_idx[:-1] <= order_idx[1:]):
        order = arrowlite.int_array(np.argsort(order_idx, kind="stable"), pa.int64())
        table = table.take(order)
        variants = variants.take(order)
    return table, variants


def _has_byte(col: pa.ChunkedArray, byte: int) -> bool:
    """False only if no value of ``col`` contains ``byte`` (a cheap scan of the raw data)."""
    for chunk in col.chunks:
        bufs = chunk.buffers()
        if chunk.type != pa.string() or len(bufs) < 3:
            return True
        if bufs[2] is None or not len(chunk):
            continue
        offs = np.frombuffer(bufs[1], dtype=np.int32, count=len(chunk) + 1,
                             offset=chunk.offset * 4)
        data = np.frombuffer(bufs[2], dtype=np.uint8)[int(offs[0]) : int(offs[-1])]
        if (data == byte).any():
            return True
    return False


def _post_process(table: pa.Table) -> pa.Table:
    # %UPSTREAM_CLUSTER% (pre-1.24) prints the cluster's alt_stat_name, which Istio ends with
    # ';' ("outbound|9080||productpage.default.svc.cluster.local;"); keep the cluster name only.
    if "upstream_cluster" in table.column_names:
        col = table.column("upstream_cluster")
        if _has_byte(col, 59) and pc.any(pc.match_substring(col, ";")).as_py():
            fixed = pc.replace_substring_regex(col, ";.*$", "")
            table = table.set_column(
                table.column_names.index("upstream_cluster"), "upstream_cluster", fixed
            )
    return table


def parse_text(
    lines: pa.Array | RawLines,
    fmt: EnvoyFormat | None = None,
    *,
    columns: Collection[str] | None = None,
) -> ParsedLines:
    """Parse Envoy TEXT access-log lines (already unwrapped from any container layout).

    ``columns``: the fields the caller needs; ``fields`` then holds only those (cutting a
    field out of the lines is the costliest step). Every field is still checked.

    With ``fmt`` None, the known Istio/Envoy variants are recognised by themselves. Exact:
    every line is either a row of ``fields`` (``good`` True) or in ``errors``. Every
    ``start_time`` value (``%START_TIME%`` without a format argument) matched the RFC3339
    pattern and every numeric field is digits (at most MAX_DIGITS) or null
    (``istio.to_flows(checked=True)`` relies on it).
    """
    if not isinstance(lines, (pa.Array, RawLines)):
        lines = arrowlite.string_array(list(lines))
    if isinstance(lines, pa.Array) and lines.type == pa.large_string():
        lines = lines.cast(pa.string())
    n = len(lines)
    formats: tuple[EnvoyFormat, ...] = (fmt,) if fmt is not None else KNOWN_FORMATS

    parts: list[tuple[pa.Table, np.ndarray, str]] = []
    remaining = np.arange(n)
    rest = lines
    for f in formats:
        if not len(remaining) or f.pieces is None:
            continue
        table, mask = _fast_parse(rest, f, columns)
        if mask.any():
            parts.append((table, remaining[mask], f.name))
            remaining = remaining[~mask]
            if isinstance(lines, RawLines):
                rest = lines.take(remaining)
            else:
                rest = (lines.take(arrowlite.int_array(remaining, pa.int64())) if len(remaining)
                        else rest.slice(0, 0))
    errors: list[tuple[int, str]] = []
    if len(remaining):
        leftover: list[str | None] = rest.to_pylist()
        for f in formats:
            if not leftover:
                break
            cols, ok = _regex_parse(leftover, f)
            okarr = np.array(ok, dtype=bool)
            if not okarr.any():
                continue
            table = pa.table({k: arrowlite.string_array(v) for k, v in cols.items()})
            valid = _validate(f, {k: table.column(k).combine_chunks() for k in f.fields},
                              _unquoted(f))
            if valid is not None:
                v_np = arrowlite.to_bool(valid)
                table = table.filter(valid)
                okidx = np.flatnonzero(okarr)
                okarr[okidx[~v_np]] = False
            if okarr.any():
                table = pa.table({k: _nullify(table.column(k).combine_chunks())
                                  for k in table.column_names})
                parts.append((table, remaining[okarr], f.name))
            remaining = remaining[~okarr]
            leftover = [x for x, o in zip(leftover, okarr, strict=True) if not o]
        errors = [
            (int(i), _reason(line, formats, fmt is not None))
            for i, line in zip(remaining, leftover, strict=True)
        ]
    # Istio's fields always (auto mode), plus the extra fields of the variants that matched.
    names = list(ISTIO_FIELDS) if fmt is None else list(fmt.fields)
    by_name = {f.name: f for f in formats}
    for _, _, variant in parts:
        names += [c for c in by_name[variant].fields if c not in names]
    if columns is not None:
        names = [c for c in names if c in columns]
    table, variants = _assemble(parts, names)
    good = np.ones(n, dtype=bool)
    good[remaining] = False
    if errors:
        log.debug("%d of %d lines are not access-log lines", len(errors), n)
    return ParsedLines(fields=_post_process(table), good=good, errors=errors, variants=variants)


def _unquoted(fmt: EnvoyFormat) -> set[str]:
    return {t.name for t in fmt.tokens if isinstance(t, Operator) and not t.quoted}


# --------------------------------------------------------------------------- JSON


def compile_json_format(text: str | bytes) -> dict[str, Operator]:
    """Compile Istio/Envoy's JSON format (key -> operator); raise FormatError if invalid."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise FormatError(f"the JSON access-log format is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict) or not obj:
        raise FormatError("the JSON access-log format must be a non-empty JSON object")
    out: dict[str, Operator] = {}
    for key, value in obj.items():
        if not isinstance(value, str):
            raise FormatError(f"JSON format key {key!r}: value must be a string operator")
        toks = [t for t in _annotate(_tokenize(value)) if isinstance(t, Operator)]
        if len(toks) != 1:
            raise FormatError(f"JSON format key {key!r}: expected one command operator")
        out[key] = toks[0]
    return out


def looks_like_istio_json(obj: object) -> bool:
    """True if a decoded JSON line looks like an Istio/Envoy JSON access-log record."""
    if not isinstance(obj, dict):
        return False
    known = sum(1 for k in ISTIO_FIELDS if k in obj)
    return known >= 6 or (known >= 3 and "start_time" in obj)


def parse_json(lines: pa.Array) -> ParsedLines:
    """Parse Istio JSON access-log lines (keys in any order, numbers unquoted, null = empty).

    Implemented in :mod:`observe.envoy_json` (Arrow's C++ reader, exact per-line fallback).
    """
    # Imported here: envoy_json builds on this module's ParsedLines and helpers.
    from observe.envoy_json import parse_json_lines

    return parse_json_lines(lines)


def looks_like_envoy_text(line: str) -> bool:
    """True if ``line`` is a line of one of the known Istio/Envoy TEXT formats."""
    return any(f.regex is not None and f.regex.match(line) for f in KNOWN_FORMATS)
