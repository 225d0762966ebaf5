//! The `tools/list` response stage: the tools the policy hides from the caller (it
//! denies them outright) and tools whose `x-mcp-header` annotations are invalid are
//! removed from the list; the others' annotations are learnt (`store::params`), so
//! that `inbound` can check the `Mcp-Param-*` headers of their calls.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;
use tollgate_policy::Policy;

use super::Frame;
use crate::pipeline::context::{Caller, Context};
use crate::state::Server;
use crate::store::params::ToolParams;

/// The filter, for one answer.
pub struct Filter {
    server: Arc<Server>,
    policy: Arc<Policy>,
    caller: Caller,
}

impl Filter {
    pub(super) fn new(ctx: &Context) -> Filter {
        Filter {
            server: ctx.server.clone(),
            policy: ctx.server.policy.load_full(),
            caller: ctx.caller.clone(),
        }
    }

    /// Hides and learns the tools listed in a message (or each message of a batch).
    pub(super) fn filter(&self, frame: &mut Frame) {
        let (server, policy, caller) = (&self.server, &*self.policy, &self.caller);
        let params = &server.params;
        if let Some(text) = frame.text() {
            // Only an answer that lists tools is parsed.
            if !memchr_tools(text) {
                return;
            }
            match filter_text(text, &server.name, params, policy, caller) {
                Some(Some(filtered)) => return frame.set_text(filtered),
                Some(None) => return,
                None => {}
            }
        }
        frame.edit(|value| {
            (
                (),
                filter_tools(value, &server.name, params, policy, caller),
            )
        });
    }
}

/// A `tools/list` answer as [`filter_text`] reads it: the tools as they are written.
/// Any other member of the answer is skipped; a duplicated `result` or `tools` is an
/// error (so the answer is read whole instead).
#[derive(serde::Deserialize)]
struct Listed<'a> {
    #[serde(borrow)]
    result: ListedTools<'a>,
}

#[derive(serde::Deserialize)]
struct ListedTools<'a> {
    #[serde(borrow)]
    tools: Vec<&'a serde_json::value::RawValue>,
}

/// What the filter reads of one tool. A duplicated `name` or `inputSchema`, or a
/// name that is not a string, is an error.
#[derive(serde::Deserialize)]
struct ListedTool<'a> {
    #[serde(borrow)]
    name: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "inputSchema", borrow)]
    input_schema: Option<&'a serde_json::value::RawValue>,
}

/// [`filter_tools`] for a single answer as text, without building its tools: each is
/// read for its name (and its schema only if it may declare `x-mcp-header`), and the
/// answer is written again from the kept tools' own text only if one is hidden.
/// `Some(None)`: nothing hidden; `None`: not a plain answer listing tools (a batch,
/// a duplicated key, …), for [`filter_tools`] to read whole.
fn filter_text(
    text: &Bytes,
    server: &str,
    params: &ToolParams,
    policy: &Policy,
    caller: &Caller,
) -> Option<Option<Bytes>> {
    let listed: Listed<'_> = serde_json::from_slice(text).ok()?;
    let tools = &listed.result.tools;
    let mut kept = Vec::with_capacity(tools.len());
    for tool in tools {
        let head: ListedTool<'_> = serde_json::from_str(tool.get()).ok()?;
        let Some(name) = head.name.as_deref() else {
            kept.push(tool);
            continue;
        };
        let schema = match head.input_schema {
            Some(raw) if may_declare_headers(raw.get()) => serde_json::from_str(raw.get()).ok()?,
            _ => Value::Null,
        };
        if keeps_tool(name, &schema, server, params, policy, caller) {
            kept.push(tool);
        }
    }
    if kept.len() == tools.len() {
        return Some(None);
    }
    // The kept tools' own text between what came before the first tool and after the
    // last (the `[` and `]` and everything else of the answer).
    // (Borrowed from `text`, so each starts inside it.)
    let at = |raw: &serde_json::value::RawValue| {
        (raw.get().as_ptr() as usize).checked_sub(text.as_ptr() as usize)
    };
    let (first, last) = (tools.first()?, tools.last()?);
    let (start, end) = (at(first)?, at(last)? + last.get().len());
    let mut out = Vec::with_capacity(text.len());
    out.extend_from_slice(text.get(..start)?);
    for (i, tool) in kept.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(tool.get().as_bytes());
    }
    out.extend_from_slice(text.get(end..)?);
    Some(Some(Bytes::from(out)))
}

/// Whether a schema's text may hold what [`tollgate_mcp::param_headers`] looks at:
/// an `x-mcp-header` (also written with escapes), or nesting deep enough to be refused.
/// A schema without either declares nothing, as `null` does.
fn may_declare_headers(schema: &str) -> bool {
    const DEEP: usize = 32;
    if memchr::memmem::find(schema.as_bytes(), b"x-mcp-header").is_some()
        || memchr::memchr(b'\\', schema.as_bytes()).is_some()
    {
        return true;
    }
    // Without escapes every `"` opens or closes a string.
    let (mut depth, mut in_string) = (0usize, false);
    for b in schema.bytes() {
        match b {
            b'"' => in_string = !in_string,
            b'{' | b'[' if !in_string => {
                depth += 1;
                if depth > DEEP {
                    return true;
                }
            }
            b'}' | b']' if !in_string => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

fn memchr_tools(text: &[u8]) -> bool {
    memchr::memmem::find(text, b"\"tools\"").is_some()
}

/// Removes hidden tools from one JSON-RPC response (or each response of a batch),
/// and tools whose `x-mcp-header` annotations are not valid (as a Streamable HTTP
/// client must); learns the annotations of the others into `params`. Returns
/// whether anything was removed.
pub fn filter_tools(
    message: &mut Value,
    server: &str,
    params: &ToolParams,
    policy: &Policy,
    caller: &Caller,
) -> bool {
    if let Value::Array(items) = message {
        return items.iter_mut().fold(false, |changed, item| {
            filter_tools(item, server, params, policy, caller) | changed
        });
    }
    let Some(tools) = message
        .pointer_mut("/result/tools")
        .and_then(Value::as_array_mut)
    else {
        return false;
    };
    let before = tools.len();
    tools.retain(|tool| {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            return true;
        };
        let schema = tool.get("inputSchema").unwrap_or(&Value::Null);
        keeps_tool(name, schema, server, params, policy, caller)
    });
    tools.len() != before
}

/// Whether a listed tool stays in the list: the policy does not hide it from
/// `caller`, and its `x-mcp-header` annotations are valid (learnt into `params`).
fn keeps_tool(
    name: &str,
    schema: &Value,
    server: &str,
    params: &ToolParams,
    policy: &Policy,
    caller: &Caller,
) -> bool {
    let claims = caller.identity.as_ref().map(|id| &id.claims);
    if policy.hides_tool(name, caller.client.as_deref(), claims) {
        return false;
    }
    match tollgate_mcp::param_headers(schema) {
        Ok(declared) => {
            if !params.learn(name, declared) {
                tracing::warn!(
                    server,
                    tool = name,
                    "too many tools with x-mcp-header annotations; this one's are not checked"
                );
            }
            true
        }
        Err(invalid) => {
            tracing::warn!(server, tool = name, error = %invalid, "tool hidden");
            params.forget(name);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    /// The annotations learnt of a few tools.
    type Learnt = Vec<Option<Arc<[tollgate_mcp::ParamHeader]>>>;

    /// What [`filter_json`] makes of `answer` by its two paths, and what each learnt:
    /// the text read for names (`None` when it leaves the answer to the other), and
    /// the value read whole.
    fn both_ways(answer: &str) -> (Option<Value>, Learnt, Value, Learnt) {
        let policy = Policy::from_yaml(
            "version: 1\ndefault: allow\nrules:\n  - tool: \"secret_*\"\n    action: deny\n",
            "test",
        )
        .unwrap();
        let anyone = Caller::anonymous(std::net::IpAddr::from([127, 0, 0, 1]));
        let learnt =
            |params: &ToolParams| ["read", "bad", "deep", "x"].map(|t| params.get(t)).to_vec();
        let (by_text, by_value) = (ToolParams::default(), ToolParams::default());
        let text = Bytes::from(answer.to_owned());
        let filtered = filter_text(&text, "s", &by_text, &policy, &anyone)
            .map(|kept| serde_json::from_slice(&kept.unwrap_or(text.clone())).unwrap());
        let mut value: Value = serde_json::from_str(answer).unwrap();
        filter_tools(&mut value, "s", &by_value, &policy, &anyone);
        (filtered, learnt(&by_text), value, learnt(&by_value))
    }

    #[test]
    fn the_text_filter_keeps_and_learns_what_the_value_filter_does() {
        let deep = format!(
            "{}{}",
            "{\"a\":".repeat(40),
            "1".to_owned() + &"}".repeat(40)
        );
        let answers = [
            // Hidden among others, odd spacing, a tool with no name.
            r#"{"jsonrpc":"2.0","id":1,"result":{ "tools" : [ {"name":"a"} , {"name":"secret_x","inputSchema":{}},{"x":1}, {"name":"secret_y"} ] ,"nextCursor":"c"}}"#.to_owned(),
            // Everything hidden; nothing hidden.
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret_a"}]}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"a","description":"say \"hi\""}]}}"#.to_owned(),
            // Annotations: valid, invalid, written with escapes; a schema nested too deep.
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"read","inputSchema":{"type":"object","properties":{"path":{"type":"string","x-mcp-header":"Path"}}}},{"name":"bad","inputSchema":{"properties":{"n":{"type":"number","x-mcp-header":"N"}}}},{"name":"x","inputSchema":{"properties":{"p":{"type":"string","x-mcp-h\u0065ader":"P"}}}},{"name":"secret_z"}]}}"#.to_owned(),
            format!(r#"{{"jsonrpc":"2.0","id":1,"result":{{"tools":[{{"name":"deep","inputSchema":{deep}}},{{"name":"secret_q"}}]}}}}"#),
            // Read whole: a duplicated name, a tool that is not an object, a batch, an error.
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret_a","name":"b"}]}}"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"result":{"tools":["odd",{"name":"secret_a"}]}}"#.to_owned(),
            r#"[{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"secret_a"}]}}]"#.to_owned(),
            r#"{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":"tools"}}"#.to_owned(),
        ];
        for answer in &answers {
            let (filtered, learnt_by_text, value, learnt_by_value) = both_ways(answer);
            if let Some(filtered) = filtered {
                assert_eq!(filtered, value, "{answer}");
                assert_eq!(learnt_by_text, learnt_by_value, "{answer}");
            }
        }
        // Only the last four are left to the value filter.
        let read_whole: Vec<bool> = answers.iter().map(|a| both_ways(a).0.is_none()).collect();
        assert_eq!(
            read_whole,
            [false, false, false, false, false, true, true, true, true]
        );
        // What the text filter hid, it hid.
        let (filtered, learnt, _, _) = both_ways(&answers[3]);
        let names: Vec<_> = filtered.unwrap()["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].clone())
            .collect();
        assert_eq!(names, ["read", "x"]);
        assert!(
            learnt[0].is_some() && learnt[1].is_none() && learnt[3].is_some(),
            "{learnt:?}"
        );
    }

    #[test]
    fn tools_list_teaches_param_headers_and_hides_invalid_tools() {
        let policy = Policy::from_yaml("version: 1\ndefault: allow\n", "test").unwrap();
        let params = ToolParams::default();
        let mut answer = json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "read", "inputSchema": {"type": "object", "properties": {
                "path": {"type": "string", "x-mcp-header": "Path"}}}},
            {"name": "plain", "inputSchema": {"type": "object"}},
            {"name": "bad", "inputSchema": {"type": "object", "properties": {
                "n": {"type": "number", "x-mcp-header": "N"}}}}
        ]}});
        let anyone = Caller::anonymous(std::net::IpAddr::from([127, 0, 0, 1]));
        assert!(filter_tools(&mut answer, "s", &params, &policy, &anyone));
        let names: Vec<_> = answer["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read", "plain"]);
        assert_eq!(params.get("read").unwrap()[0].header, "mcp-param-path");
        assert!(params.get("plain").is_none());
        assert!(params.get("bad").is_none());
    }
}
