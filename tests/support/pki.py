"""A throw-away PKI for TLS tests, made with the ``openssl`` command (.ci/run installs it):
nothing here is used outside the tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ext]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {cn}
[ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {san}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
#: Server certificates :func:`make_pki` makes: name -> (serial, subjectAltName); all signed by
#: the CA ``ca``.
SERVERS = {"server": ("1001", "DNS:localhost,IP:127.0.0.1"),
           "server2": ("1002", "DNS:localhost,IP:127.0.0.1"),
           "wrong-name": ("1003", "DNS:wrong.example")}


def make_pki(root: Path) -> Path:
    """With the ``openssl`` command: two CAs (``ca.pem``, ``other-ca.pem``) and the
    :data:`SERVERS` (``<name>.pem`` + ``<name>.key``, EC P-256), each checked with
    ``openssl verify -x509_strict`` against ``ca.pem``; returns ``root``."""
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is needed (.ci/run installs it)"

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], cwd=root, capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr

    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other-ca"):
        (root / f"{ca}.cnf").write_text(_CA_CONFIG.format(cn=f"meshwright test {ca}"))
        run("req", "-x509", "-config", f"{ca}.cnf", "-extensions", "ext", *newkey,
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "30", "-set_serial", "1")
    for name, (serial, san) in SERVERS.items():
        (root / f"{name}.cnf").write_text(_LEAF_CONFIG.format(cn=name, san=san))
        run("req", "-new", "-config", f"{name}.cnf", *newkey, "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", f"0x{serial}", "-days", "30", "-extfile", f"{name}.cnf",
            "-extensions", "ext", "-out", f"{name}.pem")
        run("verify", "-x509_strict", "-CAfile", "ca.pem", f"{name}.pem")
    return root
