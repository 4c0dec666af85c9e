"""The ``meshwright`` command: argument parsing, progress, messages and exit codes.

This package is the only code that prints or exits; everything below it raises
``observe.errors.MeshwrightError`` subclasses that carry their origin and a hint.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from meshwright import __version__
from observe.errors import MeshwrightError

#: Documented exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_NO_FLOWS = 4
EXIT_BREAKAGE = 5
EXIT_INTERRUPTED = 130

EPILOG_ANALYZE = """\
examples:
  meshwright analyze samples/bookinfo -o out/
      everything in the directory is recognised by content: logs, inventory, flow files
  meshwright analyze logs/ --inventory cluster.json --trust-domain prod.example -o out/
  kubectl logs deploy/reviews-v1 -c istio-proxy |
      meshwright analyze - --inventory cluster.json -o out/
  meshwright analyze flows.parquet --inventory cluster.json --plaintext deny -o out/
  meshwright analyze logs/ --kube --context prod -o out/     (inventory from the live API)
  meshwright analyze dump/ --mesh linkerd --mesh netpol --egress -o out/
  meshwright analyze today/ --baseline last-week-out/ -o out/   (findings against a baseline)

outputs (OUT/): policies/<namespace>/<kind>-<name>.yaml, graph.json, findings.json,
report.md, flows.parquet.  Exit codes: 0 ok, 2 usage, 3 bad input, 4 no flows found,
1 internal error.
"""

EPILOG_OBSERVE = """\
examples:
  meshwright observe dump/ -o flows.parquet
  meshwright observe node-a.pcap node-b.pcapng.zst -o flows.parquet
  zcat istio-proxy.log.gz | meshwright observe - -o flows.parquet
  meshwright observe app.log --envoy-format '[%START_TIME%] %REQ(:METHOD)% ...' -o flows.parquet
  meshwright observe --iface any --bpf 'tcp or udp port 53' --duration 600 -o flows.parquet
      live capture (root or CAP_NET_RAW); Ctrl-C or SIGTERM stops it and keeps what was seen
  meshwright observe --ebpf --duration 300 -o node-flows.parquet
      eBPF connection tracing (bpftrace); Ctrl-C or SIGTERM stops it, open connections kept
  meshwright observe --ebpf --send https://meshwright-observer.meshwright.svc:9090/v1/flows \\
      --ca-file /etc/meshwright/observer-ca/ca.crt --spool /var/lib/meshwright/spool \\
      --token-file /var/run/secrets/meshwright/token
      trace this node until SIGTERM and ship its flows to the observer every 10 s over TLS
      (spooled on disk until acknowledged: exactly once across restarts of either side)
  meshwright observe --kube -A --state /var/lib/meshwright --emit-every 15m --listen :9090 \\
      --tls-cert /etc/meshwright/tls/tls.crt --tls-key /etc/meshwright/tls/tls.key
      observe mode on a live cluster: proxy logs through the API, flows and proposals
      under --state, resumes where it stopped; SIGTERM commits and exits; /metrics,
      /healthz and the nodes' /v1/flows over HTTPS

Later: meshwright analyze flows.parquet --inventory cluster.json -o out/
"""


EPILOG_CHECK = """\
examples:
  meshwright check --policies proposed/ samples/bookinfo
      replay the recorded traffic against the policies in proposed/ (YAML or JSON, walked
      recursively, multi-document, Istio / Linkerd / NetworkPolicy mixed)
  meshwright check --policies out/policies logs/ --inventory cluster.json --json check.json
  meshwright check --from-cluster --kube flows.parquet     (the live policies and inventory)
  meshwright check --policies pr/ --linkerd-default-policy deny dump/

prints a Markdown report (breakage, unknowns, over-permission) on stdout (or --report FILE);
--json writes the same as JSON.  Exit codes: 0 no observed traffic would be denied,
5 some would be (breakage; with --fail-on-unknown also undecidable traffic), 2 usage,
3 bad input (unreadable policies or evidence), 4 no flows found, 1 internal error.
"""


def _add_input_options(parser: argparse.ArgumentParser, *, optional: bool = False) -> None:
    parser.add_argument(
        "inputs", nargs="*" if optional else "+", metavar="INPUT",
        help="log files, packet captures (pcap, pcapng), directories (walked recursively), "
        "flow files, inventory dumps, or - for stdin; recognised by content (plain, gzip or "
        "zstd; kubectl logs, CRI, shipper JSON)",
    )
    parser.add_argument(
        "--envoy-format", metavar="FORMAT",
        help="Envoy access-log format string the proxies were configured with, if it is "
        "not Istio's default TEXT or JSON",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="do not show progress on stderr"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks for internal errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshwright",
        description="Learn how services really talk from proxy logs and cluster inventory, "
        "and propose least-privilege zero-trust policies for review.",
    )
    parser.add_argument("--version", action="version", version=f"meshwright {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    analyze = sub.add_parser(
        "analyze",
        help="observe + learn + emit: policies, graph, findings and a review report",
        description="Read evidence (access logs, flow files) and the cluster inventory, learn "
        "the communication graph and write least-privilege policies and a report to OUT.",
        epilog=EPILOG_ANALYZE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_options(analyze)
    analyze.add_argument("-o", "--output", required=True, metavar="OUT", help="output directory")
    analyze.add_argument(
        "--inventory", action="append", default=[], metavar="PATH",
        help="inventory dump (kubectl get ... -A -o json, or YAML manifests); repeatable",
    )
    analyze.add_argument(
        "--kube", action="store_true",
        help="also read the inventory from the live Kubernetes API (kubeconfig or in-cluster)",
    )
    analyze.add_argument("--context", help="kubeconfig context for --kube")
    analyze.add_argument("--kubeconfig", help="kubeconfig file for --kube")
    analyze.add_argument(
        "--mesh", action="append", choices=["istio", "linkerd", "netpol"], default=None,
        help="policy flavour to propose, repeatable: istio (AuthorizationPolicy, "
        "PeerAuthentication), linkerd (Server, AuthorizationPolicy, MeshTLSAuthentication, "
        "HTTPRoute, NetworkAuthentication), netpol (Kubernetes NetworkPolicy); default istio",
    )
    analyze.add_argument(
        "--egress", action="store_true",
        help="netpol: also propose egress policies (keeps DNS to the cluster DNS pods and the "
        "observed external egress working)",
    )
    analyze.add_argument(
        "--linkerd-audit", action="store_true",
        help="linkerd: proposed Servers use accessPolicy: audit (log, don't enforce: staging)",
    )
    analyze.add_argument(
        "--linkerd-allow-unmeshed", action="store_true",
        help="linkerd: allow clients seen without a mesh identity by address "
        "(NetworkAuthentication), each reported as a finding; default: leave them out",
    )
    analyze.add_argument(
        "--trust-domain", default="cluster.local", metavar="D",
        help="mesh trust domain for SPIFFE principals (default: cluster.local)",
    )
    analyze.add_argument(
        "--plaintext", choices=["allow", "deny"], default="allow",
        help="clients seen without mTLS: 'allow' them by source address with a port-level "
        "PERMISSIVE exception (default, reported as weak), or 'deny' (leave them out)",
    )
    flagged = analyze.add_argument_group(
        "findings against a baseline (anomalies, scans, exfiltration, downgrades, new edges)")
    flagged.add_argument(
        "--baseline", metavar="OUT_OR_FLOWS",
        help="a previous analyze output directory or flows file: the traffic to compare with")
    flagged.add_argument(
        "--baseline-window", metavar="SPAN",
        help="use the inputs' own first SPAN (e.g. 24h, 90m) as the baseline")
    flagged.add_argument(
        "--contamination", default="auto", metavar="X",
        help="share of anomalous windows the learned model expects: 'auto' (default) or a "
        "number in (0, 0.5]")
    flagged.add_argument(
        "--include-flagged", action="store_true",
        help="keep traffic behind high-severity findings in the proposed policies (default: "
        "left out, listed in the report)")
    analyze.add_argument(
        "--dry-run-annotation", action="store_true",
        help="add istio.io/dry-run: \"true\" to AuthorizationPolicies (staging)",
    )

    check = sub.add_parser(
        "check",
        help="replay recorded traffic against a policy set: breakage and over-permission",
        description="Evaluate every recorded request/connection (the same inputs as analyze) "
        "against a set of policies - Istio AuthorizationPolicy/PeerAuthentication, Linkerd "
        "Server/AuthorizationPolicy/HTTPRoute/..., Kubernetes NetworkPolicy - and report the "
        "observed traffic they would deny and the permissions no traffic exercised.",
        epilog=EPILOG_CHECK,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_options(check)
    check.add_argument(
        "--policies", action="append", default=[], metavar="DIR|FILE",
        help="policy files or directories (YAML/JSON, multi-document); repeatable",
    )
    check.add_argument(
        "--from-cluster", action="store_true",
        help="also read the policies (and namespace annotations) from the live cluster",
    )
    check.add_argument(
        "--inventory", action="append", default=[], metavar="PATH",
        help="inventory dump (kubectl get ... -A -o json, or YAML manifests); repeatable",
    )
    check.add_argument("--kube", action="store_true",
                       help="also read the inventory from the live Kubernetes API")
    check.add_argument("--context", help="kubeconfig context for --kube/--from-cluster")
    check.add_argument("--kubeconfig", help="kubeconfig file for --kube/--from-cluster")
    check.add_argument(
        "--trust-domain", default="cluster.local", metavar="D",
        help="mesh trust domain (Istio SPIFFE principals, Linkerd identities)",
    )
    check.add_argument("--root-namespace", default="istio-system", metavar="NS",
                       help="Istio root namespace (mesh-wide policies; default istio-system)")
    check.add_argument(
        "--linkerd-default-policy", metavar="POLICY",
        choices=["all-unauthenticated", "all-authenticated", "cluster-authenticated",
                 "cluster-unauthenticated", "deny", "audit"],
        help="Linkerd's cluster-wide default inbound policy (proxy.defaultInboundPolicy; "
        "default all-unauthenticated); namespace and pod annotations override it",
    )
    check.add_argument(
        "--cluster-networks", metavar="CIDRS",
        help="Linkerd clusterNetworks, comma-separated (default: Linkerd's default)",
    )
    check.add_argument(
        "--namespace", "-n", default="default", metavar="NS",
        help="namespace of policy objects that name none (as kubectl apply -n; default "
        "'default')",
    )
    check.add_argument("--json", metavar="OUT.json", help="also write the result as JSON")
    check.add_argument("--report", metavar="OUT.md",
                       help="write the Markdown report here instead of stdout")
    check.add_argument("--fail-on-unknown", action="store_true",
                       help="exit 5 also when some observed traffic cannot be decided")

    observe = sub.add_parser(
        "observe",
        help="observe only: turn evidence into flow records (Parquet)",
        description="Parse evidence into meshwright flow records and write them to Parquet, "
        "to be learned from later with 'meshwright analyze FLOWS.parquet'.",
        epilog=EPILOG_OBSERVE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input_options(observe, optional=True)
    observe.add_argument(
        "-o", "--output", metavar="FLOWS",
        help="Parquet file to write (required unless --kube)"
    )
    ebpf = observe.add_argument_group("eBPF connection tracing on this node (instead of INPUT "
                                      "files; with --duration)")
    ebpf.add_argument("--ebpf", action="store_true",
                      help="trace every TCP connection of this machine with bpftrace "
                      "(root or CAP_BPF+CAP_PERFMON); records carry pid, command, container "
                      "and pod UID")
    ebpf.add_argument("--ebpf-map-entries", type=_positive_int, default=65536, metavar="N",
                      help="entries per BPF map (default 65536): connections open at once that "
                      "are followed from their start, and closes per half second; the kernel "
                      "memory of the maps grows with it (about 130 MiB at 65536)")
    ebpf.add_argument("--send", metavar="URL",
                      help="instead of -o: ship the flows to a running observer's /v1/flows "
                      "(meshwright observe --kube --listen), e.g. "
                      "https://meshwright-observer.meshwright.svc:9090/v1/flows; plain "
                      "http:// only to a loopback address (or with --insecure-http)")
    ebpf.add_argument("--ca-file", metavar="FILE",
                      help="--send https://: verify the observer's certificate with the CAs in "
                      "this PEM bundle only (default: the system's CAs), re-read when it "
                      "changes; the URL's host must be in the certificate's subjectAltName")
    ebpf.add_argument("--insecure-http", action="store_true", default=None,
                      help="--send: allow plain http:// to a host that is not loopback. The "
                      "node's bearer token and flows then cross the network in clear text: "
                      "whoever reads the token can send fabricated flows as this node")
    ebpf.add_argument("--spool", metavar="DIR",
                      help="--send: keep shipments here until the observer acknowledged them "
                      "(kept across restarts; default: a temporary directory, lost at exit)")
    ebpf.add_argument("--spool-max-bytes", type=_size, default=None, metavar="SIZE",
                      help="--send: spool at most SIZE (e.g. 512Mi, the default); when full "
                      "the oldest shipments are dropped, counted and logged")
    ebpf.add_argument("--token-file", metavar="FILE",
                      help="--send: bearer token, read again for every shipment (default "
                      "/var/run/secrets/meshwright/token when it exists)")
    ebpf.add_argument("--drain-timeout", type=_positive_float, default=None, metavar="S",
                      help="--send: at the stop, keep delivering what is spooled for at most S "
                      "seconds (default 20; the rest waits in the spool)")
    live = observe.add_argument_group("live capture (instead of INPUT files)")
    live.add_argument("--iface", metavar="IFACE",
                      help="capture on this network interface, or 'any' (all of them)")
    live.add_argument("--bpf", metavar="FILTER",
                      help="tcpdump filter expression applied in the kernel, e.g. 'tcp'")
    live.add_argument("--duration", type=_positive_float, metavar="S",
                      help="stop after S seconds (default: until Ctrl-C / SIGTERM)")
    live.add_argument("--count", type=_positive_int, metavar="N",
                      help="stop after N packets")
    live.add_argument("--flush-every", type=_positive_float, default=None, metavar="S",
                      help="hand captured packets to the tracker every S seconds (default 5); with "
                      "--kube: commit flows and the checkpoint every S seconds (default 5); "
                      "with --ebpf --send: ship every S seconds (default 10)")
    live.add_argument("--save", metavar="PCAP",
                      help="also write the captured packets to this pcap file")
    kube = observe.add_argument_group(
        "observe mode on a live cluster (instead of INPUT files; runs until SIGTERM)")
    kube.add_argument("--kube", action="store_true",
                      help="watch the inventory and follow the proxy logs through the "
                      "Kubernetes API (kubeconfig or in-cluster service account)")
    kube.add_argument("--context", help="kubeconfig context")
    kube.add_argument("--kubeconfig", help="kubeconfig file")
    kube.add_argument("-n", "--namespace", action="append", dest="namespaces", metavar="NS",
                      help="watch this namespace (repeatable); default: all (-A)")
    kube.add_argument("-A", "--all-namespaces", action="store_true",
                      help="watch all namespaces (the default)")
    kube.add_argument("--state", metavar="DIR",
                      help="state directory: flows (hourly Parquet), checkpoint, proposals")
    kube.add_argument("--emit-every", default="15m", metavar="SPAN",
                      help="re-learn and publish policies/, graph.json, findings.json, "
                      "report.md under --state every SPAN (default 15m; 0 never)")
    kube.add_argument("--mesh", action="append", choices=["istio", "linkerd", "netpol"],
                      default=None, help="policy flavour to propose, repeatable (default istio)")
    kube.add_argument("--trust-domain", default="cluster.local", metavar="D",
                      help="mesh trust domain (default cluster.local)")
    kube.add_argument("--retention", default="7d", metavar="SPAN",
                      help="delete flow partitions older than SPAN, keeping their edges in "
                      "edges-summary.json (default 7d)")
    kube.add_argument("--listen", metavar="ADDR:PORT",
                      help="serve /metrics (Prometheus), /healthz and the nodes' POST "
                      "/v1/flows here, e.g. :9090; plain HTTP unless --tls-cert/--tls-key")
    kube.add_argument("--tls-cert", metavar="FILE",
                      help="with --tls-key: --listen speaks HTTPS only (TLS 1.2+; /metrics "
                      "and /healthz too: probes and scrapes need https). PEM certificate "
                      "(chain); the pair is re-read when the files change (checked at most "
                      "every 30 s)")
    kube.add_argument("--tls-key", metavar="FILE",
                      help="the PEM private key of --tls-cert (unencrypted)")
    kube.add_argument("--ingest-allow", action="append", metavar="USER",
                      help="with --listen: who may POST node flows to /v1/flows, checked by "
                      "TokenReview (repeatable; default "
                      "system:serviceaccount:meshwright:meshwright-ebpf)")
    kube.add_argument("--ingest-max-bytes", type=_size, default=None, metavar="SIZE",
                      help="with --listen: refuse node shipments larger than SIZE (HTTP 413; "
                      "default 64Mi)")
    kube.add_argument("--git", metavar="DIR", dest="git_dir",
                      help="also commit each proposal to branch meshwright/proposals of the "
                      "git working tree DIR")
    kube.add_argument("--log-workers", type=_positive_int, default=8, metavar="N",
                      help="log streams read at once (default 8)")
    kube.add_argument("--log-read-timeout", type=_positive_float, default=10.0, metavar="S",
                      help="reopen a log stream quiet for S seconds (default 10)")
    kube.add_argument("--log-slice", type=_positive_float, default=30.0, metavar="S",
                      help="read one log stream at most S seconds while others wait "
                      "(default 30)")
    kube.add_argument("--reconnect-backoff", type=_positive_float, default=0.5,
                      help=argparse.SUPPRESS)  # first reconnect delay (tests)
    kube.add_argument("--log-format", choices=["text", "json"], default="text",
                      help="log lines on stderr as text (default) or one JSON object each")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _size(text: str) -> int:
    """Bytes: 536870912, 512Mi, 512MiB, 1G (powers of 1024 with or without the i)."""
    value = text.strip()
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    low = value.lower().removesuffix("b").removesuffix("i")
    scale = units.get(low[-1:], 1)
    number = low[:-1] if low[-1:] in units else low
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512Mi)") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
    return value


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.ERROR if args.quiet else (
        logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING
    )
    if getattr(args, "log_format", "text") == "json":
        from meshwright.observer import JsonFormatter

        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="meshwright: %(levelname)s: %(message)s")
    if getattr(args, "kube", False) and args.command == "observe" and not args.quiet:
        logging.getLogger("meshwright.observer").setLevel(
            logging.DEBUG if args.verbose > 1 else logging.INFO)


def _tune_memory() -> None:
    """Keep freed memory for reuse instead of handing it back to the kernel (glibc only).

    The parsers allocate and free chunk-sized buffers (megabytes) all the time; by default
    glibc maps each afresh and unmaps it on free, so every chunk pays its pages again in page
    faults. With glibc told to keep them, Arrow allocates from glibc too (its default mimalloc
    pool keeps more memory for itself): on a 1 M-line dump observe runs ~5 % faster in ~20 %
    less memory. The process never holds more than its peak this way.
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # a static or unusual libc: the defaults are fine
        return
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def _limit_arenas(arenas: int = 2) -> None:
    """Long-running observe mode: at most ``arenas`` glibc malloc arenas (glibc only).

    By default glibc gives each thread that allocates its own arena (up to 8 per core) and
    keeps what is freed in it: with a dozen log-reading threads the RSS kept creeping up (about
    2 MiB/s at 12,000 lines/s in benchmarks/observe_soak.py); with 2 arenas it stays flat.
    Freed memory is returned as usual (no :func:`_tune_memory` here: it pays off on one-shot
    runs over big dumps, not on a process that runs for days).
    """
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        m_arena_max = -8
        ctypes.CDLL(None).mallopt(m_arena_max, arenas)
    except (OSError, AttributeError):
        return


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    if args.command == "observe" and args.kube:
        _limit_arenas()
    else:
        _tune_memory()
    from meshwright import commands  # deferred: keeps --help fast

    try:
        if args.command == "analyze":
            return commands.analyze(args)
        if args.command == "check":
            return commands.check(args)
        return commands.observe(args)
    except MeshwrightError as exc:
        print(f"meshwright: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("meshwright: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK
    except OSError as exc:  # the environment, not a bug: disk full, permissions, ...
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"meshwright: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # a bug: one line, traceback on request
        if args.debug:
            raise
        print(
            f"meshwright: internal error: {type(exc).__name__}: {exc} "
            "(rerun with --debug for a traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
