//! A small MCP server with HealthLake-like tools, for `tollgate demo`, tests and
//! benchmarks.
//!
//! It speaks Streamable HTTP in both eras (an `initialize` handshake without
//! sessions, and the stateless 2026-07-28 era with `server/discover`), answers
//! with JSON or with an SSE stream, and can add latency to every tool call so a
//! benchmark can model a real upstream. It keeps no state besides a call counter.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tollgate_mcp::{
    Era, ErrorCode, Incoming, Kind, Message, era_of, error_response, result_response,
};

/// How the demo server answers.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Answer requests with an SSE stream instead of a JSON body.
    pub sse: bool,
    /// Added to every tool call.
    pub latency: Duration,
    /// More tools (`filler_tool_<i>`) listed after the demo's own, for benchmarks of
    /// large `tools/list` answers.
    pub extra_tools: usize,
}

/// The server's state: its options and how many tool calls it has run.
#[derive(Debug, Default)]
pub struct Demo {
    options: DemoOptions,
    calls: AtomicU64,
}

impl Demo {
    /// A demo server with these options.
    pub fn new(options: DemoOptions) -> Arc<Demo> {
        Arc::new(Demo {
            options,
            calls: AtomicU64::new(0),
        })
    }

    /// Tool calls run so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// The demo server's router: POST `/mcp`.
pub fn router(demo: Arc<Demo>) -> Router {
    Router::new()
        .route("/mcp", post(handle).get(not_allowed).delete(not_allowed))
        .with_state(demo)
}

const SUPPORTED: &[&str] = &[
    "2026-07-28",
    "2025-11-25",
    "2025-06-18",
    "2025-03-26",
    "2024-11-05",
];

async fn not_allowed() -> StatusCode {
    StatusCode::METHOD_NOT_ALLOWED
}

async fn handle(
    State(demo): State<Arc<Demo>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let incoming = match Incoming::parse(&body) {
        Ok(incoming) => incoming,
        Err(err) => {
            let answer = error_response(None, err.code(), &err.to_string(), None);
            return (StatusCode::BAD_REQUEST, axum::Json(answer)).into_response();
        }
    };
    let header_version = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    let answers: Vec<(Value, StatusCode)> = match incoming {
        Incoming::Single(message) => answer(&demo, &message, header_version)
            .await
            .into_iter()
            .collect(),
        Incoming::Batch(messages) => {
            let mut out = Vec::new();
            for message in &messages {
                out.extend(answer(&demo, message, header_version).await);
            }
            if out.is_empty() {
                return StatusCode::ACCEPTED.into_response();
            }
            let batch = Value::Array(out.into_iter().map(|(v, _)| v).collect());
            return axum::Json(batch).into_response();
        }
    };
    let Some((answer, status)) = answers.into_iter().next() else {
        return StatusCode::ACCEPTED.into_response();
    };
    if demo.options.sse && status == StatusCode::OK {
        let event = format!("event: message\ndata: {answer}\n\n");
        return Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from(event))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    (status, axum::Json(answer)).into_response()
}

/// The answer to one message, or none for notifications and responses.
async fn answer(
    demo: &Demo,
    message: &Message,
    header_version: Option<&str>,
) -> Option<(Value, StatusCode)> {
    if message.kind() != Kind::Request {
        return None;
    }
    let id = message.id().cloned().unwrap_or(Value::Null);
    let era = era_of(message, header_version);
    let params = message.params().cloned().unwrap_or_default();
    let mut result = match message.method().unwrap_or("") {
        "initialize" => initialize_result(&params),
        "server/discover" => discover_result(),
        "ping" => json!({}),
        "tools/list" => tools_list_result(demo),
        "tools/call" => match call_tool(demo, &params).await {
            Ok(result) => result,
            Err(message) => {
                let answer = error_response(Some(&id), ErrorCode::InvalidRequest, &message, None);
                return Some((answer, StatusCode::OK));
            }
        },
        other => return Some(method_not_found(&id, other, era)),
    };
    if era == Era::Stateless {
        result["resultType"] = json!("complete");
        result["_meta"] = json!({"io.modelcontextprotocol/serverInfo": server_info()});
    }
    Some((result_response(&id, result), StatusCode::OK))
}

/// The `initialize` result: the version the client asked for when the demo speaks it
/// (a handshake-era one), else the newest handshake-era version.
fn initialize_result(params: &serde_json::Map<String, Value>) -> Value {
    let asked = params
        .get("protocolVersion")
        .and_then(Value::as_str)
        .unwrap_or("2025-11-25");
    let version = if SUPPORTED[1..].contains(&asked) {
        asked
    } else {
        "2025-11-25"
    };
    json!({
        "protocolVersion": version,
        "capabilities": {"tools": {"listChanged": false}},
        "serverInfo": server_info(),
        "instructions": "A demo HealthLake-like server. Nothing here touches real data.",
    })
}

/// The stateless era's `server/discover` result.
fn discover_result() -> Value {
    json!({
        "supportedVersions": SUPPORTED,
        "capabilities": {"tools": {"listChanged": false}},
        "instructions": "A demo HealthLake-like server. Nothing here touches real data.",
        "ttlMs": 0,
        "cacheScope": "public",
    })
}

/// The `tools/list` result: the demo's tools, then `extra_tools` fillers.
fn tools_list_result(demo: &Demo) -> Value {
    let mut tools = tools();
    if let Value::Array(list) = &mut tools {
        list.extend((0..demo.options.extra_tools).map(|i| {
            json!({
                "name": format!("filler_tool_{i}"),
                "description": "A tool that does nothing, listed for benchmarks.",
                "inputSchema": {"type": "object", "properties": {"x": {"type": "string"}}},
            })
        }));
    }
    json!({ "tools": tools, "ttlMs": 0, "cacheScope": "public" })
}

/// An unknown method: a JSON-RPC error, with 404 in the stateless era (which says so
/// in HTTP too).
fn method_not_found(id: &Value, method: &str, era: Era) -> (Value, StatusCode) {
    let answer = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": format!("method not found: {method}")}});
    let status = if era == Era::Stateless {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    (answer, status)
}

fn server_info() -> Value {
    json!({"name": "tollgate-demo", "version": env!("CARGO_PKG_VERSION")})
}

/// The demo's tools, named like the AWS Labs HealthLake MCP server's.
pub fn tools() -> Value {
    let datastore_id =
        json!({"type": "string", "description": "HealthLake data store id (32 characters)"});
    json!([
        {
            "name": "list_fhir_datastores",
            "description": "List the FHIR data stores of the account.",
            "inputSchema": {"type": "object", "properties": {}},
            "annotations": {"readOnlyHint": true},
        },
        {
            "name": "describe_fhir_export_job",
            "description": "Describe a FHIR export job.",
            "inputSchema": {
                "type": "object",
                "properties": {"datastore_id": datastore_id, "job_id": {"type": "string"}},
                "required": ["datastore_id", "job_id"],
            },
            "annotations": {"readOnlyHint": true},
        },
        {
            "name": "start_fhir_export_job",
            "description": "Start exporting a data store's FHIR resources to S3.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "datastore_id": datastore_id,
                    "output_data_config": {"type": "object"},
                    "data_access_role_arn": {"type": "string"},
                    "job_name": {"type": "string"},
                    "kms_key_id": {"type": "string"},
                },
                "required": ["datastore_id", "output_data_config", "data_access_role_arn"],
            },
        },
        {
            "name": "delete_fhir_datastore",
            "description": "Delete a data store and every record in it.",
            "inputSchema": {
                "type": "object",
                "properties": {"datastore_id": datastore_id},
                "required": ["datastore_id"],
            },
            "annotations": {"destructiveHint": true},
        },
    ])
}

async fn call_tool(demo: &Demo, params: &serde_json::Map<String, Value>) -> Result<Value, String> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or("tools/call needs params.name")?;
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    let arg = |key: &str| {
        args.get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    if !demo.options.latency.is_zero() {
        tokio::time::sleep(demo.options.latency).await;
    }
    let n = demo.calls.fetch_add(1, Ordering::Relaxed) + 1;
    let structured = match name {
        "list_fhir_datastores" => json!({"datastores": [
            {"DatastoreId": "0123456789abcdef0123456789abcdef", "DatastoreName": "demo-patients", "DatastoreStatus": "ACTIVE"}
        ]}),
        "describe_fhir_export_job" => json!({
            "ExportJobProperties": {"JobId": arg("job_id"), "JobStatus": "COMPLETED", "DatastoreId": arg("datastore_id")}
        }),
        "start_fhir_export_job" => json!({
            "JobId": format!("demo-export-{n}"), "JobStatus": "SUBMITTED", "DatastoreId": arg("datastore_id")
        }),
        "delete_fhir_datastore" => {
            json!({"DatastoreId": arg("datastore_id"), "DatastoreStatus": "DELETING"})
        }
        other => return Err(format!("unknown tool: {other}")),
    };
    Ok(json!({
        "content": [{"type": "text", "text": structured.to_string()}],
        "structuredContent": structured,
        "isError": false,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn post(demo: Arc<Demo>, body: Value) -> (StatusCode, Value) {
        let request = axum::http::Request::post("/mcp")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = router(demo).oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn answers_the_handshake_and_lists_tools() {
        let demo = Demo::new(DemoOptions::default());
        let (_, init) = post(
            demo.clone(),
            json!({"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}),
        )
        .await;
        assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
        let (_, list) = post(demo, json!({"jsonrpc":"2.0","id":2,"method":"tools/list"})).await;
        assert_eq!(list["result"]["tools"].as_array().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn counts_tool_calls_and_marks_stateless_results_complete() {
        let demo = Demo::new(DemoOptions::default());
        let (_, result) = post(
            demo.clone(),
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"list_fhir_datastores","arguments":{},
                "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}),
        )
        .await;
        assert_eq!(result["result"]["resultType"], "complete");
        assert_eq!(demo.calls(), 1);
        let (status, _) = post(
            demo.clone(),
            json!({"jsonrpc":"2.0","method":"notifications/initialized"}),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
}
