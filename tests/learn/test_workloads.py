"""learn/workloads.py: facts read from real inventories (expected values read off the files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learn.workloads import NAMESPACE_NAME_LABEL, cluster_facts
from observe.inventory import Inventory, load_inventory

INV = Path(__file__).parent.parent / "data" / "inventory"
SAMPLE = Path(__file__).parent.parent.parent / "samples" / "bookinfo" / "inventory.json"


def test_bookinfo_manifests_ports_accounts_labels() -> None:
    facts = cluster_facts(load_inventory([INV / "istio-samples-bookinfo.yaml"]))
    details = facts.workloads["default/details-v1"]
    # bookinfo.yaml: `- containerPort: 9080` without a name, serviceAccountName bookinfo-details
    assert [(p.port, p.name, p.protocol, p.container) for p in details.ports] == [
        (9080, None, "TCP", "details")]
    assert details.port_name(9080) is None
    assert details.service_account == "bookinfo-details"
    assert details.labels == {"app": "details", "version": "v1"}
    assert details.probes == () and details.mesh is None
    # manifests carry no Namespace object: the API server's name label is still known
    assert facts.namespace_labels("default") == {NAMESPACE_NAME_LABEL: "default"}
    assert facts.dns is None and "kube-dns" in facts.dns_note


def test_sample_inventory_mesh_and_pod_labels() -> None:
    facts = cluster_facts(load_inventory([SAMPLE]))
    pp = facts.workloads["bookinfo/productpage-v1"]
    assert pp.mesh == "istio" and pp.meshed is True
    # the pods' labels, pod-template-hash left out, Istio's injected labels kept
    assert pp.labels["app"] == "productpage" and "pod-template-hash" not in pp.labels
    assert pp.labels["security.istio.io/tlsMode"] == "istio"
    assert [p.port for p in pp.ports] == [9080]
    assert [p.port for p in pp.proxy_ports] == [15090]
    legacy = facts.workloads["legacy/legacy-client"]
    assert legacy.mesh is None and legacy.meshed is False
    assert legacy.service_account == "default"
    assert facts.namespaces["bookinfo"] == {"istio-injection": "enabled",
                                            NAMESPACE_NAME_LABEL: "bookinfo"}


def test_istio_rewritten_probe_is_mapped_back() -> None:
    # native-sidecar-opt-in.yaml.injected: other-sidecar's readinessProbe was rewritten to
    # /app-health/other-sidecar/readyz on 15020; ISTIO_KUBE_APP_PROBERS holds the original
    # {"httpGet": {"port": 3333}} (path defaults to "/").
    facts = cluster_facts(load_inventory([INV / "istio-kube-inject-native-sidecar.yaml.injected"]))
    hello = facts.workloads["default/hello"]
    assert [(p.kind, p.port, p.path, p.container) for p in hello.probes] == [
        ("readiness", 3333, "/", "other-sidecar")]
    assert hello.http_probe_paths(3333) == ["/"]
    assert hello.http_probe_paths(15020) == []
    assert hello.mesh == "istio"
    # istio-proxy's own probe (/healthz/ready on 15021) is the proxy's, not the app's
    assert all(p.container != "istio-proxy" for p in hello.probes)
    assert hello.port_name(80) == "http"


def test_linkerd_injected_template_names_its_proxy() -> None:
    facts = cluster_facts(load_inventory([INV / "linkerd2-injected-emojivoto-web-deployment"
                                                 ".golden.yml"]))
    web = facts.workloads["emojivoto/web"]
    assert web.mesh == "linkerd" and web.meshed is True
    assert [(p.port, p.name) for p in web.ports] == [(80, "http")]
    assert sorted(p.port for p in web.proxy_ports) == [4143, 4191]
    assert web.port_name(80) == "http"
    assert web.labels["app"] == "web-svc"


def test_dns_found_through_the_service_not_a_label_convention() -> None:
    # The 2018 CoreDNS manifest: Service kube-dns selects k8s-app=coredns (not kube-dns),
    # ports dns 53/UDP and dns-tcp 53/TCP without targetPort.
    facts = cluster_facts(load_inventory([INV / "coredns-deployment-coredns-2018.yaml.sed"]))
    dns = facts.dns
    assert dns is not None, facts.dns_note
    assert (dns.namespace, dns.service) == ("kube-system", "kube-dns")
    assert dns.selector == {"k8s-app": "coredns"}
    assert dns.ports == ((53, "TCP"), (53, "UDP"))
    assert dns.pods == ()  # manifests: no pods dumped
    coredns = facts.workloads["kube-system/coredns"]
    assert coredns.http_probe_paths(8080) == ["/health"]
    assert coredns.port_name(53, "UDP") == "dns" and coredns.port_name(53, "TCP") == "dns-tcp"


def _obj(kind: str, ns: str, name: str, **rest: Any) -> dict[str, Any]:
    return {"kind": kind, "metadata": {"name": name, "namespace": ns, **rest.pop("meta", {})},
            **rest}


def test_dns_pods_labels_and_named_target_port_from_a_dump() -> None:
    inv = Inventory()
    inv.add_object(_obj("Service", "kube-system", "kube-dns",
                        spec={"selector": {"dns": "yes"}, "clusterIP": "10.96.0.10",
                              "ports": [{"name": "dns", "port": 53, "protocol": "UDP",
                                         "targetPort": "dns"},
                                        {"name": "dns-tcp", "port": 53, "protocol": "TCP",
                                         "targetPort": "dns-tcp"}]}))
    spec = {"containers": [{"name": "coredns", "ports": [
        {"name": "dns", "containerPort": 1053, "protocol": "UDP"},
        {"name": "dns-tcp", "containerPort": 1053, "protocol": "TCP"}]}]}
    for i, extra in enumerate(({"tier": "a"}, {"tier": "b"})):
        inv.add_object(_obj("Pod", "kube-system", f"dns-{i}",
                            meta={"labels": {"dns": "yes", "distro": "x", **extra}},
                            spec=spec, status={"podIP": f"10.0.0.{i + 1}"}))
    inv.add_object(_obj("Pod", "kube-system", "other",
                        meta={"labels": {"dns": "no"}}, spec=spec))
    dns = cluster_facts(inv).dns
    assert dns is not None
    assert dns.selector == {"dns": "yes"}
    assert dns.pods == ("kube-system/dns-0", "kube-system/dns-1")
    assert dns.pod_labels == {"dns": "yes", "distro": "x"}
    assert dns.ports == ((1053, "TCP"), (1053, "UDP"))


def test_kube_dns_without_selector_is_reported() -> None:
    inv = Inventory()
    inv.add_object(_obj("Service", "kube-system", "kube-dns",
                        spec={"ports": [{"port": 53, "protocol": "UDP"}]}))
    facts = cluster_facts(inv)
    assert facts.dns is None and "no selector" in facts.dns_note
