//! JSON-RPC 2.0 and MCP message framing for Tollgate.
//!
//! The proxy stays transparent: messages are kept as [`serde_json::Value`] and only
//! the fields the policy needs (method, id, tool name, arguments, `_meta`) are read.
//! Everything else passes through untouched, so new MCP methods and fields work
//! without a Tollgate release. This crate has no policy and no HTTP server.
//!
//! ```
//! use tollgate_mcp::{Incoming, Message};
//! let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"hi"}}}"#;
//! let Incoming::Single(msg) = Incoming::parse(body)? else { unreachable!() };
//! let call = msg.tool_call().expect("a tools/call");
//! assert_eq!(call.name, "echo");
//! # Ok::<(), tollgate_mcp::FramingError>(())
//! ```

mod answer;
mod era;
mod jsonrpc;
mod lines;
mod param;
mod sse;
mod strict;

pub use answer::{Answered, answered, answers_in, answers_of, names_method, plainly_ok};
pub use era::{
    CLIENT_CAPABILITIES_META, Era, HeaderMismatch, PROTOCOL_VERSION_META, RoutingHeaders,
    STATELESS_PROTOCOL_VERSION, decode_header_value, encode_header_value, era_of,
    is_stateless_version, meta_protocol_version, mirrored_headers,
};
pub use jsonrpc::{
    ErrorCode, FramingError, Incoming, Kind, Message, ToolCallRef, error_response, result_response,
};
pub use lines::{Line, LineReader, sniff_id};
pub use param::{
    InvalidParamHeaders, MAX_PARAM_HEADERS, ParamHeader, check_param_headers,
    mirrored_param_headers, param_headers,
};
pub use sse::{
    DEFAULT_MAX_EVENT_BYTES, SseDecoder, SseError, SseEvent, encode, encode_event, events,
    events_with_limit,
};
