"""The output directory: policies/, graph.json, findings.json (report.md is emit.report's).

Every file is written atomically (temporary file in the same directory, then rename), so a
crash never leaves half a policy for ``kubectl apply -f OUT/policies`` to pick up.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson

from emit.yamlio import dump_yaml, rfc3339
from learn.model import Edge, Finding, Graph, Node
from observe.errors import MeshwrightError

log = logging.getLogger(__name__)

SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2, "info": 3}
POLICIES_DIR = "policies"


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` via a temporary file and an atomic rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise MeshwrightError(f"cannot write output: {exc.strerror or exc}",
                              origin=str(path)) from exc


def dump_json(obj: Any) -> str:
    """Sorted keys, indent 2, trailing newline."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2).decode() + "\n"


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as JSON (:func:`dump_json`) atomically to ``path``."""
    write_text_atomic(path, dump_json(obj))
    return path


#: API groups whose kinds are file-named with a prefix: Linkerd's AuthorizationPolicy must not
#: collide with Istio's when both meshes are proposed at once.
_PREFIXED_GROUPS = {"policy.linkerd.io": "linkerd"}


def policy_relpath(manifest: dict[str, Any]) -> Path:
    """``policies/<namespace>/<kind lower>-<name>.yaml`` for one manifest (Linkerd's kinds:
    ``linkerd-<kind lower>-<name>.yaml``)."""
    meta = manifest.get("metadata", {})
    ns, name, kind = meta.get("namespace"), meta.get("name"), manifest.get("kind")
    group = str(manifest.get("apiVersion", "")).split("/", 1)[0]
    if kind and group in _PREFIXED_GROUPS:
        kind = f"{_PREFIXED_GROUPS[group]}-{kind}"
    if not ns or not name or not kind:
        raise MeshwrightError(f"manifest without namespace/name/kind: {kind}/{ns}/{name}")
    for part in (ns, name):
        if "/" in part or part in (".", ".."):
            raise MeshwrightError(f"unsafe name for a file: {part!r}")
    return Path(POLICIES_DIR) / ns / f"{kind.lower()}-{name}.yaml"


def write_policies(manifests: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One object per file under ``out_dir/policies``; files of a previous run removed."""
    root = out_dir / POLICIES_DIR
    targets: dict[Path, dict[str, Any]] = {}
    for m in manifests:
        path = out_dir / policy_relpath(m)
        if path in targets:
            raise MeshwrightError(f"two manifests map to the same file {path}")
        targets[path] = m
    written = []
    for path in sorted(targets):
        write_text_atomic(path, dump_yaml(targets[path]))
        written.append(path)
    keep = set(written)
    try:
        if root.is_dir():
            # Only our own kinds of file: a stray README someone put there stays.
            ours = [p for p in root.rglob("*") if p.is_file() and p not in keep
                    and (p.suffix == ".yaml" or (p.name.startswith(".") and p.suffix == ".tmp"))]
            for stale in sorted(ours):
                log.info("removing stale policy file %s", stale)
                stale.unlink()
            # deepest first, so emptied parents can go too
            for d in sorted((p for p in root.rglob("*") if p.is_dir()),
                            key=lambda p: len(p.parts), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
    except OSError as exc:
        raise MeshwrightError(f"cannot clean stale policies: {exc.strerror or exc}",
                              origin=str(root)) from exc
    return written


def _node_json(node: Node) -> dict[str, Any]:
    d = asdict(node)
    d["ips"] = sorted(d["ips"])
    d["services"] = sorted(d["services"])
    return d


def _edge_json(edge: Edge) -> dict[str, Any]:
    d = asdict(edge)
    d["mtls"] = edge.mtls
    d["methods"] = edge.methods
    d["paths"] = edge.paths
    d["first_seen"] = rfc3339(edge.first_seen)
    d["last_seen"] = rfc3339(edge.last_seen)
    d["operations"] = sorted(d["operations"], key=lambda o: (o["method"], o["path"]))
    for key in ("hours", "source_ips", "hosts", "evidence"):
        d[key] = sorted(d[key])
    return d


def graph_json(graph: Graph) -> dict[str, Any]:
    """``{"nodes": [...], "edges": [...]}``, nodes by id, edges by (source, dest, port, proto)."""
    nodes = [_node_json(graph.nodes[k]) for k in sorted(graph.nodes)]
    edges = sorted((_edge_json(e) for e in graph.edges),
                   key=lambda e: (e["source"], e["destination"], e["port"], e["protocol"]))
    return {"nodes": nodes, "edges": edges}


def findings_json(findings: list[Finding]) -> list[dict[str, Any]]:
    """Findings sorted by severity (high first), then id."""
    rows = [{
        "id": f.id, "kind": f.kind, "severity": f.severity, "source": f.source,
        "destination": f.destination, "port": f.port, "summary": f.summary,
        "evidence": list(f.evidence),
    } for f in findings]
    return sorted(rows, key=lambda r: (SEVERITY_ORDER.get(r["severity"], len(SEVERITY_ORDER)),
                                       r["severity"], r["id"]))
