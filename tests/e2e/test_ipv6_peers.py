"""Issue 14.17: anonymous IPv6 peers are told apart by their /64, not their full address,
so one host cannot dodge a per-client limit by hopping addresses within its prefix.

IPv6 loopback is a single address, so the test makes a network namespace of its own
(root only) with a few addresses on its loopback device: two in one /64, one in another.
Tollgate and the client both run inside it; nothing leaves the namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap

import pytest

from conftest import PYTHON, TOLLGATE, Proc, free_port, wait_until

NS = f"tg-v6-{os.getpid()}"
HOST = "fd00:6::1"
SAME_64 = ("fd00:6::2", "fd00:6::3")
OTHER_64 = "fd00:7::2"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 to make a network namespace with IPv6 test addresses",
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@pytest.fixture
def namespace():
    ip("netns", "add", NS)
    try:
        ip("netns", "exec", NS, "ip", "link", "set", "lo", "up")
        for address in (HOST, *SAME_64, OTHER_64):
            ip("netns", "exec", NS, "ip", "-6", "addr", "add", f"{address}/64", "dev", "lo", "nodad")
        yield NS
    finally:
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=20)


CLIENT = textwrap.dedent("""
    import json, sys, httpx
    url, sources = sys.argv[1], sys.argv[2:]
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
            "params": {"name": "anything", "arguments": {},
                       "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                                 "io.modelcontextprotocol/clientCapabilities": {}}}}
    headers = {"accept": "application/json, text/event-stream", "mcp-protocol-version": "2026-07-28",
               "mcp-method": "tools/call", "mcp-name": "anything"}
    statuses = []
    for source in sources:
        transport = httpx.HTTPTransport(local_address=source)
        with httpx.Client(transport=transport, timeout=10) as client:
            statuses.append(client.post(url, json=call, headers=headers).status_code)
    print(json.dumps(statuses))
""")


def test_anonymous_ipv6_peers_share_a_request_rate_per_64(namespace, procs, tmp_path):
    port = free_port()
    (tmp_path / "p.yaml").write_text("version: 1\ndefault: deny\nrules: []\n")
    config = tmp_path / "v6.yaml"
    config.write_text(
        f"listen: '[{HOST}]:{port}'\n"
        "limits: {requests_per_second: 1, burst: 1}\n"
        f"servers:\n  s:\n    url: 'http://[{HOST}]:9/mcp'\n    policy: p.yaml\n"
    )
    proxy = Proc(["ip", "netns", "exec", namespace, TOLLGATE, "serve", "--config", str(config)],
                 tmp_path / "tollgate.log")
    procs.append(proxy)
    proxy.wait_line(r"Tollgate listening on")
    url = f"http://[{HOST}]:{port}/mcp"

    def statuses(*sources: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "exec", namespace, PYTHON, "-c", CLIENT, url, *sources],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    # Every call is denied by the policy (200 with the refusal) unless the request rate
    # of its client stops it first (429); no upstream is ever needed.
    first, second, other = statuses(SAME_64[0], SAME_64[1], OTHER_64)
    assert first == 200
    assert second == 429, "an address in the same /64 has its own request rate"
    assert other == 200, "another /64 is another client"
    wait_until(lambda: statuses(SAME_64[1]) == [200], 10, "the /64's rate never refilled")
