"""deploy/: valid Kubernetes objects, with the privileges they claim; the eBPF DaemonSet ships
to the observer's Service over TLS, verifying its certificate, with a token only the observer
accepts; the TLS recipes of deploy/README.md (run with the ``openssl`` command) and the
cert-manager example make what the manifests mount.

kubeconform is not installable here (no registry ships it), so each object is checked
against the Kubernetes API's own types as the official Python client generates them from the
API's OpenAPI document: every key must be a field of its type (recursively, the strict check
kubeconform's ``-strict`` does), values must have the field's type, and the client's model
constructors must accept it (they reject missing required fields).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes.client as k8s
import pytest
import yaml

from meshwright.cli import build_parser
from meshwright.ingest import AUDIENCE, DEFAULT_ALLOW, INGEST_PATH, ServerTLS
from observe.ship import DEFAULT_TOKEN_FILE, client_context, plaintext_host

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFEST = DEPLOY / "ebpf-daemonset.yaml"
TYPES = {("v1", "Namespace"): "V1Namespace", ("v1", "ServiceAccount"): "V1ServiceAccount",
         ("apps/v1", "DaemonSet"): "V1DaemonSet", ("apps/v1", "Deployment"): "V1Deployment",
         ("v1", "Service"): "V1Service",
         ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
         ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
         ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding"}


def strict(value: Any, type_name: str, where: str) -> list[str]:
    """Problems of ``value`` as an instance of the client's ``type_name``."""
    # The client spells containers 'list[T]'/'dict(str, T)' or 'List[T]'/'Dict[str, T]'.
    if type_name.lower().startswith("list["):
        if not isinstance(value, list):
            return [f"{where}: expected a list"]
        return [p for i, v in enumerate(value) for p in strict(v, type_name[5:-1], f"{where}[{i}]")]
    if type_name.lower().startswith(("dict(", "dict[")):
        inner = type_name[type_name.index(",") + 1:-1].strip()
        if not isinstance(value, dict):
            return [f"{where}: expected a map"]
        return [p for k, v in value.items() for p in strict(v, inner, f"{where}.{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (
            type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{where}: expected {type_name}, got {value!r}"]
    if type_name in ("object", "datetime"):
        return []
    cls = getattr(k8s, type_name)
    if not isinstance(value, dict):
        return [f"{where}: expected a {type_name} object"]
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    problems = [f"{where}.{k}: not a field of {type_name}" for k in value if k not in fields]
    for key, val in value.items():
        if key in fields:
            problems += strict(val, cls.openapi_types[fields[key]], f"{where}.{key}")
    return problems


def documents() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")) if d]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_objects_are_valid_kubernetes_types(doc: dict[str, Any]) -> None:
    type_name = TYPES[(doc["apiVersion"], doc["kind"])]
    assert strict(doc, type_name, doc["kind"]) == []
    # The generated constructors raise on missing required fields.
    k8s.ApiClient()._ApiClient__deserialize(doc, type_name)  # type: ignore[attr-defined]


def test_a_typo_is_caught() -> None:
    (ds,) = [d for d in documents() if d["kind"] == "DaemonSet"]
    ds["spec"]["template"]["spec"]["hostPid"] = True
    assert strict(ds, "V1DaemonSet", "ds") == ["ds.spec.template.spec.hostPid: not a field of "
                                               "V1PodSpec"]


def test_privileges_are_the_documented_minimum() -> None:
    (ds,) = [d for d in documents() if d["kind"] == "DaemonSet"]
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    assert pod["automountServiceAccountToken"] is False
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == {"BPF", "PERFMON", "SYS_RESOURCE"}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/sys/kernel/tracing", "/sys/kernel/btf", "/host/sys/fs/cgroup"):
        assert mounts[path]["readOnly"] is True
    assert c["command"] == ["meshwright"] and c["args"][:2] == ["observe", "--ebpf"]
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["MESHWRIGHT_CGROUP_ROOT"]["value"] == "/host/sys/fs/cgroup"


# -- the whole kustomization ---------------------------------------------------------------------
def kustomized() -> list[dict[str, Any]]:
    """What ``kubectl kustomize deploy/`` makes of deploy/kustomization.yaml (its resources
    with the namespace and labels set; the fields it uses are all this does)."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    out: list[dict[str, Any]] = []
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((DEPLOY / name).read_text(encoding="utf-8")):
            if not doc:
                continue
            meta = doc["metadata"]
            if doc["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                meta["namespace"] = kust["namespace"]
            for pairs in kust.get("labels", []):
                meta.setdefault("labels", {}).update(pairs["pairs"])
            out.append(doc)
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("doc", kustomized(),
                         ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_installed_object_is_a_valid_kubernetes_type(doc: dict[str, Any]) -> None:
    type_name = TYPES[(doc["apiVersion"], doc["kind"])]
    assert strict(doc, type_name, doc["kind"]) == []
    k8s.ApiClient()._ApiClient__deserialize(doc, type_name)  # type: ignore[attr-defined]


def test_one_kustomization_installs_observer_and_daemonset_once_each() -> None:
    docs = kustomized()
    ids = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(ids) == len(set(ids))  # kustomize refuses duplicates (one Namespace)
    assert ("DaemonSet", "meshwright-ebpf") in ids and ("Deployment", "meshwright-observer") in ids
    assert ("ServiceAccount", "meshwright-ebpf") in ids


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_agrees() -> None:
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True,
                          check=True, timeout=120)
    theirs = [d for d in yaml.safe_load_all(done.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, theirs)) == sorted(map(key, kustomized()))
    for d in theirs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "meshwright"


def test_the_daemonset_ships_to_the_observer_with_a_token_only_it_accepts() -> None:
    docs = kustomized()
    ds = by_kind(docs, "DaemonSet")["meshwright-ebpf"]
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in c["args"] if "=" in a)
    # --send names the observer's Service, its port and the ingest path.
    url = urlsplit(args["send"])
    svc = by_kind(docs, "Service")["meshwright-observer"]
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert (url.scheme, url.hostname, url.path) == ("https", host, INGEST_PATH)
    assert url.port in [p["port"] for p in svc["spec"]["ports"]]
    observer = by_kind(docs, "Deployment")["meshwright-observer"]["spec"]["template"]["spec"]
    (oc,) = observer["containers"]
    assert f"--listen=:{url.port}" in oc["args"]
    # The token: projected, audience meshwright, short-lived, where --token-file reads it.
    assert pod["serviceAccountName"] == "meshwright-ebpf"
    assert pod["automountServiceAccountToken"] is False
    assert by_kind(docs, "ServiceAccount")["meshwright-ebpf"]["automountServiceAccountToken"] \
        is False
    (projected,) = [v for v in pod["volumes"] if "projected" in v]
    (source,) = projected["projected"]["sources"]
    token = source["serviceAccountToken"]
    assert token["audience"] == AUDIENCE and 600 <= token["expirationSeconds"] <= 3600
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == projected["name"]]
    assert mount["readOnly"] is True
    assert args["token-file"] == f"{mount['mountPath']}/{token['path']}" == DEFAULT_TOKEN_FILE
    # The observer's default --ingest-allow is this service account.
    sa = f"system:serviceaccount:{ds['metadata']['namespace']}:{pod['serviceAccountName']}"
    assert (sa,) == DEFAULT_ALLOW
    # The spool on the node, so a restarted pod sends what was left.
    (spool,) = [v for v in pod["volumes"] if v["name"] == "spool"]
    (smount,) = [m for m in c["volumeMounts"] if m["name"] == "spool"]
    assert smount["mountPath"] == args["spool"] == spool["hostPath"]["path"]
    assert pod["terminationGracePeriodSeconds"] >= 25  # a 20 s drain fits


def test_rbac_is_read_only_plus_tokenreviews_and_nothing_for_the_daemonset() -> None:
    docs = kustomized()
    (role,) = by_kind(docs, "ClusterRole").values()
    writes = [(r["apiGroups"], r["resources"], v) for r in role["rules"] for v in r["verbs"]
              if v not in ("get", "list", "watch")]
    assert writes == [(["authentication.k8s.io"], ["tokenreviews"], "create")]
    subjects = [s for b in by_kind(docs, "ClusterRoleBinding").values() for s in b["subjects"]]
    assert {s["name"] for s in subjects} == {"meshwright-observer"}
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


# -- TLS -----------------------------------------------------------------------------------------
def args_of(container: dict[str, Any]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in container["args"] if "=" in a)


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str
                 ) -> tuple[dict[str, Any], str]:
    """The volume a file path of the container lies in, and the volume's key it shows."""
    (mount,) = [m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    assert mount.get("readOnly") is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    rel = path.removeprefix(mount["mountPath"] + "/")
    source = volume.get("secret") or volume.get("configMap") or {}
    keys = [i["key"] for i in source.get("items", []) if i["path"] == rel]
    return volume, keys[0] if keys else rel


def test_the_nodes_verify_the_observer_and_only_the_observer_holds_the_key() -> None:
    docs = kustomized()
    ds = by_kind(docs, "DaemonSet")["meshwright-ebpf"]["spec"]["template"]["spec"]
    obs_pod = by_kind(docs, "Deployment")["meshwright-observer"]["spec"]["template"]
    observer = obs_pod["spec"]
    (node,) = ds["containers"]
    (oc,) = observer["containers"]
    # Both commands accept these arguments (the same parser as the image's meshwright).
    parser = build_parser()
    for container in (node, oc):
        parser.parse_args(container["args"])
    nargs, oargs = args_of(node), args_of(oc)
    assert plaintext_host(nargs["send"]) is None and "insecure-http" not in node["args"]
    # The node: the CA from the ConfigMap, no Secret at all (the observer's key stays off the
    # nodes: a pod referencing a Secret lets its node read all of it).
    volume, key = mounted_file(ds, node, nargs["ca-file"])
    assert volume["configMap"]["name"] == "meshwright-observer-ca" and key == "ca.crt"
    assert not [v for v in ds["volumes"] if "secret" in v]
    # The observer: the certificate and key from the kubernetes.io/tls Secret, readable by
    # its group (the fsGroup) only.
    for flag, wanted in (("tls-cert", "tls.crt"), ("tls-key", "tls.key")):
        volume, key = mounted_file(observer, oc, oargs[flag])
        assert volume["secret"]["secretName"] == "meshwright-observer-tls" and key == wanted
        assert volume["secret"]["defaultMode"] == 0o440
    assert observer["securityContext"]["fsGroup"] == 65532
    # Everything on --listen is HTTPS now: the probes and the scrape say so.
    for probe in ("readinessProbe", "livenessProbe"):
        assert oc[probe]["httpGet"]["scheme"] == "HTTPS"
    assert obs_pod["metadata"]["annotations"]["prometheus.io/scheme"] == "https"
    (port,) = by_kind(docs, "Service")["meshwright-observer"]["spec"]["ports"]
    assert port["appProtocol"] == "https"


def readme_blocks() -> list[str]:
    """The shell blocks of deploy/README.md marked as tested, in order."""
    text = (DEPLOY / "README.md").read_text(encoding="utf-8")
    return re.findall(r"<!-- tested: [^>]*-->\n```sh\n(.*?)```", text, re.S)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's openssl recipe, run as it stands."""
    assert shutil.which("openssl") is not None, "the openssl command is needed (.ci/run)"
    root = tmp_path_factory.mktemp("recipe")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_blocks()[0]], cwd=root,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "tls.crt: OK"
    return root


def handshake(root: Path, hostname: str) -> dict[str, Any]:
    """A TLS handshake between the observer's listener with the recipe's certificate and a
    node verifying it with the recipe's CA for ``hostname``; the certificate it got."""
    server, client = socket.socketpair()
    tls = ServerTLS(root / "tls.crt", root / "tls.key")
    threading.Thread(target=tls.handshake, args=(server, "node"), daemon=True).start()
    try:
        with client_context(root / "ca.crt").wrap_socket(client,
                                                         server_hostname=hostname) as conn:
            cert = conn.getpeercert()
            assert cert is not None
            return cert
    finally:
        client.close()


def test_the_openssl_recipe_makes_a_certificate_the_nodes_accept(recipe: Path) -> None:
    docs = kustomized()
    (node,) = by_kind(docs, "DaemonSet")["meshwright-ebpf"]["spec"]["template"]["spec"][
        "containers"]
    host = urlsplit(args_of(node)["send"]).hostname
    assert host is not None
    cert = handshake(recipe, host)
    assert ("DNS", host) in cert["subjectAltName"]
    # Another name is refused: the node checks the name, not only the CA.
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        handshake(recipe, "meshwright-observer.default.svc")
    # The CA is a CA, the certificate is not.
    text = subprocess.run(["openssl", "x509", "-in", str(recipe / "tls.crt"), "-noout",
                           "-text"], capture_output=True, text=True, check=True).stdout
    assert "CA:FALSE" in text and "TLS Web Server Authentication" in text


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_the_kubectl_recipe_makes_what_the_manifests_mount(recipe: Path) -> None:
    made: dict[tuple[str, str], dict[str, Any]] = {}
    for command in readme_blocks()[1].replace("\\\n", " ").splitlines():
        if not command.strip():
            continue
        assert command.startswith("kubectl -n meshwright create ")
        done = subprocess.run(f"{command} --dry-run=client -o yaml", shell=True, cwd=recipe,
                              capture_output=True, text=True, timeout=60, check=False,
                              env={"PATH": os.environ.get("PATH", ""), "HOME": str(recipe)})
        assert done.returncode == 0, done.stderr
        obj = yaml.safe_load(done.stdout)
        made[(obj["kind"], obj["metadata"]["name"])] = obj
    secret = made[("Secret", "meshwright-observer-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    assert {"tls.crt", "tls.key", "ca.crt"} <= set(secret["data"])
    assert "ca.crt" in made[("ConfigMap", "meshwright-observer-ca")]["data"]
    assert {n for _, n in made} == {"meshwright-observer-tls", "meshwright-observer-ca"}


def test_the_cert_manager_example_issues_the_secret_the_observer_mounts() -> None:
    path = DEPLOY / "cert-manager-tls.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text(encoding="utf-8"))
    assert path.name not in kust["resources"]  # an example: cert-manager may not be there
    assert {d["apiVersion"] for d in docs} == {"cert-manager.io/v1"}
    assert {d["metadata"]["namespace"] for d in docs} == {"meshwright"}
    issuers = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Issuer"}
    certs = {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}
    for spec in certs.values():
        assert spec["issuerRef"]["kind"] == "Issuer" and spec["issuerRef"]["name"] in issuers
    # The chain: a self-signed issuer signs the CA, whose Secret the CA issuer signs with.
    ca_issuer = issuers[certs["meshwright-observer-tls"]["issuerRef"]["name"]]
    ca = certs[ca_issuer["ca"]["secretName"]]
    assert ca["isCA"] is True and "selfSigned" in issuers[ca["issuerRef"]["name"]]
    # The observer's: the Secret observer.yaml mounts, the name the nodes send to.
    observer = by_kind(kustomized(), "Deployment")["meshwright-observer"]["spec"]["template"]
    (volume,) = [v for v in observer["spec"]["volumes"] if "secret" in v]
    leaf = certs[volume["secret"]["secretName"]]
    (node,) = by_kind(kustomized(), "DaemonSet")["meshwright-ebpf"]["spec"]["template"][
        "spec"]["containers"]
    assert urlsplit(args_of(node)["send"]).hostname in leaf["dnsNames"]
    assert "server auth" in leaf["usages"] and not leaf.get("isCA")
    assert leaf["privateKey"]["rotationPolicy"] == "Always"
