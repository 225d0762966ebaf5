//! Stage 1, inbound: what a message is and what travels with it.
//!
//! On Streamable HTTP the routing headers must agree with the body (Tollgate
//! decides on the body, so a header-routed component behind it must see the same
//! call) and are forwarded as sent. So must the `Mcp-Param-*` headers of a
//! `tools/call` that its tool declares (`x-mcp-header`, learned from `tools/list`);
//! those no tool declares are forwarded untouched, as the spec asks of an
//! intermediary. A binding without headers (stdio, legacy SSE) gets them all
//! mirrored from the body, as a Streamable HTTP client would send them.

use axum::http::{HeaderName, HeaderValue};
use tollgate_mcp::{
    Era, Kind, Message, ParamHeader, RoutingHeaders, check_param_headers, era_of,
    is_stateless_version, meta_protocol_version, mirrored_headers, mirrored_param_headers,
};

use super::context::Meta;
use crate::error::ProxyError;
use crate::store::params::ToolParams;

/// A message, understood.
pub struct Decoded {
    /// Its era.
    pub era: Era,
    /// Whether it is an `initialize` request.
    pub initialize: bool,
    /// Headers forwarded upstream with it.
    pub forwarded: Vec<(HeaderName, HeaderValue)>,
}

/// The headers a binding without headers gets mirrored from `message`: the routing
/// headers, and the `Mcp-Param-*` headers its tool `declared` (a stateless-era
/// call's, with its arguments).
fn mirror(
    message: &Message,
    declared: Option<&[ParamHeader]>,
    arguments: Option<&serde_json::Map<String, serde_json::Value>>,
    forwarded: &mut Vec<(HeaderName, HeaderValue)>,
) {
    for (name, value) in mirrored_headers(message) {
        if let Ok(value) = HeaderValue::from_str(&value) {
            forwarded.push((HeaderName::from_static(name), value));
        }
    }
    if let Some(declared) = declared {
        for (name, value) in mirrored_param_headers(declared, arguments) {
            if let (Ok(name), Ok(value)) =
                (HeaderName::try_from(name), HeaderValue::from_str(&value))
            {
                forwarded.push((name, value));
            }
        }
    }
}

/// Checks the routing headers (and the `Mcp-Param-*` headers the called tool
/// declares in `params`) and tells the era.
pub fn decode(message: &Message, meta: &Meta, params: &ToolParams) -> Result<Decoded, ProxyError> {
    let mismatch = |mismatch: tollgate_mcp::HeaderMismatch| ProxyError::HeaderMismatch {
        id: message.id().cloned(),
        message: mismatch.to_string(),
    };
    let call = message.tool_call();
    let declared = call.as_ref().and_then(|call| params.get(call.name));
    let stateless = meta_protocol_version(message).is_some_and(is_stateless_version);
    let mut forwarded = Vec::new();
    let header_version = match &meta.routing {
        Some(routing) => {
            let headers = RoutingHeaders {
                protocol_version: routing.protocol_version.as_ref().map(HeaderValue::as_bytes),
                method: routing.method.as_ref().map(HeaderValue::as_bytes),
                name: routing.name.as_ref().map(HeaderValue::as_bytes),
            };
            headers.validate(message).map_err(mismatch)?;
            if let (Some(call), Some(declared)) = (&call, &declared) {
                let sent = meta
                    .params
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_bytes()));
                // Required only where the spec obliges clients to send them.
                check_param_headers(declared, call.arguments.as_object(), sent, stateless)
                    .map_err(mismatch)?;
            }
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
            let arguments = call.as_ref().and_then(|call| call.arguments.as_object());
            let param = declared.as_deref().filter(|_| stateless);
            mirror(message, param, arguments, &mut forwarded);
            None
        }
    };
    Ok(Decoded {
        era: era_of(message, header_version),
        initialize: message.kind() == Kind::Request && message.method() == Some("initialize"),
        forwarded,
    })
}
