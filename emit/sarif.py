"""Findings as SARIF 2.1.0 (``findings.sarif``) for code-scanning views, and findings.json.

One run, tool ``meshwright``; one rule per finding kind; one result per finding. A result's
location is its first evidence sample (``file:line`` -> the file and its line; ``file:packet
N`` -> the file), further samples are ``relatedLocations``; every result also names its edge
as a logical location. ``partialFingerprints`` carry the finding's stable id, so a code
scanning view tracks the same finding across runs. The output validates against the official
schema (``tests/data/sarif/sarif-schema-2.1.0.json``).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from emit.outputs import SEVERITY_ORDER, write_json
from learn.findings import Flag
from learn.model import Finding

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = ("https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/"
                "sarif-schema-2.1.0.json")
#: SARIF result level per severity.
LEVELS = {"high": "error", "medium": "warning", "low": "note", "info": "note"}
#: GitHub's ``security-severity`` (0-10) per severity: high >= 7, medium >= 4, low > 0.
SECURITY_SEVERITY = {"high": "8.0", "medium": "5.0", "low": "2.0", "info": "0.0"}
#: One line per finding kind (the rule's short description).
RULES: dict[str, str] = {
    "plaintext": "Unencrypted traffic between workloads",
    "permissive": "A workload accepts plaintext",
    "mtls-downgrade": "An edge that was mTLS in the baseline now carries plaintext",
    "new-edge": "Traffic the baseline never saw (a new edge, or new operations on an old one)",
    "scan": "One source reaching many destinations and ports, with failed attempts",
    "exfiltration": "Upload to one destination far above the source's baseline",
    "external-egress": "Traffic to destinations outside the cluster",
    "unknown-source": "Traffic from an address nothing in the cluster accounts for",
    "denied": "Traffic an existing policy already rejects",
    "anomaly": "Traffic the learned model finds unlike the baseline",
}
_EVIDENCE = re.compile(r"^(?P<file>.+?):(?:(?P<line>\d+)|packet (?P<packet>\d+))$")


def _version() -> str:
    try:
        return metadata.version("meshwright")
    except metadata.PackageNotFoundError:
        return "0"


def _rule_name(kind: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", kind) if part)


def _uri(path: str) -> str:
    """A file path as a SARIF artifact URI: relative paths stay relative (POSIX separators),
    absolute ones become ``file://`` URIs."""
    p = Path(path)
    if p.is_absolute():
        return p.as_uri()
    return quote(PurePosixPath(*p.parts).as_posix(), safe="/._-~")


def location(evidence: str) -> dict[str, Any]:
    """A SARIF ``location`` for one ``file:line`` / ``file:packet N`` evidence sample."""
    m = _EVIDENCE.match(evidence)
    if m is None:
        return {"physicalLocation": {"artifactLocation": {"uri": _uri(evidence)}}}
    physical: dict[str, Any] = {"artifactLocation": {"uri": _uri(m["file"])}}
    if m["line"] is not None and int(m["line"]) > 0:
        physical["region"] = {"startLine": int(m["line"])}
    loc: dict[str, Any] = {"physicalLocation": physical}
    if m["packet"] is not None:
        loc["message"] = {"text": f"packet {int(m['packet'])}"}
    return loc


def _logical(f: Finding) -> dict[str, Any]:
    if f.source is not None and f.destination is not None:
        name = f"{f.source}->{f.destination}" + (f":{f.port}" if f.port is not None else "")
    else:
        name = f.source or (f"{f.destination}:{f.port}" if f.port is not None
                            else f.destination) or f.id
    return {"fullyQualifiedName": name, "kind": "resource"}


def sarif_log(findings: list[Finding], *, tool_version: str | None = None) -> dict[str, Any]:
    """The SARIF 2.1.0 log of ``findings`` (kept in their given order, which is their rank)."""
    kinds = sorted({f.kind for f in findings})
    index = {k: i for i, k in enumerate(kinds)}
    rules = [{
        "id": k,
        "name": _rule_name(k),
        "shortDescription": {"text": RULES.get(k, k)},
        "properties": {"tags": ["security", "network"]},
    } for k in kinds]
    n = len(findings)
    results = []
    for i, f in enumerate(findings):
        result: dict[str, Any] = {
            "ruleId": f.kind,
            "ruleIndex": index[f.kind],
            "level": LEVELS.get(f.severity, "note"),
            "message": {"text": f.summary},
            "partialFingerprints": {"meshwrightFindingId/v1": f.id},
            # 0-100, higher is more important: the finding's position in the ranking.
            "rank": round(100.0 * (n - i) / n, 1),
            "properties": {
                "id": f.id, "severity": f.severity,
                "security-severity": SECURITY_SEVERITY.get(f.severity, "0.0"),
                **({"source": f.source} if f.source is not None else {}),
                **({"destination": f.destination} if f.destination is not None else {}),
                **({"port": f.port} if f.port is not None else {}),
            },
        }
        if isinstance(f, Flag) and f.details:
            result["properties"]["details"] = f.details
        locations = [location(e) for e in f.evidence]
        first = dict(locations[0]) if locations else {}
        first["logicalLocations"] = [_logical(f)]
        result["locations"] = [first]
        if len(locations) > 1:
            result["relatedLocations"] = [dict(loc, id=j) for j, loc in
                                          enumerate(locations[1:], start=1)]
        results.append(result)
    return {
        "$schema": SARIF_SCHEMA,
        "version": SARIF_VERSION,
        "runs": [{
            "tool": {"driver": {
                "name": "meshwright",
                "version": tool_version or _version(),
                "rules": rules,
            }},
            "columnKind": "unicodeCodePoints",
            "results": results,
        }],
    }


def findings_rows(findings: list[Finding]) -> list[dict[str, Any]]:
    """findings.json rows in rank order: the contract's keys plus ``rank`` (1 = first) and,
    for baseline and learned findings, ``details``."""
    rows = []
    for i, f in enumerate(findings, start=1):
        row: dict[str, Any] = {
            "id": f.id, "kind": f.kind, "severity": f.severity, "source": f.source,
            "destination": f.destination, "port": f.port, "summary": f.summary,
            "evidence": list(f.evidence), "rank": i,
        }
        if isinstance(f, Flag) and f.details:
            row["details"] = f.details
        rows.append(row)
    return rows


def _ranked(findings: list[Finding]) -> list[Finding]:
    """Severity first, keeping the given order within a severity (callers pass ranked
    findings; a plain list from :func:`learn.findings.find` is sorted the same way)."""
    order = {id(f): i for i, f in enumerate(findings)}
    return sorted(findings, key=lambda f: (SEVERITY_ORDER.get(f.severity, len(SEVERITY_ORDER)),
                                           order[id(f)]))


def emit_findings_outputs(out_dir: Path, findings: list[Finding], *,
                          tool_version: str | None = None) -> list[Path]:
    """Write ``findings.json`` and ``findings.sarif`` into ``out_dir`` (atomically); return
    their paths. ``findings`` should be ranked (:func:`learn.findings.rank`)."""
    ranked = _ranked(list(findings))
    return [
        write_json(out_dir / "findings.json", findings_rows(ranked)),
        write_json(out_dir / "findings.sarif", sarif_log(ranked, tool_version=tool_version)),
    ]
