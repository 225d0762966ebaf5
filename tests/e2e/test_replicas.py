"""Several replicas behind a load balancer (issue 17): three `tollgate serve`
processes share one Redis (`state.backend: redis`), nginx round-robins between
them, and they behave as one: rate limits count across all of them, a session
opened through one continues through the others, approvals (tickets, stateless-era
`requestState`s, grants) opened on one are redeemed once on any other, and Redis
going away refuses what needs it (never lets it through unlimited) until Redis is back.

redis-server and nginx are Debian's (tests/run installs them); each test starts its
own on free loopback ports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import TOLLGATE, Proc, RawSession, free_port, start_upstream, stdio_argv, wait_port, wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"

STATELESS_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"


class Redis:
    """A redis-server of the test's own, on a loopback port; can be killed and restarted."""

    def __init__(self, procs: list, tmp_path: Path):
        self.port = free_port()
        self.procs, self.tmp_path = procs, tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> None:
        self.proc = Proc(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                          "--appendonly", "no", "--dir", str(self.tmp_path)],
                         self.tmp_path / f"redis-{len(self.procs)}.log")
        self.procs.append(self.proc)
        wait_port(self.port)

    def kill(self) -> None:
        self.proc.proc.kill()
        self.proc.proc.wait(timeout=10)

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()


class Cluster:
    """Three Tollgate replicas (a, b, c) on one Redis, nginx round-robin in front."""

    def __init__(self, procs: list, tmp_path: Path, redis: Redis, upstream: str, policy: str,
                 state_extra: str = "", n: int = 3):
        """upstream: the server's URL, or its config lines (indented by 4 spaces)."""
        block = upstream if upstream.startswith("    ") else f"    url: {upstream}\n"
        (tmp_path / "policy.yaml").write_text(policy)
        self.replicas = []
        for name in "abc"[:n]:
            port, admin = free_port(), free_port()
            config = tmp_path / f"tollgate-{name}.yaml"
            config.write_text(
                f"listen: 127.0.0.1:{port}\n"
                f"admin: {{listen: '127.0.0.1:{admin}', token: admin-token-0123456789}}\n"
                f"audit: {{path: '{tmp_path / f'audit-{name}.jsonl'}'}}\n"
                f"limits: {{requests_per_second: 0}}\n"
                f"clients:\n  - {{name: alice, key: {ALICE}}}\n  - {{name: bob, key: {BOB}}}\n"
                f"state:\n  backend: redis\n  url: {redis.url}\n  prefix: 'e2e:'\n  replica: {name}\n"
                f"  timeout: 500ms\n{state_extra}"
                f"servers:\n  up:\n{block}    policy: policy.yaml\n")
            proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / f"tollgate-{name}.log")
            procs.append(proc)
            proc.wait_line(r"Tollgate listening on")
            self.replicas.append({"name": name, "url": f"http://127.0.0.1:{port}/servers/up/mcp",
                                  "admin": f"http://127.0.0.1:{admin}", "proc": proc})
        self.lb_port = free_port()
        servers = "".join(f"    server 127.0.0.1:{r['url'].split(':')[2].split('/')[0]};\n" for r in self.replicas)
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            "worker_processes 1;\n"
            f"pid {tmp_path / 'nginx.pid'};\n"
            f"error_log {tmp_path / 'nginx-error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            f"  access_log {tmp_path / 'nginx-access.log'};\n"
            f"  client_body_temp_path {tmp_path}/nginx-body;\n  proxy_temp_path {tmp_path}/nginx-proxy;\n"
            f"  fastcgi_temp_path {tmp_path}/nginx-fcgi;\n  uwsgi_temp_path {tmp_path}/nginx-uwsgi;\n"
            f"  scgi_temp_path {tmp_path}/nginx-scgi;\n"
            f"  upstream tollgate {{\n{servers}  }}\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.lb_port};\n"
            "    location / {\n"
            "      proxy_pass http://tollgate;\n"
            "      proxy_http_version 1.1;\n"
            "      proxy_set_header Connection \"\";\n"
            "      proxy_set_header Host $http_host;\n"
            "      proxy_buffering off;\n"
            "      proxy_read_timeout 60s;\n"
            "    }\n"
            "  }\n"
            "}\n")
        self.nginx = Proc([NGINX, "-c", str(conf), "-p", str(tmp_path), "-g", "daemon off;"],
                          tmp_path / "nginx.log")
        procs.append(self.nginx)
        wait_port(self.lb_port)
        self.url = f"http://127.0.0.1:{self.lb_port}/servers/up/mcp"


def stateless_call(url: str, tool: str, arguments: dict, key: str | None = None, id_: int = 1) -> dict:
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": tool}
    if key:
        headers["authorization"] = f"Bearer {key}"
    body = {"jsonrpc": "2.0", "id": id_, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments, "_meta": dict(STATELESS_META)}}
    r = httpx.post(url, json=body, headers=headers, timeout=30)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        for line in r.text.splitlines():
            if line.startswith("data:"):
                msg = json.loads(line[5:])
                if msg.get("id") == id_:
                    return msg
    return r.json()


def passed(answer: dict) -> bool:
    """Whether a call reached the upstream's tool (its echo came back)."""
    result = answer.get("result") or {}
    return result.get("isError") is False and "error" not in answer


@pytest.fixture
def redis(procs, tmp_path):
    return Redis(procs, tmp_path)


def test_a_global_limit_of_10_lets_exactly_10_of_100_concurrent_calls_through(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url,
                      "version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                      "    rate_limit: {max: 10, window: 1h, per: global}\n")
    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(lambda i: stateless_call(cluster.url, "echo", {"text": str(i)}, ALICE, i),
                                range(100)))
    allowed = [a for a in answers if passed(a)]
    refused = [a for a in answers if not passed(a)]
    assert len(allowed) == 10, [a for a in answers][:5]
    assert len(refused) == 90
    for answer in refused:
        text = answer["result"]["content"][0]["text"]
        assert "rate limit of 10 calls per 3600s per everyone exceeded" in text, answer
    # Exactly 10 reached the upstream, and every replica took part.
    assert upstream.tools_called().count("echo") == 10
    served = {r["name"] for r in cluster.replicas
              if any('"decision"' in line for line in (Path(tmp_path / f"audit-{r['name']}.jsonl").read_text().splitlines()))}
    assert served == {"a", "b", "c"}
    # The window lives in Redis, with an expiry no longer than the window.
    keys = redis.cli("--scan", "--pattern", "e2e:limit:up:*").splitlines()
    assert len(keys) == 1, keys
    assert 0 < int(redis.cli("PTTL", keys[0])) <= 3600 * 1000
    assert int(redis.cli("ZCARD", keys[0])) == 10


def test_per_client_limits_hold_across_replicas(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url,
                      "version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                      "    rate_limit: {max: 4, window: 1h, per: client}\n")
    with ThreadPoolExecutor(max_workers=20) as pool:
        alice = list(pool.map(lambda i: stateless_call(cluster.url, "echo", {"text": f"a{i}"}, ALICE, i), range(20)))
        bob = list(pool.map(lambda i: stateless_call(cluster.url, "echo", {"text": f"b{i}"}, BOB, i), range(20)))
    assert sum(map(passed, alice)) == 4
    assert sum(map(passed, bob)) == 4
    assert upstream.tools_called().count("echo") == 8


def test_a_slot_of_a_call_that_never_left_is_given_back(procs, tmp_path, redis):
    # The upstream is down: the call is refused as unreachable, and its shared slot is
    # given back, so the limit of 1 lets the next call try again.
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    cluster = Cluster(procs, tmp_path, redis, dead,
                      "version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                      "    rate_limit: {max: 1, window: 1h, per: global}\n")
    for i in range(4):
        answer = stateless_call(cluster.url, "echo", {"text": "x"}, ALICE, i)
        text = json.dumps(answer)
        assert "rate limit" not in text, (i, answer)
    wait_until(lambda: all(int(redis.cli("ZCARD", k)) == 0
                           for k in redis.cli("--scan", "--pattern", "e2e:limit:*").splitlines()),
               5, "the slots to be given back")


class KeyedSession(RawSession):
    """A RawSession of client alice whose URL can change between requests (replica to replica)."""

    def _headers(self) -> dict:
        return {**super()._headers(), "authorization": f"Bearer {ALICE}"}


def audited_sessions(tmp_path: Path, replica: str) -> list[str]:
    path = tmp_path / f"audit-{replica}.jsonl"
    return [json.loads(line).get("session") for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("event") == "decision"]


ECHO_PER_SESSION = ("version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                    "    rate_limit: {max: 3, window: 1h, per: session}\n")


def test_a_session_opened_through_a_continues_through_b_and_c(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, "version: 1\nrules:\n  - tool: echo\n    action: allow\n")
    a, b, c = (r["url"] for r in cluster.replicas)
    session = KeyedSession(a)
    session.initialize()
    for url, text in [(b, "via b"), (c, "via c"), (a, "via a"), (c, "via c again")]:
        session.url = url
        answer = session.call("echo", {"text": text})
        assert answer["result"]["isError"] is False, answer
        assert text in answer["result"]["content"][0]["text"]
    session.url = b
    assert "echo" in [t["name"] for t in session.request("tools/list")["result"]["tools"]]
    # Each replica decided calls of that one session; the upstream saw one session.
    for replica in "abc":
        assert session.session_id in audited_sessions(tmp_path, replica), replica
    assert session.initializes == 1
    # Ended through C: gone on A and B too, although they had it in hand.
    session.url = c
    session.close()
    for url in (a, b):
        session.http = httpx.Client(timeout=10)
        session.url = url
        wait_until(lambda: "unknown or expired session" in json.dumps(session.call("echo", {"text": "x"})),
                   5, f"the ended session to be refused at {url}")


@pytest.mark.anyio
async def test_the_official_sdk_keeps_one_session_across_round_robin_replicas(procs, tmp_path, redis):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, "version: 1\nrules:\n  - tool: echo\n    action: allow\n")
    transport = streamable_http_client(
        cluster.url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {ALICE}"}))
    async with Client(transport, mode="legacy") as client:
        for i in range(6):
            result = await client.call_tool("echo", {"text": f"call {i}"})
            assert not result.is_error and f"call {i}" in result.content[0].text
    ids = {s for r in "abc" for s in audited_sessions(tmp_path, r)}
    assert len(ids) == 1 and None not in ids, ids
    assert sum(bool(audited_sessions(tmp_path, r)) for r in "abc") >= 2


def test_a_per_session_limit_holds_across_replicas(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, ECHO_PER_SESSION)
    urls = [r["url"] for r in cluster.replicas]
    one, other = KeyedSession(urls[0]), KeyedSession(urls[1])
    one.initialize()
    other.initialize()
    passed_one = 0
    for i in range(9):
        one.url = urls[i % 3]
        passed_one += passed(one.call("echo", {"text": str(i)}))
    other.url = urls[2]
    assert passed_one == 3
    assert passed(other.call("echo", {"text": "another session has its own"}))


def test_a_stdio_session_on_the_wrong_replica_is_told_where_it_lives(procs, tmp_path, redis):
    argv = stdio_argv(tmp_path / "stdio.jsonl")
    block = "    command: [" + ", ".join(json.dumps(a) for a in argv) + "]\n"
    cluster = Cluster(procs, tmp_path, redis, block, "version: 1\nrules:\n  - tool: echo\n    action: allow\n", n=2)
    a, b = (r["url"] for r in cluster.replicas)
    session = KeyedSession(a)
    session.initialize()
    assert passed(session.call("echo", {"text": "home"}))
    session.url = b
    answer = session.call("echo", {"text": "away"})
    assert session.last.status_code == 421, answer
    message = json.dumps(answer)
    assert "belongs to replica `a`" in message and "Mcp-Session-Id" in message, answer
    session.url = a
    assert passed(session.call("echo", {"text": "home again"}))


def metric(admin: str, name: str) -> float:
    text = httpx.get(f"{admin}/metrics", headers={"authorization": "Bearer admin-token-0123456789"}, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def echo_records(tmp_path: Path) -> list[dict]:
    """The audit records of `echo` calls, on every replica."""
    return [record for path in sorted(tmp_path.glob("audit-*.jsonl"))
            for record in map(json.loads, filter(str.strip, path.read_text().splitlines()))
            if record.get("tool") == "echo"]


def test_redis_down_refuses_with_a_clear_error_and_recovers_without_a_restart(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url,
                      "version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                      "    rate_limit: {max: 1000, window: 1h, per: global}\n"
                      "  - tool: list_fhir_datastores\n    action: allow\n")
    admin = cluster.replicas[0]["admin"]
    auth = {"authorization": "Bearer admin-token-0123456789"}
    assert passed(stateless_call(cluster.url, "echo", {"text": "before"}, ALICE))
    assert httpx.get(f"{admin}/readyz", headers=auth, timeout=10).json()["state"]["ready"] is True
    session = KeyedSession(cluster.replicas[0]["url"])
    session.initialize()

    redis.kill()
    # A session this replica has not seen cannot be looked up: refused, saying why.
    session.url = cluster.replicas[1]["url"]
    lost = session.request("tools/list")
    assert session.last.status_code == 503, lost
    assert "shared state (Redis at" in json.dumps(lost) and "state.on_failure: refuse" in json.dumps(lost)
    # The replica that has it goes on with what needs nothing shared.
    session.url = cluster.replicas[0]["url"]
    assert passed(session.call("list_fhir_datastores", {}))
    before = len(upstream.tools_called())
    echoes_before = len(echo_records(tmp_path))
    answers = [stateless_call(cluster.url, "echo", {"text": f"down {i}"}, ALICE, i) for i in range(6)]
    for answer in answers:
        assert answer["error"]["code"] == -32603, answer
        message = answer["error"]["message"]
        assert "rate limit could not be checked" in message and "Redis at redis://127.0.0.1" in message, message
        assert "state.on_failure: refuse" in message
    # None went through unlimited, and each refusal is in the audit log.
    assert len(upstream.tools_called()) == before
    wait_until(lambda: len(echo_records(tmp_path)) >= echoes_before + 6, 10, "the refused calls to be audited")
    # A call that needs no shared state still flows.
    assert passed(stateless_call(cluster.url, "list_fhir_datastores", {}, ALICE))
    ready = httpx.get(f"{admin}/readyz", headers=auth, timeout=10)
    assert ready.status_code == 503
    assert ready.json()["state"]["ready"] is False and ready.json()["state"]["error"], ready.json()
    assert httpx.get(f"{admin}/readyz", timeout=10).json() == {"ready": False}
    assert metric(admin, 'tollgate_state_unavailable_total{server="up",kind="refused"}') >= 1
    assert "shared state unreachable" in cluster.replicas[0]["proc"].log.read_text()

    redis.start()
    # Each replica reconnects by itself (it pings every second), so once they had a
    # moment, no call of any replica fails.
    time.sleep(3)
    for i in range(6):
        assert passed(stateless_call(cluster.url, "echo", {"text": f"after {i}"}, ALICE, i)), i
    assert httpx.get(f"{admin}/readyz", headers=auth, timeout=10).status_code == 200
    assert all(r["proc"].proc.poll() is None for r in cluster.replicas)


def test_on_failure_allow_lets_calls_through_without_their_limit_counted(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url,
                      "version: 1\nrules:\n  - tool: echo\n    action: allow\n"
                      "    rate_limit: {max: 1000, window: 1h, per: global}\n",
                      state_extra="  on_failure: allow\n", n=1)
    redis.kill()
    assert passed(stateless_call(cluster.url, "echo", {"text": "allowed"}, ALICE))
    assert metric(cluster.replicas[0]["admin"], 'tollgate_state_unavailable_total{server="up",kind="allowed"}') == 1
    # It serves calls, so it stays ready (saying Redis is down): a Service keeps its pods.
    ready = httpx.get(f"{cluster.replicas[0]['admin']}/readyz", headers=ADMIN_AUTH, timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["state"]["ready"] is False and ready.json()["state"]["error"], ready.json()


ADMIN_AUTH = {"authorization": "Bearer admin-token-0123456789"}


def test_a_call_held_on_a_is_listed_everywhere_and_approved_through_b(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url,
                      "version: 1\nrules:\n  - tool: echo\n    action: require_approval\n"
                      "    approval: {timeout: 60}\n")
    a, b, c = cluster.replicas
    held: dict = {}

    def call_on_a(text: str) -> None:
        held[text] = stateless_call(a["url"], "echo", {"text": text}, ALICE)
        held[text + "@"] = time.monotonic()

    def pending_on(replica) -> list[dict]:
        listed = httpx.get(f"{replica['admin']}/approvals", headers=ADMIN_AUTH, timeout=10).json()
        return [x for x in listed if x["status"] == "pending"]

    with ThreadPoolExecutor(max_workers=2) as pool:
        waiting = pool.submit(call_on_a, "approve me")
        wait_until(lambda: len(pending_on(b)) == 1 and len(pending_on(c)) == 1, 10,
                   "the approval held on A to be listed on B and C")
        (approval,) = pending_on(b)
        assert approval["tool"] == "echo" and approval["client"] == "alice"
        assert upstream.tools_called() == []
        r = httpx.post(f"{b['admin']}/approvals/{approval['id']}/approve", headers=ADMIN_AUTH, timeout=10)
        decided_at = time.monotonic()
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "approved"
        waiting.result(timeout=10)
    # The client on A was released within 1 s of the decision on B, and forwarded once.
    assert held["approve me@"] - decided_at < 1.0
    assert passed(held["approve me"]), held["approve me"]
    assert upstream.tools_called() == ["echo"]
    # Deciding again, anywhere, is refused: it was settled once.
    again = httpx.post(f"{c['admin']}/approvals/{approval['id']}/deny", headers=ADMIN_AUTH, timeout=10)
    assert again.status_code == 409, again.text
    wait_until(lambda: [x["status"] for x in httpx.get(f"{c['admin']}/approvals", headers=ADMIN_AUTH,
                                                       timeout=10).json()] == ["approved"],
               5, "C to see it approved")

    # Denied through C: the client on A gets the refusal, nothing is forwarded.
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(call_on_a, "deny me")
        wait_until(lambda: len(pending_on(c)) == 1, 10, "the second approval to be listed on C")
        (second,) = pending_on(c)
        r = httpx.post(f"{c['admin']}/approvals/{second['id']}/deny", headers=ADMIN_AUTH,
                       json={"reason": "not today"}, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "denied", r.text
        waiting.result(timeout=10)
    assert not passed(held["deny me"])
    assert "not today" in json.dumps(held["deny me"])
    assert upstream.tools_called() == ["echo"]


# ---- approvals shared in Redis: retries, requestStates and grants on any replica -----------

HELD = ("version: 1\nrules:\n  - tool: echo\n    action: require_approval\n"
        "    approval: {timeout: 60, wait: 1}\n")


def sdk_client(url: str, key: str, mode: str):
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"})),
                  mode=mode)


def approve_on(replica, approval_id: str, body: dict | None = None) -> dict:
    r = httpx.post(f"{replica['admin']}/approvals/{approval_id}/approve", headers=ADMIN_AUTH, json=body or {},
                   timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.anyio
async def test_a_ticket_held_on_a_approved_on_b_is_redeemed_once_on_c(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, HELD)
    a, b, c = cluster.replicas
    async with sdk_client(a["url"], ALICE, "legacy") as on_a, sdk_client(c["url"], ALICE, "legacy") as on_c:
        first = await on_a.call_tool("echo", {"text": "ship it"})
        ticket = first.meta["dev.tollgate/decision"]
        assert first.is_error is True and ticket["kind"] == "approval_pending", first
        # Still pending: a retry on C joins the same approval (no second entry).
        joined = await on_c.call_tool("echo", {"text": "ship it"})
        assert joined.meta["dev.tollgate/decision"]["approval_id"] == ticket["approval_id"]
        assert approve_on(b, ticket["approval_id"])["status"] == "approved"
        assert upstream.tools_called() == []
        # The retry lands on C: forwarded, once.
        retry = await on_c.call_tool("echo", {"text": "ship it"})
        assert retry.is_error is False and "ship it" in retry.content[0].text, retry
        assert upstream.tools_called() == ["echo"]
        # A second retry, on C or back on A, is held again (a new approval).
        for client in (on_c, on_a):
            again = await client.call_tool("echo", {"text": "ship it"})
            meta = again.meta["dev.tollgate/decision"]
            assert meta["kind"] == "approval_pending" and meta["approval_id"] != ticket["approval_id"], again
        # Another client's identical call is not let through by it either.
        async with sdk_client(c["url"], BOB, "legacy") as bob:
            other = await bob.call_tool("echo", {"text": "ship it"})
            assert other.meta["dev.tollgate/decision"]["kind"] == "approval_pending"
    assert upstream.tools_called() == ["echo"]


def test_concurrent_retries_on_every_replica_redeem_an_approval_exactly_once(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, HELD)
    a, b, c = cluster.replicas
    first = stateless_call(a["url"], "echo", {"text": "once"}, ALICE)
    approval_id = first["result"]["_meta"]["dev.tollgate/decision"]["approval_id"]
    approve_on(b, approval_id)
    # None of them on A, the replica that opened it: B and C race for it in Redis.
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda i: stateless_call((b, c)[i % 2]["url"], "echo", {"text": "once"},
                                                         ALICE, id_=i + 2), range(8)))
    assert sum(passed(x) for x in answers) == 1, answers
    assert upstream.tools_called() == ["echo"]


@pytest.mark.anyio
async def test_a_request_state_sealed_on_a_is_redeemed_once_on_c(procs, tmp_path, redis):
    from mcp import types

    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, HELD)
    a, b, c = cluster.replicas
    async with sdk_client(a["url"], ALICE, "auto") as on_a, sdk_client(c["url"], ALICE, "auto") as on_c:
        first = await on_a.session.call_tool("echo", {"text": "mrtr"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult) and first.request_state, first
        approval_id = first.meta["dev.tollgate/decision"]["approval_id"]
        # Pending, retried on C: the state (sealed on A) opens there, and C waits on it.
        again = await on_c.session.call_tool("echo", {"text": "mrtr"}, request_state=first.request_state,
                                             allow_input_required=True)
        assert isinstance(again, types.InputRequiredResult), again
        assert again.meta["dev.tollgate/decision"]["approval_id"] == approval_id
        approve_on(b, approval_id)
        done = await on_c.session.call_tool("echo", {"text": "mrtr"}, request_state=first.request_state,
                                            allow_input_required=True)
        assert isinstance(done, types.CallToolResult) and done.is_error is False, done
        assert upstream.tools_called() == ["echo"]
        # Replayed, on A or on C: refused, never forwarded again.
        for client in (on_a, on_c):
            replay = await client.session.call_tool("echo", {"text": "mrtr"}, request_state=first.request_state,
                                                    allow_input_required=True)
            assert isinstance(replay, types.CallToolResult) and replay.is_error is True, replay
            assert replay.meta["dev.tollgate/decision"]["kind"] == "approval_denied"
    assert upstream.tools_called() == ["echo"]


@pytest.mark.anyio
async def test_a_grant_made_on_b_lets_the_clients_calls_through_on_c_within_its_window(procs, tmp_path, redis):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, HELD)
    a, b, c = cluster.replicas
    async with sdk_client(a["url"], ALICE, "legacy") as on_a, sdk_client(c["url"], ALICE, "legacy") as on_c:
        first = await on_a.call_tool("echo", {"text": "g0"})
        approval_id = first.meta["dev.tollgate/decision"]["approval_id"]
        decided = approve_on(b, approval_id, {"grant": {"scope": "client", "for": "5s", "any_arguments": True}})
        assert decided["status"] == "approved"
        listed = httpx.get(f"{c['admin']}/approvals/grants", headers=ADMIN_AUTH, timeout=10).json()
        assert [g["principal"] for g in listed] == ["client:alice"], listed
        for i in range(1, 4):
            result = await on_c.call_tool("echo", {"text": f"g{i}"})
            assert result.is_error is False, result
        async with sdk_client(c["url"], BOB, "legacy") as bob:
            assert (await bob.call_tool("echo", {"text": "g1"})).meta["dev.tollgate/decision"]["kind"] \
                == "approval_pending"
        (listed,) = httpx.get(f"{a['admin']}/approvals/grants", headers=ADMIN_AUTH, timeout=10).json()
        assert listed["uses"] == 3 and listed["granted_by"], listed
        wait_until(lambda: httpx.get(f"{c['admin']}/approvals/grants", headers=ADMIN_AUTH, timeout=10).json() == [],
                   15, "the grant to end")
        late = await on_c.call_tool("echo", {"text": "late"})
        assert late.meta["dev.tollgate/decision"]["kind"] == "approval_pending"
        # A grant given through B for C's approval, revoked through A: ended on every replica at once.
        late_id = late.meta["dev.tollgate/decision"]["approval_id"]
        grant = approve_on(b, late_id, {"grant": {"scope": "client", "for": "10m", "any_arguments": True}})["grant"]
        assert (await on_c.call_tool("echo", {"text": "late"})).is_error is False  # the approval itself
        assert (await on_a.call_tool("echo", {"text": "via grant"})).is_error is False  # the grant, on A
        revoked = httpx.delete(f"{a['admin']}/approvals/grants/{grant['id']}", headers=ADMIN_AUTH, timeout=10)
        assert revoked.status_code == 200, revoked.text
        for client in (on_a, on_c):
            held = await client.call_tool("echo", {"text": "after revoke"})
            assert held.meta["dev.tollgate/decision"]["kind"] == "approval_pending", held
    assert upstream.tools_called() == ["echo"] * 5


def test_replicas_start_while_redis_is_down_and_share_one_request_state_key_once_it_is_up(procs, tmp_path, redis):
    """Without approvals.state_key the replicas' key lives in Redis, read when a held call
    first needs it: a replica starts (not ready) while Redis is down, and once Redis is up
    a requestState sealed on A opens on B."""
    upstream = start_upstream(procs, tmp_path)
    redis.kill()
    a, b = Cluster(procs, tmp_path, redis, upstream.url, HELD, n=2).replicas
    assert httpx.get(f"{a['admin']}/readyz", timeout=10).status_code == 503
    down = stateless_call(a["url"], "echo", {"text": "key"}, ALICE)
    assert "kept in the shared state" in json.dumps(down) and not passed(down), down
    redis.start()
    wait_until(lambda: httpx.get(f"{a['admin']}/readyz", timeout=10).status_code == 200, 15, "A to be ready")
    first = stateless_call(a["url"], "echo", {"text": "key"}, ALICE)
    state = first["result"]["requestState"]
    assert len(redis.cli("GET", "e2e:approvals:state-key")) == 64
    retry = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
             "params": {"name": "echo", "arguments": {"text": "key"}, "requestState": state,
                        "_meta": dict(STATELESS_META)}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": "2026-07-28", "mcp-method": "tools/call", "mcp-name": "echo",
               "authorization": f"Bearer {ALICE}"}
    answer = httpx.post(b["url"], json=retry, headers=headers, timeout=30)
    text = answer.text
    # Still pending on B under the same approval: B opened A's state with the shared key.
    assert first["result"]["_meta"]["dev.tollgate/decision"]["approval_id"] in text, text
    assert "input_required" in text, text
    assert upstream.tools_called() == []


@pytest.mark.parametrize("on_failure", ["refuse", "allow"])
def test_redis_down_refuses_a_held_call_and_never_forwards_an_approved_one(procs, tmp_path, redis, on_failure):
    upstream = start_upstream(procs, tmp_path)
    cluster = Cluster(procs, tmp_path, redis, upstream.url, HELD, state_extra=f"  on_failure: {on_failure}\n")
    a, b, c = cluster.replicas
    first = stateless_call(a["url"], "echo", {"text": "down"}, ALICE)
    approve_on(b, first["result"]["_meta"]["dev.tollgate/decision"]["approval_id"])
    redis.kill()
    # Approved, but the retry on C cannot redeem it once: refused, saying why, whatever on_failure says.
    for replica in (c, a):
        answer = stateless_call(replica["url"], "echo", {"text": "down"}, ALICE)
        text = json.dumps(answer)
        assert not passed(answer), answer
        assert "needs an approval, kept in the shared state" in text and "Redis at redis://127.0.0.1" in text, text
    assert upstream.tools_called() == []
    redis.start()
    time.sleep(3)
    # Redis came back empty: the call is held afresh, not let through.
    again = stateless_call(c["url"], "echo", {"text": "down"}, ALICE)
    assert again["result"]["_meta"]["dev.tollgate/decision"]["kind"] == "approval_pending", again
    assert upstream.tools_called() == []
