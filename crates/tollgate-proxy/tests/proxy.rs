//! The proxy over real sockets, in front of the built-in demo upstream.
//!
//! These exercise the data path stage by stage (guards, framing, sessions,
//! enforcement, approvals, reload, metrics); the SDK interoperability tests live
//! in the repository's `tests/` directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tollgate_demo::{Demo, DemoOptions};
use tollgate_proxy::{AppState, Config, Lanes, LoadedPolicy};

const POLICY: &str = r#"
version: 1
default: deny
rules:
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    approval: { timeout: 2 }
    arguments:
      type: object
      required: [datastore_id]
      properties:
        datastore_id: { type: string, pattern: "^[A-Za-z0-9]{32}$" }
  - tool: describe_*
    action: allow
    rate_limit: { max: 2, window: 60 }
  - tool: list_fhir_datastores
    action: allow
  - tool: delete_*
    action: deny
    reason: Deleting data stores is never done by agents.
"#;

struct Harness {
    url: String,
    admin: Option<String>,
    demo: Arc<Demo>,
    state: AppState,
    http: reqwest::Client,
    dir: tempdir::Dir,
}

mod tempdir {
    use std::path::{Path, PathBuf};
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let n: u64 = rand_suffix();
            let path = std::env::temp_dir()
                .join(format!("tollgate-proxy-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Dir(path)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }
}

async fn start_demo(options: DemoOptions) -> (String, Arc<Demo>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let demo = Demo::new(options);
    let router = tollgate_demo::router(demo.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}/mcp"), demo)
}

/// The demo upstream, with the set of connections (peers) Tollgate opened to it.
async fn start_counting_demo() -> (String, Arc<Demo>, Arc<Mutex<HashSet<SocketAddr>>>) {
    use axum::extract::{ConnectInfo, Request};
    use axum::middleware::Next;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let demo = Demo::new(DemoOptions::default());
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = peers.clone();
    let router = tollgate_demo::router(demo.clone()).layer(axum::middleware::from_fn(
        move |ConnectInfo(peer): ConnectInfo<SocketAddr>, request: Request, next: Next| {
            seen.lock().unwrap().insert(peer);
            next.run(request)
        },
    ));
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, service).await });
    (format!("http://{addr}/mcp"), demo, peers)
}

async fn start(policy: &str, extra_config: &str, with_admin: bool) -> Harness {
    let (upstream, demo) = start_demo(DemoOptions::default()).await;
    start_with_upstream(policy, extra_config, with_admin, &upstream, demo).await
}

async fn start_with_upstream(
    policy: &str,
    extra_config: &str,
    with_admin: bool,
    upstream: &str,
    demo: Arc<Demo>,
) -> Harness {
    start_on_lanes(
        policy,
        extra_config,
        with_admin,
        upstream,
        demo,
        Lanes::one(),
    )
    .await
}

async fn start_on_lanes(
    policy: &str,
    extra_config: &str,
    with_admin: bool,
    upstream: &str,
    demo: Arc<Demo>,
    lanes: Lanes,
) -> Harness {
    let dir = tempdir::Dir::new();
    let policy_path = dir.path().join("policy.yaml");
    std::fs::write(&policy_path, policy).unwrap();
    let audit_path = dir.path().join("audit.jsonl");
    let yaml = format!(
        "listen: 127.0.0.1:0\naudit: {{path: '{}'}}\n{extra_config}\nservers:\n  healthlake:\n    url: {upstream}\n    policy: policy.yaml\n    timeout: 2s\n",
        audit_path.display()
    );
    let config = Config::from_yaml(&yaml, "test.yaml", &|_| None).unwrap();
    let mut policies = BTreeMap::new();
    policies.insert(
        "healthlake".to_owned(),
        LoadedPolicy::read(&policy_path).unwrap(),
    );
    let state = AppState::build_with(&config, policies, lanes).unwrap();
    let listeners = state.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr: SocketAddr = listeners.local_addr().unwrap();
    let admin = if with_admin {
        let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin_listener.local_addr().unwrap();
        let admin =
            tollgate_proxy::prepare_admin(&state, admin_addr, Some("admin-token"), "test").unwrap();
        tokio::spawn(tollgate_proxy::serve_admin(
            admin,
            admin_listener,
            std::future::pending(),
        ));
        Some(format!("http://{admin_addr}"))
    } else {
        None
    };
    tokio::spawn(tollgate_proxy::serve(
        state.clone(),
        listeners,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    Harness {
        url: format!("http://{addr}/mcp"),
        admin,
        demo,
        state,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        dir,
    }
}

fn call(id: u64, tool: &str, arguments: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}})
}

fn stateless(mut message: Value) -> Value {
    message["params"]["_meta"] = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    });
    message
}

impl Harness {
    async fn post(
        &self,
        session: Option<&str>,
        body: &Value,
    ) -> (reqwest::StatusCode, reqwest::header::HeaderMap, Value) {
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(session) = session {
            request = request
                .header("mcp-session-id", session)
                .header("mcp-protocol-version", "2025-11-25");
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        (status, headers, parse_body(&text))
    }

    async fn post_stateless(
        &self,
        body: &Value,
        name_header: Option<&str>,
    ) -> (reqwest::StatusCode, Value) {
        let body = stateless(body.clone());
        let mut request = self
            .http
            .post(&self.url)
            .header("accept", "application/json, text/event-stream")
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", body["method"].as_str().unwrap());
        if let Some(name) = name_header {
            request = request.header("mcp-name", name);
        }
        let response = request.body(body.to_string()).send().await.unwrap();
        let status = response.status();
        (status, parse_body(&response.text().await.unwrap()))
    }

    async fn initialize(&self) -> String {
        let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}}});
        let (status, headers, body) = self.post(None, &init).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["result"]["serverInfo"]["name"], "tollgate-demo");
        headers["mcp-session-id"].to_str().unwrap().to_owned()
    }

    fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.path().join("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn policy_path(&self) -> std::path::PathBuf {
        self.dir.path().join("policy.yaml")
    }
}

/// JSON bodies parse as they are; an SSE body yields its last `data:` message.
fn parse_body(text: &str) -> Value {
    if let Ok(value) = serde_json::from_str(text) {
        return value;
    }
    text.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find(|v| v.get("id").is_some())
        .unwrap_or(Value::Null)
}

fn decision(body: &Value) -> &Value {
    &body["result"]["_meta"]["dev.tollgate/decision"]
}

#[tokio::test]
async fn handshake_era_session_list_allow_and_deny() {
    let h = start(POLICY, "", false).await;
    let session = h.initialize().await;
    assert_eq!(session.len(), 32, "a 128-bit hex session id");

    let (_, _, list) = h
        .post(
            Some(&session),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await;
    let names: Vec<&str> = list["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"list_fhir_datastores"));
    assert!(
        names.contains(&"start_fhir_export_job"),
        "needs approval, so it stays visible"
    );
    assert!(
        !names.contains(&"delete_fhir_datastore"),
        "denied outright, so hidden: {names:?}"
    );

    let (_, _, allowed) = h
        .post(Some(&session), &call(2, "list_fhir_datastores", json!({})))
        .await;
    assert_eq!(allowed["result"]["isError"], false);
    assert_eq!(h.demo.calls(), 1);

    let (_, _, denied) = h
        .post(
            Some(&session),
            &call(3, "delete_fhir_datastore", json!({"datastore_id": "x"})),
        )
        .await;
    assert_eq!(denied["id"], 3);
    assert_eq!(denied["result"]["isError"], true);
    let text = denied["result"]["content"][0]["text"].as_str().unwrap();
    assert_eq!(
        text,
        "Denied by policy: Deleting data stores is never done by agents."
    );
    assert_eq!(decision(&denied)["kind"], "deny");
    assert_eq!(decision(&denied)["tool"], "delete_fhir_datastore");

    let (_, _, default) = h
        .post(Some(&session), &call(4, "not_a_tool", json!({})))
        .await;
    assert_eq!(decision(&default)["kind"], "deny");
    assert_eq!(h.demo.calls(), 1, "denied calls never reach the upstream");

    let audit = h.audit();
    let decisions: Vec<&str> = audit
        .iter()
        .filter(|r| r["event"] == "decision")
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["allow", "deny", "deny"]);
    // An outcome is written with the next record or within 50 ms.
    let mut outcome = false;
    for _ in 0..50 {
        outcome = h
            .audit()
            .iter()
            .any(|r| r["event"] == "outcome" && r["outcome"] == "ok");
        if outcome {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(outcome, "no outcome record within 1 s");
}

#[tokio::test]
async fn sessions_are_required_known_and_deletable() {
    let h = start(POLICY, "", false).await;
    let (status, _, body) = h
        .post(
            None,
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _, _) = h
        .post(
            Some("0123456789abcdef0123456789abcdef"),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        )
        .await;
    assert_eq!(status, 404);
    let session = h.initialize().await;
    let (status, _, _) = h
        .post(
            Some(&session),
            &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        )
        .await;
    assert_eq!(status, 202);
    let deleted = h
        .http
        .delete(&h.url)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let (status, _, _) = h
        .post(
            Some(&session),
            &json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}),
        )
        .await;
    assert_eq!(status, 404, "a deleted session is gone");
}

#[tokio::test]
async fn stateless_era_checks_headers_against_the_body() {
    let h = start(POLICY, "", false).await;
    let (status, body) = h
        .post_stateless(
            &call(1, "list_fhir_datastores", json!({})),
            Some("list_fhir_datastores"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["result"]["resultType"], "complete");
    assert_eq!(h.demo.calls(), 1);

    // A header naming an allowed tool cannot smuggle a denied one past the policy.
    let (status, body) = h
        .post_stateless(
            &call(2, "delete_fhir_datastore", json!({})),
            Some("list_fhir_datastores"),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], -32020);
    assert_eq!(body["id"], 2);
    let (status, body) = h
        .post_stateless(&call(3, "list_fhir_datastores", json!({})), None)
        .await;
    assert_eq!(status, 400, "Mcp-Name is required for tools/call: {body}");
    assert_eq!(h.demo.calls(), 1, "refused requests are never forwarded");

    let (_, denied) = h
        .post_stateless(
            &call(4, "delete_fhir_datastore", json!({})),
            Some("delete_fhir_datastore"),
        )
        .await;
    assert_eq!(denied["result"]["isError"], true);
    assert_eq!(denied["result"]["resultType"], "complete");
}

#[tokio::test]
async fn bad_input_gets_json_rpc_errors_and_http_statuses() {
    let h = start(POLICY, "limits: {max_body: 1KiB}", false).await;
    let raw = |body: &'static str| {
        h.http
            .post(&h.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let response = raw("{not json").await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        -32700
    );
    let response = raw(r#"{"jsonrpc":"1.0","id":1,"method":"x"}"#)
        .await
        .unwrap();
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        -32600
    );
    let big = "x".repeat(2048);
    let response = h
        .http
        .post(&h.url)
        .body(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{big}"}}"#))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let response = h
        .http
        .post(&h.url)
        .header("origin", "http://evil.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = h
        .http
        .post(&h.url)
        .header("host", "evil.example")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 421);
    let response = h.http.put(&h.url).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 405);
    let other = h.url.replace("/mcp", "/servers/nope/mcp");
    assert_eq!(
        h.http
            .post(&other)
            .body("{}")
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(h.demo.calls(), 0);
}

#[tokio::test]
async fn tool_calls_that_cannot_be_judged_are_never_forwarded() {
    let h = start("version: 1\ndefault: allow\nrules: []\n", "", false).await;
    let session = h.initialize().await;
    for (body, status) in [
        (
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": 7}}),
            200,
        ),
        (
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call"}),
            200,
        ),
        (
            json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"arguments": {}}}),
            200,
        ),
        (
            json!({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "list_fhir_datastores"}}),
            400,
        ),
    ] {
        let (got, _, answer) = h.post(Some(&session), &body).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], -32602, "{answer}");
    }
    let batch =
        json!([{"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": null}}]);
    let (_, _, answer) = h.post(Some(&session), &batch).await;
    assert_eq!(answer[0]["error"]["code"], -32602, "{answer}");
    assert_eq!(h.demo.calls(), 0);
}

#[tokio::test]
async fn argument_schema_and_rate_limits() {
    let h = start(POLICY, "", true).await;
    let session = h.initialize().await;
    let (_, _, bad) = h
        .post(
            Some(&session),
            &call(1, "start_fhir_export_job", json!({"datastore_id": "short"})),
        )
        .await;
    assert_eq!(decision(&bad)["kind"], "arguments");
    assert!(
        decision(&bad)["reason"]
            .as_str()
            .unwrap()
            .contains("datastore_id"),
        "{bad}"
    );

    let describe = json!({"datastore_id": "a", "job_id": "b"});
    for id in 2..4 {
        let (_, _, ok) = h
            .post(
                Some(&session),
                &call(id, "describe_fhir_export_job", describe.clone()),
            )
            .await;
        assert_eq!(ok["result"]["isError"], false, "{ok}");
    }
    let (_, _, limited) = h
        .post(
            Some(&session),
            &call(4, "describe_fhir_export_job", describe.clone()),
        )
        .await;
    assert_eq!(decision(&limited)["kind"], "rate_limit");
    assert!(decision(&limited)["retry_after_ms"].as_u64().unwrap() > 0);
    assert!(
        limited["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("retry in ")
    );
    assert_eq!(h.demo.calls(), 2);

    // per: session (the default): a new session has a fresh quota.
    let other = h.initialize().await;
    let (_, _, fresh) = h
        .post(Some(&other), &call(5, "describe_fhir_export_job", describe))
        .await;
    assert_eq!(fresh["result"]["isError"], false, "{fresh}");
}

#[tokio::test]
async fn upstream_down_or_silent_is_a_clear_error_within_the_timeout() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}/mcp", closed.local_addr().unwrap());
    drop(closed);
    let h = start_with_upstream(POLICY, "", false, &dead, Demo::new(DemoOptions::default())).await;
    let (status, body) = h
        .post_stateless(
            &call(1, "list_fhir_datastores", json!({})),
            Some("list_fhir_datastores"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("upstream `healthlake`") && message.contains("could not be reached"),
        "{message}"
    );

    // An upstream that accepts and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}/mcp", silent.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let h = start_with_upstream(
        POLICY,
        "",
        false,
        &silent_url,
        Demo::new(DemoOptions::default()),
    )
    .await;
    let started = std::time::Instant::now();
    let (_, body) = h
        .post_stateless(
            &call(1, "list_fhir_datastores", json!({})),
            Some("list_fhir_datastores"),
        )
        .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer within 2s"),
        "{body}"
    );
}

async fn wait_for_pending(h: &Harness) -> String {
    for _ in 0..100 {
        if let Some(a) = h
            .state
            .approvals()
            .list()
            .into_iter()
            .find(|a| a.status == tollgate_proxy::ApprovalStatus::Pending)
        {
            return a.id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no approval became pending");
}

const EXPORT: &str = "0123456789abcdef0123456789abcdef";

#[tokio::test]
async fn approval_holds_the_call_until_a_human_decides() {
    let h = start(POLICY, "", true).await;
    let admin = h.admin.clone().unwrap();
    let session = h.initialize().await;

    let waiting = {
        let h_url = h.url.clone();
        let http = h.http.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let body = call(1, "start_fhir_export_job", json!({"datastore_id": EXPORT}));
            let response = http
                .post(&h_url)
                .header("mcp-session-id", session)
                .header("accept", "application/json, text/event-stream")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            parse_body(&response.text().await.unwrap())
        })
    };
    let id = wait_for_pending(&h).await;
    assert_eq!(h.demo.calls(), 0, "held, not forwarded");
    assert_eq!(
        h.state
            .metrics()
            .open_streams
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the held call's stream"
    );

    // The admin API wants the token.
    let unauthorized = h
        .http
        .get(format!("{admin}/approvals"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    let wrong = h
        .http
        .get(format!("{admin}/approvals"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let list: Value = h
        .http
        .get(format!("{admin}/approvals"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["arguments"]["datastore_id"], EXPORT);

    // Another site cannot reach the admin API, by DNS rebinding or by a cross-site form.
    let rebound = h
        .http
        .post(format!("{admin}/approvals/{id}/approve"))
        .bearer_auth("admin-token")
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 421);
    let cross_site = h
        .http
        .post(format!("{admin}/approvals/{id}/approve"))
        .bearer_auth("admin-token")
        .header("origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    assert_eq!(h.demo.calls(), 0);

    let approved = h
        .http
        .post(format!("{admin}/approvals/{id}/approve"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(approved.status(), 200);
    let result = waiting.await.unwrap();
    assert_eq!(
        result["result"]["structuredContent"]["JobStatus"], "SUBMITTED",
        "{result}"
    );
    assert_eq!(h.demo.calls(), 1);

    let again = h
        .http
        .post(format!("{admin}/approvals/{id}/deny"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let unknown = h
        .http
        .post(format!("{admin}/approvals/nope/deny"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(
        h.audit()
            .iter()
            .any(|r| r["event"] == "approval" && r["verdict"] == "approved")
    );
}

#[tokio::test]
async fn denied_expired_and_left_approvals_never_reach_the_upstream() {
    let h = start(POLICY, "", true).await;
    let admin = h.admin.clone().unwrap();
    let send = |id: u64| {
        let (url, http) = (h.url.clone(), h.http.clone());
        tokio::spawn(async move {
            // Each its own call: a retry of the same call would join its approval.
            let body = stateless(call(
                id,
                "start_fhir_export_job",
                json!({"datastore_id": EXPORT, "job": id}),
            ));
            let response = http
                .post(&url)
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "start_fhir_export_job")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            parse_body(&response.text().await.unwrap())
        })
    };
    let denied = send(1);
    let id = wait_for_pending(&h).await;
    h.http
        .post(format!("{admin}/approvals/{id}/deny"))
        .bearer_auth("admin-token")
        .json(&json!({"reason": "wrong bucket"}))
        .send()
        .await
        .unwrap();
    let body = denied.await.unwrap();
    assert_eq!(decision(&body)["kind"], "approval_denied");
    assert!(
        body["result"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("wrong bucket"),
        "{body}"
    );

    // The rule's approval timeout is 2s.
    let body = send(2).await.unwrap();
    assert_eq!(decision(&body)["kind"], "approval_timeout", "{body}");

    // A client that goes away leaves its approval pending, for its retry.
    let left = send(3);
    let id = wait_for_pending(&h).await;
    left.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.state.approvals().get(&id).map(|a| a.status),
        Some(tollgate_proxy::ApprovalStatus::Pending)
    );
    // Everything the vanished client held is freed, its stream included.
    let streams = || {
        h.state
            .metrics()
            .open_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for _ in 0..100 {
        if streams() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(streams(), 0);
    assert_eq!(h.demo.calls(), 0);
}

#[tokio::test]
async fn reload_swaps_valid_policies_and_keeps_the_old_one_on_errors() {
    let h = start(POLICY, "", true).await;
    let list = || stateless(call(1, "list_fhir_datastores", json!({})));
    let (_, body) = h
        .post_stateless(&list(), Some("list_fhir_datastores"))
        .await;
    assert_eq!(body["result"]["isError"], false);

    std::fs::write(h.policy_path(), "version: 1\ndefault: deny\nrules: []\n").unwrap();
    let reports = tollgate_proxy::reload_all(&h.state);
    assert_eq!(reports[0].result, "reloaded");
    let (_, body) = h
        .post_stateless(&list(), Some("list_fhir_datastores"))
        .await;
    assert_eq!(decision(&body)["kind"], "deny");

    std::fs::write(
        h.policy_path(),
        "version: 1\ndefault: allow\nrules:\n  - tool: x\n    actoin: deny\n",
    )
    .unwrap();
    let reports = tollgate_proxy::reload_all(&h.state);
    assert_eq!(reports[0].result, "failed");
    assert!(reports[0].error.as_deref().unwrap().contains("actoin"));
    let (_, body) = h
        .post_stateless(&list(), Some("list_fhir_datastores"))
        .await;
    assert_eq!(
        decision(&body)["kind"],
        "deny",
        "the previous policy stays in force"
    );

    let admin = h.admin.clone().unwrap();
    let status: Value = h
        .http
        .get(format!("{admin}/status"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        status["servers"][0]["policy"]["last_error"]
            .as_str()
            .unwrap()
            .contains("actoin"),
        "{status}"
    );
    let metrics = h
        .http
        .get(format!("{admin}/metrics"))
        .bearer_auth("admin-token")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"tollgate_policy_reloads_total{server="healthlake",result="failed"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tollgate_policy_reloads_total{server="healthlake",result="ok"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn clients_need_keys_and_sessions_stay_with_their_client() {
    let clients = "clients:\n  - {name: alice, key: alice-key-0123456789}\n  - {name: bob, key: bob-key-0123456789ab}";
    let h = start(POLICY, clients, false).await;
    let init = json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let anonymous = h
        .http
        .post(&h.url)
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let alice = h
        .http
        .post(&h.url)
        .bearer_auth("alice-key-0123456789")
        .body(init.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(alice.status(), 200);
    let session = alice.headers()["mcp-session-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let stolen = h
        .http
        .post(&h.url)
        .bearer_auth("bob-key-0123456789ab")
        .header("mcp-session-id", &session)
        .body(json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        stolen.status(),
        404,
        "a session is bound to the client that opened it"
    );
    // An unknown server name: only an authenticated client learns the real names.
    let base = h.url.trim_end_matches("/mcp");
    for path in ["/servers/nope/mcp", "/servers/nope/sse"] {
        let stranger = h.http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(stranger.status(), 404);
        assert!(!stranger.text().await.unwrap().contains("healthlake"));
        let known = h
            .http
            .get(format!("{base}{path}"))
            .bearer_auth("alice-key-0123456789")
            .send()
            .await
            .unwrap();
        assert_eq!(known.status(), 404);
        let text = known.text().await.unwrap();
        assert!(text.contains("servers here: healthlake"), "{text}");
    }
}

#[tokio::test]
async fn several_servers_each_with_its_own_policy() {
    let (upstream, demo) = start_demo(DemoOptions::default()).await;
    let dir = tempdir::Dir::new();
    std::fs::write(
        dir.path().join("open.yaml"),
        "version: 1\ndefault: allow\nrules: []\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("closed.yaml"),
        "version: 1\ndefault: deny\nrules: []\n",
    )
    .unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nservers:\n  open:\n    url: {upstream}\n    policy: open.yaml\n  closed:\n    url: {upstream}\n    policy: closed.yaml\n"
    );
    let config = Config::from_yaml(&yaml, "two.yaml", &|_| None).unwrap();
    let mut policies = BTreeMap::new();
    for name in ["open", "closed"] {
        policies.insert(
            name.to_owned(),
            LoadedPolicy::read(&dir.path().join(format!("{name}.yaml"))).unwrap(),
        );
    }
    let state = AppState::build(&config, policies).unwrap();
    let listeners = state.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listeners.local_addr().unwrap();
    tokio::spawn(tollgate_proxy::serve(
        state,
        listeners,
        std::future::pending(),
        Duration::from_secs(1),
    ));
    let http = reqwest::Client::new();
    let post = |path: &str| {
        let body = stateless(call(1, "list_fhir_datastores", json!({})));
        http.post(format!("http://{addr}{path}"))
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "list_fhir_datastores")
            .body(body.to_string())
            .send()
    };
    let open: Value = post("/servers/open/mcp")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(open["result"]["isError"], false, "{open}");
    let closed: Value = post("/servers/closed/mcp")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(decision(&closed)["kind"], "deny", "{closed}");
    assert_eq!(
        post("/mcp").await.unwrap().status(),
        404,
        "/mcp is only for a single server"
    );
    let unknown = post("/servers/other/mcp").await.unwrap();
    assert_eq!(unknown.status(), 404);
    let text = unknown.text().await.unwrap();
    assert!(
        !text.contains("open") && !text.contains("closed"),
        "does not list the others: {text}"
    );
    assert_eq!(demo.calls(), 1);
}

/// Issue 16.3: a stateless-era client that supports URL-mode elicitation is pointed at
/// the approvals page in `inputRequests`; one without gets `requestState` alone; a
/// handshake-era one gets neither (an `approval_pending` result).
#[tokio::test]
async fn a_pending_approval_points_a_url_capable_client_at_the_page() {
    let policy = POLICY.replace(
        "approval: { timeout: 2 }",
        "approval: { timeout: 60, wait: 1 }",
    );
    let h = start(&policy, "", true).await;
    let admin = h.admin.clone().unwrap();
    let ask = |id: u64, capabilities: Value| {
        let (url, http) = (h.url.clone(), h.http.clone());
        async move {
            let mut body = stateless(call(
                id,
                "start_fhir_export_job",
                json!({"datastore_id": EXPORT, "job": id}),
            ));
            body["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] = capabilities;
            let response = http
                .post(&url)
                .header("accept", "application/json, text/event-stream")
                .header("mcp-protocol-version", "2026-07-28")
                .header("mcp-method", "tools/call")
                .header("mcp-name", "start_fhir_export_job")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            parse_body(&response.text().await.unwrap())
        }
    };
    let with_url = ask(1, json!({"elicitation": {"url": {}}})).await;
    let result = &with_url["result"];
    assert_eq!(result["resultType"], "input_required", "{with_url}");
    assert!(
        result["requestState"]
            .as_str()
            .unwrap()
            .starts_with("tollgate1.")
    );
    let link = &result["inputRequests"]["dev.tollgate/approval-page"];
    assert_eq!(link["method"], "elicitation/create", "{with_url}");
    assert_eq!(link["params"]["mode"], "url");
    let id = decision(&with_url)["approval_id"].as_str().unwrap();
    assert_eq!(
        link["params"]["url"],
        format!("{admin}/#approval={id}").as_str()
    );
    // Form-only elicitation (an empty object) with a queue rule: no form, no link.
    let plain = ask(2, json!({"elicitation": {}})).await;
    assert_eq!(plain["result"]["resultType"], "input_required", "{plain}");
    assert!(plain["result"].get("inputRequests").is_none(), "{plain}");
    assert_eq!(h.demo.calls(), 0);
}

/// Several lanes serve one port, the kernel spreading connections over them: every
/// call is decided and answered whichever lane took it, and each lane reaches the
/// upstream over connections of its own.
#[tokio::test]
async fn several_lanes_serve_one_port_each_with_its_own_upstream_connections() {
    let (upstream, demo, peers) = start_counting_demo().await;
    let h = start_on_lanes(POLICY, "", false, &upstream, demo, Lanes::new(3)).await;
    const CALLS: u64 = 24;
    for id in 0..CALLS {
        // A new connection for each call, so that the calls land on every lane.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let body = stateless(call(id, "list_fhir_datastores", json!({})));
        let answer: Value = client
            .post(&h.url)
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "list_fhir_datastores")
            .header("accept", "application/json, text/event-stream")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(answer["result"]["isError"], false, "{answer}");
    }
    assert_eq!(h.demo.calls(), CALLS);
    let connections = peers.lock().unwrap().len();
    assert!(
        connections >= 2,
        "{CALLS} calls over new connections to 3 lanes reached the upstream over {connections} connection(s): the lanes do not have pools of their own"
    );
}
