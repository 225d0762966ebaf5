//! MCP protocol eras and the 2026-07-28 routing headers.
//!
//! The handshake era (2024-11-05 … 2025-11-25) negotiates a version with
//! `initialize` and may use sessions; the stateless era (2026-07-28) carries the
//! version in every request's `params._meta` and mirrors method and name into
//! headers. Tollgate decides on the body, so a header that disagrees with the
//! body is refused: otherwise a header-routed component could be steered around
//! the policy.

use std::borrow::Cow;

use base64::Engine as _;

use crate::jsonrpc::{Kind, Message};

/// The first protocol version of the stateless era.
pub const STATELESS_PROTOCOL_VERSION: &str = "2026-07-28";

/// The `_meta` key that carries the protocol version in the stateless era (kept where the
/// message is read, the bottom of this crate).
pub use crate::strict::{CLIENT_CAPABILITIES_META, PROTOCOL_VERSION_META};

/// Which generation of MCP a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Era {
    /// `initialize` handshake, optional `Mcp-Session-Id` sessions.
    Handshake,
    /// Per-request metadata, no sessions (2026-07-28 and later).
    Stateless,
}

/// `params._meta["io.modelcontextprotocol/protocolVersion"]`, when present.
pub fn meta_protocol_version(message: &Message) -> Option<&str> {
    message.meta_protocol_version()
}

/// Whether a protocol version belongs to the stateless era.
pub fn is_stateless_version(version: &str) -> bool {
    // Versions are ISO dates, so they order as strings.
    version >= STATELESS_PROTOCOL_VERSION
}

/// The era of one message, from its body first and the `MCP-Protocol-Version` header second.
pub fn era_of(message: &Message, header_version: Option<&str>) -> Era {
    match meta_protocol_version(message).or(header_version) {
        Some(version) if is_stateless_version(version) => Era::Stateless,
        _ => Era::Handshake,
    }
}

/// Headers of a POST that mirror fields of its body, as received (`None` when absent).
#[derive(Debug, Clone, Default)]
pub struct RoutingHeaders<'a> {
    /// `MCP-Protocol-Version`.
    pub protocol_version: Option<&'a [u8]>,
    /// `Mcp-Method`.
    pub method: Option<&'a [u8]>,
    /// `Mcp-Name`.
    pub name: Option<&'a [u8]>,
}

/// A header that is missing, malformed or disagrees with the body (JSON-RPC -32020, HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("header mismatch: {0}")]
pub struct HeaderMismatch(pub String);

/// Decodes a header value, including the `=?base64?…?=` sentinel form of 2026-07-28.
/// A plain value is borrowed: every routing header of every call is decoded, and
/// most are plain.
pub fn decode_header_value(raw: &[u8]) -> Option<Cow<'_, str>> {
    // Visible ASCII and tabs only, hence UTF-8.
    if !raw
        .iter()
        .all(|&b| b == b'\t' || (0x20..=0x7e).contains(&b))
    {
        return None;
    }
    let text = std::str::from_utf8(raw).ok()?;
    match text
        .strip_prefix("=?base64?")
        .and_then(|t| t.strip_suffix("?="))
    {
        Some(encoded) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .ok()?;
            String::from_utf8(bytes).ok().map(Cow::Owned)
        }
        None => Some(Cow::Borrowed(text)),
    }
}

/// The body value `Mcp-Name` mirrors: `params.name`, else `params.uri`.
/// Encodes a header value: as is when it is visible ASCII, else in the
/// `=?base64?…?=` sentinel form of 2026-07-28.
pub fn encode_header_value(value: &str) -> String {
    let plain = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        && !value.starts_with(' ')
        && !value.ends_with(' ')
        && !value.starts_with("=?base64?");
    if plain {
        value.to_owned()
    } else {
        let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
        format!("=?base64?{encoded}?=")
    }
}

/// The routing headers a Streamable HTTP client sends with a stateless-era
/// request (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`), mirrored from its
/// body; empty for any other message. Used where a message arrives on a binding
/// without headers (stdio, legacy SSE) and continues over HTTP.
pub fn mirrored_headers(message: &Message) -> Vec<(&'static str, String)> {
    let Some(version) = meta_protocol_version(message).filter(|v| is_stateless_version(v)) else {
        return Vec::new();
    };
    let Some(method) = message.method() else {
        return Vec::new();
    };
    let mut headers = vec![
        ("mcp-protocol-version", encode_header_value(version)),
        ("mcp-method", encode_header_value(method)),
    ];
    if requires_name(method)
        && let Some(name) = message.routing_name()
    {
        headers.push(("mcp-name", encode_header_value(name)));
    }
    headers
}

fn requires_name(method: &str) -> bool {
    matches!(method, "tools/call" | "resources/read" | "prompts/get")
}

/// A routing header's value, decoded; an error names the header.
fn routing_header<'a>(
    name: &str,
    raw: Option<&'a [u8]>,
) -> Result<Option<Cow<'a, str>>, HeaderMismatch> {
    raw.map(|raw| {
        decode_header_value(raw).ok_or_else(|| {
            HeaderMismatch(format!(
                "{name} header value is not valid (visible ASCII or =?base64?…?=)"
            ))
        })
    })
    .transpose()
}

impl RoutingHeaders<'_> {
    /// Checks the headers against the body. Headers present in any era must agree
    /// with it; in the stateless era the standard ones are also required.
    pub fn validate(&self, message: &Message) -> Result<(), HeaderMismatch> {
        let version = routing_header("MCP-Protocol-Version", self.protocol_version)?;
        let method = routing_header("Mcp-Method", self.method)?;
        let name = routing_header("Mcp-Name", self.name)?;
        let stateless = meta_protocol_version(message);

        if let (Some(header), Some(body)) = (&version, stateless)
            && header != body
        {
            return Err(HeaderMismatch(format!(
                "MCP-Protocol-Version header value '{header}' does not match body value '{body}'"
            )));
        }
        if let Some(header) = &method {
            let body = message.method().unwrap_or("");
            if header != body {
                return Err(HeaderMismatch(format!(
                    "Mcp-Method header value '{header}' does not match body value '{body}'"
                )));
            }
        }
        if let Some(header) = &name {
            let body = message.routing_name().unwrap_or("");
            if header != body {
                return Err(HeaderMismatch(format!(
                    "Mcp-Name header value '{header}' does not match body value '{body}'"
                )));
            }
        }
        if stateless.is_some_and(is_stateless_version) && message.kind() == Kind::Request {
            if version.is_none() {
                return Err(HeaderMismatch(
                    "the MCP-Protocol-Version header is required".into(),
                ));
            }
            let body_method = message.method().unwrap_or("");
            if method.is_none() {
                return Err(HeaderMismatch("the Mcp-Method header is required".into()));
            }
            if requires_name(body_method) && name.is_none() {
                return Err(HeaderMismatch(format!(
                    "the Mcp-Name header is required for {body_method}"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::Incoming;

    fn msg(body: &str) -> Message {
        match Incoming::parse(body.as_bytes()).unwrap() {
            Incoming::Single(m) => m,
            Incoming::Batch(_) => panic!("batch"),
        }
    }

    const STATELESS_CALL: &str = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28"}}}"#;

    fn headers<'a>(
        v: Option<&'a str>,
        m: Option<&'a str>,
        n: Option<&'a str>,
    ) -> RoutingHeaders<'a> {
        RoutingHeaders {
            protocol_version: v.map(str::as_bytes),
            method: m.map(str::as_bytes),
            name: n.map(str::as_bytes),
        }
    }

    #[test]
    fn mirrored_headers_pass_validation() {
        for name in ["get_weather", "météo", " padded ", "=?base64?x?="] {
            let message = Message::from_value(serde_json::json!({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": name, "_meta": {PROTOCOL_VERSION_META: STATELESS_PROTOCOL_VERSION}},
            }))
            .unwrap();
            let headers = mirrored_headers(&message);
            let get = |key: &str| {
                headers
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.as_bytes())
            };
            let routing = RoutingHeaders {
                protocol_version: get("mcp-protocol-version"),
                method: get("mcp-method"),
                name: get("mcp-name"),
            };
            assert_eq!(routing.validate(&message), Ok(()), "{name}");
        }
        let handshake = Message::from_value(
            serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
        )
        .unwrap();
        assert!(mirrored_headers(&handshake).is_empty());
    }

    #[test]
    fn detects_eras() {
        let call = msg(STATELESS_CALL);
        assert_eq!(era_of(&call, None), Era::Stateless);
        let init = msg(
            r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-11-25"}}"#,
        );
        assert_eq!(era_of(&init, Some("2025-11-25")), Era::Handshake);
        assert_eq!(era_of(&init, None), Era::Handshake);
    }

    #[test]
    fn accepts_matching_headers() {
        let call = msg(STATELESS_CALL);
        headers(Some("2026-07-28"), Some("tools/call"), Some("get_weather"))
            .validate(&call)
            .unwrap();
        let encoded = "=?base64?Z2V0X3dlYXRoZXI=?=";
        headers(Some("2026-07-28"), Some("tools/call"), Some(encoded))
            .validate(&call)
            .unwrap();
    }

    #[test]
    fn refuses_a_name_that_smuggles_another_tool() {
        let call = msg(STATELESS_CALL);
        let err =
            headers(Some("2026-07-28"), Some("tools/call"), Some("delete_all")).validate(&call);
        assert!(
            err.unwrap_err()
                .0
                .contains("Mcp-Name header value 'delete_all'")
        );
        let err =
            headers(Some("2026-07-28"), Some("tools/list"), Some("get_weather")).validate(&call);
        assert!(err.unwrap_err().0.contains("Mcp-Method"));
        let err =
            headers(Some("2025-11-25"), Some("tools/call"), Some("get_weather")).validate(&call);
        assert!(err.unwrap_err().0.contains("MCP-Protocol-Version"));
    }

    #[test]
    fn requires_standard_headers_in_the_stateless_era() {
        let call = msg(STATELESS_CALL);
        assert!(
            headers(None, Some("tools/call"), Some("get_weather"))
                .validate(&call)
                .is_err()
        );
        assert!(
            headers(Some("2026-07-28"), None, Some("get_weather"))
                .validate(&call)
                .is_err()
        );
        assert!(
            headers(Some("2026-07-28"), Some("tools/call"), None)
                .validate(&call)
                .is_err()
        );
    }

    #[test]
    fn checks_headers_present_in_the_handshake_era_too() {
        let call = msg(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a"}}"#);
        headers(Some("2025-11-25"), None, None)
            .validate(&call)
            .unwrap();
        assert!(
            headers(Some("2025-11-25"), None, Some("b"))
                .validate(&call)
                .is_err()
        );
    }

    #[test]
    fn refuses_malformed_header_values() {
        let call = msg(STATELESS_CALL);
        let bad = RoutingHeaders {
            protocol_version: Some(b"2026-07-28"),
            method: Some(b"tools/call"),
            name: Some(b"get_weather\x01"),
        };
        assert!(bad.validate(&call).is_err());
        assert_eq!(decode_header_value(b"=?base64?not base64!?="), None);
        assert_eq!(decode_header_value(b"plain").as_deref(), Some("plain"));
    }
}
