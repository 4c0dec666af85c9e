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
    host_match,
    linkerd_identity,
    path_match_length,
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


# --- route selection as linkerd2-proxy does it ------------------------------------------------
# Expected values derived by hand from linkerd2-proxy's linkerd/http/route/src (path.rs: match
# lengths; match.rs: (path length, headers, query params, method) order; lib.rs: host first,
# first route/rule wins ties) and the policy controller's route order (oldest, then name).


@pytest.mark.parametrize(("kind", "value", "path", "expected"), [
    ("Exact", "/foo/bar", "/foo/bar", 8),
    ("Exact", "/foo/bar", "/foo/bar/", None),          # verbatim: no trimming for Exact
    ("Exact", "/foo/bar", "/foo", None),
    ("PathPrefix", "/", "/anything", 1),
    ("PathPrefix", "/foo", "/foo", 4),
    ("PathPrefix", "/foo/", "/foo", 4),                # trailing "/" trimmed, length 4 not 5
    ("PathPrefix", "/foo/", "/foo/bar/qux", 4),
    ("PathPrefix", "/foo", "/foo/", 4),
    ("PathPrefix", "/foo", "/foobar", None),           # whole segments only
    ("RegularExpression", r"/foo/\d+", "/foo/4321", 9),  # a regex scores the whole path
    ("RegularExpression", r"/foo/\d+", "/foo/4/bar", None),
    ("RegularExpression", r"/foo/\d+", "/bar/foo/4", None),
])
def test_path_match_lengths(kind: str, value: str, path: str, expected: int | None) -> None:
    ok, length = path_match_length({"path": {"type": kind, "value": value}}, path)
    assert (length if ok else None) == expected


def test_host_match_scores() -> None:
    assert host_match("api.example.com", "API.example.com.") == (2, 15)
    assert host_match("*.example.com", "api.example.com") == (1, 12)
    assert host_match("*.example.com", "example.com") is None
    assert host_match("api.example.com", "web.example.com") is None


def _server(proto: str = "unknown") -> dict[str, Any]:
    return {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server",
            "metadata": {"name": "srv", "namespace": "ns"},
            "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "port": 80,
                     "proxyProtocol": proto}}


def _route(name: str, *matches: dict[str, Any], ts: str | None = None,
           hostnames: list[str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns"}
    if ts:
        meta["creationTimestamp"] = ts
    spec: dict[str, Any] = {"parentRefs": [{"group": "policy.linkerd.io", "kind": "Server",
                                            "name": "srv"}],
                            "rules": [{"matches": list(matches)}]}
    if hostnames:
        spec["hostnames"] = hostnames
    return {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "HTTPRoute", "metadata": meta,
            "spec": spec}


def _open(target_kind: str, target: str, group: str = "policy.linkerd.io"
          ) -> list[dict[str, Any]]:
    """An AuthorizationPolicy admitting any address to ``target``."""
    name = f"open-{target}"
    return [{"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "NetworkAuthentication",
             "metadata": {"name": name, "namespace": "ns"},
             "spec": {"networks": [{"cidr": "0.0.0.0/0"}]}},
            {"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "AuthorizationPolicy",
             "metadata": {"name": name, "namespace": "ns"},
             "spec": {"targetRef": {"group": group, "kind": target_kind, "name": target},
                      "requiredAuthenticationRefs": [{"group": "policy.linkerd.io",
                                                      "kind": "NetworkAuthentication",
                                                      "name": name}]}}]


def _req(method: str = "GET", path: str = "/foo", host: str | None = None,
         protocol: str = "http") -> LinkerdRequest:
    return LinkerdRequest("ns", {"app": "a"}, 80, protocol=protocol, method=method, path=path,
                          client_ip="10.0.0.1", host=host)


def _prefix(value: str, **extra: Any) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": value}, **extra}


def _exact(value: str, **extra: Any) -> dict[str, Any]:
    return {"path": {"type": "Exact", "value": value}, **extra}


def test_exact_and_prefix_of_equal_length_tie_and_the_route_order_decides() -> None:
    # Exact /foo and PathPrefix /foo/ both score 4 for GET /foo: no "Exact first"; the older
    # route wins, without timestamps the name decides.
    docs = [_server(), _route("b-exact", _exact("/foo")), _route("a-prefix", _prefix("/foo/")),
            *_open("HTTPRoute", "b-exact")]
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo"))
    assert (d.route, d.verdict) == ("HTTPRoute ns/a-prefix", "deny")
    docs[1]["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo"))
    assert (d.route, d.verdict) == ("HTTPRoute ns/b-exact", "allow")


def test_trimmed_prefix_length_not_the_written_one() -> None:
    # PathPrefix /foo/ scores 4, like /foo: a method decides between them, not the "/".
    docs = [_server(), _route("slash", _prefix("/foo/")),
            _route("method", _prefix("/foo", method="GET")), *_open("HTTPRoute", "method")]
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/x"))
    assert (d.route, d.verdict) == ("HTTPRoute ns/method", "allow")


def test_regex_scores_the_whole_path() -> None:
    docs = [_server(), _route("prefix", _prefix("/foo/")),
            _route("regex", {"path": {"type": "RegularExpression", "value": r"/foo/\d+"}}),
            *_open("HTTPRoute", "regex")]
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/12")).route == \
        "HTTPRoute ns/regex"
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/x")).route == \
        "HTTPRoute ns/prefix"


def test_headers_outrank_a_method() -> None:
    # (path length, headers, query, method): a header match beats a method match on the same
    # path; the log has no headers, so which route is taken cannot be told.
    docs = [_server(), _route("method", _prefix("/foo", method="GET")),
            _route("header", _prefix("/foo", headers=[{"name": "x", "value": "1"}])),
            *_open("HTTPRoute", "method")]
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo")).verdict == "unknown"
    # ... but a longer path match wins outright whatever the headers say
    docs.append(_route("longer", _prefix("/foo/bar")))
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/bar"))
    assert (d.route, d.verdict) == ("HTTPRoute ns/longer", "deny")


def test_host_match_comes_before_the_path() -> None:
    docs = [_server(), _route("path", _prefix("/foo/bar")),
            _route("host", _prefix("/"), hostnames=["*.example.com"]), *_open("HTTPRoute", "host")]
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/bar", host="api.example.com:80"))
    assert (d.route, d.verdict) == ("HTTPRoute ns/host", "allow")
    d = evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/bar", host="other.test"))
    assert d.route == "HTTPRoute ns/path"
    # no host in the evidence: the host route may or may not apply
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(path="/foo/bar")).verdict == "unknown"


def test_methods_compare_as_written() -> None:
    docs = [_server(), _route("get", _prefix("/", method="GET")), *_open("HTTPRoute", "get")]
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(method="GET")).allowed
    assert evaluate_linkerd(LinkerdPolicies(docs), _req(method="get")).verdict == "deny"


def test_authorization_target_group_must_be_the_routes() -> None:
    docs = [_server(), _route("r", _prefix("/")),
            *_open("HTTPRoute", "r", group="gateway.networking.k8s.io")]
    assert evaluate_linkerd(LinkerdPolicies(docs), _req()).verdict == "deny"


def test_grpc_and_opaque_servers_take_no_httproutes() -> None:
    # gRPC Servers only have GRPCRoutes (none here: the default route); opaque ones route
    # nothing: Server-level authorizations decide either way.
    for proto in ("gRPC", "opaque"):
        docs = [_server(proto), _route("r", _prefix("/")), *_open("HTTPRoute", "r")]
        d = evaluate_linkerd(LinkerdPolicies(docs), _req(protocol="grpc"))
        assert (d.verdict, d.route) == ("deny", "default" if proto == "gRPC" else None)
        docs += _open("Server", "srv")
        assert evaluate_linkerd(LinkerdPolicies(docs), _req(protocol="grpc")).allowed
