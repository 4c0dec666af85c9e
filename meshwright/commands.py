"""The ``analyze`` and ``observe`` commands: wiring the stages together, talking to the user."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from observe.errors import InputError, UsageError
from observe.flows_io import FlowWriter

if TYPE_CHECKING:
    from observe.inventory import Inventory
from observe.pipeline import InputPlan, ObserveOptions, ObserveStats, iter_flows, plan_inputs

EXIT_OK = 0
EXIT_NO_FLOWS = 4
EXIT_BREAKAGE = 5


class Progress:
    """A one-line progress meter on stderr, only when it is a terminal (or forced)."""

    def __init__(self, label: str, enabled: bool, unit: str = "MiB") -> None:
        self.label = label
        self.unit = unit
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
        amount = done / 2**20 if self.unit == "MiB" else done
        print(f"\r{self.label}: {amount:,.0f} {self.unit} {pct}", end="", file=sys.stderr)

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
    if stats.lines or not stats.packets:
        _say(
            args,
            f"meshwright: {stats.files} file(s), {stats.lines:,} lines -> {stats.records:,} "
            f"flow records; {stats.ignored_lines:,} non-access-log lines ignored, "
            f"{stats.duplicates:,} duplicates dropped, {stats.malformed:,} malformed",
        )
    for sample in stats.malformed_samples[:5]:
        _say(args, f"  malformed: {sample}")
    if stats.packets or stats.packets_skipped:
        skipped = sum(stats.packets_skipped.values())
        _say(
            args,
            f"meshwright: {stats.packets:,} packets -> {stats.connections:,} connections "
            f"({stats.failed_connections:,} failed attempts), "
            f"{stats.by_source.get('pcap', 0) - stats.connections:,} requests; "
            f"{skipped:,} packets not decoded",
        )
        for reason, count in sorted(stats.packets_skipped.items()):
            _say(args, f"  not decoded: {count:,} x {reason}")
        if stats.duplicate_copies:
            _say(args, f"  {stats.duplicate_copies:,} packets were copies of one seen on another "
                       "interface (tcpdump -i any) and were counted once")
        if stats.duplicate_connections:
            _say(args, f"  {stats.duplicate_connections:,} connections were already in another "
                       "capture (both ends captured) and were counted once")
        if stats.not_itemized:
            _say(args, f"  {stats.not_itemized:,} connections carried more requests than their "
                       "first bytes show: their edges get port-level rules only")
    for warning in stats.capture_warnings[:5]:
        _say(args, f"  capture damage: {warning}")


def observe(args: argparse.Namespace) -> int:
    send_only = [f"--{n.replace('_', '-')}" for n in ("spool", "spool_max_bytes", "token_file",
                                                       "drain_timeout", "ca_file",
                                                       "insecure_http")
                 if getattr(args, n) is not None]
    if send_only and not args.send:
        raise UsageError(f"{', '.join(send_only)} apply to --ebpf --send",
                         hint="add --send URL (the observer's /v1/flows)")
    if args.send and not args.ebpf:
        raise UsageError("--send ships eBPF flows: add --ebpf",
                         hint="meshwright observe --ebpf --send URL")
    if args.kube:
        return _observe_kube(args)
    kube_only = [f"--{n.replace('_', '-')}" for n in ("state", "git_dir", "listen", "namespaces",
                                                       "context", "kubeconfig", "mesh",
                                                       "ingest_allow", "ingest_max_bytes",
                                                       "tls_cert", "tls_key")
                 if getattr(args, n) is not None]
    if kube_only:
        raise UsageError(f"{', '.join(kube_only)} apply to --kube", hint="add --kube")
    if args.ebpf and args.send:
        if args.output is not None:
            raise UsageError("give -o FLOWS or --send URL, not both",
                             hint="--send ships the flows to the observer instead of a file")
        if args.inputs or args.iface is not None:
            raise UsageError("--ebpf traces this machine: give no INPUT files and no --iface")
        extra = [f"--{n}" for n in ("bpf", "count", "save") if getattr(args, n) is not None]
        if extra:
            raise UsageError(f"{', '.join(extra)} apply to --iface, not --ebpf")
        return _observe_ebpf_send(args)
    if args.output is None:
        raise UsageError("-o FLOWS is required", hint="meshwright observe dump/ -o flows.parquet")
    target = Path(args.output)
    if target.is_dir():
        raise UsageError(f"{target} is a directory; -o names the Parquet file to write",
                         hint="e.g. -o flows.parquet")
    if args.ebpf:
        if args.inputs or args.iface is not None:
            raise UsageError("--ebpf traces this machine: give no INPUT files and no --iface",
                             hint="meshwright observe --ebpf --duration 300 -o flows.parquet")
        extra = [f"--{n}" for n in ("bpf", "count", "save") if getattr(args, n) is not None]
        if extra:
            raise UsageError(f"{', '.join(extra)} apply to --iface, not --ebpf")
        return _observe_ebpf(args, target)
    live_only = ("bpf", "duration", "count", "save")
    if args.iface is None:
        given = [f"--{name}" for name in live_only if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to a live capture",
                             hint="add --iface IFACE (or 'any')")
        if not args.inputs:
            raise UsageError("nothing to observe: give INPUT files or --iface IFACE",
                             hint="meshwright observe dump/ -o flows.parquet")
    elif args.inputs:
        raise UsageError("give either INPUT files or --iface, not both",
                         hint="capture first (--save), then observe the files together")
    else:
        return _observe_live(args, target)
    stats = _observe_to(
        args, plan_inputs(list(args.inputs), envoy_format=args.envoy_format), target, frozenset()
    )
    _report_observe(args, stats)
    _say(args, f"meshwright: wrote {target}")
    return EXIT_OK if stats.records else EXIT_NO_FLOWS


def _observe_kube(args: argparse.Namespace) -> int:
    import threading

    from learn.baseline import parse_span
    from meshwright.ingest import DEFAULT_ALLOW, DEFAULT_MAX_BODY
    from meshwright.observer import Observer, ObserverConfig, parse_listen
    from observe.live import stop_on_signals

    if args.inputs or args.iface is not None or args.ebpf or args.output is not None:
        raise UsageError("--kube observes the cluster: give no INPUT files, --iface, --ebpf "
                         "or -o", hint="flows go to --state DIR")
    if (args.ingest_allow or args.ingest_max_bytes) and not args.listen:
        raise UsageError("--ingest-allow and --ingest-max-bytes apply to the /v1/flows "
                         "endpoint of --listen", hint="add --listen :9090")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together",
                         hint="give the certificate and its private key (PEM), or neither")
    if args.tls_cert and not args.listen:
        raise UsageError("--tls-cert and --tls-key apply to --listen", hint="add --listen :9090")
    extra = [f"--{n}" for n in ("bpf", "duration", "count", "save") if getattr(args, n)]
    if extra:
        raise UsageError(f"{', '.join(extra)} apply to --iface, not --kube")
    if not args.state:
        raise UsageError("--kube needs --state DIR", hint="e.g. --state /var/lib/meshwright")
    if args.namespaces and args.all_namespaces:
        raise UsageError("-n and -A exclude each other")
    emit_every = (None if args.emit_every.strip() in ("0", "0s", "never")
                  else parse_span(args.emit_every).total_seconds())
    retention = (None if args.retention.strip() in ("0", "never")
                 else parse_span(args.retention))
    try:
        listen = parse_listen(args.listen) if args.listen else None
    except ValueError as exc:
        raise UsageError(f"--listen: {exc}", hint="e.g. --listen :9090") from None
    if args.git_dir and not Path(args.git_dir).is_dir():
        raise InputError("not a directory", origin=args.git_dir,
                         hint="--git names a git working tree")
    if args.tls_cert:  # the pair is loaded again by the listener; here it fails before anything
        from meshwright.ingest import load_server_context

        load_server_context(Path(args.tls_cert), Path(args.tls_key))
    config = ObserverConfig(
        state=Path(args.state), namespaces=args.namespaces, context=args.context,
        kubeconfig=args.kubeconfig, emit_every=emit_every,
        flush_every=args.flush_every or 5.0,
        retention=retention, meshes=tuple(dict.fromkeys(args.mesh or ["istio"])),
        trust_domain=args.trust_domain, listen=listen,
        git_dir=Path(args.git_dir) if args.git_dir else None, workers=args.log_workers,
        read_timeout=args.log_read_timeout, slice_seconds=args.log_slice,
        backoff_base=args.reconnect_backoff,
        ingest_allow=(tuple(dict.fromkeys(args.ingest_allow)) if args.ingest_allow
                      else DEFAULT_ALLOW),
        ingest_max_bytes=args.ingest_max_bytes or DEFAULT_MAX_BODY,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
    )
    stop = threading.Event()
    with stop_on_signals(stop):
        observer = Observer(config, stop)
        code = observer.run()
    _say(args, f"meshwright: stopped; {observer.store.stats.rows:,} flow records stored in "
               f"{observer.store.stats.commits} commits, {observer.stats.emits} proposals "
               f"published under {config.state}")
    return code


def _observe_ebpf(args: argparse.Namespace, target: Path) -> int:
    import threading

    from observe.ebpf import TraceStats, trace_connections
    from observe.live import stop_on_signals

    stop = threading.Event()
    stats = TraceStats()
    ready = threading.Event()

    def announce() -> None:  # once the probes are attached: from then on nothing is missed
        if ready.wait() and not stop.is_set():
            _say(args, "meshwright: tracing TCP connections; Ctrl-C or SIGTERM stops")

    threading.Thread(target=announce, daemon=True, name="meshwright-announce").start()
    with stop_on_signals(stop):
        batches = trace_connections(
            duration_s=args.duration, stop=stop, stats=stats, ready=ready,
            cgroup_root=os.environ.get("MESHWRIGHT_CGROUP_ROOT") or None,
            map_keys=args.ebpf_map_entries,
        )
        with FlowWriter(target) as writer:
            for batch in batches:
                writer.write(batch)
    for note in stats.notes:
        _say(args, f"meshwright: note: {note}")
    _say(args, f"meshwright: traced {stats.connections:,} connections ({stats.refused:,} "
               f"refused, {stats.no_answer:,} unanswered, {stats.open_at_stop:,} still open, "
               f"{stats.midstream:,} begun before tracing); {stats.attributed:,} placed in a "
               f"container" + (f"; {stats.lost:,} events LOST (kernel buffer or BPF map full: "
                                  f"raise --ebpf-map-entries)"
                               if stats.lost else "")
               + (f"; {stats.malformed:,} malformed tracer lines" if stats.malformed else ""))
    _say(args, f"meshwright: wrote {target}")
    return EXIT_OK if stats.connections else EXIT_NO_FLOWS


def _observe_ebpf_send(args: argparse.Namespace) -> int:
    """``observe --ebpf --send URL``: one tracer for the process's life, its records shipped
    to the observer every ``--flush-every`` seconds through a spool (observe.ship)."""
    import shutil
    import socket
    import tempfile
    import threading

    from observe.ebpf import TraceStats, trace_connections
    from observe.live import stop_on_signals
    from observe.ship import (
        DEFAULT_FLUSH_SECONDS,
        DEFAULT_SPOOL_BYTES,
        DEFAULT_TOKEN_FILE,
        DRAIN_SECONDS,
        INSECURE_HINT,
        Shipper,
        Spool,
        check_url,
        client_context,
        plaintext_host,
    )

    url = check_url(args.send, insecure_http=True)  # an http(s) URL at all
    host = plaintext_host(url)
    if host is not None and not args.insecure_http:
        raise UsageError(f"--send {url}: plain http:// to {host} would send the node's "
                         "bearer token and its flows in clear text", hint=INSECURE_HINT)
    https = url.lower().startswith("https://")
    if args.ca_file and not https:
        raise UsageError("--ca-file verifies an https:// observer; --send is http://",
                         hint="use https:// in --send")
    if args.insecure_http and https:
        raise UsageError("--insecure-http and an https:// --send URL contradict each other",
                         hint="leave --insecure-http out")
    ca_file = Path(args.ca_file) if args.ca_file else None
    if https:
        client_context(ca_file)  # a bad --ca-file fails here, before tracing starts
    elif host is not None:
        print(f"meshwright: WARNING: --insecure-http: the node's bearer token and flows go to "
              f"{host} in clear text; whoever reads the token can send flows as this node "
              "until it expires", file=sys.stderr)
    node = os.environ.get("NODE_NAME") or socket.gethostname()
    if args.spool:
        spool_dir = Path(args.spool)
    else:
        spool_dir = Path(tempfile.mkdtemp(prefix="meshwright-spool-"))
        _say(args, f"meshwright: spooling in {spool_dir} (temporary: shipments not delivered "
                   "by the exit are lost; give --spool DIR to keep them across restarts)")
    spool = Spool(spool_dir, max_bytes=args.spool_max_bytes or DEFAULT_SPOOL_BYTES)
    if spool.stats.found:
        _say(args, f"meshwright: {spool.stats.found} shipments left by an earlier run are sent "
                   "first")
    token_file = Path(args.token_file or DEFAULT_TOKEN_FILE)
    if args.token_file is None and not token_file.exists():
        _say(args, f"meshwright: no {token_file}: shipping without a token")
        token_file_opt: Path | None = None
    else:
        token_file_opt = token_file
    every = args.flush_every or DEFAULT_FLUSH_SECONDS
    shipper = Shipper(url, spool, node=node, token_file=token_file_opt, ca_file=ca_file,
                      insecure_http=bool(args.insecure_http), flush_every=every)
    stop = threading.Event()
    stats = TraceStats()
    ready = threading.Event()

    def announce() -> None:
        if ready.wait() and not stop.is_set():
            _say(args, f"meshwright: tracing TCP connections on {node}, shipping to {url} every "
                       f"{every:g} s; SIGTERM stops")

    threading.Thread(target=announce, daemon=True, name="meshwright-announce").start()
    with stop_on_signals(stop):
        batches = trace_connections(
            duration_s=args.duration, stop=stop, stats=stats, ready=ready, node=node,
            cgroup_root=os.environ.get("MESHWRIGHT_CGROUP_ROOT") or None,
            map_keys=args.ebpf_map_entries,
        )
        ship = shipper.run(batches, stop, drain_timeout=args.drain_timeout or DRAIN_SECONDS)
    for note in stats.notes:
        _say(args, f"meshwright: note: {note}")
    left = spool.pending()
    _say(args, f"meshwright: traced {stats.connections:,} connections"
               + (f"; {stats.lost:,} events LOST (kernel buffer or BPF map full: "
                                  f"raise --ebpf-map-entries)" if stats.lost else ""))
    _say(args, f"meshwright: shipped {ship.delivered:,} shipments ({ship.rows_delivered:,} "
               f"records) to {url}"
               + (f", {ship.duplicates:,} already stored" if ship.duplicates else "")
               + (f"; {ship.rejected:,} REJECTED (kept aside in {spool.root})"
                  if ship.rejected else "")
               + (f"; {spool.stats.dropped:,} DROPPED undelivered (spool full)"
                  if spool.stats.dropped else "")
               + (f"; {len(left):,} left in {spool.root} for the next start" if left else "")
               + (f"; {ship.failures['tls']:,} attempts failed TLS ({ship.last_tls_error})"
                  if ship.failures.get("tls") else ""))
    if not args.spool and not left and not spool.rejected():
        shutil.rmtree(spool.root, ignore_errors=True)
    return EXIT_OK


def _observe_live(args: argparse.Namespace, target: Path) -> int:
    import threading
    from contextlib import ExitStack

    from observe.capture import live_batches
    from observe.live import capture_live, stop_on_signals

    stop = threading.Event()
    with ExitStack() as stack:
        save = stack.enter_context(open(args.save, "wb")) if args.save else None
        chunks = capture_live(args.iface, bpf=args.bpf, duration_s=args.duration,
                              count=args.count, flush_every_s=args.flush_every or 5.0,
                              stop=stop,
                              save=save)
        stack.enter_context(stop_on_signals(stop))
        _say(args, f"meshwright: capturing on {args.iface}"
                   + (f" ({args.bpf})" if args.bpf else "")
                   + "; Ctrl-C or SIGTERM stops and keeps what was captured")
        run = live_batches(chunks, f"live:{args.iface}")
        with FlowWriter(target) as writer:
            for batch in run:
                writer.write(batch)
                if not args.quiet and not args.no_progress and sys.stderr.isatty():
                    print(f"\rcapturing: {run.stats.packets:,} packets, "
                          f"{run.stats.connections:,} connections", end="", file=sys.stderr)
        if not args.quiet and not args.no_progress and sys.stderr.isatty():
            print("\r\033[K", end="", file=sys.stderr)
    live = run.live
    _say(args, f"meshwright: captured {live.captured if live else 0:,} packets"
               + (f" ({live.kernel_dropped:,} dropped by the kernel: queue full)"
                  if live and live.kernel_dropped else "")
               + f" -> {run.stats.connections:,} connections "
               f"({run.stats.failed:,} failed attempts), {run.stats.requests:,} requests")
    _say(args, f"meshwright: wrote {target}")
    return EXIT_OK if run.stats.connections else EXIT_NO_FLOWS


def _inventory(args: argparse.Namespace, found: list[Path]) -> Inventory:
    from observe.inventory import load_inventory

    inventory = load_inventory([Path(p) for p in [*args.inventory, *found]])
    if args.kube:
        from observe.kube import load_live_inventory

        inventory = inventory.merge(
            load_live_inventory(context=args.context, kubeconfig=args.kubeconfig)
        )
    return inventory


def _contamination(args: argparse.Namespace) -> float | str:
    if args.contamination == "auto":
        return "auto"
    try:
        value = float(args.contamination)
    except ValueError:
        raise UsageError(f"--contamination must be 'auto' or a number, not "
                         f"{args.contamination!r}") from None
    if not 0 < value <= 0.5:
        raise UsageError(f"--contamination must be in (0, 0.5], not {value}")
    return value


def _findings(args: argparse.Namespace, out: Path, graph: Any, inventory: Inventory,
              contamination: float | str) -> tuple[list[Any], Any, list[dict[str, Any]]]:
    """Ranked findings (against the baseline, if any), the graph the proposals are made
    from (high-severity traffic left out unless --include-flagged) and what was left out."""
    from learn.baseline import (
        learn_baseline,
        load_baseline_flows,
        parse_span,
        prepare,
        read_resolved,
        split_by_window,
    )
    from learn.findings import apply_exclusions, find_all

    if not args.baseline and not args.baseline_window:
        findings = find_all(graph)
    else:
        frame = prepare(read_resolved(out / "flows.parquet"))
        if args.baseline:
            base = prepare(load_baseline_flows(Path(args.baseline), inventory,
                                               trust_domain=args.trust_domain))
            new = frame
        else:
            base, new = split_by_window(frame, parse_span(args.baseline_window))
        findings = find_all(graph, new, learn_baseline(base), contamination=contamination)
    if args.include_flagged:
        return findings, graph, []
    kept, left = apply_exclusions(graph, findings)
    left_out = [{"source": x.source, "destination": x.destination, "port": x.port,
                 "reason": f"{'its plaintext part ' if x.what == 'plaintext' else ''}left out: "
                           f"finding {x.finding} (--include-flagged keeps it)"}
                for x in left]
    if left:
        _say(args, f"meshwright: {len(left)} flagged edge(s) left out of the proposals "
                   "(see report.md; --include-flagged keeps them)")
    return findings, kept, left_out


def analyze(args: argparse.Namespace) -> int:
    # Imported here so that `observe` (the hot path on big dumps) doesn't pay for pandas & co.
    from emit.analysis import EmitOptions, emit_outputs
    from learn.pipeline import learn_graph

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory", hint="-o names a directory")
    contamination = _contamination(args)
    if args.baseline and args.baseline_window:
        raise UsageError("--baseline and --baseline-window exclude each other",
                         hint="compare with a previous run, or with the inputs' first part")
    if args.baseline and not Path(args.baseline).exists():
        raise InputError("baseline not found", origin=args.baseline,
                         hint="a previous analyze output directory or a flows .parquet file")
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
        meter = Progress("learning", not args.no_progress, unit="records")
        try:
            learned = learn_graph(raw, inventory, trust_domain=args.trust_domain,
                                  resolved_out=out / "flows.parquet", progress=meter)
        finally:
            meter.close()
    finally:
        if raw.exists():
            os.unlink(raw)

    if learned.stats.get("records_unattributed"):
        _say(args, f"meshwright: {learned.stats['records_unattributed']:,} records name no "
                   "destination address or port; left out of the graph (see report.md)")
    meshes = tuple(dict.fromkeys(args.mesh or ["istio"]))
    if args.egress and "netpol" not in meshes:
        raise UsageError("--egress applies to --mesh netpol", hint="add --mesh netpol")
    if (args.linkerd_audit or args.linkerd_allow_unmeshed) and "linkerd" not in meshes:
        raise UsageError("--linkerd-* options apply to --mesh linkerd",
                         hint="add --mesh linkerd")
    options = EmitOptions(meshes=meshes, plaintext=args.plaintext,
                          dry_run=args.dry_run_annotation, trust_domain=args.trust_domain,
                          linkerd_allow_unmeshed=args.linkerd_allow_unmeshed,
                          linkerd_audit=args.linkerd_audit, egress=args.egress)
    findings, graph, left_out = _findings(args, out, learned.graph, inventory, contamination)
    emitted = emit_outputs(out, graph, options,
                           stats={**stats.to_dict(), **learned.stats}, inventory=inventory,
                           findings=findings, left_out=left_out)
    by_severity: dict[str, int] = {}
    for f in emitted.findings:
        by_severity[f.severity] = by_severity.get(f.severity, 0) + 1
    _say(
        args,
        f"meshwright: {len(learned.graph.nodes)} nodes, {len(learned.graph.edges)} edges, "
        f"{len(emitted.manifests)} manifests, findings: "
        + (", ".join(f"{n} {s}" for s, n in sorted(by_severity.items())) or "none"),
    )
    _say(args, f"meshwright: wrote {out}/ (report.md, policies/, graph.json, findings.json, "
               "flows.parquet)")
    return EXIT_OK


def check(args: argparse.Namespace) -> int:
    """Replay the recorded traffic against a policy set (``meshwright check``)."""
    import tempfile

    from emit import check as checking
    from learn.pipeline import learn_graph

    if not args.policies and not args.from_cluster:
        raise UsageError("no policies to check against",
                         hint="give --policies DIR|FILE (repeatable) or --from-cluster")
    for path in args.inventory:
        if not Path(path).exists():
            raise InputError("inventory file not found", origin=path)
    policies = checking.load_policies([Path(p) for p in args.policies],
                                      default_namespace=args.namespace)
    if args.from_cluster:
        from observe.kube import load_live_policies

        live, missing = load_live_policies(context=args.context, kubeconfig=args.kubeconfig)
        for obj, origin in live:
            policies.add(obj, origin, args.namespace)
        for resource in missing:
            _say(args, f"meshwright: the cluster does not serve {resource}; none checked")
    if not policies.manifests and not args.linkerd_default_policy:
        raise InputError("no policy objects found (Istio, Linkerd or NetworkPolicy)",
                         origin=", ".join(args.policies) or "the cluster",
                         hint="expected YAML/JSON manifests of policy kinds")
    if args.cluster_networks:
        networks = tuple(n.strip() for n in args.cluster_networks.split(",") if n.strip())
    else:
        from emit.evaluate_linkerd import DEFAULT_CLUSTER_NETWORKS as networks
    plan = plan_inputs(list(args.inputs), envoy_format=args.envoy_format)
    inventory_paths = [Path(p) for p in [*args.inventory, *plan.inventories]]
    inventory = _inventory(args, list(plan.inventories))
    annotations: list[dict[str, object]] = []
    for path in inventory_paths:
        try:  # Linkerd default-policy annotations (the inventory itself does not keep them)
            annotations.extend(obj for obj, _ in checking.iter_objects(path)
                               if obj.get("kind") != "Service")
        except InputError as exc:  # e.g. a compressed dump the inventory loader unpacked
            _say(args, f"meshwright: annotations not read from {path}: {exc}")
    defaults = checking.default_inbound_policies(annotations)
    known_pods = frozenset((p.namespace, p.name) for p in inventory.pods)
    with tempfile.TemporaryDirectory(prefix="meshwright-check-") as tmp:
        raw = Path(tmp) / "observed.parquet"
        resolved = Path(tmp) / "resolved.parquet"
        stats = _observe_to(args, plan, raw, known_pods)
        _report_observe(args, stats)
        if stats.records == 0:
            _say(args, "meshwright: no flow records found in the inputs; nothing to check")
            return EXIT_NO_FLOWS
        learned = learn_graph(raw, inventory, trust_domain=args.trust_domain,
                              resolved_out=resolved)
        observed = checking.observations(resolved)
    options = checking.CheckOptions(
        root_namespace=args.root_namespace, trust_domain=args.trust_domain,
        linkerd_default_policy=args.linkerd_default_policy, cluster_networks=networks,
        default_inbound=defaults,
    )
    result = checking.check(observed, policies, inventory, learned.graph, options)
    text = checking.render_markdown(result)
    if args.report:
        Path(args.report).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(checking.dumps_json(result), encoding="utf-8")
    _say(args, f"meshwright: {len(observed)} observations checked against "
               f"{len(policies.manifests)} policy objects ({', '.join(result.engines)}): "
               f"{len(result.breakage)} would break, {len(result.unknown)} unknown, "
               f"{len(result.over_permission)} unused permissions"
               + (f"; {len(result.latent_breakage)} would break once the destinations run "
                  "the mesh proxy the policies are for" if result.latent_breakage else ""))
    if result.breakage or (args.fail_on_unknown and result.unknown):
        return EXIT_BREAKAGE
    return EXIT_OK
