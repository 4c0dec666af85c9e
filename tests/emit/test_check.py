"""`emit.check` end to end on the Bookinfo sample (its logs and inventory): the policies meshwright
emits from the traffic break nothing; the Istio docs' Bookinfo set breaks exactly what the
sample does that the set forbids (derived by hand below); unused permissions are listed."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from emit import check as checking
from learn.pipeline import Learned, learn_graph
from meshwright.cli import main
from observe.inventory import Inventory, load_inventory

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "bookinfo"
DATA = Path(__file__).resolve().parent.parent / "data" / "policies"


@pytest.fixture(scope="module")
def bookinfo(tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, Inventory, Learned, list[checking.Observation]]:
    base = tmp_path_factory.mktemp("check")
    dump = base / "dump"
    # The proxies' logs and the inventory (the sample's other evidence is left out so that the
    # expectations below are about these logs alone).
    shutil.copytree(SAMPLE / "logs", dump / "logs")
    shutil.copy(SAMPLE / "inventory.json", dump / "inventory.json")
    out = base / "out"
    assert main(["analyze", str(dump), "-o", str(out), "-q"]) == 0
    inventory = load_inventory([dump / "inventory.json"])
    learned = learn_graph(out / "flows.parquet", inventory, resolved_out=base / "resolved.parquet")
    return out, inventory, learned, checking.observations(base / "resolved.parquet")


def _docs_set(namespace: str) -> list[dict[str, Any]]:
    """The Istio docs' Bookinfo set, moved from namespace `default` to ``namespace`` (its
    principals too), as a user applying it to the sample's namespace would."""
    text = (DATA / "istio-docs-bookinfo-authz-http.yaml").read_text("utf-8")
    docs = [d for d in yaml.safe_load_all(text) if d]
    out = []
    for d in docs:
        d = copy.deepcopy(d)
        d["metadata"]["namespace"] = namespace
        out.append(json.loads(json.dumps(d).replace("/ns/default/", f"/ns/{namespace}/")))
    return out


def _policy_set(docs: list[dict[str, Any]]) -> checking.PolicySet:
    ps = checking.PolicySet()
    for i, d in enumerate(docs):
        ps.add(d, f"docs#{i}")
    return ps


def test_observations_count_each_request_once(bookinfo: Any) -> None:
    _, _, learned, observed = bookinfo
    # every request the graph counts (both sidecars logged most of them) is one observation's
    graph_total = sum(e.requests for e in learned.graph.edges)
    assert sum(o.requests for o in observed) == graph_total
    # query strings are stripped, so /productpage?u=normal and /productpage are one
    assert all("?" not in (o.path or "") for o in observed)


def test_emitted_policies_break_nothing(bookinfo: Any) -> None:
    out, inventory, learned, observed = bookinfo
    result = checking.check(observed, checking.load_policies([out / "policies"]), inventory,
                            learned.graph)
    assert result.engines == ["istio"]
    assert result.breakage == []
    # The one undecidable observation: a client-side line (the server pod was replaced before
    # it logged) whose mTLS state the default log format does not record; with mTLS the
    # emitted ratings-v1 policy allows it, without it would not.
    assert [(c.observation.source, c.observation.destination, c.observation.mtls)
            for c in result.unknown] == [
        ("bookinfo/reviews-v2", "bookinfo/ratings-v1", "unknown")]
    # The three requests the cluster's policy already rejected stay rejected.
    assert {c.observation.destination for c in result.still_denied} == {
        "bookinfo/reviews-v1", "bookinfo/reviews-v2", "bookinfo/reviews-v3"}
    assert result.newly_allowed == []


def test_docs_set_breakage_derived_by_hand(bookinfo: Any) -> None:
    """The docs' set in the sample's namespace `bookinfo`:

    - allow-nothing (spec {}) makes every bookinfo workload deny-by-default;
    - productpage-viewer: app=productpage, GET from anyone -> the gateway's POSTs (/login)
      break, its GETs pass;
    - details-viewer: app=details, GET from sa/bookinfo-productpage -> productpage's GETs
      pass, nightly-report's GET (sa/nightly-report) breaks;
    - reviews-viewer: app=reviews, GET from sa/bookinfo-productpage -> productpage's GETs
      pass; legacy-client's plaintext GETs were already denied (still denied);
    - ratings-viewer: app=ratings, GET from sa/bookinfo-reviews -> reviews-v2/v3 pass,
      legacy-client's plaintext GETs (no principal) break;
    - istio-system (the gateway) and the external api.example.com are out of the set's
      reach: the gateway is unrestricted (no ALLOW policy), the external host not a mesh
      workload.
    """
    _, inventory, learned, observed = bookinfo
    result = checking.check(observed, _policy_set(_docs_set("bookinfo")), inventory,
                            learned.graph)
    broken = {(c.observation.source, c.observation.destination, c.observation.method)
              for c in result.breakage}
    assert broken == {
        ("istio-system/istio-ingressgateway", "bookinfo/productpage-v1", "POST"),
        ("bookinfo/nightly-report", "bookinfo/details-v1", "GET"),
        ("legacy/legacy-client", "bookinfo/ratings-v1", "GET"),
    }
    post = [c for c in result.breakage if c.observation.method == "POST"]
    assert {c.observation.path for c in post} == {"/login"}
    assert all(c.observation.evidence and c.engines[0].reason == "no ALLOW rule matches"
               for c in result.breakage)
    legacy = [c for c in result.breakage if c.observation.source == "legacy/legacy-client"]
    assert sum(c.observation.requests for c in legacy) == 27
    assert {c.observation.destination for c in result.still_denied} == {
        "bookinfo/reviews-v1", "bookinfo/reviews-v2", "bookinfo/reviews-v3"}
    # every viewer rule was exercised by some allowed request: no unused permission
    assert result.over_permission == []
    # The set has no PeerAuthentication: PERMISSIVE everywhere. Every bookinfo workload only
    # let mTLS requests through (legacy-client's plaintext ones are denied), so accepting
    # plaintext is an unused permission there; the gateway serves the internet in plaintext
    # but nothing restricts who calls it.
    assert [(u.destination, u.port, u.what.split(":")[0].split(" accepts")[0])
            for u in result.unrestricted] == [
        ("istio-system/istio-ingressgateway", 8080, "no ALLOW AuthorizationPolicy applies"),
        *[(f"bookinfo/{w}", 9080, "PeerAuthentication PERMISSIVE")
          for w in ("details-v1", "productpage-v1", "ratings-v1", "reviews-v1", "reviews-v2",
                    "reviews-v3")],
    ]


def test_docs_set_in_another_namespace_is_all_over_permission(bookinfo: Any) -> None:
    # As published (namespace default) the set touches nothing the sample runs: no breakage,
    # and each viewer's only rule is a permission nobody used.
    _, inventory, learned, observed = bookinfo
    result = checking.check(observed, _policy_set(_docs_set("default")), inventory,
                            learned.graph)
    assert result.breakage == []
    assert [(o.object, o.part) for o in result.over_permission] == [
        ("AuthorizationPolicy default/productpage-viewer", "rules[0]"),
        ("AuthorizationPolicy default/details-viewer", "rules[0]"),
        ("AuthorizationPolicy default/reviews-viewer", "rules[0]"),
        ("AuthorizationPolicy default/ratings-viewer", "rules[0]"),
    ]


def test_unused_principal_inside_a_used_rule(bookinfo: Any) -> None:
    _, inventory, learned, observed = bookinfo
    docs = _docs_set("bookinfo")
    ratings = next(d for d in docs if d["metadata"]["name"] == "ratings-viewer")
    ratings["spec"]["rules"][0]["from"][0]["source"]["principals"].append(
        "cluster.local/ns/bookinfo/sa/bookinfo-details")
    result = checking.check(observed, _policy_set(docs), inventory, learned.graph)
    assert [(o.object, o.part, o.what) for o in result.over_permission] == [
        ("AuthorizationPolicy bookinfo/ratings-viewer", "rules[0].from[0].source.principals[1]",
         "principals cluster.local/ns/bookinfo/sa/bookinfo-details")]


def test_mixed_engines_netpol_denies_what_istio_allows(bookinfo: Any) -> None:
    # A default-deny ingress NetworkPolicy in bookinfo plus an allow for productpage only:
    # every observed call into bookinfo but those to productpage breaks at L4.
    out, inventory, learned, observed = bookinfo
    policies = checking.load_policies([out / "policies"])
    for i, spec in enumerate([
        {"podSelector": {}, "policyTypes": ["Ingress"]},
        {"podSelector": {"matchLabels": {"app": "productpage"}},
         "ingress": [{"ports": [{"port": 9080}]}]},
    ]):
        policies.add({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                      "metadata": {"name": f"np{i}", "namespace": "bookinfo"}, "spec": spec},
                     f"netpol#{i}")
    result = checking.check(observed, policies, inventory, learned.graph)
    assert result.engines == ["istio", "netpol"]
    broken = {c.observation.destination for c in result.breakage}
    assert broken == {"bookinfo/details-v1", "bookinfo/reviews-v1", "bookinfo/reviews-v2",
                      "bookinfo/reviews-v3", "bookinfo/ratings-v1"}
    assert all(any(v.engine == "netpol" and v.verdict == "deny" for v in c.engines)
               for c in result.breakage)


def test_json_and_markdown(bookinfo: Any) -> None:
    _, inventory, learned, observed = bookinfo
    result = checking.check(observed, _policy_set(_docs_set("bookinfo")), inventory,
                            learned.graph)
    doc = json.loads(checking.dumps_json(result))
    assert doc["version"] == 1 and doc["summary"]["breakage"] == len(result.breakage) >= 3
    assert doc["summary"]["breakage_requests"] == sum(c.observation.requests
                                                      for c in result.breakage)
    assert set(doc) == {"version", "engines", "policies", "summary", "breakage", "unknown",
                        "newly_allowed", "still_denied", "latent_breakage", "over_permission",
                        "unrestricted"}
    entry = doc["breakage"][0]
    assert set(entry) == {"source", "destination", "port", "transport", "protocol", "method",
                          "path", "host", "mtls", "source_ip", "requests", "verdict",
                          "engines", "evidence"}
    assert all(":" in e for e in entry["evidence"])  # file:line
    text = checking.render_markdown(result)
    assert f"**Breakage: {len(result.breakage)}**" in text
    assert "| bookinfo/nightly-report | bookinfo/details-v1 | 9080 | GET /details/" in text


def test_policies_of_a_mesh_the_pods_do_not_run_are_not_enforced(bookinfo: Any,
                                                                  tmp_path: Path) -> None:
    """The docs' Istio set against pods whose sidecar is linkerd-proxy (the sample's inventory
    with the container renamed): Istio enforces nothing there. The requests the set would deny
    (derived in test_docs_set_breakage_derived_by_hand) are latent breakage, not breakage; the
    rules the traffic would use still count as used; every destination is unrestricted."""
    _, _, learned, observed = bookinfo
    text = (SAMPLE / "inventory.json").read_text("utf-8").replace('"istio-proxy"',
                                                                  '"linkerd-proxy"')
    (tmp_path / "inventory.json").write_text(text, encoding="utf-8")
    inventory = load_inventory([tmp_path / "inventory.json"])
    result = checking.check(observed, _policy_set(_docs_set("bookinfo")), inventory,
                            learned.graph)
    assert result.breakage == [] and result.still_denied == []
    latent = {(c.observation.source, c.observation.destination, c.observation.method)
              for c in result.latent_breakage}
    assert latent == {
        ("istio-system/istio-ingressgateway", "bookinfo/productpage-v1", "POST"),
        ("bookinfo/nightly-report", "bookinfo/details-v1", "GET"),
        ("legacy/legacy-client", "bookinfo/ratings-v1", "GET"),
    }
    for c in result.latent_breakage:
        (v,) = c.engines
        assert (v.verdict, v.latent) == ("n/a", "deny")
        assert v.reason.startswith("destination runs no istio-proxy: not enforced (with one: "
                                   "deny, no ALLOW rule matches")
    assert result.over_permission == []
    # reviews-v2's client-side lines to a ratings pod replaced before it logged name no pod
    # the inventory knows: whether that pod ran a sidecar is unknown, so those requests are
    # evaluated as enforced - and there the set is PERMISSIVE with only mTLS seen.
    assert {(u.destination, u.what) for u in result.unrestricted} == {
        (d, "destination runs no istio-proxy: its istio policies are not enforced")
        for d in ("bookinfo/details-v1", "bookinfo/productpage-v1", "bookinfo/ratings-v1",
                  "bookinfo/reviews-v1", "bookinfo/reviews-v2", "bookinfo/reviews-v3",
                  "istio-system/istio-ingressgateway")} | {
        ("bookinfo/ratings-v1", "PeerAuthentication PERMISSIVE accepts plaintext, but every "
         "observed request it lets through was mTLS")}
    text = checking.render_markdown(result)
    latent_md = text.split("## Latent breakage", 1)[1].split("## Over-permission", 1)[0]
    row = next(line for line in latent_md.splitlines()
               if line.startswith("| bookinfo/nightly-report | bookinfo/details-v1"))
    assert "| istio: destination runs no istio-proxy: not enforced (with one: deny" in row
