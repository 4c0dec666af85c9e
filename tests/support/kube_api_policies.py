"""The policy endpoints ``meshwright check --from-cluster`` lists, served by the same
:class:`support.kube_api.FakeApiServer` (which answers 404 for any other path)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from support import kube_api

#: list endpoint -> list kind, for the policy resources of ``observe.kube.POLICY_RESOURCES``.
POLICY_PATHS = {
    "/apis/security.istio.io/v1/authorizationpolicies": "AuthorizationPolicyList",
    "/apis/security.istio.io/v1/peerauthentications": "PeerAuthenticationList",
    "/apis/policy.linkerd.io/v1beta3/servers": "ServerList",
    "/apis/policy.linkerd.io/v1beta1/serverauthorizations": "ServerAuthorizationList",
    "/apis/policy.linkerd.io/v1alpha1/authorizationpolicies": "AuthorizationPolicyList",
    "/apis/policy.linkerd.io/v1alpha1/meshtlsauthentications": "MeshTLSAuthenticationList",
    "/apis/policy.linkerd.io/v1alpha1/networkauthentications": "NetworkAuthenticationList",
    "/apis/policy.linkerd.io/v1beta3/httproutes": "HTTPRouteList",
    "/apis/gateway.networking.k8s.io/v1/httproutes": "HTTPRouteList",
    "/apis/networking.k8s.io/v1/networkpolicies": "NetworkPolicyList",
}


@contextmanager
def policy_server(objects: dict[str, list[dict[str, Any]]],
                  served: set[str] | None = None) -> Iterator[kube_api.FakeApiServer]:
    """A running fake API server for ``objects`` (endpoint -> objects) that also serves the
    policy endpoints in ``served`` (default: all); the others answer 404 like a CRD that is not
    installed. The support module's endpoint table is restored afterwards."""
    saved = dict(kube_api.PATHS)
    kube_api.PATHS.update({p: k for p, k in POLICY_PATHS.items()
                           if served is None or p in served})
    try:
        with kube_api.FakeApiServer(objects) as server:
            yield server
    finally:
        kube_api.PATHS.clear()
        kube_api.PATHS.update(saved)
