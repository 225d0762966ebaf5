//! JSON-RPC 2.0 messages over `serde_json::Value`.

use bytes::Bytes;
use serde_json::{Map, Value, json};

/// JSON-RPC and MCP error codes Tollgate answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The body is not JSON.
    ParseError,
    /// JSON, but not a JSON-RPC 2.0 message.
    InvalidRequest,
    /// A known method with unusable parameters.
    InvalidParams,
    /// An internal error, used for upstream failures.
    InternalError,
    /// A tool call refused by the policy (`deny_as: error`).
    DeniedByPolicy,
    /// MCP `HeaderMismatch`: routing headers disagree with the body.
    HeaderMismatch,
}

impl ErrorCode {
    /// The numeric code on the wire.
    pub fn code(self) -> i64 {
        match self {
            ErrorCode::ParseError => -32700,
            ErrorCode::InvalidRequest => -32600,
            ErrorCode::InvalidParams => -32602,
            ErrorCode::InternalError => -32603,
            ErrorCode::DeniedByPolicy => -32001,
            ErrorCode::HeaderMismatch => -32020,
        }
    }
}

/// Why a body could not be framed as JSON-RPC.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FramingError {
    /// The body is not valid JSON.
    #[error("parse error: the body is not valid JSON ({0})")]
    Parse(#[from] serde_json::Error),
    /// Valid JSON that is not a JSON-RPC 2.0 message.
    #[error("invalid request: {0}")]
    Invalid(&'static str),
}

impl FramingError {
    /// The JSON-RPC error code that answers this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            FramingError::Parse(_) => ErrorCode::ParseError,
            FramingError::Invalid(_) => ErrorCode::InvalidRequest,
        }
    }
}

/// What kind of JSON-RPC message a [`Message`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result` or `error`.
    Response,
}

/// One JSON-RPC message, validated once and kept as its JSON value, or (when it
/// arrived alone) as its bytes and the parts every stage reads; the rest of its
/// value is parsed from those bytes only when a stage asks for it.
#[derive(Debug, Clone)]
pub struct Message {
    body: Body,
    kind: Kind,
    /// What every stage asks, told once when the message is read, so that no stage
    /// walks (and hashes its way through) the value again.
    told: Told,
}

#[derive(Debug, Clone)]
enum Body {
    /// The whole value.
    Value(Value),
    /// A lone message as it arrived ([`Incoming::parse_bytes`]).
    Bytes(Box<Arrived>),
}

#[derive(Debug, Clone)]
struct Arrived {
    bytes: Bytes,
    /// The parts read apart from the value ([`Message::part`]).
    parts: Parts,
    /// Whether `bytes` mean exactly what the value does (integers only).
    exact: bool,
    /// The whole value, parsed when first asked for.
    value: std::sync::OnceLock<Value>,
}

#[derive(Debug, Clone)]
struct Parts {
    id: Option<Value>,
    arguments: Option<Value>,
    request_state: Option<Value>,
    input_responses: Option<Value>,
    progress_token: Option<Value>,
    client_capabilities: Option<Value>,
}

/// The parts of a message the stages read on every call.
#[derive(Debug, Clone, Default)]
struct Told {
    /// `method`: an MCP method by its static name, or another one (read from the value).
    method: Method,
    /// A `tools/call` request's `params.name`, when it is a string.
    tool_name: Option<Box<str>>,
    /// `params.name`, else `params.uri`, when it is a string (the `Mcp-Name` header's).
    routing_name: Option<Box<str>>,
    /// `params._meta["io.modelcontextprotocol/protocolVersion"]`, when it is a string.
    protocol_version: Option<Box<str>>,
}

#[derive(Debug, Clone, Copy, Default)]
enum Method {
    /// No `method` (a response).
    #[default]
    None,
    /// One of [`MCP_METHODS`].
    Known(&'static str),
    /// Any other string.
    Other,
}

impl PartialEq for Message {
    fn eq(&self, other: &Message) -> bool {
        self.kind == other.kind && self.as_value() == other.as_value()
    }
}

/// A message's members, as both ways of reading it find them.
#[derive(Default)]
struct Members<'a> {
    jsonrpc: Option<&'a Value>,
    method: Option<&'a Value>,
    id: Option<&'a Value>,
    /// Whether `params` is there, and whether it is an object or an array.
    params: Option<bool>,
    name: Option<&'a Value>,
    uri: Option<&'a Value>,
    protocol_version: Option<&'a Value>,
    /// Whether it has `result` or `error`.
    answer: bool,
}

impl Members<'_> {
    /// Validates a JSON-RPC 2.0 request, notification or response, and tells what
    /// the stages read.
    fn tell(&self) -> Result<(Kind, Told), FramingError> {
        if self.jsonrpc.and_then(Value::as_str) != Some("2.0") {
            return Err(FramingError::Invalid(r#"`jsonrpc` must be "2.0""#));
        }
        if let Some(Value::String(method)) = self.method
            && is_lookalike_method(method)
        {
            return Err(FramingError::Invalid(
                "`method` differs from an MCP method only by case, whitespace or control characters",
            ));
        }
        let id_ok = |id: &Value| matches!(id, Value::String(_) | Value::Number(_));
        let kind = match (self.method, self.id) {
            (Some(Value::String(_)), None) => Kind::Notification,
            (Some(Value::String(_)), Some(id)) if id_ok(id) => Kind::Request,
            (Some(Value::String(_)), Some(_)) => {
                return Err(FramingError::Invalid("`id` must be a string or a number"));
            }
            (Some(_), _) => return Err(FramingError::Invalid("`method` must be a string")),
            (None, Some(_)) if self.answer => Kind::Response,
            (None, _) => {
                return Err(FramingError::Invalid(
                    "a message needs `method` (request, notification) or `result`/`error` (response)",
                ));
            }
        };
        if self.params == Some(false) {
            return Err(FramingError::Invalid(
                "`params` must be an object or an array",
            ));
        }
        let method = match self.method.and_then(Value::as_str) {
            None => Method::None,
            Some(name) => MCP_METHODS
                .iter()
                .find(|known| **known == name)
                .map_or(Method::Other, |known| Method::Known(known)),
        };
        let tools_call = kind == Kind::Request && matches!(method, Method::Known("tools/call"));
        let name = self.name.and_then(Value::as_str);
        let text = |value: Option<&Value>| value.and_then(Value::as_str).map(Into::into);
        let told = Told {
            method,
            tool_name: name.filter(|_| tools_call).map(Into::into),
            // A `name` that is not a string names nothing; only without one is `uri` read.
            routing_name: match self.name {
                Some(name) => text(Some(name)),
                None => text(self.uri),
            },
            protocol_version: text(self.protocol_version),
        };
        Ok((kind, told))
    }
}

/// A body: one message, or a JSON-RPC batch (MCP 2025-03-26).
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// One message.
    Single(Message),
    /// A non-empty batch.
    Batch(Vec<Message>),
}

impl Incoming {
    /// Parses and validates a body (strictly: a duplicate object key at any depth,
    /// invalid UTF-8 or a lone surrogate is a parse error).
    pub fn parse(body: &[u8]) -> Result<Incoming, FramingError> {
        Incoming::from_value(crate::strict::parse(body)?)
    }

    /// [`Incoming::parse`], keeping a lone message as its bytes ([`Message::raw`]):
    /// one pass checks all of it and builds only the parts the stages read.
    pub fn parse_bytes(body: Bytes) -> Result<Incoming, FramingError> {
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Incoming::parse(&body);
        }
        let scanned = crate::strict::scan(&body)?;
        let (kind, told) = Members {
            jsonrpc: scanned.jsonrpc.as_ref(),
            method: scanned.method.as_ref(),
            id: scanned.id.as_ref(),
            params: scanned.params,
            name: scanned.name.as_ref(),
            uri: scanned.uri.as_ref(),
            protocol_version: scanned.protocol_version.as_ref(),
            answer: scanned.answer,
        }
        .tell()?;
        Ok(Incoming::Single(Message {
            body: Body::Bytes(Box::new(Arrived {
                bytes: body,
                parts: Parts {
                    id: scanned.id,
                    arguments: scanned.arguments,
                    request_state: scanned.request_state,
                    input_responses: scanned.input_responses,
                    progress_token: scanned.progress_token,
                    client_capabilities: scanned.client_capabilities,
                },
                exact: scanned.exact,
                value: std::sync::OnceLock::new(),
            })),
            kind,
            told,
        }))
    }

    fn from_value(value: Value) -> Result<Incoming, FramingError> {
        match value {
            Value::Array(items) if items.is_empty() => Err(FramingError::Invalid(
                "an empty batch is not a JSON-RPC message",
            )),
            Value::Array(items) => items
                .into_iter()
                .map(Message::from_value)
                .collect::<Result<_, _>>()
                .map(Incoming::Batch),
            value => Message::from_value(value).map(Incoming::Single),
        }
    }
}

/// The parts of a `tools/call` request the policy reads.
#[derive(Debug, Clone, Copy)]
pub struct ToolCallRef<'a> {
    /// `params.name`.
    pub name: &'a str,
    /// `params.arguments`, `Null` when absent.
    pub arguments: &'a Value,
}

static NULL: Value = Value::Null;

/// Every method MCP defines (2025-11-25 and 2026-07-28), requests and notifications.
const MCP_METHODS: &[&str] = &[
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "resources/list",
    "resources/read",
    "resources/templates/list",
    "resources/subscribe",
    "resources/unsubscribe",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
    "sampling/createMessage",
    "elicitation/create",
    "roots/list",
    "subscriptions/listen",
    "tasks/get",
    "tasks/result",
    "tasks/list",
    "tasks/cancel",
    "tasks/update",
    "notifications/initialized",
    "notifications/cancelled",
    "notifications/progress",
    "notifications/message",
    "notifications/resources/updated",
    "notifications/resources/list_changed",
    "notifications/tools/list_changed",
    "notifications/prompts/list_changed",
    "notifications/roots/list_changed",
    "notifications/elicitation/complete",
    "notifications/tasks/status",
    "notifications/subscriptions/acknowledged",
];

/// Invisible characters that are neither whitespace nor control characters to Rust.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// A method that is not an MCP method but reads as one: it differs from one only by
/// case, whitespace, control or invisible characters (`Tools/Call`, `tools/call `,
/// `tools/call\u{0}`). Tollgate decides `tools/call` by its exact name, so such a name
/// would pass unevaluated to an upstream that might normalise it. A method with a
/// control character is never an MCP method either.
fn is_lookalike_method(method: &str) -> bool {
    if MCP_METHODS.contains(&method) {
        return false;
    }
    if method.chars().any(char::is_control) {
        return true;
    }
    // The longest MCP method has 40 characters; anything much longer cannot fold to one.
    if method.len() > 256 {
        return false;
    }
    let folded: String = method
        .chars()
        .filter(|&c| !c.is_whitespace() && !is_invisible(c))
        .flat_map(char::to_lowercase)
        .collect();
    MCP_METHODS
        .iter()
        .any(|known| known.eq_ignore_ascii_case(&folded))
}

impl Message {
    /// Validates that `value` is a JSON-RPC 2.0 request, notification or response.
    pub fn from_value(value: Value) -> Result<Message, FramingError> {
        let Value::Object(map) = &value else {
            return Err(FramingError::Invalid(
                "a JSON-RPC message must be a JSON object",
            ));
        };
        // One pass over the members (a strict parse has no duplicate keys).
        let mut members = Members::default();
        for (key, member) in map {
            match key.as_str() {
                "jsonrpc" => members.jsonrpc = Some(member),
                "method" => members.method = Some(member),
                "id" => members.id = Some(member),
                "params" => {
                    members.params = Some(member.is_object() || member.is_array());
                    if let Some(params) = member.as_object() {
                        members.name = params.get("name");
                        members.uri = params.get("uri");
                        members.protocol_version = params
                            .get("_meta")
                            .and_then(|meta| meta.get(crate::strict::PROTOCOL_VERSION_META));
                    }
                }
                "result" | "error" => members.answer = true,
                _ => {}
            }
        }
        let (kind, told) = members.tell()?;
        Ok(Message {
            body: Body::Value(value),
            kind,
            told,
        })
    }

    /// Request, notification or response.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// `method`, for requests and notifications.
    pub fn method(&self) -> Option<&str> {
        match self.told.method {
            Method::None => None,
            Method::Known(name) => Some(name),
            Method::Other => self.as_value().get("method").and_then(Value::as_str),
        }
    }

    /// `params._meta["io.modelcontextprotocol/protocolVersion"]`, when it is a string.
    pub fn meta_protocol_version(&self) -> Option<&str> {
        self.told.protocol_version.as_deref()
    }

    /// `params.name`, else `params.uri`, when it is a string: what the `Mcp-Name`
    /// header must say.
    pub fn routing_name(&self) -> Option<&str> {
        self.told.routing_name.as_deref()
    }

    /// A part a stage reads: kept apart when the message arrived as bytes (so that
    /// reading it never parses the whole value beside them), else looked up by `path`.
    fn part<'m>(
        &'m self,
        kept: impl FnOnce(&'m Parts) -> Option<&'m Value>,
        path: &[&str],
    ) -> Option<&'m Value> {
        match &self.body {
            Body::Value(value) => path
                .iter()
                .try_fold(value, |value, key| value.as_object()?.get(*key)),
            Body::Bytes(arrived) => kept(&arrived.parts),
        }
    }

    /// `id`, for requests and responses.
    pub fn id(&self) -> Option<&Value> {
        self.part(|p| p.id.as_ref(), &["id"])
    }

    /// `params.requestState` (multi round-trip requests).
    pub fn request_state(&self) -> Option<&Value> {
        self.part(|p| p.request_state.as_ref(), &["params", "requestState"])
    }

    /// `params.inputResponses` (multi round-trip requests).
    pub fn input_responses(&self) -> Option<&Value> {
        self.part(
            |p| p.input_responses.as_ref(),
            &["params", "inputResponses"],
        )
    }

    /// `params._meta["io.modelcontextprotocol/clientCapabilities"]` (stateless era).
    pub fn client_capabilities(&self) -> Option<&Value> {
        self.part(
            |p| p.client_capabilities.as_ref(),
            &["params", "_meta", crate::strict::CLIENT_CAPABILITIES_META],
        )
    }

    /// `params`, when present.
    pub fn params(&self) -> Option<&Map<String, Value>> {
        self.as_value().get("params").and_then(Value::as_object)
    }

    /// The tool name and arguments when this is a `tools/call` request.
    pub fn tool_call(&self) -> Option<ToolCallRef<'_>> {
        let name = self.told.tool_name.as_deref()?;
        let arguments = self.part(|p| p.arguments.as_ref(), &["params", "arguments"]);
        Some(ToolCallRef {
            name,
            arguments: arguments.unwrap_or(&NULL),
        })
    }

    /// A `tools/call` that cannot be judged: a notification, or a request without a
    /// string `params.name`. Such a message must never be forwarded unevaluated.
    pub fn is_malformed_tool_call(&self) -> bool {
        self.method() == Some("tools/call") && self.tool_call().is_none()
    }

    /// `params.progressToken` from `_meta`, when the client asked for progress.
    pub fn progress_token(&self) -> Option<&Value> {
        self.part(
            |p| p.progress_token.as_ref(),
            &["params", "_meta", "progressToken"],
        )
    }

    /// The JSON value.
    pub fn as_value(&self) -> &Value {
        match &self.body {
            Body::Value(value) => value,
            Body::Bytes(arrived) => arrived.value.get_or_init(|| whole(&arrived.bytes)),
        }
    }

    /// The JSON value, consumed.
    pub fn into_value(self) -> Value {
        match self.body {
            Body::Value(value) => value,
            Body::Bytes(arrived) => {
                let Arrived { bytes, value, .. } = *arrived;
                value.into_inner().unwrap_or_else(|| whole(&bytes))
            }
        }
    }

    /// The bytes the message arrived as, when they mean exactly what its value does:
    /// parsed strictly ([`Incoming::parse_bytes`]), alone (not in a batch), and with
    /// integers only (a fraction is re-serialised as the `f64` the policy saw).
    pub fn raw(&self) -> Option<&Bytes> {
        match &self.body {
            Body::Bytes(arrived) if arrived.exact => Some(&arrived.bytes),
            _ => None,
        }
    }

    /// Serialises the message as it was evaluated.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising a `Value` cannot fail: its keys are strings.
        serde_json::to_vec(self.as_value()).unwrap_or_default()
    }
}

/// The whole value of bytes [`crate::strict::scan`] accepted. The strict parse reads
/// the same grammar with the same checks, so it accepts them too: the `Null` is
/// never reached.
fn whole(bytes: &[u8]) -> Value {
    crate::strict::parse(bytes).unwrap_or(Value::Null)
}

/// A JSON-RPC error response. `id` is `Null` when the request's id is unknown.
pub fn error_response(
    id: Option<&Value>,
    code: ErrorCode,
    message: &str,
    data: Option<Value>,
) -> Value {
    let mut error = json!({ "code": code.code(), "message": message });
    if let (Some(data), Value::Object(map)) = (data, &mut error) {
        map.insert("data".into(), data);
    }
    json!({ "jsonrpc": "2.0", "id": id.cloned().unwrap_or(Value::Null), "error": error })
}

/// A JSON-RPC result response.
pub fn result_response(id: &Value, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    // A scenario test reads top to bottom as one story: its length is allowed here.
    #![allow(clippy::too_many_lines)]
    use super::*;

    fn single(body: &str) -> Message {
        match Incoming::parse(body.as_bytes()).unwrap() {
            Incoming::Single(m) => m,
            Incoming::Batch(_) => panic!("expected a single message"),
        }
    }

    /// A lone message read from its bytes (one pass, the rest parsed on demand) is
    /// the message the whole parse reads: every accessor agrees, and so does every
    /// refusal.
    #[test]
    fn a_message_read_from_its_bytes_is_the_message_parsed_whole() {
        let bodies = [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"t":"x"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","progressToken":7}}}"#,
            r#" {"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":1}}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"n"}}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///x"}}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"prompts/get","params":{"name":5,"uri":"u"}}"#,
            r#"{"jsonrpc":"2.0","id":4,"method":"vendor/thing","params":[1,2]}"#,
            r#"{"jsonrpc":"2.0","id":5,"result":{"ok":true}}"#,
            r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"t","arguments":{"n":1.5}}}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","method":7}"#,
            r#"{"jsonrpc":"2.0","method":"m","params":"x"}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"Tools/Call"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","name":"b"}}"#,
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"t","requestState":"tollgate1.s","inputResponses":{"q":{"action":"accept"}},"_meta":{"io.modelcontextprotocol/clientCapabilities":{"elicitation":{"url":{}}}}}}"#,
            r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"t","inputResponses":3,"_meta":[{"io.modelcontextprotocol/clientCapabilities":{}}]}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":{"p":"\ud800"}}}"#,
        ];
        for body in bodies {
            let whole = Incoming::parse(body.as_bytes());
            let scanned = Incoming::parse_bytes(Bytes::from(body));
            let (whole, scanned) = match (whole, scanned) {
                (Ok(Incoming::Single(w)), Ok(Incoming::Single(s))) => (w, s),
                (Err(w), Err(s)) => {
                    // The same refusal, in the same words.
                    assert_eq!(w.to_string(), s.to_string(), "{body}");
                    continue;
                }
                (w, s) => panic!("{body}: {w:?} against {s:?}"),
            };
            assert_eq!(whole, scanned, "{body}");
            assert_eq!(whole.kind(), scanned.kind(), "{body}");
            assert_eq!(whole.method(), scanned.method(), "{body}");
            assert_eq!(whole.id(), scanned.id(), "{body}");
            assert_eq!(
                whole.tool_call().map(|c| (c.name, c.arguments.clone())),
                scanned.tool_call().map(|c| (c.name, c.arguments.clone())),
                "{body}"
            );
            assert_eq!(whole.progress_token(), scanned.progress_token(), "{body}");
            assert_eq!(whole.request_state(), scanned.request_state(), "{body}");
            assert_eq!(whole.input_responses(), scanned.input_responses(), "{body}");
            assert_eq!(
                whole.client_capabilities(),
                scanned.client_capabilities(),
                "{body}"
            );
            assert_eq!(whole.routing_name(), scanned.routing_name(), "{body}");
            assert_eq!(
                whole.meta_protocol_version(),
                scanned.meta_protocol_version(),
                "{body}"
            );
            assert_eq!(whole.params(), scanned.params(), "{body}");
            assert_eq!(
                whole.is_malformed_tool_call(),
                scanned.is_malformed_tool_call()
            );
            // Its own bytes go upstream unless a number was rounded.
            assert_eq!(scanned.raw().is_some(), !body.contains("1.5"), "{body}");
            assert!(whole.raw().is_none());
        }
    }

    #[test]
    fn classifies_requests_notifications_and_responses() {
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).kind(),
            Kind::Request
        );
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).kind(),
            Kind::Notification
        );
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","id":"a","result":{}}"#).kind(),
            Kind::Response
        );
        assert_eq!(
            single(r#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}"#).kind(),
            Kind::Response
        );
    }

    #[test]
    fn refuses_methods_that_only_look_like_mcp_methods() {
        for method in [
            "Tools/Call",
            "TOOLS/CALL",
            "tools/call ",
            " tools/call",
            "tools/ call",
            "tools/call\u{0000}",
            "tools/call\n",
            "tools/call\u{200b}",
            "tools\u{202e}/call",
            "Initialize",
            "logging/setlevel",
            "x\u{0007}",
        ] {
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method}).to_string();
            let err = Incoming::parse(body.as_bytes()).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{method:?}");
            assert!(
                err.to_string().contains("differs from an MCP method"),
                "{err}"
            );
            // Notifications and batch members alike.
            let note = serde_json::json!([{"jsonrpc": "2.0", "method": method}]).to_string();
            assert!(Incoming::parse(note.as_bytes()).is_err(), "{method:?}");
        }
        // Exact MCP methods, and methods MCP does not define, pass.
        for method in [
            "tools/call",
            "logging/setLevel",
            "notifications/initialized",
            "x/custom",
            "Custom Method",
        ] {
            let body = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method}).to_string();
            assert!(Incoming::parse(body.as_bytes()).is_ok(), "{method:?}");
        }
    }

    #[test]
    fn rejects_what_is_not_json_rpc() {
        for body in [
            r#"{"id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":7}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":"s"}"#,
            r#"[]"#,
            r#"42"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}, 3]"#,
        ] {
            let err = Incoming::parse(body.as_bytes()).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidRequest, "{body}");
        }
        let err = Incoming::parse(b"{not json").unwrap_err();
        assert_eq!(err.code(), ErrorCode::ParseError);
    }

    #[test]
    fn reads_batches() {
        let body = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"n"}]"#;
        let Incoming::Batch(items) = Incoming::parse(body.as_bytes()).unwrap() else {
            panic!("expected a batch")
        };
        assert_eq!(items.len(), 2);
    }

    #[test]
    fn extracts_tool_calls_only_from_tools_call_requests() {
        let msg = single(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":1},"_meta":{"progressToken":7}}}"#,
        );
        let call = msg.tool_call().unwrap();
        assert_eq!(call.name, "x");
        assert_eq!(call.arguments, &json!({"a": 1}));
        assert_eq!(msg.progress_token(), Some(&json!(7)));
        let no_args =
            single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#);
        assert_eq!(no_args.tool_call().unwrap().arguments, &Value::Null);
        let notification =
            single(r#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#);
        assert!(notification.tool_call().is_none());
        let nameless =
            single(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":3}}"#);
        assert!(nameless.tool_call().is_none());
    }

    #[test]
    fn keeps_unknown_fields_when_reserialised() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"future/thing","params":{"x":{"y":[1,2]}},"extra":true}"#;
        let msg = single(body);
        let again: Value = serde_json::from_slice(&msg.to_bytes()).unwrap();
        assert_eq!(again, serde_json::from_str::<Value>(body).unwrap());
    }

    #[test]
    fn keeps_a_lone_messages_bytes_only_when_they_mean_what_its_value_does() {
        let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":7}}}"#;
        let Incoming::Single(message) =
            Incoming::parse_bytes(Bytes::from_static(body.as_bytes())).unwrap()
        else {
            panic!("expected a single message")
        };
        assert_eq!(message.raw().map(|b| &b[..]), Some(body.as_bytes()));
        // A fraction is re-serialised as the f64 the policy saw, not forwarded as written.
        let fraction = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"n":0.10000000000000000001}}}"#;
        let Incoming::Single(message) =
            Incoming::parse_bytes(Bytes::from_static(fraction.as_bytes())).unwrap()
        else {
            panic!("expected a single message")
        };
        assert!(message.raw().is_none());
        // Batch members are re-serialised (refused members are taken out).
        let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#;
        let Incoming::Batch(items) =
            Incoming::parse_bytes(Bytes::from_static(batch.as_bytes())).unwrap()
        else {
            panic!("expected a batch")
        };
        assert!(items[0].raw().is_none());
        // `parse` keeps no bytes.
        let Incoming::Single(message) = Incoming::parse(body.as_bytes()).unwrap() else {
            panic!("expected a single message")
        };
        assert!(message.raw().is_none());
    }

    #[test]
    fn refuses_duplicate_keys_anywhere_in_a_message() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","arguments":{"a":{"p":1,"p":2}}}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping","params":{"k":1,"k":1}}]"#,
        ] {
            let err = Incoming::parse_bytes(Bytes::from_static(body.as_bytes())).unwrap_err();
            assert_eq!(err.code(), ErrorCode::ParseError, "{body}");
            assert!(err.to_string().contains("duplicate object key"), "{err}");
        }
    }

    #[test]
    fn builds_error_responses() {
        let err = error_response(
            Some(&json!(3)),
            ErrorCode::DeniedByPolicy,
            "no",
            Some(json!({"k": 1})),
        );
        assert_eq!(
            err,
            json!({"jsonrpc":"2.0","id":3,"error":{"code":-32001,"message":"no","data":{"k":1}}})
        );
        assert_eq!(
            error_response(None, ErrorCode::ParseError, "bad", None)["id"],
            Value::Null
        );
    }
}
