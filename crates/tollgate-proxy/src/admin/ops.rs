//! Operations endpoints on the admin listener: `/metrics`, `/readyz`, `/status`,
//! `/tools` and `POST /reload`. (`/healthz` and `/readyz` need no token; `admin` routes them.)

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::Admin;

/// The operations routes.
pub fn routes() -> Router<Admin> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/tools", get(tools))
        .route("/reload", post(reload))
}

/// `GET /tools`: each server with a tool lock, its tools with their lock status
/// (`unchanged`, `changed`, `unknown`, `not_listed`) and the diff of each that differs.
async fn tools(State(admin): State<Admin>) -> Json<Value> {
    let servers: serde_json::Map<String, Value> = admin
        .app
        .servers()
        .values()
        .filter_map(|server| {
            let watch = server.tools.as_ref()?;
            let info = watch.info.lock().clone();
            Some((
                server.name.to_string(),
                json!({
                    "lock": watch.path.display().to_string(),
                    "lock_hash": info.hash,
                    "last_error": info.last_error,
                    "on_tool_change": if watch.warns() { "warn" } else { "refuse" },
                    "tools": watch.report(),
                }),
            ))
        })
        .collect();
    Json(json!({ "servers": servers }))
}

async fn metrics(State(admin): State<Admin>) -> Response {
    let app = &admin.app;
    for server in app.servers().values() {
        if let Some(live) = server.upstream.live_processes() {
            app.metrics.upstream_processes(&server.name, live);
        }
    }
    if let Some(remote) = &app.remote {
        app.metrics.state_round_trips(remote.round_trips());
    }
    let text = app.metrics.render(
        app.sessions.len(),
        app.approvals.pending(),
        app.audit.failures(),
        app.notify().failures(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Ready when every upstream answered its last readiness probe (an `initialize`
/// exchange, or a stdio command that exists; `upstream::probe`, every `health_interval`),
/// and the shared state (Redis) answers when there is one. Without the admin token only
/// `ready` is told: upstream names and errors stay behind it.
pub(super) async fn readyz(State(admin): State<Admin>, headers: HeaderMap) -> Response {
    let checks = admin.app.servers().values().map(|server| async move {
        let checked = match server.health.last() {
            Some(checked) => checked,
            None => server.probe().await,
        };
        (server.name.to_string(), checked)
    });
    let (results, state) = futures::future::join(futures::future::join_all(checks), async {
        match &admin.app.remote {
            Some(remote) => Some(remote.ping().await.err().map(|e| e.to_string())),
            None => None,
        }
    })
    .await;
    // With `state.backend: redis`, a replica that cannot reach Redis is not ready, unless
    // `state.on_failure: allow` lets calls through without it: then it serves them, and
    // every replica going unready at once would only take the whole Service down.
    let state_ok = !matches!(state, Some(Some(_)))
        || admin.app.state_on_failure == crate::config::OnStateFailure::Allow;
    let ready = state_ok && results.iter().all(|(_, checked)| checked.ready);
    let upstreams: Value = results
        .into_iter()
        .map(|(name, checked)| (name, json!(checked)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !super::authorized(&admin, &headers) {
        return (status, Json(json!({"ready": ready}))).into_response();
    }
    let mut body = json!({"ready": ready, "upstreams": upstreams});
    if let (Some(error), Some(remote)) = (state, &admin.app.remote) {
        body["state"] = json!({"backend": "redis", "url": remote.shown(), "replica": &**remote.replica(), "ready": error.is_none(), "error": error});
    }
    (status, Json(body)).into_response()
}

async fn status(State(admin): State<Admin>) -> Json<Value> {
    let app = &admin.app;
    let servers: Vec<Value> = app
        .servers()
        .values()
        .map(|server| {
            let info = server.policy_info.lock().clone();
            // Processes or connections a stdio or legacy SSE upstream holds open.
            let upstream_sessions = server.upstream.live_sessions();
            json!({
                "name": &*server.name,
                "upstream": &server.location,
                "upstream_sessions": upstream_sessions,
                "timeout_ms": server.timeout.as_millis() as u64,
                "health": server.health.last(),
                "policy": info,
            })
        })
        .collect();
    let connections = crate::downstream::listener::ConnectionLimits::new(app.limits());
    Json(json!({
        "version": &*admin.version,
        "connections": {"max": connections.max, "per_peer": connections.per_peer},
        "servers": servers,
        "sessions": app.sessions.len(),
        "approvals_pending": app.approvals.pending(),
        "audit_write_failures": app.audit.failures(),
        "tls": {
            "listen": app.tls().listen().map(|c| c.info()),
            "admin.listen": app.tls().admin().map(|c| c.info()),
        },
    }))
}

async fn reload(State(admin): State<Admin>) -> Response {
    let app = admin.app.clone();
    let reports = tokio::task::spawn_blocking(move || crate::reload::reload_all(&app))
        .await
        .unwrap_or_default();
    let failed = reports.iter().any(|r| r.result == "failed");
    let status = if failed {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    (status, Json(json!({"reloads": reports}))).into_response()
}
