"""Issue 30.1: behind a load balancer every client is still its own client.

`trusted_proxies:` names the balancers whose word on the client's address is taken:
their `X-Forwarded-For` (the rightmost hop that is not itself a trusted proxy), or the
PROXY protocol header they start each connection with (`proxy_protocol: true`). The
test plays the balancer: SDK clients send `X-Forwarded-For` as a balancer would add it,
or connect through a small TCP relay of the test's own that starts every connection
with a PROXY v1 or v2 header naming a made-up client. Everything keyed on an address
(per-session windows in the stateless era, `per: client`, `requests_per_second`,
`sessions_per_client`, `connections_per_peer`) then counts the client, every refusal
names what it counted, and audit records carry the client's address. Nobody else's
headers are believed.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import start_tollgate, start_upstream, wait_until

POLICY = """
version: 1
default: deny
rules:
  - tool: echo
    action: allow
    rate_limit: { max: 1, window: 60, per: session }
  - tool: list_fhir_datastores
    action: allow
    rate_limit: { max: 1, window: 60, per: client }
"""

CLIENTS = ["203.0.113.1", "203.0.113.2", "2001:db8:77::5"]


def decision(result) -> dict:
    return (result.meta or {})["dev.tollgate/decision"]


def forwarded_for(url: str, address: str):
    """An SDK transport whose every request says, as a balancer would, whom it forwards."""
    return streamable_http_client(url, http_client=httpx2.AsyncClient(headers={"X-Forwarded-For": address}))


async def two_calls_each(targets: dict[str, object], mode: str = "auto") -> dict[str, list]:
    """For each client: echo twice and list_fhir_datastores twice, each with its own SDK client."""
    results = {}
    for name, target in targets.items():
        with anyio.fail_after(60):
            async with Client(target, mode=mode) as client:
                results[name] = [
                    await client.call_tool("echo", {"text": "1"}),
                    await client.call_tool("echo", {"text": "2"}),
                    await client.call_tool("list_fhir_datastores", {}),
                    await client.call_tool("list_fhir_datastores", {}),
                ]
    return results


def counted(address: str) -> str:
    """What a limit counts an anonymous client by: its address, an IPv6 one by its /64."""
    return "2001:db8:77::/64" if address == "2001:db8:77::5" else address


def assert_own_windows(results: dict[str, list]) -> None:
    """Each client's first calls went through; its second ones were refused, naming
    the client's own address as what was counted."""
    for address, (first, second, listed, relisted) in results.items():
        assert first.is_error is False, (address, first)
        assert listed.is_error is False, (address, listed)
        for refused, per in ((second, "per session"), (relisted, "per client")):
            found = decision(refused)
            assert found["kind"] == "rate_limit", (address, found)
            assert per in found["reason"], found
            assert found["reason"].endswith(f"(counted on address {counted(address)})"), found


def audited_addresses(tg) -> list[str]:
    return [r["client_address"] for r in tg.audit() if r.get("event") == "decision"]


@pytest.mark.anyio
async def test_sdk_clients_behind_a_trusted_proxy_get_their_own_windows(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY, extra="trusted_proxies: [127.0.0.1/32, 10.0.0.0/8]")
    # Each client's requests also went through an inner balancer (10.1.2.3), which is
    # trusted and so skipped; a client cannot choose its address by writing its own
    # first hop (the forged 6.6.6.6 is left of the hop the balancer added).
    targets = {a: forwarded_for(tg.url, f"6.6.6.6, {a}, 10.1.2.3") for a in CLIENTS}
    results = await two_calls_each(targets)
    assert_own_windows(results)
    assert upstream.tools_called() == ["echo", "list_fhir_datastores"] * 3
    # Every decision records the client it was made for.
    addresses = audited_addresses(tg)
    assert addresses == [a for a in CLIENTS for _ in range(4)], addresses


@pytest.mark.anyio
async def test_an_untrusted_peers_forwarded_for_is_ignored(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY, extra="trusted_proxies: [10.0.0.0/8]")
    targets = {a: forwarded_for(tg.url, a) for a in CLIENTS[:2]}
    results = await two_calls_each(targets)
    # Both are the peer they are, 127.0.0.1, and share its windows.
    first, second = results.values()
    assert first[0].is_error is False
    assert decision(first[1])["reason"].endswith("(counted on address 127.0.0.1)"), decision(first[1])
    for refused in second:
        assert decision(refused)["kind"] == "rate_limit"
        assert decision(refused)["reason"].endswith("(counted on address 127.0.0.1)")
    assert set(audited_addresses(tg)) == {"127.0.0.1"}
    assert upstream.tools_called() == ["echo", "list_fhir_datastores"]


STATELESS_CALL = {
    "jsonrpc": "2.0", "id": 1, "method": "tools/call",
    "params": {"name": "echo", "arguments": {"text": "x"},
               "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                         "io.modelcontextprotocol/clientCapabilities": {}}},
}
STATELESS_HEADERS = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
                     "mcp-method": "tools/call", "mcp-name": "echo"}


def test_the_request_rate_counts_each_forwarded_client(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, "version: 1\ndefault: allow\nrules: []\n",
                        extra="trusted_proxies: ['127.0.0.1']\nlimits: {requests_per_second: 1, burst: 1}")
    with httpx.Client(timeout=30) as http:
        def post(address: str) -> httpx.Response:
            return http.post(tg.url, json=STATELESS_CALL, headers={**STATELESS_HEADERS, "x-forwarded-for": address})
        assert post("203.0.113.1").status_code == 200
        refused = post("203.0.113.1")
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert "too many requests from address 203.0.113.1 (limits.requests_per_second)" in refused.text
        # Another client behind the same balancer has its own bucket.
        assert post("203.0.113.2").status_code == 200


@pytest.mark.anyio
async def test_sessions_per_client_counts_the_forwarded_client(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY,
                        extra="trusted_proxies: [127.0.0.1/32]\nlimits: {sessions_per_client: 1}")
    with anyio.fail_after(60):
        async with Client(forwarded_for(tg.url, "203.0.113.1"), mode="legacy") as first:
            # A second client behind the same balancer opens its own session.
            async with Client(forwarded_for(tg.url, "203.0.113.2"), mode="legacy") as other:
                assert (await other.call_tool("echo", {"text": "b"})).is_error is False
            assert (await first.call_tool("echo", {"text": "a"})).is_error is False
            # The same client's second session is over its quota, which the error names.
            with httpx.Client(timeout=30) as http:
                init = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                                   "clientInfo": {"name": "raw", "version": "1"}}}
                refused = http.post(tg.url, json=init, headers={
                    "accept": "application/json, text/event-stream", "x-forwarded-for": "203.0.113.1"})
    assert refused.status_code == 429, refused.text
    assert "address 203.0.113.1 already holds 1 sessions (limits.sessions_per_client)" in refused.text


# ---- PROXY protocol ----------------------------------------------------------------


def proxy_header(version: int, client: str, client_port: int, port: int) -> bytes:
    v6 = ":" in client
    if version == 1:
        family = "TCP6" if v6 else "TCP4"
        local = "::1" if v6 else "127.0.0.1"
        return f"PROXY {family} {client} {local} {client_port} {port}\r\n".encode()
    kind = socket.AF_INET6 if v6 else socket.AF_INET
    source = socket.inet_pton(kind, client)
    destination = socket.inet_pton(kind, "::1" if v6 else "127.0.0.1")
    addresses = source + destination + struct.pack("!HH", client_port, port)
    family = 0x21 if v6 else 0x11
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, family]) + struct.pack("!H", len(addresses)) + addresses


class Balancer:
    """A TCP relay standing in for a load balancer: every connection made to it is
    relayed to Tollgate after a PROXY header (v1 or v2) naming `client`."""

    def __init__(self, target_port: int, client: str, version: int):
        self.target_port, self.client, self.version = target_port, client, version
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                down, peer = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            up.sendall(proxy_header(self.version, self.client, peer[1], self.target_port))
            self.sockets += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


@pytest.fixture
def balancers():
    made: list[Balancer] = []
    yield made
    for balancer in made:
        balancer.close()


def port_of(url: str) -> int:
    return int(url.split(":")[2].split("/")[0])


@pytest.mark.anyio
async def test_sdk_clients_through_a_proxy_protocol_balancer_get_their_own_windows(procs, tmp_path, balancers):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY,
                        extra="trusted_proxies: [127.0.0.0/8]\nproxy_protocol: true")
    port = port_of(tg.url)
    for i, client in enumerate(CLIENTS):
        balancers.append(Balancer(port, client, version=1 + i % 2))
    results = await two_calls_each({b.client: b.url for b in balancers})
    assert_own_windows(results)
    assert audited_addresses(tg) == [a for a in CLIENTS for _ in range(4)]


def raw_exchange(port: int, data: bytes, timeout: float = 20) -> bytes:
    """Sends `data` on a new connection; returns everything read until the server closes
    or the answer to one request is in."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        got = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk
            if b"\r\n\r\n" in got:
                head, _, body = got.partition(b"\r\n\r\n")
                length = [int(v) for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length"]
                if length and len(body) >= length[0]:
                    return got


def http_post(path: str, body: dict, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            f"accept: application/json, text/event-stream\r\nmcp-protocol-version: 2026-07-28\r\n"
            f"mcp-method: tools/call\r\nmcp-name: echo\r\ncontent-length: {len(data)}\r\n{extra}\r\n")
    return head.encode() + data


def test_proxy_protocol_headers_are_believed_only_from_trusted_peers(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY,
                        extra="trusted_proxies: [127.0.0.1]\nproxy_protocol: true\nlimits: {header_read_timeout: 1s}")
    port = port_of(tg.url)
    request = http_post("/mcp", STATELESS_CALL)
    # v1 and v2 from the trusted balancer: each client its own window.
    for version, client in ((1, "198.51.100.1"), (2, "198.51.100.2"), (2, "2001:db8::9")):
        answer = raw_exchange(port, proxy_header(version, client, 4711, port) + request)
        assert answer.startswith(b"HTTP/1.1 200"), answer
        assert b'"isError":false' in answer.replace(b" ", b""), answer
    answer = raw_exchange(port, proxy_header(2, "198.51.100.1", 4712, port) + request)
    assert b"counted on address 198.51.100.1" in answer, answer
    # A v2 LOCAL header (the balancer's own health check) names no client: the peer is.
    local = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    answer = raw_exchange(port, local + request)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    # A trusted peer that sends no header, or garbage, is closed without an answer.
    assert raw_exchange(port, request) == b""
    # Half a header, then nothing: closed at the header deadline, not held open.
    with socket.create_connection(("127.0.0.1", port), timeout=20) as stalled:
        stalled.sendall(b"PROXY TCP4 198.51.100.")
        assert stalled.recv(100) == b""
    assert [a for a in audited_addresses(tg)] == ["198.51.100.1", "198.51.100.2", "2001:db8::9", "198.51.100.1", "127.0.0.1"]
    assert upstream.tools_called() == ["echo"] * 4


def test_an_untrusted_peers_proxy_header_is_not_read(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY,
                        extra="trusted_proxies: [10.0.0.0/8]\nproxy_protocol: true")
    port = port_of(tg.url)
    request = http_post("/mcp", STATELESS_CALL)
    # Its header is not taken for one: the connection is plain HTTP, and that is not HTTP.
    answer = raw_exchange(port, proxy_header(1, "198.51.100.1", 4711, port) + request)
    assert not answer.startswith(b"HTTP/1.1 200"), answer
    # Without one, it is served as itself.
    answer = raw_exchange(port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert audited_addresses(tg) == ["127.0.0.1"]


def test_connections_per_peer_counts_the_client_a_proxy_header_names(procs, tmp_path):
    upstream = start_upstream(procs, tmp_path)
    tg = start_tollgate(procs, tmp_path, upstream.url, POLICY,
                        extra="trusted_proxies: [127.0.0.1]\nproxy_protocol: true\nlimits: {connections_per_peer: 1}")
    port = port_of(tg.url)
    held = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        # One connection of client A, kept open once its header was read.
        held.sendall(proxy_header(1, "198.51.100.1", 1, port) + b"GET /nothing HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert held.recv(100).startswith(b"HTTP/1.1 "), "the first connection is served"
        request = http_post("/mcp", STATELESS_CALL)
        # A second of client A's is closed at once; client B's is served, although the
        # balancer (one peer, 127.0.0.1) already holds a connection.
        assert raw_exchange(port, proxy_header(2, "198.51.100.1", 2, port) + request) == b""
        answer = raw_exchange(port, proxy_header(2, "198.51.100.2", 3, port) + request)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    finally:
        held.close()
    # Once A's connection closed, A may connect again.
    wait_until(lambda: raw_exchange(port, proxy_header(1, "198.51.100.1", 4, port) + http_post("/mcp", STATELESS_CALL))
               .startswith(b"HTTP/1.1 200"), 10, "client A's slot to be given back")


def test_proxy_protocol_needs_trusted_proxies(procs, tmp_path):
    from conftest import TOLLGATE
    import subprocess
    (tmp_path / "p.yaml").write_text("version: 1\nrules: []\n")
    config = tmp_path / "t.yaml"
    config.write_text("proxy_protocol: true\ntrusted_proxies: [not-an-address]\n"
                      "servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    out = subprocess.run([TOLLGATE, "validate", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert "`not-an-address` is not an address or a CIDR block" in out.stderr, out.stderr
    config.write_text("proxy_protocol: true\n"
                      "servers:\n  s:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n")
    out = subprocess.run([TOLLGATE, "validate", str(config)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out
    assert "proxy_protocol: a PROXY protocol header is read only from trusted_proxies" in out.stderr, out.stderr
