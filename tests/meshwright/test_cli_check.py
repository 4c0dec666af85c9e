"""`meshwright check`: exit codes, the JSON document, and policies read from a (fake) live API
server through observe.kube.load_live_policies."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.kube_api import _kubeconfig
from support.kube_api_policies import policy_server

from meshwright.cli import EXIT_BREAKAGE, EXIT_INPUT, EXIT_OK, EXIT_USAGE, main
from observe.errors import InventoryError
from observe.kube import load_live_policies

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "samples" / "bookinfo"
DOCS = ROOT / "tests" / "data" / "policies" / "istio-docs-bookinfo-authz-http.yaml"


@pytest.fixture(scope="module")
def dump(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli-check")
    shutil.copytree(SAMPLE / "logs", base / "logs")
    shutil.copy(SAMPLE / "inventory.json", base / "inventory.json")
    return base


def _docs_in_bookinfo() -> list[dict[str, Any]]:
    out = []
    for doc in yaml.safe_load_all(DOCS.read_text("utf-8")):
        if doc:
            doc = copy.deepcopy(doc)
            doc["metadata"]["namespace"] = "bookinfo"
            out.append(json.loads(json.dumps(doc).replace("/ns/default/", "/ns/bookinfo/")))
    return out


def test_own_policies_pass_and_docs_set_breaks(dump: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["analyze", str(dump / "logs"), "--inventory", str(dump / "inventory.json"),
                 "-o", str(out), "-q"]) == EXIT_OK
    capsys.readouterr()
    report = tmp_path / "ok.json"
    code = main(["check", "--policies", str(out / "policies"), str(dump / "logs"),
                 "--inventory", str(dump / "inventory.json"), "--json", str(report), "-q"])
    assert code == EXIT_OK
    assert "**Breakage: 0**" in capsys.readouterr().out
    assert json.loads(report.read_text("utf-8"))["summary"]["breakage"] == 0
    # one undecidable observation (mTLS state not logged): --fail-on-unknown makes it fail
    assert main(["check", "--policies", str(out / "policies"), str(dump / "logs"),
                 "--inventory", str(dump / "inventory.json"), "-q", "--fail-on-unknown",
                 "--report", str(tmp_path / "r.md")]) == EXIT_BREAKAGE

    docs = tmp_path / "docs.yaml"
    docs.write_text(yaml.safe_dump_all(_docs_in_bookinfo()), encoding="utf-8")
    result = tmp_path / "docs.json"
    code = main(["check", "--policies", str(docs), str(dump / "logs"),
                 "--inventory", str(dump / "inventory.json"), "--json", str(result), "-q"])
    assert code == EXIT_BREAKAGE
    broken = {(b["source"], b["destination"], b["method"])
              for b in json.loads(result.read_text("utf-8"))["breakage"]}
    assert broken == {
        ("istio-system/istio-ingressgateway", "bookinfo/productpage-v1", "POST"),
        ("bookinfo/nightly-report", "bookinfo/details-v1", "GET"),
        ("legacy/legacy-client", "bookinfo/ratings-v1", "GET"),
    }


def test_bad_input_and_usage(dump: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: AuthorizationPolicy\nspec: [unclosed\n", encoding="utf-8")
    assert main(["check", "--policies", str(bad), str(dump / "logs"), "-q"]) == EXIT_INPUT
    none = tmp_path / "none.yaml"
    none.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n", encoding="utf-8")
    assert main(["check", "--policies", str(none), str(dump / "logs"), "-q"]) == EXIT_INPUT
    assert main(["check", "--policies", str(tmp_path / "missing"), str(dump / "logs"),
                 "-q"]) == EXIT_INPUT
    assert main(["check", str(dump / "logs"), "-q"]) == EXIT_USAGE


def test_live_policies_from_the_api_server(tmp_path: Path) -> None:
    policies = _docs_in_bookinfo()
    netpol = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "deny", "namespace": "bookinfo"},
              "spec": {"podSelector": {}}}
    namespace = {"metadata": {"name": "bookinfo", "annotations": {
        "config.linkerd.io/default-inbound-policy": "deny"}}}
    objects = {
        "/apis/security.istio.io/v1/authorizationpolicies": policies,
        "/apis/networking.k8s.io/v1/networkpolicies": [netpol],
        "/api/v1/namespaces": [namespace],
    }
    served = {"/apis/security.istio.io/v1/authorizationpolicies",
              "/apis/security.istio.io/v1/peerauthentications",
              "/apis/networking.k8s.io/v1/networkpolicies"}
    with policy_server(objects, served=served) as api:
        found, missing = load_live_policies(kubeconfig=_kubeconfig(tmp_path, api.url))
        listed = {path for path, _, _ in api.requests}
    kinds = sorted((o["apiVersion"], o["kind"], o["metadata"]["name"]) for o, _ in found)
    assert kinds == sorted(
        [("security.istio.io/v1", "AuthorizationPolicy", p["metadata"]["name"])
         for p in policies]
        + [("networking.k8s.io/v1", "NetworkPolicy", "deny"), ("v1", "Namespace", "bookinfo")])
    # the Linkerd and Gateway API CRDs are not installed on this server: skipped, reported
    assert missing == sorted([
        "authorizationpolicies.policy.linkerd.io/v1alpha1",
        "httproutes.gateway.networking.k8s.io/v1", "httproutes.policy.linkerd.io/v1beta3",
        "meshtlsauthentications.policy.linkerd.io/v1alpha1",
        "networkauthentications.policy.linkerd.io/v1alpha1",
        "serverauthorizations.policy.linkerd.io/v1beta1", "servers.policy.linkerd.io/v1beta3"])
    assert "/apis/policy.linkerd.io/v1beta3/servers" in listed
    assert all(origin.startswith(api.url) for _, origin in found)


def test_live_policies_forbidden_is_an_error(tmp_path: Path) -> None:
    path = "/apis/security.istio.io/v1/authorizationpolicies"
    with policy_server({}) as api:
        api.failures[path] = [(403, json.dumps({"kind": "Status", "message": "no"}).encode())]
        with pytest.raises(InventoryError, match="forbidden"):
            load_live_policies(kubeconfig=_kubeconfig(tmp_path, api.url))


def test_check_from_cluster(dump: Path, tmp_path: Path) -> None:
    objects = {"/apis/security.istio.io/v1/authorizationpolicies": _docs_in_bookinfo(),
               "/api/v1/namespaces": []}
    with policy_server(objects) as api:
        kubeconfig = _kubeconfig(tmp_path, api.url)
        result = tmp_path / "live.json"
        code = main(["check", "--from-cluster", "--kubeconfig", kubeconfig, str(dump / "logs"),
                     "--inventory", str(dump / "inventory.json"), "--json", str(result),
                     "-q", "--report", str(tmp_path / "live.md")])
    assert code == EXIT_BREAKAGE
    doc = json.loads(result.read_text("utf-8"))
    assert doc["policies"]["by_kind"] == {"security.istio.io/AuthorizationPolicy": 5}
    assert doc["summary"]["breakage"] >= 3
