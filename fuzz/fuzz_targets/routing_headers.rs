//! 2026-07-28 routing headers: arbitrary header bytes against an arbitrary body never
//! panic, and a header that matches is accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_mcp::{Incoming, RoutingHeaders};

fuzz_target!(|data: &[u8]| {
    // Layout: three header values and the body, split at the first three 0xff bytes.
    let mut parts = data.splitn(4, |&b| b == 0xff);
    let (Some(version), Some(method), Some(name), Some(body)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(Incoming::Single(message)) = Incoming::parse(body) else {
        return;
    };
    let headers = RoutingHeaders {
        protocol_version: Some(version),
        method: Some(method),
        name: (!name.is_empty()).then_some(name),
    };
    let _ = headers.validate(&message);
    let _ = tollgate_mcp::decode_header_value(name);
});
