"""Tollgate as the MCP server's OAuth 2.1 resource server (issue 19).

A real authorization server, node `oidc-provider` (tests/ts/oidc_server.mjs: dynamic
registration, authorization code + PKCE, client credentials, resource indicators, JWT
access tokens), issues the tokens; the official Python SDK's OAuth clients run the whole
flow through Tollgate (401 → protected resource metadata → authorization server metadata
→ registration → the login and consent pages, driven here → token → tools/call), in both
eras. Tokens that must not pass are signed with the issuer's own key (the test holds it),
or fetched from the issuer for another resource.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import anyio
import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives import serialization
from mcp import Client
from mcp.client.auth import OAuthClientProvider
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthClientMetadata, OAuthToken

from conftest import HERE, PYTHON, TOLLGATE, Proc, free_port, wait_port

pytestmark = pytest.mark.anyio

TS = HERE.parent / "ts"
MODERN = "2026-07-28"
ERAS = ["auto", "legacy"]
REDIRECT = "http://localhost:3999/callback"

POLICY = """
version: 1
default: deny
rules:
  - tool: query_metrics
    when: {claims: {groups: [sre, data-eng]}}
    action: allow
  - tool: query_metrics
    action: deny
    reason: only SRE and data engineering may query metrics
  - tool: start_export
    scopes: ["exports:write"]
    action: allow
  - tool: whoami
    action: allow
    rate_limit: {max: 3, window: 1h, per: user}
  - tool: drop_everything
    action: require_approval
    reason: a human decides
"""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Idp:
    """The running authorization server and the private key it signs with."""

    def __init__(self, proc: Proc, issuer: str, key, kid: str):
        self.proc, self.issuer, self.key, self.kid = proc, issuer, key, kid

    def jwks_hits(self) -> int:
        return httpx.get(f"{self.issuer}/test/jwks-hits", timeout=10).json()["hits"]

    def sign(self, claims: dict, key=None, kid: str | None = None, alg: str = "RS256") -> str:
        return jwt.encode(claims, key or self.key, algorithm=alg, headers={"kid": kid or self.kid, "typ": "at+jwt"})

    def client_credentials(self, resource: str, scope: str = "mcp") -> httpx.Response:
        return httpx.post(
            f"{self.issuer}/token",
            data={"grant_type": "client_credentials", "resource": resource, "scope": scope},
            auth=("ci-agent", "ci-agent-secret-0123"),
            timeout=10,
        )


class Gate:
    def __init__(self, proc: Proc, base: str, audit: Path, record: Path):
        self.proc, self.base, self.audit_path, self.record = proc, base, audit, record
        self.url = f"{base}/servers/demo/mcp"
        self.resource = base

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line.strip()]

    def decisions(self) -> list[dict]:
        return [r for r in self.audit() if r["event"] == "decision"]

    def calls(self) -> list[str]:
        if not self.record.exists():
            return []
        return [json.loads(line)["tool"] for line in self.record.read_text().splitlines() if line.strip()]

    def upstream_headers(self) -> list[dict]:
        path = Path(str(self.record) + ".headers")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def setup(procs, tmp_path, request):
    """The authorization server, an upstream that records headers, and Tollgate
    (an indirect parameter adds configuration lines)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True)
    jwk.update({"kid": "k1", "alg": "RS256", "use": "sig"})
    keys = tmp_path / "idp-keys.json"
    keys.write_text(json.dumps({"keys": [jwk]}))

    gate_port, idp_port, up_port = free_port(), free_port(), free_port()
    resource = f"http://127.0.0.1:{gate_port}"
    other = "http://127.0.0.1:1/other-mcp"
    idp_proc = Proc(
        ["node", str(TS / "oidc_server.mjs"), str(idp_port), str(keys), f"{resource},{resource}/,{other}"],
        tmp_path / "idp.log",
        cwd=TS,
    )
    procs.append(idp_proc)
    issuer = idp_proc.wait_line(r"^issuer (http://\S+)").group(1)

    record = tmp_path / "upstream.jsonl"
    up = Proc([PYTHON, str(HERE / "identity_upstream.py"), str(up_port), str(record)], tmp_path / "upstream.log")
    procs.append(up)
    wait_port(up_port)

    (tmp_path / "demo.yaml").write_text(POLICY)
    audit = tmp_path / "audit.jsonl"
    config = tmp_path / "tollgate.yaml"
    admin_port = free_port()
    config.write_text(
        f"listen: 127.0.0.1:{gate_port}\n"
        f"audit: {{path: '{audit}'}}\n"
        f"admin: {{listen: 127.0.0.1:{admin_port}, token: admin-token-0123456789}}\n"
        f"{getattr(request, 'param', '')}\n"
        "auth:\n  oauth:\n"
        f"    issuer: {issuer}\n"
        f"    resource: {resource}\n"
        "    scopes_supported: [mcp]\n"
        "servers:\n  demo:\n"
        f"    url: http://127.0.0.1:{up_port}/mcp\n"
        "    policy: demo.yaml\n"
    )
    proc = Proc([TOLLGATE, "serve", "--config", str(config)], tmp_path / "tollgate.log")
    procs.append(proc)
    base = proc.wait_line(r"Tollgate listening on (http://127\.0\.0\.1:\d+)").group(1)
    gate = Gate(proc, base, audit, record)
    gate.admin = f"http://127.0.0.1:{admin_port}"
    wait_port(admin_port)
    return Idp(idp_proc, issuer, key, "k1"), gate, other


class Memory:
    """TokenStorage in memory."""

    def __init__(self):
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self):
        return self.tokens

    async def set_tokens(self, tokens):
        self.tokens = tokens

    async def get_client_info(self):
        return self.client

    async def set_client_info(self, info):
        self.client = info


class Browser:
    """The user at the authorization server's pages: signs in as `user` and consents.
    Keeps its cookies, as a browser would, so a second authorization (a step-up) finds
    the user signed in and only asks for consent."""

    def __init__(self, user: str):
        self.user = user
        self.http = httpx.AsyncClient(timeout=15, follow_redirects=False)
        self.pending: str | None = None
        self.pages: list[str] = []

    async def redirect(self, url: str) -> None:
        self.pending = url

    async def callback(self) -> AuthorizationCodeResult:
        url, self.pending = self.pending, None
        assert url, "the SDK asked for the callback before redirecting"
        for _ in range(20):
            r = await self.http.get(url)
            if r.status_code in (302, 303):
                url = urljoin(url, r.headers["location"])
                if url.startswith(REDIRECT):
                    query = parse_qs(urlparse(url).query)
                    assert "code" in query, query
                    return AuthorizationCodeResult(
                        code=query["code"][0],
                        state=query.get("state", [None])[0],
                        iss=query.get("iss", [None])[0],
                    )
                continue
            assert r.status_code == 200, (r.status_code, r.text[:500])
            action = re.search(r'<form[^>]*action="([^"]+)"', r.text).group(1)
            prompt = re.search(r'name="prompt" value="(\w+)"', r.text).group(1)
            self.pages.append(prompt)
            form = {"prompt": prompt}
            if prompt == "login":
                form.update({"login": self.user, "password": "any"})
            r = await self.http.post(urljoin(url, action), data=form)
            assert r.status_code in (302, 303), (r.status_code, r.text[:500])
            url = urljoin(url, r.headers["location"])
            if url.startswith(REDIRECT):
                continue_url = url
                query = parse_qs(urlparse(continue_url).query)
                return AuthorizationCodeResult(
                    code=query["code"][0], state=query.get("state", [None])[0], iss=query.get("iss", [None])[0]
                )
        raise AssertionError("the authorization pages never redirected back")


def user_provider(gate: Gate, browser: Browser, storage: Memory) -> OAuthClientProvider:
    return OAuthClientProvider(
        server_url=gate.url,
        client_metadata=OAuthClientMetadata(
            client_name="tollgate-e2e",
            redirect_uris=[REDIRECT],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="client_secret_post",
        ),
        storage=storage,
        redirect_handler=browser.redirect,
        callback_handler=browser.callback,
    )


@asynccontextmanager
async def connect(url: str, auth, era: str):
    transport = streamable_http_client(url, http_client=httpx2.AsyncClient(auth=auth, timeout=30))
    async with Client(transport, mode=era) as client:
        if era == "auto":
            assert client.protocol_version == MODERN, client.protocol_version
        else:
            assert client.protocol_version != MODERN, client.protocol_version
        yield client


def claims(storage: Memory) -> dict:
    return jwt.decode(storage.tokens.access_token, options={"verify_signature": False})


def no_token_reached_upstream(gate: Gate, *tokens: str) -> None:
    requests = gate.upstream_headers()
    assert requests, "the upstream saw no request at all"
    for request in requests:
        names = {name for name, _ in request["headers"]}
        assert "authorization" not in names, request
        for token in tokens:
            assert all(token not in value for _, value in request["headers"]), request


@pytest.mark.parametrize("era", ERAS)
async def test_the_sdk_runs_the_whole_oauth_flow_and_steps_up_for_a_scope(era, setup):
    idp, gate, _ = setup
    browser, storage = Browser("alice"), Memory()
    with anyio.fail_after(60):
        async with connect(gate.url, user_provider(gate, browser, storage), era) as client:
            assert browser.pages == ["login", "consent"], browser.pages
            first = claims(storage)
            assert first["sub"] == "alice" and first["scope"] == "mcp", first
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"query_metrics", "start_export", "whoami"} <= names, names
            ok = await client.call_tool("query_metrics", {"query": "cpu"})
            assert ok.is_error is False and ok.content[0].text == "42 rows for cpu", ok
            # start_export needs `exports:write`: 403 insufficient_scope, the SDK asks for
            # it (a second authorization: alice is still signed in, so only consent), retries.
            export = await client.call_tool("start_export", {"dataset": "sales"})
            assert export.is_error is False and "started" in export.content[0].text, export
            assert browser.pages == ["login", "consent", "consent"], browser.pages
            stepped = claims(storage)
            assert set(stepped["scope"].split()) == {"mcp", "exports:write"}, stepped
    assert gate.calls() == ["query_metrics", "start_export"]
    decisions = gate.decisions()
    by_tool = {(d["tool"], d["decision"], d.get("kind")) for d in decisions}
    assert ("start_export", "deny", "insufficient_scope") in by_tool, decisions
    allowed = [d for d in decisions if d["decision"] == "allow"]
    assert {d["tool"] for d in allowed} == {"query_metrics", "start_export"}
    for d in allowed:
        assert d["user"] == "alice" and d["client_id"] == storage.client.client_id, d
        assert d["jti"] in (first["jti"], stepped["jti"]), d
    no_token_reached_upstream(gate, storage.tokens.access_token, first.get("jti", "-"))
    # The token is never logged either.
    assert storage.tokens.access_token not in gate.proc.log.read_text()


async def test_a_challenge_names_the_metadata_and_the_metadata_names_the_issuer(setup):
    idp, gate, _ = setup
    r = httpx.post(gate.url, json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                   headers={"accept": "application/json, text/event-stream"}, timeout=10)
    assert r.status_code == 401
    # The body was not read, so the connection is not reused for the client's next try.
    assert r.headers["connection"] == "close"
    challenge = r.headers["www-authenticate"]
    metadata_url = f"{gate.base}/.well-known/oauth-protected-resource/servers/demo/mcp"
    assert challenge == f'Bearer scope="mcp", resource_metadata="{metadata_url}"', challenge
    for url in (metadata_url, f"{gate.base}/.well-known/oauth-protected-resource",
                f"{gate.base}/.well-known/oauth-protected-resource/mcp"):
        meta = httpx.get(url, timeout=10).json()
        assert meta["resource"] == gate.resource
        assert meta["authorization_servers"] == [idp.issuer]
        assert meta["scopes_supported"] == ["mcp"]
    assert httpx.get(f"{gate.base}/.well-known/oauth-protected-resource/servers/nope/mcp", timeout=10).status_code == 404
    assert gate.calls() == []


@pytest.mark.parametrize("era", ERAS)
async def test_claims_decide_who_may_call_and_what_is_listed(era, setup):
    idp, gate, _ = setup
    browser, storage = Browser("bob"), Memory()
    with anyio.fail_after(60):
        async with connect(gate.url, user_provider(gate, browser, storage), era) as client:
            names = {t.name for t in (await client.list_tools()).tools}
            assert "query_metrics" not in names and "whoami" in names, names
            denied = await client.call_tool("query_metrics", {"query": "cpu"})
            assert denied.is_error is True
            assert denied.content[0].text == "Denied by policy: only SRE and data engineering may query metrics"
    assert gate.calls() == []
    [d] = [d for d in gate.decisions() if d["tool"] == "query_metrics"]
    assert d["decision"] == "deny" and d["user"] == "bob", d


@pytest.mark.parametrize("era", ERAS)
async def test_a_client_credentials_client_calls_as_itself(era, setup):
    idp, gate, _ = setup
    storage = Memory()
    auth = ClientCredentialsOAuthProvider(
        server_url=gate.url, storage=storage, client_id="ci-agent",
        client_secret="ci-agent-secret-0123", issuer=idp.issuer, scope="mcp",
    )
    with anyio.fail_after(60):
        async with connect(gate.url, auth, era) as client:
            result = await client.call_tool("whoami", {})
            assert result.is_error is False, result
            # Its token's `groups` is [ci]: the SRE rule does not apply.
            denied = await client.call_tool("query_metrics", {"query": "x"})
            assert denied.is_error is True
    assert gate.calls() == ["whoami"]
    d = [d for d in gate.decisions() if d["tool"] == "whoami"][0]
    assert d["user"] == "ci-agent" and d["client_id"] == "ci-agent", d
    no_token_reached_upstream(gate, storage.tokens.access_token)


async def test_per_user_limits_follow_the_user_across_sessions_and_eras(setup):
    idp, gate, _ = setup
    browser = Browser("alice")  # one person, signed in once, two clients
    results = []
    with anyio.fail_after(90):
        for era in ("legacy", "auto"):
            async with connect(gate.url, user_provider(gate, browser, Memory()), era) as client:
                for _ in range(2):
                    results.append(await client.call_tool("whoami", {}))
        # Another user has a quota of their own.
        async with connect(gate.url, user_provider(gate, Browser("bob"), Memory()), "auto") as client:
            bobs = await client.call_tool("whoami", {})
    assert [r.is_error for r in results] == [False, False, False, True], results
    meta = results[3].meta["dev.tollgate/decision"]
    assert meta["kind"] == "rate_limit" and "per user" in meta["reason"], meta
    assert bobs.is_error is False
    assert gate.calls() == ["whoami"] * 4


def raw_call(gate: Gate, token: str | None, tool: str = "whoami") -> httpx.Response:
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
               "mcp-protocol-version": MODERN, "mcp-method": "tools/call", "mcp-name": tool}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": tool, "arguments": {},
        "_meta": {"io.modelcontextprotocol/protocolVersion": MODERN,
                  "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
                  "io.modelcontextprotocol/clientCapabilities": {}}}}
    return httpx.post(gate.url, json=body, headers=headers, timeout=15)


def hmac_with_public_key(idp: Idp, claims: dict) -> str:
    """HS256 with the issuer's public key as the secret: the classic key-confusion forgery."""
    public = idp.key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": idp.kid}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(public, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


def unsigned(claims: dict) -> str:
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64url(json.dumps(claims).encode())}."


async def test_bad_tokens_are_refused_with_401_and_never_forwarded(setup):
    idp, gate, other = setup
    now = int(time.time())
    good = {"iss": idp.issuer, "sub": "mallory", "aud": f"{gate.resource}/", "client_id": "x",
            "scope": "mcp", "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
    # The issuer's own key and claims: accepted (so each case below fails for its one reason).
    assert raw_call(gate, idp.sign(good)).status_code == 200
    assert gate.calls() == ["whoami"]
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_resource = idp.client_credentials(other)
    assert other_resource.status_code == 200, other_resource.text
    cases = {
        "wrong audience": (idp.sign({**good, "aud": "https://elsewhere.example/mcp"}), "not for this resource"),
        "another resource's token": (other_resource.json()["access_token"], "not for this resource"),
        "wrong issuer": (idp.sign({**good, "iss": "https://evil.example"}), "another issuer"),
        "expired": (idp.sign({**good, "iat": now - 900, "exp": now - 600}), "expired"),
        "not yet valid": (idp.sign({**good, "nbf": now + 600}), "not valid yet"),
        "unknown key": (idp.sign(good, key=stranger, kid="k-unknown"), "a key the issuer does not publish"),
        "a known kid, another key": (idp.sign(good, key=stranger), "signature does not verify"),
        "alg none": (unsigned(good), "algorithm is not accepted"),
        "HMAC with the public key": (hmac_with_public_key(idp, good), "algorithm is not accepted"),
        "no sub": (idp.sign({k: v for k, v in good.items() if k != "sub"}), "lacks a required claim"),
        "not a JWT": ("not-a-token", "not a JWT"),
    }
    for name, (token, why) in cases.items():
        r = raw_call(gate, token)
        assert r.status_code == 401, (name, r.status_code, r.text)
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith('Bearer error="invalid_token"'), (name, challenge)
        assert "resource_metadata=" in challenge, (name, challenge)
        assert why in r.json()["error"]["message"], (name, r.text)
    assert gate.calls() == ["whoami"], "a refused token's call reached the upstream"
    no_token_reached_upstream(gate, *(token for token, _ in cases.values()))


async def test_an_unknown_kid_fetches_the_keys_once_not_once_per_request(setup):
    idp, gate, _ = setup
    now = int(time.time())
    good = {"iss": idp.issuer, "sub": "alice", "aud": gate.resource, "scope": "mcp",
            "iat": now, "exp": now + 300}
    assert raw_call(gate, idp.sign(good)).status_code == 200
    warm = idp.jwks_hits()
    assert warm >= 1
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for i in range(8):
        r = raw_call(gate, idp.sign(good, key=stranger, kid=f"rotated-{i % 2}"))
        assert r.status_code == 401, r.text
    assert idp.jwks_hits() == warm + 1, "unknown kids must trigger one JWKS refresh, not one per request"
    # The known key still works from the cache, with no further fetch.
    assert raw_call(gate, idp.sign(good)).status_code == 200
    assert idp.jwks_hits() == warm + 1


async def test_the_approvals_api_shows_who_asked(setup):
    idp, gate, _ = setup
    now = int(time.time())
    token = idp.sign({"iss": idp.issuer, "sub": "alice", "aud": gate.resource, "azp": "vscode",
                      "scope": "mcp", "iat": now, "exp": now + 300, "jti": "j-approval"})
    admin = {"authorization": "Bearer admin-token-0123456789"}
    answers: list[httpx.Response] = []

    def call() -> None:
        answers.append(raw_call(gate, token, "drop_everything"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, call)
        with anyio.fail_after(20):
            while True:
                pending = [a for a in httpx.get(f"{gate.admin}/approvals", headers=admin, timeout=10).json()
                           if a["status"] == "pending"]
                if pending:
                    break
                await anyio.sleep(0.05)
        [approval] = pending
        assert approval["user"] == "alice" and approval["client_id"] == "vscode", approval
        r = httpx.post(f"{gate.admin}/approvals/{approval['id']}/deny", headers=admin,
                       json={"reason": "not today"}, timeout=10)
        assert r.status_code == 200, r.text
    assert "not today" in answers[0].text
    assert gate.calls() == []


async def test_the_legacy_sse_transport_takes_tokens_too(setup):
    from mcp.client.sse import sse_client

    idp, gate, _ = setup
    sse_url = f"{gate.base}/servers/demo/sse"
    r = httpx.get(sse_url, timeout=10)
    assert r.status_code == 401, r.text
    assert f'resource_metadata="{gate.base}/.well-known/oauth-protected-resource/servers/demo/sse"' in r.headers["www-authenticate"]
    storage = Memory()
    auth = ClientCredentialsOAuthProvider(
        server_url=sse_url, storage=storage, client_id="ci-agent",
        client_secret="ci-agent-secret-0123", issuer=idp.issuer, scope="mcp",
    )
    with anyio.fail_after(60):
        async with Client(sse_client(sse_url, auth=auth, timeout=30), mode="legacy") as client:
            assert (await client.call_tool("whoami", {})).is_error is False
    assert gate.calls() == ["whoami"]
    [d] = [d for d in gate.decisions() if d["tool"] == "whoami"]
    assert d["user"] == "ci-agent", d
    no_token_reached_upstream(gate, storage.tokens.access_token)


@pytest.mark.parametrize("setup", ["limits: {requests_per_second: 5, burst: 5}"], indirect=True)
async def test_bad_tokens_cost_their_sender_requests(setup):
    idp, gate, _ = setup
    answers = [raw_call(gate, "not-a-token").status_code for _ in range(30)]
    assert answers[0] == 401
    assert 429 in answers, answers
    assert gate.calls() == []
