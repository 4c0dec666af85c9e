"""Path families: generalize observed HTTP paths into patterns Istio ``paths`` can express.

What Istio matches (AuthorizationPolicy ``Operation.paths``, security.istio.io/v1):

- exact ``/a/b``, prefix ``/a/*`` (trailing ``*``), suffix ``*/b`` (leading ``*``) and
  presence ``*``; a ``*`` anywhere else is a literal character.
- Since Istio 1.22, a path containing ``{*}`` (exactly one segment) or ``{**}`` (zero or more
  trailing segments) is an Envoy URI template; only whole segments, and ``*``/``**`` may not
  be mixed with templates in the same path (istio/istio#50365, #54171). Older control planes
  reject or literally match such paths, so templates are opt-in (``templates=True``), never
  the default.
- Matching uses the normalized path WITHOUT the query string: Istio drops everything after
  ``?`` before comparing (istio.io "Authorization Policy Normalization", item 5), and with
  the default ``BASE`` normalization decodes percent-encoded unreserved characters, turns
  ``\\`` into ``/`` and resolves ``.``/``..`` segments (slashes are merged only with
  ``MERGE_SLASHES``). :func:`path_family` applies the same steps so a family matches the
  request as Istio sees it.
- gRPC paths ``/package.Service/Method`` are kept exact.

A prefix family (``/reviews/*``) ALLOWS MORE THAN WAS SEEN: any path under the prefix, of
any depth, including ones the application never served during the observation window.
That is the price of expressing "an id goes here" without templates: Istio has no
single-segment wildcard before 1.22 and no regex at all. Families are therefore cut at the
FIRST id-like segment (``/users/42/orders`` -> ``/users/*``), which is the narrowest prefix
that still covers every id. The report must say so; the template form ``/users/{*}/orders``
is the exact alternative on Istio >= 1.22.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from functools import lru_cache

#: Minimum Istio version for ``{*}`` / ``{**}`` path templates in AuthorizationPolicy.
TEMPLATES_MIN_ISTIO = "1.22"

#: Default: more distinct paths than this under one parent collapse into ``parent/*``.
DEFAULT_MAX_EXACT = 20

_DECIMAL = re.compile(r"^[+-]?\d+(?:\.\d+)?$")
_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_HEX = re.compile(r"^(?:0x)?[0-9a-fA-F]{8,}$")
_DATE = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:[T_ ]\d{2}:?\d{2}(?::?\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?$"
)
_TOKEN = re.compile(r"^[A-Za-z0-9_\-+=.~]{20,}$")
# %HH for unreserved characters (RFC 3986 2.3) is what Istio's BASE normalization decodes.
_PCT_UNRESERVED = re.compile(r"%(2[dDeE]|3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF]|7[eE])")
# A kebab-case slug ('release-2024-notes-v2') is a route name even when long.
_SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# Anything normalize_path would change: query/fragment, %HH, backslash, dot segments.
_NEEDS_NORMALIZING = re.compile(r"[?#%\\]|/\.\.?(?:/|$)")
# Characters Istio would read as wildcard/template syntax in a policy path.
_SPECIAL = re.compile(r"[*{}]")


def is_id_segment(segment: str) -> bool:
    """True if ``segment`` looks like a generated identifier rather than a route name."""
    if not segment:
        return False
    if _DECIMAL.match(segment) or _UUID.match(segment) or _DATE.match(segment):
        return True
    # Hex hashes must carry a digit: 'deadbeef'-like words are rare, 'accepted' is not hex.
    if _HEX.match(segment) and any(c.isdigit() for c in segment):
        return True
    if _TOKEN.match(segment):
        # Long opaque tokens (base64/base64url, JWT-ish): mixed classes, not a slug of words.
        has_digit = any(c.isdigit() for c in segment)
        has_alpha = any(c.isalpha() for c in segment)
        return has_digit and has_alpha and not _SLUG.match(segment)
    # Anything Istio would interpret as a wildcard cannot be matched literally.
    return bool(_SPECIAL.search(segment))


@lru_cache(maxsize=1 << 16)
def _id_segment(segment: str) -> bool:
    # Route-name segments repeat across paths ('api', 'v1', 'users'): decide each once.
    return is_id_segment(segment)


def normalize_path(path: str) -> str:
    """The path as Istio's default (BASE) normalization compares it: no query/fragment,
    unreserved %HH decoded, backslashes as slashes, dot segments resolved."""
    if not _NEEDS_NORMALIZING.search(path):
        return path  # the common case: nothing to decode, drop or resolve
    return _normalize(path)


def _normalize(path: str) -> str:
    for sep in ("?", "#"):
        path = path.split(sep, 1)[0]
    path = _PCT_UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    path = path.replace("\\", "/")
    if not path.startswith("/"):
        return path
    out: list[str] = []
    parts = path.split("/")[1:]
    for i, seg in enumerate(parts):
        last = i == len(parts) - 1
        if seg == ".":
            if last:
                out.append("")
            continue
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(seg)
    return "/" + "/".join(out)


def path_family(path: str, protocol: str, *, templates: bool = False) -> str:
    """The family of one raw logged path, in Istio ``paths`` syntax.

    Without templates the path is cut at its first id-like segment into a prefix
    (``/reviews/0`` -> ``/reviews/*``); with ``templates=True`` (Istio >= 1.22) each id-like
    segment becomes ``{*}`` and the rest stays exact. gRPC paths are returned exact (after
    dropping any query). Paths that are not origin-form (``*`` of ``OPTIONS *``, an
    authority) are returned unchanged unless they contain wildcard characters, which
    become presence ``*``.
    """
    if protocol == "grpc":
        return path.split("?", 1)[0]
    norm = normalize_path(path)
    if not norm.startswith("/"):
        return "*" if _SPECIAL.search(norm) or not norm else norm
    segments = norm.split("/")[1:]
    if templates:
        if not any(_id_segment(s) for s in segments):
            return norm
        return "/" + "/".join("{*}" if _id_segment(s) else s for s in segments)
    for i, seg in enumerate(segments):
        if _id_segment(seg):
            if i == 0 and not _SPECIAL.search(seg):
                # '/*' would allow every path; a root-level id stays exact (collapse may
                # still group many of them, but never into '/*').
                return norm
            return "/" + "".join(s + "/" for s in segments[:i]) + "*"
    return norm


def _parent(family: str) -> str | None:
    """Directory one level above a family, or None at the root (collapsing there = any path)."""
    base = family
    for tail in ("/*", "/{**}"):
        if base.endswith(tail):
            base = base[: -len(tail)]
            break
    if "/" not in base.lstrip("/"):
        return None
    return base.rsplit("/", 1)[0]


def families(
    paths: Mapping[str, int],
    protocol: str,
    *,
    max_exact: int = DEFAULT_MAX_EXACT,
    templates: bool = False,
) -> dict[str, str]:
    """Map each raw path (keys of ``paths``, values are request counts) to its family.

    After per-path generalization, when more than ``max_exact`` distinct families share one
    parent directory they collapse into ``parent/*`` (``parent/{**}`` with templates),
    repeatedly, but never into ``/*`` (that would be "any path"). gRPC is never collapsed:
    a method is an API, not an id. Output is independent of the input's order.
    """
    result = {p: path_family(p, protocol, templates=templates) for p in sorted(paths)}
    if protocol == "grpc" or max_exact < 1:
        return result
    wildcard = "/{**}" if templates else "/*"
    while True:
        by_parent: dict[str, set[str]] = defaultdict(set)
        for fam in set(result.values()):
            if not fam.startswith("/"):
                continue
            parent = _parent(fam)
            if parent:
                by_parent[parent].add(fam)
        crowded = sorted(p for p, fams in by_parent.items() if len(fams) > max_exact)
        if not crowded:
            return result
        # Collapse the deepest crowded parent first so outer levels see the merged family.
        target = max(crowded, key=lambda p: (p.count("/"), p))
        members = by_parent[target]
        collapsed = target + wildcard
        result = {raw: (collapsed if fam in members else fam) for raw, fam in result.items()}


def is_wildcard(family: str) -> bool:
    """True if ``family`` matches more than one literal path (prefix/suffix/presence/template)."""
    return family == "*" or family.startswith("*") or family.endswith("*") or "{" in family
