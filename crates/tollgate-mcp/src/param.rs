//! `Mcp-Param-*` headers (2026-07-28): tool arguments a client mirrors into HTTP
//! headers because the tool's `inputSchema` marks them with `x-mcp-header`.
//!
//! A component that routes on such a header (a load balancer, a WAF) must see the
//! call Tollgate decided on, so a recognised header has to match the argument it
//! mirrors, and an argument the tool declares must not travel without its header.

use serde_json::{Map, Value};

use crate::era::{HeaderMismatch, decode_header_value, encode_header_value};

/// Most `x-mcp-header` annotations one tool may declare.
pub const MAX_PARAM_HEADERS: usize = 64;

/// Deepest chain of `properties` keys looked into.
const MAX_DEPTH: usize = 32;

/// One argument a tool mirrors into a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamHeader {
    /// The `x-mcp-header` value as declared, for messages: `Region`.
    pub name: String,
    /// The header's name, lowercase: `mcp-param-<name>`.
    pub header: String,
    /// The chain of `properties` keys that leads to the argument.
    pub path: Vec<String>,
}

/// Why a tool's `x-mcp-header` annotations are not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid x-mcp-header: {0}")]
pub struct InvalidParamHeaders(String);

/// The `x-mcp-header` annotations of a tool's `inputSchema`, checked against the
/// constraints of the 2026-07-28 spec: a non-empty token, case-insensitively unique,
/// on an `integer`, `string` or `boolean` property reachable from the root through
/// `properties` keys only. An annotation anywhere else makes the tool invalid.
pub fn param_headers(input_schema: &Value) -> Result<Vec<ParamHeader>, InvalidParamHeaders> {
    let mut found = Vec::new();
    walk(input_schema, &mut Vec::new(), true, 0, &mut found)?;
    Ok(found)
}

/// The header an `x-mcp-header` annotation (`name`) on the property at `path`
/// declares, checked against those `found` before.
fn declared(
    object: &serde_json::Map<String, Value>,
    name: &Value,
    path: &[String],
    reachable: bool,
    found: &[ParamHeader],
) -> Result<ParamHeader, InvalidParamHeaders> {
    let invalid = |why: String| Err(InvalidParamHeaders(why));
    let at = path_text(path);
    if !reachable || path.is_empty() {
        return invalid(format!(
            "on `{at}`, which is not reached through `properties` alone"
        ));
    }
    let Some(name) = name.as_str().filter(|n| is_token(n)) else {
        return invalid(format!("on `{at}`: the name is not an HTTP token"));
    };
    if !matches!(
        object.get("type").and_then(Value::as_str),
        Some("string" | "integer" | "boolean")
    ) {
        return invalid(format!(
            "on `{at}`: only string, integer and boolean properties may be mirrored"
        ));
    }
    let header = format!("mcp-param-{}", name.to_ascii_lowercase());
    if found.iter().any(|f| f.header == header) {
        return invalid(format!("`{name}` is declared twice"));
    }
    if found.len() == MAX_PARAM_HEADERS {
        return invalid(format!("more than {MAX_PARAM_HEADERS} annotations"));
    }
    Ok(ParamHeader {
        name: name.to_owned(),
        header,
        path: path.to_vec(),
    })
}

fn walk(
    schema: &Value,
    path: &mut Vec<String>,
    reachable: bool,
    depth: usize,
    found: &mut Vec<ParamHeader>,
) -> Result<(), InvalidParamHeaders> {
    if depth > MAX_DEPTH {
        return Err(InvalidParamHeaders(format!(
            "schema nested deeper than {MAX_DEPTH} levels"
        )));
    }
    match schema {
        Value::Array(items) => {
            for item in items {
                walk(item, path, false, depth + 1, found)?;
            }
        }
        Value::Object(object) => {
            if let Some(name) = object.get("x-mcp-header") {
                let header = declared(object, name, path, reachable, found)?;
                found.push(header);
            }
            for (key, value) in object {
                if key == "properties"
                    && let Value::Object(properties) = value
                {
                    for (property, schema) in properties {
                        path.push(property.clone());
                        walk(schema, path, reachable, depth + 1, found)?;
                        path.pop();
                    }
                } else if key != "x-mcp-header" {
                    // Anything below another keyword (`items`, `oneOf`, `$defs`, …) is
                    // not statically reachable.
                    walk(value, path, false, depth + 1, found)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn path_text(path: &[String]) -> String {
    if path.is_empty() {
        "(root)".into()
    } else {
        path.join(".")
    }
}

/// RFC 9110 `1*tchar`.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// The argument at `path`, when it is there and not `null`.
fn argument<'a>(arguments: Option<&'a Map<String, Value>>, path: &[String]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    let mut value = arguments?.get(first)?;
    for key in rest {
        value = value.as_object()?.get(key)?;
    }
    (!value.is_null()).then_some(value)
}

/// Checks the `Mcp-Param-*` headers of one `tools/call` against its arguments.
///
/// `headers` are the request's `Mcp-Param-*` headers (names lowercase, values as
/// received). Every header `declared` names must match the argument it mirrors
/// (after decoding the `=?base64?…?=` form; integers compared as numbers) and
/// appear once; when `required` (the stateless era), an argument the tool declares
/// and the body carries must have its header. Headers the tool does not declare
/// are not looked at.
pub fn check_param_headers<'a>(
    declared: &[ParamHeader],
    arguments: Option<&Map<String, Value>>,
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])> + Clone,
    required: bool,
) -> Result<(), HeaderMismatch> {
    for param in declared {
        let name = format!("Mcp-Param-{}", param.name);
        let mut sent = headers
            .clone()
            .into_iter()
            .filter(|(header, _)| header.eq_ignore_ascii_case(&param.header))
            .map(|(_, value)| value);
        let (raw, again) = (sent.next(), sent.next());
        if again.is_some() {
            return Err(HeaderMismatch(format!("the {name} header is sent twice")));
        }
        let body = argument(arguments, &param.path);
        let Some(raw) = raw else {
            if required && body.is_some() {
                return Err(HeaderMismatch(format!(
                    "the {name} header is required: the tool mirrors `{}` into it",
                    param.path.join(".")
                )));
            }
            continue;
        };
        let header = decode_header_value(raw).ok_or_else(|| {
            HeaderMismatch(format!(
                "{name} header value is not valid (visible ASCII or =?base64?…?=)"
            ))
        })?;
        let Some(body) = body else {
            return Err(HeaderMismatch(format!(
                "{name} header value '{header}' has no value in the body at `{}`",
                param.path.join(".")
            )));
        };
        if !matches(&header, body) {
            return Err(HeaderMismatch(format!(
                "{name} header value '{header}' does not match body value {body}"
            )));
        }
    }
    Ok(())
}

/// Whether a decoded header value mirrors a body value, by the body value's type.
fn matches(header: &str, body: &Value) -> bool {
    match body {
        Value::String(text) => header == text,
        Value::Bool(flag) => header == if *flag { "true" } else { "false" },
        Value::Number(number) => match (number.as_f64(), header.trim().parse::<f64>()) {
            // Compared as numbers, so `42.0` mirrors `42`; both are within ±2^53 or
            // they could not have been mirrored exactly.
            (Some(body), Ok(header)) => header.is_finite() && header == body,
            _ => false,
        },
        _ => false,
    }
}

/// The `Mcp-Param-*` headers a Streamable HTTP client would send with a call
/// whose arguments are `arguments`, for a binding without headers.
pub fn mirrored_param_headers(
    declared: &[ParamHeader],
    arguments: Option<&Map<String, Value>>,
) -> Vec<(String, String)> {
    declared
        .iter()
        .filter_map(|param| {
            let value = match argument(arguments, &param.path)? {
                Value::String(text) => text.clone(),
                Value::Bool(flag) => flag.to_string(),
                Value::Number(number) => number.to_string(),
                _ => return None,
            };
            Some((param.header.clone(), encode_header_value(&value)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "x-mcp-header": "Path"},
                "count": {"type": "integer", "x-mcp-header": "Count"},
                "dry": {"type": "boolean", "x-mcp-header": "Dry-Run"},
                "where": {"type": "object", "properties": {
                    "region": {"type": "string", "x-mcp-header": "Region"}
                }},
                "query": {"type": "string"}
            }
        })
    }

    fn declared() -> Vec<ParamHeader> {
        param_headers(&schema()).unwrap()
    }

    fn check(args: Value, headers: &[(&str, &str)], required: bool) -> Result<(), String> {
        let headers: Vec<(&str, &[u8])> = headers.iter().map(|(n, v)| (*n, v.as_bytes())).collect();
        check_param_headers(&declared(), args.as_object(), headers, required)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn learns_statically_reachable_annotations() {
        let found = declared();
        let mut names: Vec<_> = found.iter().map(|p| p.header.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "mcp-param-count",
                "mcp-param-dry-run",
                "mcp-param-path",
                "mcp-param-region"
            ]
        );
        let region = found
            .iter()
            .find(|p| p.header == "mcp-param-region")
            .unwrap();
        assert_eq!(region.path, ["where", "region"]);
    }

    #[test]
    fn rejects_invalid_annotations() {
        let bad = [
            json!({"properties": {"a": {"type": "string", "x-mcp-header": ""}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "A B"}}}),
            json!({"properties": {"a": {"type": "string", "x-mcp-header": "A\r\nX: y"}}}),
            json!({"properties": {"a": {"type": "number", "x-mcp-header": "A"}}}),
            json!({"properties": {"a": {"type": "object", "x-mcp-header": "A"}}}),
            json!({"properties": {
                "a": {"type": "string", "x-mcp-header": "Dup"},
                "b": {"type": "string", "x-mcp-header": "dup"}
            }}),
            json!({"properties": {"a": {"type": "array", "items": {"type": "string", "x-mcp-header": "A"}}}}),
            json!({"oneOf": [{"properties": {"a": {"type": "string", "x-mcp-header": "A"}}}]}),
            json!({"$defs": {"a": {"type": "string", "x-mcp-header": "A"}}}),
            json!({"type": "object", "x-mcp-header": "Root"}),
        ];
        for schema in bad {
            assert!(param_headers(&schema).is_err(), "{schema}");
        }
        assert_eq!(param_headers(&json!({"type": "object"})).unwrap(), []);
    }

    #[test]
    fn matching_headers_pass() {
        let args =
            json!({"path": "/safe/x", "count": 42, "dry": true, "where": {"region": "us-west1"}});
        let headers = [
            ("mcp-param-path", "/safe/x"),
            ("mcp-param-count", "42.0"),
            ("mcp-param-dry-run", "true"),
            ("mcp-param-region", "=?base64?dXMtd2VzdDE=?="),
        ];
        assert_eq!(check(args, &headers, true), Ok(()));
    }

    #[test]
    fn encoded_values_are_decoded_before_comparing() {
        for value in [
            "Hello, 世界",
            " padded ",
            "line1\nline2",
            "=?base64?literal?=",
        ] {
            let args = json!({ "path": value });
            let header = encode_header_value(value);
            assert_eq!(check(args, &[("mcp-param-path", &header)], true), Ok(()));
        }
    }

    #[test]
    fn mismatches_are_refused() {
        let cases = [
            (
                json!({"path": "/safe/x"}),
                ("mcp-param-path", "/etc/passwd"),
            ),
            (
                json!({"path": "/safe/x"}),
                ("mcp-param-path", "=?base64?L2V0Yy9wYXNzd2Q=?="),
            ),
            (json!({"count": 42}), ("mcp-param-count", "43")),
            (json!({"count": 42}), ("mcp-param-count", "forty-two")),
            (json!({"dry": true}), ("mcp-param-dry-run", "True")),
            (json!({"dry": false}), ("mcp-param-dry-run", "true")),
            (
                json!({"where": {"region": "eu"}}),
                ("mcp-param-region", "us"),
            ),
            // A header for an argument the body does not carry.
            (json!({}), ("mcp-param-path", "/etc/passwd")),
            (json!({"path": null}), ("mcp-param-path", "/etc/passwd")),
            // A header for an argument the body carries as another type.
            (
                json!({"path": ["/etc/passwd"]}),
                ("mcp-param-path", "/etc/passwd"),
            ),
            // Not a valid header value.
            (json!({"path": "/x"}), ("mcp-param-path", "=?base64?%%%?=")),
        ];
        for (args, header) in cases {
            let result = check(args.clone(), &[header], false);
            assert!(result.is_err(), "{args} with {header:?}");
            assert!(result.unwrap_err().starts_with("header mismatch: "));
        }
    }

    #[test]
    fn header_names_are_case_insensitive_and_sent_once() {
        let args = json!({"path": "/safe/x"});
        assert_eq!(
            check(args.clone(), &[("MCP-PARAM-PATH", "/safe/x")], true),
            Ok(())
        );
        let twice = [
            ("mcp-param-path", "/safe/x"),
            ("mcp-param-path", "/etc/passwd"),
        ];
        assert!(check(args, &twice, true).unwrap_err().contains("twice"));
    }

    #[test]
    fn missing_header_is_refused_when_required() {
        let args = json!({"path": "/safe/x"});
        let error = check(args.clone(), &[], true).unwrap_err();
        assert!(
            error.contains("Mcp-Param-Path header is required"),
            "{error}"
        );
        // Before 2026-07-28 nothing obliges a client to send it.
        assert_eq!(check(args, &[], false), Ok(()));
        // An argument the body does not carry needs no header.
        assert_eq!(check(json!({"path": null}), &[], true), Ok(()));
    }

    #[test]
    fn undeclared_headers_are_ignored() {
        let args = json!({"path": "/safe/x"});
        let headers = [
            ("mcp-param-path", "/safe/x"),
            ("mcp-param-other", "anything"),
        ];
        assert_eq!(check(args, &headers, true), Ok(()));
    }

    #[test]
    fn mirrored_headers_pass_the_check() {
        let args = json!({"path": " padded ", "count": 7, "dry": false, "where": {"region": "eu"}});
        let mirrored = mirrored_param_headers(&declared(), args.as_object());
        assert_eq!(mirrored.len(), 4);
        let headers: Vec<(&str, &[u8])> = mirrored
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            check_param_headers(&declared(), args.as_object(), headers, true),
            Ok(())
        );
    }
}
