//! Stage 1, inbound: what a message is and what travels with it.
//!
//! On Streamable HTTP the routing headers must agree with the body (Tollgate
//! decides on the body, so a header-routed component behind it must see the same
//! call) and are forwarded as sent. A binding without headers (stdio, legacy SSE)
//! gets them mirrored from the body, as a Streamable HTTP client would send them.

use axum::http::{HeaderName, HeaderValue};
use tollgate_mcp::{Era, Kind, Message, RoutingHeaders, era_of, mirrored_headers};

use super::context::Meta;
use crate::error::ProxyError;

/// A message, understood.
pub struct Decoded {
    /// Its era.
    pub era: Era,
    /// Whether it is an `initialize` request.
    pub initialize: bool,
    /// Headers forwarded upstream with it.
    pub forwarded: Vec<(HeaderName, HeaderValue)>,
}

/// Checks the routing headers and tells the era.
pub fn decode(message: &Message, meta: &Meta) -> Result<Decoded, ProxyError> {
    let mut forwarded = Vec::new();
    let header_version = match &meta.routing {
        Some(routing) => {
            let headers = RoutingHeaders {
                protocol_version: routing.protocol_version.as_ref().map(HeaderValue::as_bytes),
                method: routing.method.as_ref().map(HeaderValue::as_bytes),
                name: routing.name.as_ref().map(HeaderValue::as_bytes),
            };
            headers
                .validate(message)
                .map_err(|mismatch| ProxyError::HeaderMismatch {
                    id: message.id().cloned(),
                    message: mismatch.to_string(),
                })?;
            let named = [
                ("mcp-protocol-version", &routing.protocol_version),
                ("mcp-method", &routing.method),
                ("mcp-name", &routing.name),
            ];
            for (name, value) in named {
                if let Some(value) = value {
                    forwarded.push((HeaderName::from_static(name), value.clone()));
                }
            }
            forwarded.extend(meta.params.iter().cloned());
            routing
                .protocol_version
                .as_ref()
                .and_then(|v| v.to_str().ok())
        }
        None => {
            for (name, value) in mirrored_headers(message) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    forwarded.push((HeaderName::from_static(name), value));
                }
            }
            None
        }
    };
    Ok(Decoded {
        era: era_of(message, header_version),
        initialize: message.kind() == Kind::Request && message.method() == Some("initialize"),
        forwarded,
    })
}
