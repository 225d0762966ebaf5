//! JSON-RPC framing: any body either parses into messages whose accessors do not
//! panic, or is refused with a JSON-RPC error code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_mcp::Incoming;

fuzz_target!(|body: &[u8]| {
    match Incoming::parse(body) {
        Ok(Incoming::Single(message)) => touch(&message),
        Ok(Incoming::Batch(messages)) => messages.iter().for_each(touch),
        Err(err) => {
            let _ = err.code().code();
            let _ = err.to_string();
        }
    }
});

fn touch(message: &tollgate_mcp::Message) {
    let _ = (message.kind(), message.method(), message.id(), message.meta_protocol_version(), message.routing_name());
    let _ = message.tool_call();
    let _ = message.to_bytes();
}
