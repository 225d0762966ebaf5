"""Issue 30.2: HTTPS on both listeners (`listen_tls:`, `admin.listen_tls:`), with rustls.

The test makes its own certificate authority and server certificates (`cryptography`),
and the official Python SDK talks to Tollgate over https, trusting only that CA. A
certificate replaced on disk is served to the next connection without a restart (the
policy watcher's reload); one that cannot be used is refused, reported as a bad policy
reload is (log, `/status`, `POST /reload`), and the old one stays in force.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import socket
import ssl
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import Proc, TOLLGATE, start_upstream, wait_until

POLICY = "version: 1\ndefault: deny\nrules:\n  - tool: echo\n    action: allow\n"
TOKEN = "tls-test-admin-token-0123456789"


class Authority:
    """A certificate authority of the test's own."""

    def __init__(self, name: str):
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str) -> tuple[bytes, bytes, bytes]:
        """A server certificate for 127.0.0.1 and localhost: (chain PEM, key PEM, DER)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.pem
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return chain, key_pem, cert.public_bytes(serialization.Encoding.DER)


def replace(path: Path, data: bytes) -> None:
    """Writes a file as deployment tools do: a new file renamed over the old one."""
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def context(ca: Authority) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca.pem.decode())
    return ctx


def served_certificate(port: int) -> bytes:
    """The DER certificate a new connection to `port` is given (not verified)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


@pytest.fixture
def tls_tollgate(procs, tmp_path):
    ca = Authority("Tollgate test CA")
    chain, key, der = ca.issue("tollgate first")
    for name, data in (("proxy.crt", chain), ("proxy.key", key), ("admin.crt", chain), ("admin.key", key)):
        (tmp_path / name).write_bytes(data)
    upstream = start_upstream(procs, tmp_path)
    (tmp_path / "p.yaml").write_text(POLICY)
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\n"
        "listen_tls: {cert: proxy.crt, key: proxy.key}\n"
        f"admin: {{listen: 127.0.0.1:0, token: {TOKEN}, listen_tls: {{cert: admin.crt, key: admin.key}}}}\n"
        f"servers:\n  s:\n    url: {upstream.url}\n    policy: p.yaml\n"
    )
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / "tollgate.log")
    procs.append(proc)
    url = proc.wait_line(r"Tollgate listening on (https://127\.0\.0\.1:\d+/mcp)").group(1)
    admin = proc.wait_line(r"Tollgate admin on (https://127\.0\.0\.1:\d+)/").group(1)
    return {"ca": ca, "der": der, "url": url, "admin": admin, "dir": tmp_path, "proc": proc, "upstream": upstream}


async def echo_over_https(url: str, ca: Authority, text: str) -> str:
    http = httpx2.AsyncClient(verify=context(ca))
    with anyio.fail_after(60):
        async with Client(streamable_http_client(url, http_client=http)) as client:
            result = await client.call_tool("echo", {"text": text})
    assert result.is_error is False, result
    return result.content[0].text


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


@pytest.mark.anyio
async def test_the_sdk_talks_to_tollgate_over_https_and_sees_a_rotated_certificate(tls_tollgate):
    t = tls_tollgate
    ca, url, port = t["ca"], t["url"], port_of(t["url"])
    assert served_certificate(port) == t["der"]
    assert "echo: over tls" in await echo_over_https(url, ca, "over tls")
    # Plain HTTP on the TLS port gets no MCP answer.
    with httpx.Client(timeout=10) as http:
        with pytest.raises(httpx.HTTPError):
            http.post(url.replace("https://", "http://"), json={})

    # A new certificate, from a new CA, renamed over the old files: the next connection
    # gets it, with no restart.
    rotated_ca = Authority("Tollgate rotated CA")
    chain, key, der = rotated_ca.issue("tollgate rotated")
    replace(t["dir"] / "proxy.key", key)
    replace(t["dir"] / "proxy.crt", chain)
    wait_until(lambda: served_certificate(port) == der, 20, "the rotated certificate to be served")
    assert "echo: after rotation" in await echo_over_https(url, rotated_ca, "after rotation")
    # ... and a client that trusts only the old CA no longer connects.
    with pytest.raises(Exception):
        await echo_over_https(url, ca, "old ca")

    with httpx.Client(verify=context(ca), timeout=10) as http:
        status = http.get(f"{t['admin']}/status", headers={"authorization": f"Bearer {TOKEN}"}).json()
    tls = status["tls"]["listen"]
    assert tls["fingerprint"] == "sha256:" + hashlib.sha256(der).hexdigest(), tls
    assert tls["last_error"] is None
    assert "TLS certificate reloaded" in t["proc"].log.read_text()


def test_a_bad_new_certificate_keeps_the_old_one_and_is_reported(tls_tollgate):
    t = tls_tollgate
    ca, port = t["ca"], port_of(t["url"])
    # A key that does not belong to the certificate, then a file that is not PEM.
    other_chain, _, _ = Authority("someone else").issue("mismatch")
    replace(t["dir"] / "proxy.crt", other_chain)
    admin = httpx.Client(base_url=t["admin"], verify=context(ca), timeout=10,
                         headers={"authorization": f"Bearer {TOKEN}"})
    with admin:
        wait_until(lambda: admin.get("/status").json()["tls"]["listen"]["last_error"] is not None, 20,
                   "the bad certificate to be refused")
        error = admin.get("/status").json()["tls"]["listen"]["last_error"]
        assert "do not make a usable certificate" in error, error
        assert served_certificate(port) == t["der"], "the old certificate stays in force"
        log = t["proc"].log.read_text()
        assert "TLS certificate reload refused; the previous certificate stays in force" in log, log

        replace(t["dir"] / "proxy.crt", b"not a certificate\n")
        reload = admin.post("/reload")
        assert reload.status_code == 422, reload.text
        report = [r for r in reload.json()["reloads"] if r["file"] == "listen_tls"]
        assert report == [{"server": "listen", "file": "listen_tls", "result": "failed", "error": report[0]["error"]},
                          {"server": "admin.listen", "file": "listen_tls", "result": "unchanged"}], report
        assert "holds no certificate" in report[0]["error"], report
        assert served_certificate(port) == t["der"]
        metrics = admin.get("/metrics").text
        assert 'tollgate_policy_reloads_total{server="listen",result="failed"}' in metrics
        # The admin listener's own certificate was never touched, and is served over https.
        assert admin.get("/healthz").status_code == 200


def test_a_certificate_that_cannot_be_loaded_stops_the_start(tmp_path):
    import subprocess
    (tmp_path / "p.yaml").write_text(POLICY)
    (tmp_path / "bad.crt").write_text("garbage\n")
    (tmp_path / "bad.key").write_text("garbage\n")
    config = tmp_path / "t.yaml"
    config.write_text("listen: 127.0.0.1:0\nlisten_tls: {cert: bad.crt, key: missing.key}\n"
                      "servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    out = subprocess.run([TOLLGATE, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert "missing.key: cannot read the key" in out.stderr, out.stderr
    # `tollgate validate` refuses what `serve` refuses.
    out = subprocess.run([TOLLGATE, "validate", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert "listen_tls: " in out.stderr and "missing.key: cannot read the key" in out.stderr, out.stderr
    config.write_text("listen: 127.0.0.1:0\nlisten_tls: {cert: bad.crt, key: bad.key}\n"
                      "servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    out = subprocess.run([TOLLGATE, "validate", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "bad.crt: holds no certificate" in out.stderr, out


def test_a_proxy_protocol_header_comes_before_the_tls_handshake(procs, tmp_path):
    """A TCP balancer in front of HTTPS: its PROXY header, then the client's TLS."""
    import json
    import struct
    ca = Authority("Tollgate test CA")
    chain, key, _ = ca.issue("tollgate")
    (tmp_path / "t.crt").write_bytes(chain)
    (tmp_path / "t.key").write_bytes(key)
    (tmp_path / "p.yaml").write_text(POLICY)
    audit = tmp_path / "audit.jsonl"
    upstream = start_upstream(procs, tmp_path)
    config = tmp_path / "tollgate.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nlisten_tls: {cert: t.crt, key: t.key}\n"
        "trusted_proxies: [127.0.0.1]\nproxy_protocol: true\n"
        f"audit: {{path: '{audit}'}}\n"
        f"servers:\n  s:\n    url: {upstream.url}\n    policy: p.yaml\n"
    )
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / "tollgate.log")
    procs.append(proc)
    port = port_of(proc.wait_line(r"Tollgate listening on (https://127\.0\.0\.1:\d+/mcp)").group(1))
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": {"name": "echo", "arguments": {"text": "pp"},
                                  "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                            "io.modelcontextprotocol/clientCapabilities": {}}}}).encode()
    request = (b"POST /mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
               b"accept: application/json, text/event-stream\r\nmcp-protocol-version: 2026-07-28\r\n"
               b"mcp-method: tools/call\r\nmcp-name: echo\r\nconnection: close\r\n"
               + f"content-length: {len(body)}\r\n\r\n".encode() + body)
    addresses = socket.inet_aton("198.51.100.4") + socket.inet_aton("127.0.0.1") + struct.pack("!HH", 4711, port)
    header = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(addresses)) + addresses
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(header)
        with context(ca).wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(request)
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"echo: pp" in answer, answer
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["client_address"] for r in records if r["event"] == "decision"] == ["198.51.100.4"]
