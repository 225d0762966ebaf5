//! The admin listener: approvals API, the approver's page, and (in `ops`) health,
//! status and metrics. Separate from the proxy listener so it can be firewalled
//! differently, and guarded by a bearer token compared in constant time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::json;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::BroadcastStream;

use crate::app::AppState;
use crate::approvals::decide::Decided;
use crate::store::approvals::{DecideError, GrantRequest, Scope};

/// The longest grant an approver may give.
const MAX_GRANT: Duration = Duration::from_secs(24 * 3600);

/// The approver's web page: self-contained, no CDN.
const PAGE: &str = include_str!("admin/approvals.html");

mod ops;

/// State of the admin listener.
#[derive(Clone)]
pub struct Admin {
    /// The proxy's state.
    pub app: AppState,
    /// Bearer token; `None` only on a loopback listener.
    pub token: Option<Arc<str>>,
    /// Version string shown by `/status`.
    pub version: Arc<str>,
    /// Whether the admin listener is on a loopback address (enables the Host check).
    pub loopback: bool,
}

/// Who is calling the admin API, as their token says.
#[derive(Debug, Clone)]
enum Identity {
    /// The operator's key (`admin.token`), or anyone on a loopback listener without one.
    Operator,
    /// A named approver (`admin.approvers`): approvals only.
    Approver(Arc<str>),
}

impl Identity {
    /// The name a decision records: the token's owner, never what a request body says.
    fn name(&self) -> &str {
        match self {
            Identity::Operator => "admin",
            Identity::Approver(name) => name,
        }
    }
}

/// The admin router.
pub fn admin_router(admin: Admin) -> Router {
    let operations = ops::routes().layer(middleware::from_fn(operator_only));
    let api = Router::new()
        .route("/approvals", get(list))
        .route("/approvals/stream", get(stream))
        .route("/approvals/grants", get(grants))
        .route("/approvals/grants/{id}", delete(revoke))
        .route("/approvals/{id}", get(one))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/deny", post(deny))
        .merge(operations)
        .layer(middleware::from_fn_with_state(admin.clone(), require_token));
    Router::new()
        .route("/", get(page))
        // Probes answer without a token, so an orchestrator can use them on any address;
        // without the token `/readyz` says only whether it is ready.
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ops::readyz))
        .merge(api)
        // Outermost: a page on another site must not reach this API through DNS
        // rebinding or a cross-site form, token or not.
        .layer(middleware::from_fn_with_state(
            admin.clone(),
            same_site_only,
        ))
        .with_state(admin)
}

async fn same_site_only(State(admin): State<Admin>, request: Request, next: Next) -> Response {
    match admin
        .app
        .doors()
        .guard()
        .check(admin.loopback, true, request.headers())
    {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// Whether the request carries the admin token (always, when there is none).
fn authorized(admin: &Admin, headers: &axum::http::HeaderMap) -> bool {
    matches!(identify(admin, headers), Some(Identity::Operator))
}

/// The identity a request's bearer token proves, if any. Every token is compared in
/// constant time, so timing tells nothing about which one nearly matched.
fn identify(admin: &Admin, headers: &axum::http::HeaderMap) -> Option<Identity> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    let same = |token: &[u8]| bool::from(subtle::ConstantTimeEq::ct_eq(presented, token));
    let mut found = None;
    for approver in admin.app.approvers() {
        if same(&approver.token) {
            found = Some(Identity::Approver(approver.name.clone()));
        }
    }
    match &admin.token {
        Some(token) if same(token.as_bytes()) => Some(Identity::Operator),
        Some(_) => found,
        // A loopback listener without a token is open; an approver's token still names them.
        None => found.or(Some(Identity::Operator)),
    }
}

async fn require_token(State(admin): State<Admin>, mut request: Request, next: Next) -> Response {
    let Some(identity) = identify(&admin, request.headers()) else {
        let body = json!({"error": "missing or wrong admin token: send `Authorization: Bearer <token>` with admin.token or an admin.approvers token"});
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(body),
        )
            .into_response();
    };
    request.extensions_mut().insert(identity);
    next.run(request).await
}

/// Operations (metrics, status, reload) are the operator's; an approver's token is for approvals.
async fn operator_only(request: Request, next: Next) -> Response {
    match request.extensions().get::<Identity>() {
        Some(Identity::Operator) => next.run(request).await,
        _ => (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "an approver's token may only list and decide approvals; use admin.token"})),
        )
            .into_response(),
    }
}

async fn page() -> impl IntoResponse {
    static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| page_csp(PAGE));
    (
        [
            (header::CONTENT_SECURITY_POLICY, CSP.as_str()),
            // For browsers that predate `frame-ancestors`: no other site may frame the
            // page and trick an approver into clicking Approve (clickjacking).
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        Html(PAGE),
    )
}

/// The page's Content-Security-Policy: nothing by default; only the page's own inline
/// scripts (by their SHA-256, so an injected script would not run), inline styles,
/// and requests to this listener; never framed.
fn page_csp(page: &str) -> String {
    use base64::Engine as _;
    use sha2::{Digest as _, Sha256};
    let mut scripts = String::new();
    let mut rest = page;
    while let Some((_, after)) = rest.split_once("<script>") {
        let Some((body, after)) = after.split_once("</script>") else {
            break;
        };
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body));
        scripts.push_str(&format!(" 'sha256-{hash}'"));
        rest = after;
    }
    format!(
        "default-src 'none'; script-src{scripts}; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
         frame-ancestors 'none'"
    )
}

async fn list(State(admin): State<Admin>) -> impl IntoResponse {
    Json(admin.app.approvals.list())
}

async fn one(State(admin): State<Admin>, Path(id): Path<String>) -> Response {
    let id = match resolve(&admin, &id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    match admin.app.approvals.get(&id) {
        Some(approval) => Json(approval).into_response(),
        None => not_found(&id),
    }
}

/// The approval a unique prefix of its id names (the CLI and README shorten ids).
fn resolve(admin: &Admin, prefix: &str) -> Result<String, Box<Response>> {
    let matches: Vec<String> = admin
        .app
        .approvals
        .list()
        .into_iter()
        .map(|a| a.id)
        .filter(|id| id.starts_with(prefix))
        .collect();
    match matches.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Box::new(not_found(prefix))),
        many => Err(Box::new((
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("`{prefix}` is the start of {} approval ids ({}); give more of the id", many.len(), many.join(", ")),
            })),
        )
            .into_response())),
    }
}

fn not_found(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("no approval with id `{id}`")})),
    )
        .into_response()
}

/// Body of approve and deny.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    reason: Option<String>,
    /// Accepted for older clients and ignored: who decided is the token's owner.
    #[serde(default)]
    #[allow(dead_code)]
    by: Option<String>,
    /// With approve: let this tool's calls through for a window.
    #[serde(default)]
    grant: Option<GrantBody>,
}

/// `grant` of an approval: `{scope: client|session, for: 10m, any_arguments: false}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GrantBody {
    #[serde(default = "client_scope")]
    scope: Scope,
    #[serde(rename = "for")]
    window: tollgate_policy::DurationDoc,
    #[serde(default)]
    any_arguments: bool,
}

fn client_scope() -> Scope {
    Scope::Client
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
}

async fn approve(
    State(admin): State<Admin>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
    body: Option<Json<DecisionBody>>,
) -> Response {
    decide(
        admin,
        &identity,
        id,
        true,
        body.map(|b| b.0).unwrap_or_default(),
    )
    .await
}

async fn deny(
    State(admin): State<Admin>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
    body: Option<Json<DecisionBody>>,
) -> Response {
    decide(
        admin,
        &identity,
        id,
        false,
        body.map(|b| b.0).unwrap_or_default(),
    )
    .await
}

async fn decide(
    admin: Admin,
    identity: &Identity,
    id: String,
    approved: bool,
    body: DecisionBody,
) -> Response {
    let id = match resolve(&admin, &id) {
        Ok(id) => id,
        Err(response) => return *response,
    };
    let grant = match body.grant {
        None => None,
        Some(_) if !approved => {
            return bad_request("`grant` goes with approve, not deny".to_owned());
        }
        Some(grant) => match tollgate_policy::parse_window(&grant.window) {
            Ok(window) if window <= MAX_GRANT => Some(GrantRequest {
                scope: grant.scope,
                window,
                any_arguments: grant.any_arguments,
            }),
            Ok(_) => return bad_request("grant.for: at most 24h".to_owned()),
            Err(message) => return bad_request(format!("grant.for: {message}")),
        },
    };
    let by = identity.name();
    let decided =
        crate::approvals::decide::decide(&admin.app, &id, approved, by, body.reason, grant).await;
    match decided {
        Ok(Decided::AsAsked(approval, grant)) => {
            let mut body = serde_json::to_value(approval).unwrap_or_default();
            if let Some(grant) = grant {
                body["grant"] = serde_json::to_value(*grant).unwrap_or_default();
            }
            Json(body).into_response()
        }
        Ok(Decided::PolicyChanged(approval)) => (
            StatusCode::CONFLICT,
            Json(json!({
                "error": approval.decision_reason.clone().unwrap_or_default(),
                "approval": approval,
            })),
        )
            .into_response(),
        Err(DecideError::NotFound(id)) => not_found(&id),
        Err(DecideError::Settled(current)) => (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("approval `{id}` is already settled"), "approval": current})),
        )
            .into_response(),
        Err(err @ DecideError::Unconfirmed(..)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("{err}; look the approval up again before retrying")})),
        )
            .into_response(),
    }
}

async fn grants(State(admin): State<Admin>) -> impl IntoResponse {
    Json(admin.app.approvals.grants().await)
}

async fn revoke(
    State(admin): State<Admin>,
    Extension(identity): Extension<Identity>,
    Path(id): Path<String>,
) -> Response {
    match crate::approvals::decide::revoke(&admin.app, &id, identity.name()).await {
        Ok(Some(grant)) => Json(grant).into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": format!("grant `{id}` could not be revoked: {err}; retry when Redis is back")})),
        )
            .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no active grant with id `{id}`")})),
        )
            .into_response(),
    }
}

async fn stream(State(admin): State<Admin>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let changes = BroadcastStream::new(admin.app.approvals.subscribe()).filter_map(|change| {
        let approval = change.ok()?;
        Event::default()
            .event("approval")
            .json_data(approval)
            .ok()
            .map(Ok)
    });
    Sse::new(changes).keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_page_csp_allows_only_its_own_scripts_and_no_framing() {
        use base64::Engine as _;
        use sha2::{Digest as _, Sha256};
        let csp = page_csp("<p><script>one()</script><script>\ntwo()\n</script>");
        let hash = |s: &str| base64::engine::general_purpose::STANDARD.encode(Sha256::digest(s));
        assert!(csp.starts_with("default-src 'none'; "), "{csp}");
        assert!(
            csp.contains(&format!(
                "script-src 'sha256-{}' 'sha256-{}';",
                hash("one()"),
                hash("\ntwo()\n")
            )),
            "{csp}"
        );
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(
            !csp.contains("unsafe-inline'; connect") || !csp.contains("script-src 'unsafe-inline'"),
            "{csp}"
        );
        // The real page has exactly one inline script.
        assert_eq!(page_csp(PAGE).matches("'sha256-").count(), 1);
    }
}
