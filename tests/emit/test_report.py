"""emit/report.py: a deterministic Markdown report a reviewer can act on."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from emit.istio import istio_manifests
from emit.report import excluded_items, mermaid, render_report
from learn.model import Finding, Graph

Make = Callable[[int | None], Graph]

STATS: dict[str, Any] = {
    "files": 2, "lines": 300, "records": 290, "ignored_lines": 5, "malformed": 5,
    "malformed_samples": ["logs/a.log:3: unterminated quote"], "duplicates": 1,
    "by_source": {"istio-text": 250, "istio-json": 40}, "skipped_files": ["logs/x.bin"],
}
EXCLUDED = [{"source": "default/batch", "destination": "default/details-v1", "port": 9080,
             "reason": "identity ambiguous (IP reuse)"}]


def _render(g: Graph, findings: list[Finding], **opts: Any) -> str:
    return render_report(g, findings, istio_manifests(g, **opts), stats=STATS,
                         excluded=EXCLUDED, options=opts)


def test_report_golden_and_deterministic(make_bookinfo: Make, findings: list[Finding],
                                         golden: Callable[[str, str], None]) -> None:
    text = _render(make_bookinfo(None), findings)
    golden("emit/bookinfo-report.md", text)
    for seed in (1, 2):
        assert _render(make_bookinfo(seed), list(reversed(findings))) == text


def test_summary_numbers(make_bookinfo: Make, findings: list[Finding]) -> None:
    text = _render(make_bookinfo(None), findings)
    assert "| time window | 2024-05-01T12:00:00Z .. 2024-05-01T13:30:15Z |" in text
    assert "| flow records | 290 |" in text and "| malformed lines | 5 |" in text
    g = make_bookinfo(None)
    total = sum(e.requests for e in g.edges)
    mtls = sum(e.mtls_requests for e in g.edges)
    assert f"| mTLS coverage | {100 * mtls / total:.1f}% of requests |" in text
    assert "| findings | high: 1, medium: 1, info: 1 |" in text
    assert "| istio-json | 40 |" in text and "`logs/x.bin`" in text


def test_mermaid_ids_stable_and_plaintext_dashed(make_bookinfo: Make) -> None:
    g = make_bookinfo(None)
    lines = mermaid(g)
    assert lines[:2] == ["```mermaid", "flowchart LR"] and lines[-1] == "```"
    assert '  n_default_legacy_client -.->|"9080/http"| n_default_details_v1' in lines
    assert '  n_default_productpage_v1 -->|"9080/http"| n_default_details_v1' in lines
    # TLS to an external host is not plaintext: solid
    assert '  n_default_reviews_v2 -->|"443/tls"| n_external_api_example_com' in lines
    style = next(x for x in lines if x.startswith("  linkStyle"))
    edge_lines = [x for x in lines if "|" in x and ("-->" in x or "-.->" in x)]
    dashed = {str(i) for i, x in enumerate(edge_lines) if "-.->" in x}
    assert set(style.split()[1].split(",")) == dashed
    # removing a node does not renumber the others
    del g.nodes["default/idle-v1"]
    g.idle_workloads = []
    assert '  n_default_details_v1["default/details-v1"]' in mermaid(g)


def test_policies_section_shows_rules_with_evidence(make_bookinfo: Make,
                                                    findings: list[Finding]) -> None:
    text = _render(make_bookinfo(None), findings)
    sec = text.split("### `policies/default/authorizationpolicy-details-v1.yaml`")[1]
    sec = sec.split("\n### ")[0]
    assert "Rule 1 (ipBlocks) **WEAK**" in sec and "IP `10.1.2.3`" in sec
    assert "Rule 2 (principals)" in sec
    assert "| default/productpage-v1 | 9080 | http | 40 |" in sec
    assert "full (100.0%)" in sec and "none (0.0%)" in sec
    assert "port 9080: **PERMISSIVE**" in text
    assert "allowed from ANY source" in text
    assert "shared by default/reviews-v2, default/reviews-v3" in text


def test_evidence_limits_section(make_bookinfo: Make, findings: list[Finding]) -> None:
    text = _render(make_bookinfo(None), findings)
    limits = text.split("## What the evidence cannot vouch for")[1]
    assert "- `default/idle-v1`" in limits
    assert "| default/legacy-client | default/details-v1 | 9080 | 03:00 UTC | 6 |" in limits
    assert "10.1.2.3 was reused" in limits
    assert "identity ambiguous (IP reuse)" in limits  # caller's excluded
    assert "every request was denied" in limits  # the planner's excluded
    assert "| `/details/*` | default/details-v1 |" in limits
    assert "`logs/a.log:3: unterminated quote`" in limits
    rare = limits.split("### Seen only a handful of times")[1].split("###")[0]
    assert "| unknown:10.9.9.9 | default/productpage-v1 | 9080 | http | 3 |" in rare
    assert "| default/productpage-v1 | default/details-v1 |" not in rare


def test_plaintext_deny_report_lists_clients_left_out(make_bookinfo: Make,
                                                      findings: list[Finding]) -> None:
    text = _render(make_bookinfo(None), findings, plaintext="deny", dry_run=True)
    assert "Options: `dry_run=True`, `plaintext=deny`" in text
    assert re.search(r"\| default/legacy-client \| default/details-v1 \| 9080 \| "
                     r"client without a verified identity \(plaintext=deny\) \|", text)
    assert "PERMISSIVE" not in text
    assert "(dry-run)" in text


def test_empty_graph_renders(findings: list[Finding]) -> None:
    text = render_report(Graph(), [], [], stats={}, excluded=[], options={})
    assert text.endswith("\n") and "| time window | ? .. ? |" in text
    assert "## Proposed policies\n\nNone." in text
    assert "mTLS coverage | n/a of requests" in text


def test_excluded_items_matches_what_the_report_lists(make_bookinfo: Make,
                                                      findings: list[Finding]) -> None:
    g = make_bookinfo(None)
    items = excluded_items(g, plaintext="deny")
    assert {"source": "default/legacy-client", "destination": "default/details-v1",
            "port": 9080, "reason": "client without a verified identity (plaintext=deny)"} in items
    # passing them in again does not duplicate rows
    text = render_report(g, findings, istio_manifests(g, plaintext="deny"), stats={},
                         excluded=items, options={"plaintext": "deny"})
    assert text.count("client without a verified identity (plaintext=deny)") == 2
