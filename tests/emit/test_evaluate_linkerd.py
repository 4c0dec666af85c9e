"""The Linkerd evaluator against Linkerd's own policy examples; every expected verdict is
derived by hand from the documentation cited in emit/evaluate_linkerd.py (reasoning inline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from emit.evaluate_linkerd import (
    LinkerdPolicies,
    LinkerdRequest,
    evaluate_linkerd,
    linkerd_identity,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "policies"


def _docs(name: str, namespace: str | None = None) -> list[dict[str, Any]]:
    with (DATA / name).open(encoding="utf-8") as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d]
    if namespace:
        for d in docs:
            d.setdefault("metadata", {}).setdefault("namespace", namespace)
    return docs


def ident(sa: str, ns: str) -> str:
    return f"{sa}.{ns}.serviceaccount.identity.linkerd.cluster.local"


# --- booksapp per-route policy (linkerd.io/2-edge/tasks/configuring-per-route-policy) -------

AUTHORS = {"app": "authors", "project": "booksapp"}


def _authors(method: str, path: str, who: str | None, *, ip: str = "10.244.1.7",
             protocol: str = "http") -> LinkerdRequest:
    # authors listens on container port 7001, named "service" (the Server's port).
    return LinkerdRequest("booksapp", AUTHORS, 7001, port_names=("service",), protocol=protocol,
                          method=method, path=path,
                          client_identity=ident(who, "booksapp") if who else None,
                          client_ip=ip, probe_paths=frozenset({(7001, "/ping")}))


BOOKSAPP_CASES = [
    # books may GET authors (authors-get-route, PathPrefix /authors/ + GET; authn books|webapp)
    ("GET", "/authors/1.json", "books", "allow", "AuthorizationPolicy booksapp/authors-get-policy"),
    # Exact /authors.json GET
    ("GET", "/authors.json", "webapp", "allow", "AuthorizationPolicy booksapp/authors-get-policy"),
    # DELETE is on authors-modify-route, whose authn lists webapp only; accessPolicy deny
    ("DELETE", "/authors/1.json", "books", "deny", None),
    ("DELETE", "/authors/1.json", "webapp", "allow",
     "AuthorizationPolicy booksapp/authors-modify-policy"),
    ("PUT", "/authors/1.json", "webapp", "allow",
     "AuthorizationPolicy booksapp/authors-modify-policy"),
    ("POST", "/authors.json", "webapp", "allow",
     "AuthorizationPolicy booksapp/authors-modify-policy"),
    # no route matches PATCH, nor a path that only shares characters with the prefix: 404
    ("PATCH", "/authors/1.json", "webapp", "deny", None),
    ("GET", "/authorsXYZ", "webapp", "deny", None),
    # the kubelet's probe from the node, no identity: authors-probe-route + 0.0.0.0/0
    ("GET", "/ping", None, "allow", "AuthorizationPolicy booksapp/authors-probe-policy"),
    # an unmeshed client on the get route: MeshTLSAuthentication needs an identity
    ("GET", "/authors.json", None, "deny", None),
]


@pytest.mark.parametrize(("method", "path", "who", "verdict", "by"), BOOKSAPP_CASES)
def test_booksapp_per_route_policy(method: str, path: str, who: str | None, verdict: str,
                                   by: str | None) -> None:
    policies = LinkerdPolicies(_docs("linkerd-docs-booksapp-per-route-policy.yaml"))
    d = evaluate_linkerd(policies, _authors(method, path, who))
    assert d.verdict == verdict, d.reason
    assert d.authorization == by
    assert d.server == "Server booksapp/authors-server"


def test_booksapp_routes_and_authentications_used() -> None:
    policies = LinkerdPolicies(_docs("linkerd-docs-booksapp-per-route-policy.yaml"))
    d = evaluate_linkerd(policies, _authors("GET", "/authors/1.json", "books"))
    assert d.route == "HTTPRoute booksapp/authors-get-route"
    assert d.hits["HTTPRoute booksapp/authors-get-route"] == {"", "rules[0].matches[1]"}
    assert d.hits["MeshTLSAuthentication booksapp/authors-get-authn"] == {"", "identities[0]"}


def test_booksapp_opaque_tcp_sees_only_server_authorizations() -> None:
    # Every authorization targets a route; a TCP connection takes no route: accessPolicy deny.
    policies = LinkerdPolicies(_docs("linkerd-docs-booksapp-per-route-policy.yaml"))
    d = evaluate_linkerd(policies, _authors("", "", "webapp", protocol="tcp"))
    assert d.verdict == "deny"


def test_booksapp_missing_authentication_ignores_the_authorization() -> None:
    # CRD: "If any of the referred objects cannot be found, the authorization will be ignored."
    docs = [d for d in _docs("linkerd-docs-booksapp-per-route-policy.yaml")
            if d["metadata"]["name"] != "authors-get-authn"]
    d = evaluate_linkerd(LinkerdPolicies(docs), _authors("GET", "/authors.json", "webapp"))
    assert d.verdict == "deny"


def test_server_access_policy_audit() -> None:
    docs = _docs("linkerd-docs-booksapp-per-route-policy.yaml")
    docs[0]["spec"]["accessPolicy"] = "audit"
    d = evaluate_linkerd(LinkerdPolicies(docs), _authors("DELETE", "/authors/1.json", "books"))
    assert d.verdict == "allow" and d.audit
    # routes still decide what exists: an unrouted request is a 404 whatever the audit mode
    assert evaluate_linkerd(LinkerdPolicies(docs),
                            _authors("PATCH", "/authors/1", "books")).verdict == "deny"


# --- emojivoto with ServerAuthorizations (run.linkerd.io/emojivoto-policy.yml) ---------------


def _emoji(app: str, port: int, names: tuple[str, ...], who: str | None,
           ns: str = "emojivoto", ip: str = "10.244.2.9") -> LinkerdRequest:
    return LinkerdRequest("emojivoto", {"app": app, "version": "v11"}, port, port_names=names,
                          protocol="grpc" if "grpc" in names else "http", method="POST",
                          path="/x", client_identity=ident(who, ns) if who else None,
                          client_ip=ip)


def test_emojivoto_server_authorizations() -> None:
    policies = LinkerdPolicies(_docs("linkerd-run-emojivoto-policy.yml"))
    # voting-grpc carries emojivoto/api=internal-grpc: internal-grpc admits SA web (its ns)
    d = evaluate_linkerd(policies, _emoji("voting-svc", 8080, ("grpc",), "web"))
    assert (d.verdict, d.authorization) == ("allow", "ServerAuthorization emojivoto/internal-grpc")
    assert evaluate_linkerd(policies, _emoji("voting-svc", 8080, ("grpc",), "voting")
                            ).verdict == "deny"
    # ... a web SA of another namespace is another identity
    assert evaluate_linkerd(policies, _emoji("voting-svc", 8080, ("grpc",), "web", ns="other")
                            ).verdict == "deny"
    assert evaluate_linkerd(policies, _emoji("emoji-svc", 8080, ("grpc",), "web")).allowed
    assert evaluate_linkerd(policies, _emoji("emoji-svc", 8080, ("grpc",), None)
                            ).verdict == "deny"
    # web-http: unauthenticated from 0.0.0.0/0 and ::/0
    d = evaluate_linkerd(policies, _emoji("web-svc", 8080, ("http",), None, ip="203.0.113.5"))
    assert (d.verdict, d.authorization) == ("allow", "ServerAuthorization emojivoto/web-public")
    # prom (matchExpressions In) and admin (every pod) are open to unauthenticated scrapes
    assert evaluate_linkerd(policies, _emoji("voting-svc", 8801, ("prom",), None)).allowed
    assert evaluate_linkerd(policies, _emoji("voting-svc", 4191, ("linkerd-admin",), None)
                            ).allowed
    # A port no Server selects: the cluster default decides.
    assert evaluate_linkerd(policies, _emoji("voting-svc", 9999, (), None)).allowed
    strict = LinkerdPolicies(_docs("linkerd-run-emojivoto-policy.yml"), cluster_default="deny")
    assert evaluate_linkerd(strict, _emoji("voting-svc", 9999, (), "web")).verdict == "deny"


def test_emojivoto_fixture_without_namespaces() -> None:
    # The integration-test fixture is applied with -n linkerd-stat-authz-test; its emoji-grpc
    # authorization admits every identity of that namespace ("*.<ns>.serviceaccount...").
    ns = "linkerd-stat-authz-test"
    policies = LinkerdPolicies(_docs("linkerd2-emojivoto-policy.yaml", namespace=ns))
    req = LinkerdRequest(ns, {"app": "emoji-svc"}, 8080, port_names=("grpc",), protocol="grpc",
                         method="POST", path="/emojivoto.v1.EmojiService/ListAll",
                         client_identity=ident("vote-bot", ns), client_ip="10.1.1.1")
    assert evaluate_linkerd(policies, req).allowed
    other = LinkerdRequest(ns, {"app": "emoji-svc"}, 8080, port_names=("grpc",),
                           protocol="grpc", client_identity=ident("web", "elsewhere"))
    assert evaluate_linkerd(policies, other).verdict == "deny"


# --- default policies (linkerd.io/2-edge/reference/authorization-policy#default-policies) ----


@pytest.mark.parametrize(("policy", "identity", "ip", "verdict"), [
    ("all-unauthenticated", None, "203.0.113.1", "allow"),
    ("audit", None, "203.0.113.1", "allow"),
    ("all-authenticated", None, "10.0.0.1", "deny"),
    ("all-authenticated", "web", "203.0.113.1", "allow"),
    ("cluster-authenticated", "web", "10.0.0.1", "allow"),
    ("cluster-authenticated", "web", "203.0.113.1", "deny"),   # not from the cluster networks
    ("cluster-authenticated", None, "10.0.0.1", "deny"),
    ("cluster-unauthenticated", None, "172.16.3.4", "allow"),
    ("cluster-unauthenticated", None, "203.0.113.1", "deny"),
    ("cluster-unauthenticated", None, None, "unknown"),        # no client address recorded
    ("deny", "web", "10.0.0.1", "deny"),
])
def test_default_policies(policy: str, identity: str | None, ip: str | None,
                          verdict: str) -> None:
    policies = LinkerdPolicies([])
    req = LinkerdRequest("ns", {"app": "a"}, 8080, method="GET", path="/",
                         client_identity=ident(identity, "ns") if identity else None,
                         client_ip=ip, default_policy=policy)
    assert evaluate_linkerd(policies, req).verdict == verdict


def test_probes_stay_authorized_until_a_route_exists() -> None:
    probe = LinkerdRequest("ns", {"app": "a"}, 8080, port_names=("http",), method="GET",
                           path="/ready", client_ip="10.0.0.1", default_policy="deny",
                           probe_paths=frozenset({(8080, "/ready")}))
    assert evaluate_linkerd(LinkerdPolicies([]), probe).allowed  # no Server
    server = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
              "metadata": {"name": "a-http", "namespace": "ns"},
              "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "port": "http"}}
    assert evaluate_linkerd(LinkerdPolicies([server]), probe).allowed  # Server, no route
    route = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": "api", "namespace": "ns"},
             "spec": {"parentRefs": [{"group": "policy.linkerd.io", "kind": "Server",
                                      "name": "a-http"}],
                      "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}]}]}}
    assert evaluate_linkerd(LinkerdPolicies([server, route]), probe).verdict == "deny"


def test_header_matches_are_unknown() -> None:
    server = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
              "metadata": {"name": "s", "namespace": "ns"},
              "spec": {"podSelector": {}, "port": 80}}
    route = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "HTTPRoute",
             "metadata": {"name": "r", "namespace": "ns"},
             "spec": {"parentRefs": [{"kind": "Server", "name": "s"}],
                      "rules": [{"matches": [{"headers": [{"name": "x-user",
                                                           "value": "admin"}]}]}]}}
    req = LinkerdRequest("ns", {}, 80, method="GET", path="/", client_ip="10.0.0.1")
    assert evaluate_linkerd(LinkerdPolicies([server, route]), req).verdict == "unknown"


def test_identity_conversion() -> None:
    assert linkerd_identity("cluster.local/ns/booksapp/sa/webapp") == ident("webapp", "booksapp")
    assert linkerd_identity(ident("a", "b")) == ident("a", "b")
    assert linkerd_identity(None) is None
