//! The policy loader: any text either compiles or gives errors with a location; a
//! compiled policy decides any call without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_policy::{Policy, ToolCall};

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    match Policy::from_yaml(source, "fuzz.yaml") {
        Ok(policy) => {
            let args = serde_json::json!({"a": 1, "path": "/x"});
            let serde_json::Value::Object(claims) =
                serde_json::json!({"sub": "u", "groups": ["sre", 1, true], "realm_access": {"roles": "admin"}})
            else {
                return;
            };
            let scopes = ["mcp".to_owned()];
            for tool in ["echo", "delete_x", "", "describe_job"] {
                let call = ToolCall { tool, arguments: &args, client: Some("c"), session_key: "s", client_key: "c", user_key: "u", claims: Some(&claims), scopes: &scopes };
                let _ = policy.evaluate(&call);
                let _ = policy.hides_tool(tool, None, Some(&claims));
                let _ = policy.names_tool(tool);
            }
        }
        Err(errors) => {
            let _ = errors.to_string();
        }
    }
});
