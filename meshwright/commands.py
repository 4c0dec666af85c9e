"""The ``analyze`` and ``observe`` commands: wiring the stages together, talking to the user."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from observe.errors import InputError, UsageError
from observe.flows_io import FlowWriter, read_flows

if TYPE_CHECKING:
    from observe.inventory import Inventory
from observe.pipeline import InputPlan, ObserveOptions, ObserveStats, iter_flows, plan_inputs
from observe.schema import without_learned

EXIT_OK = 0
EXIT_NO_FLOWS = 4
#: Namespaces that never get namespace-wide policies (control-plane traffic is not logged).
SYSTEM_NAMESPACES = frozenset({"istio-system", "kube-system"})


class Progress:
    """A one-line progress meter on stderr, only when it is a terminal (or forced)."""

    def __init__(self, label: str, enabled: bool) -> None:
        self.label = label
        self.enabled = enabled and sys.stderr.isatty()
        self._last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.2 and done < total:
            return
        self._last = now
        pct = f"{100 * done / total:5.1f}%" if total else ""
        print(f"\r{self.label}: {done / 2**20:,.0f} MiB {pct}", end="", file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            print("\r\033[K", end="", file=sys.stderr)


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def _observe_to(
    args: argparse.Namespace, plan: InputPlan, target: Path, known_pods: frozenset[tuple[str, str]]
) -> ObserveStats:
    for path, reason in plan.skipped:
        _say(args, f"meshwright: skipped {path}: {reason}")
    progress = Progress("reading", not args.no_progress)
    options = ObserveOptions(
        envoy_format=args.envoy_format, known_pods=known_pods, progress=progress
    )
    stats = ObserveStats()
    try:
        with FlowWriter(target) as writer:
            for batch in iter_flows(plan, options, stats):
                writer.write(batch)
    finally:
        progress.close()
    return stats


def _report_observe(args: argparse.Namespace, stats: ObserveStats) -> None:
    _say(
        args,
        f"meshwright: {stats.files} file(s), {stats.lines:,} lines -> {stats.records:,} flow "
        f"records; {stats.ignored_lines:,} non-access-log lines ignored, "
        f"{stats.duplicates:,} duplicates dropped, {stats.malformed:,} malformed",
    )
    for sample in stats.malformed_samples[:5]:
        _say(args, f"  malformed: {sample}")


def observe(args: argparse.Namespace) -> int:
    target = Path(args.output)
    if target.is_dir():
        raise UsageError(f"{target} is a directory; -o names the Parquet file to write",
                         hint="e.g. -o flows.parquet")
    stats = _observe_to(
        args, plan_inputs(list(args.inputs), envoy_format=args.envoy_format), target, frozenset()
    )
    _report_observe(args, stats)
    _say(args, f"meshwright: wrote {target}")
    return EXIT_OK if stats.records else EXIT_NO_FLOWS


def _inventory(args: argparse.Namespace, found: list[Path]) -> Inventory:
    from observe.inventory import load_inventory

    inventory = load_inventory([Path(p) for p in [*args.inventory, *found]])
    if args.kube:
        from observe.kube import load_live_inventory

        inventory = inventory.merge(
            load_live_inventory(context=args.context, kubeconfig=args.kubeconfig)
        )
    return inventory


def analyze(args: argparse.Namespace) -> int:
    # Imported here so that `observe` (the hot path on big dumps) doesn't pay for pandas & co.
    import pyarrow.compute as pc

    from emit import outputs, report
    from emit.istio import istio_manifests
    from learn import paths
    from learn.findings import find
    from learn.graph import GraphBuilder
    from learn.identity import IdentityResolver

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", hint="-o names a directory")
    for path in args.inventory:
        if not Path(path).exists():
            raise InputError("inventory file not found", origin=path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the output directory: {exc.strerror}", origin=str(out),
                         hint="-o names a directory meshwright may create or write") from exc
    plan = plan_inputs(list(args.inputs), envoy_format=args.envoy_format)
    inventory = _inventory(args, list(plan.inventories))
    known_pods = frozenset((p.namespace, p.name) for p in inventory.pods)

    raw = out / ".flows.observed.parquet"
    try:
        stats = _observe_to(args, plan, raw, known_pods)
        _report_observe(args, stats)
        if stats.records == 0:
            _say(args, "meshwright: no flow records found in the inputs; nothing to learn")
            return EXIT_NO_FLOWS
        resolver = IdentityResolver(inventory, trust_domain=args.trust_domain)
        inbound_reporters: set[str] = set()
        lease_columns = ["time", "direction", "reporter", "src_ip", "dst_ip"]
        for batch in read_flows(raw, columns=lease_columns):
            resolver.learn_leases(batch)
            inbound = batch.filter(pc.fill_null(pc.equal(batch["direction"], "inbound"), False))
            inbound_reporters.update(
                r for r in pc.unique(inbound["reporter"]).to_pylist() if r
            )
        builder = GraphBuilder(
            inbound_reporters=inbound_reporters,
            path_family=paths.path_family,
            families=paths.families,
        )
        with FlowWriter(out / "flows.parquet") as writer:
            for batch in read_flows(raw):
                resolved = resolver.resolve(without_learned(batch))
                builder.add(resolved)
                writer.write(resolved)
    finally:
        if raw.exists():
            os.unlink(raw)

    idle = [n.id for n in resolver.workloads()]
    graph = builder.build(
        resolver.node, idle=idle, ambiguities=[*resolver.ambiguities, *resolver.inferred],
        trust_domain=args.trust_domain,
    )
    findings = find(graph)
    manifests = istio_manifests(
        graph, plaintext=args.plaintext, dry_run=args.dry_run_annotation,
        system_namespaces=SYSTEM_NAMESPACES,
    )
    outputs.write_policies(manifests, out)
    outputs.write_json(out / "graph.json", outputs.graph_json(graph))
    outputs.write_json(out / "findings.json", outputs.findings_json(findings))
    learn_stats = {
        "records_counted": builder.records_counted,
        "records_mirrored": builder.records_mirrored,
        "records_unattributed": builder.records_unattributed,
    }
    text = report.render_report(
        graph, findings, manifests,
        stats={**stats.to_dict(), **learn_stats},
        excluded=report.excluded_items(
            graph, plaintext=args.plaintext, system_namespaces=SYSTEM_NAMESPACES
        ),
        options={"trust_domain": args.trust_domain, "plaintext": args.plaintext,
                 "dry_run": args.dry_run_annotation, "system_namespaces": SYSTEM_NAMESPACES},
    )
    outputs.write_text_atomic(out / "report.md", text)
    by_severity: dict[str, int] = {}
    for f in findings:
        by_severity[f.severity] = by_severity.get(f.severity, 0) + 1
    _say(
        args,
        f"meshwright: {len(graph.nodes)} nodes, {len(graph.edges)} edges, "
        f"{len(manifests)} manifests, findings: "
        + (", ".join(f"{n} {s}" for s, n in sorted(by_severity.items())) or "none"),
    )
    _say(args, f"meshwright: wrote {out}/ (report.md, policies/, graph.json, findings.json, "
               "flows.parquet)")
    return EXIT_OK
