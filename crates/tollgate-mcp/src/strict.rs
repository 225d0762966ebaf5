//! The strict JSON parse: a body is accepted only if every parser reads it the way
//! Tollgate does, so that its original bytes may be forwarded in place of a
//! re-serialisation.
//!
//! serde_json already refuses invalid UTF-8, lone surrogates (`\ud800`), control
//! characters in strings, trailing data and nesting deeper than 128. What it does not
//! refuse is a duplicate object key, which it collapses (last one wins), while other
//! parsers keep the first: such a body could name one tool to the policy and another to
//! the upstream. This parse refuses duplicates at any depth, comparing keys after their
//! escapes are decoded (`"name"` and `"na\u006de"` are the same key).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};

/// Parses `body` as one JSON value, refusing duplicate object keys at any depth.
pub(crate) fn parse(body: &[u8]) -> Result<Value, serde_json::Error> {
    // Exactness matters only for the bytes of a lone message ([`scan`]).
    let mut exact = true;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Strict { exact: &mut exact }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(value)
}

/// The `_meta` key that carries the protocol version in the stateless era, one of
/// the parts [`scan`] keeps.
pub const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";

/// The `_meta` key that carries a stateless request's client capabilities.
pub const CLIENT_CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";

/// The longest part of a duplicate key an error quotes.
const QUOTED_KEY: usize = 64;

struct Strict<'a> {
    exact: &'a mut bool,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        *self.exact = false;
        // serde_json never yields a non-finite number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(Strict {
            exact: &mut *self.exact,
        })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Strict {
                exact: &mut *self.exact,
            })?;
            match object.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                Entry::Occupied(taken) => return Err(duplicate(taken.key())),
            }
        }
        Ok(Value::Object(object))
    }
}

/// What one pass over a lone message (a JSON object) finds: the parts the stages
/// read on every call, built; everything else checked as strictly as [`parse`]
/// checks it (duplicate keys at any depth, UTF-8, surrogates, nesting) and not built.
/// The rest of the value is parsed from the same bytes only if a stage asks for it.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// `jsonrpc`, `method`, `id`.
    pub jsonrpc: Option<Value>,
    pub method: Option<Value>,
    pub id: Option<Value>,
    /// Whether `params` is there, and whether it is an object or an array.
    pub params: Option<bool>,
    /// `params.name`, `params.uri`, `params.arguments`, and the multi round-trip
    /// `params.requestState` and `params.inputResponses`, when `params` is an object.
    pub name: Option<Value>,
    pub uri: Option<Value>,
    pub arguments: Option<Value>,
    pub request_state: Option<Value>,
    pub input_responses: Option<Value>,
    /// `params._meta`'s protocol version, progress token and client capabilities,
    /// when it is an object.
    pub protocol_version: Option<Value>,
    pub progress_token: Option<Value>,
    pub client_capabilities: Option<Value>,
    /// Whether it has `result` or `error`.
    pub answer: bool,
    /// Whether every number in it is an integer, which any parser reads exactly. A
    /// fraction or exponent (or an integer beyond 64 bits) was rounded to an `f64`,
    /// which a parser with more precision would read differently: such a body is
    /// forwarded re-serialised, as the number the policy saw.
    pub exact: bool,
}

/// Scans `body`, which must be one JSON object (a lone message).
pub(crate) fn scan(body: &[u8]) -> Result<Scanned, serde_json::Error> {
    let mut scanned = Scanned {
        exact: true,
        ..Scanned::default()
    };
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Walk {
        scanned: &mut scanned,
        scope: Scope::Top,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(scanned)
}

fn duplicate<E: de::Error>(key: &str) -> E {
    let quoted: String = key.chars().take(QUOTED_KEY).collect();
    E::custom(format_args!(
        "duplicate object key {quoted:?}: each key may appear once per object"
    ))
}

/// Where in the message a walked value is, which says what of it is kept.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    Top,
    Params,
    Meta,
    Other,
}

/// Checks a value strictly, building only what [`Scanned`] keeps.
struct Walk<'s> {
    scanned: &'s mut Scanned,
    scope: Scope,
}

impl Walk<'_> {
    fn plain<E: de::Error>(self) -> Result<(), E> {
        match self.scope {
            Scope::Top => Err(E::custom("a JSON-RPC message must be a JSON object")),
            Scope::Params => {
                self.scanned.params = Some(false);
                Ok(())
            }
            Scope::Meta | Scope::Other => Ok(()),
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.plain()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.plain()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.plain()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scanned.exact = false;
        self.plain()
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.plain()
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.plain()
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        match self.scope {
            Scope::Top => {
                return Err(de::Error::custom(
                    "a JSON-RPC message must be a JSON object",
                ));
            }
            Scope::Params => self.scanned.params = Some(true),
            Scope::Meta | Scope::Other => {}
        }
        while seq
            .next_element_seed(Walk {
                scanned: &mut *self.scanned,
                scope: Scope::Other,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.scope == Scope::Params {
            self.scanned.params = Some(true);
        }
        let mut seen = Seen::default();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let scanned = &mut *self.scanned;
            // What is kept is parsed as `parse` would have it; the rest is walked.
            let kept = match (self.scope, &*key) {
                (Scope::Top, "jsonrpc") => Some(&mut scanned.jsonrpc),
                (Scope::Top, "method") => Some(&mut scanned.method),
                (Scope::Top, "id") => Some(&mut scanned.id),
                (Scope::Params, "name") => Some(&mut scanned.name),
                (Scope::Params, "uri") => Some(&mut scanned.uri),
                (Scope::Params, "arguments") => Some(&mut scanned.arguments),
                (Scope::Params, "requestState") => Some(&mut scanned.request_state),
                (Scope::Params, "inputResponses") => Some(&mut scanned.input_responses),
                (Scope::Meta, PROTOCOL_VERSION_META) => Some(&mut scanned.protocol_version),
                (Scope::Meta, "progressToken") => Some(&mut scanned.progress_token),
                (Scope::Meta, CLIENT_CAPABILITIES_META) => Some(&mut scanned.client_capabilities),
                _ => None,
            };
            if let Some(slot) = kept {
                *slot = Some(map.next_value_seed(Strict {
                    exact: &mut scanned.exact,
                })?);
            } else {
                let scope = match (self.scope, &*key) {
                    (Scope::Top, "params") => Scope::Params,
                    (Scope::Params, "_meta") => Scope::Meta,
                    _ => Scope::Other,
                };
                if self.scope == Scope::Top && matches!(&*key, "result" | "error") {
                    scanned.answer = true;
                }
                map.next_value_seed(Walk { scanned, scope })?;
            }
            seen.insert(key)?;
        }
        Ok(())
    }
}

/// An object's keys so far, to refuse a second one: compared in a list while the
/// object is small, in a hash set once it is not (a hostile body may have many).
#[derive(Default)]
struct Seen<'de> {
    list: Vec<std::borrow::Cow<'de, str>>,
    set: Option<std::collections::HashSet<std::borrow::Cow<'de, str>>>,
}

impl<'de> Seen<'de> {
    const LIST: usize = 16;

    fn insert<E: de::Error>(&mut self, key: std::borrow::Cow<'de, str>) -> Result<(), E> {
        if let Some(set) = &mut self.set {
            if set.contains(&key) {
                return Err(duplicate(&key));
            }
            set.insert(key);
            return Ok(());
        }
        if self.list.contains(&key) {
            return Err(duplicate(&key));
        }
        self.list.push(key);
        if self.list.len() > Self::LIST {
            self.set = Some(self.list.drain(..).collect());
        }
        Ok(())
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = std::borrow::Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(std::borrow::Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    // A scenario test reads top to bottom as one story: its length is allowed here.
    #![allow(clippy::too_many_lines)]
    use super::*;

    fn refused(body: &str) -> String {
        match parse(body.as_bytes()) {
            Ok(value) => panic!("accepted {body}: {value}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let body = r#"{"a":[1,-2,"x\n\u00e9",true,null,{"b":{}}],"c":"\ud83d\ude00"}"#;
        let value = parse(body.as_bytes()).unwrap();
        assert_eq!(value, serde_json::from_str::<Value>(body).unwrap());
        assert!(scan(body.as_bytes()).unwrap().exact);
        // Key order is kept (serde_json's `preserve_order`).
        let keys: Vec<_> = value.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["a", "c"]);
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        for body in [
            r#"{"name":"a","name":"b"}"#,
            r#"{"params":{"name":"a","name":"b"}}"#,
            r#"{"params":{"arguments":{"path":"/ok","path":"/etc/passwd"}}}"#,
            r#"[{"x":[{"k":1,"k":1}]}]"#,
            // Equal once escapes are decoded.
            r#"{"name":"a","na\u006de":"b"}"#,
        ] {
            assert!(refused(body).contains("duplicate object key"), "{body}");
        }
        // The same key in different objects is fine.
        assert!(parse(br#"{"a":{"k":1},"b":{"k":2},"c":[{"k":3},{"k":4}]}"#).is_ok());
    }

    #[test]
    fn refuses_lone_surrogates_and_invalid_utf8() {
        for body in [
            r#"{"a":"\ud800"}"#,
            r#"{"a":"\udc00"}"#,
            r#"{"a":"\ud800\u0041"}"#,
            r#"{"\ud800":1}"#,
        ] {
            // serde_json's words vary ("lone leading surrogate", "unexpected end of hex
            // escape"): what matters is that nothing is accepted.
            refused(body);
        }
        assert!(parse(b"{\"a\":\"\xff\"}").is_err());
        assert!(parse(b"{\"\xc3\":1}").is_err());
        assert!(
            parse(b"{\"a\":\"\xed\xa0\x80\"}").is_err(),
            "an encoded surrogate"
        );
    }

    #[test]
    fn tells_inexact_numbers() {
        assert!(
            scan(br#"{"a":[1,-1,18446744073709551615,-9223372036854775808]}"#)
                .unwrap()
                .exact
        );
        for body in [
            r#"{"a":[0.5]}"#,
            r#"{"a":[1e2]}"#,
            r#"{"a":[18446744073709551616]}"#,
            r#"{"a":{"b":-0.0}}"#,
            r#"{"id":1.5}"#,
            r#"{"params":{"arguments":{"x":2.5}}}"#,
            r#"{"params":{"_meta":{"progressToken":0.1}}}"#,
        ] {
            assert!(!scan(body.as_bytes()).unwrap().exact, "{body}");
        }
    }

    /// Bodies every check must treat alike: what `parse` refuses `scan` refuses,
    /// and what it accepts `scan` keeps as `parse` reads it.
    const BODIES: &[&str] = &[
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","arguments":{"a":[1,{"b":null}]},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","progressToken":"p","x":{}}}}"#,
        r#"{"params":{"_meta":{"progressToken":1}},"method":"m","jsonrpc":"2.0"}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"t","requestState":"s","inputResponses":{"q":{"action":"accept"}},"_meta":{"io.modelcontextprotocol/clientCapabilities":{"elicitation":{}}}}}"#,
        r#"{"params":{"requestState":{"deep":[1]},"inputResponses":[],"_meta":{"io.modelcontextprotocol/clientCapabilities":7}}}"#,
        r#"{"params":{"inputResponses":{"q":1,"q":2}}}"#,
        r#"{"params":{"_meta":{"io.modelcontextprotocol/clientCapabilities":{},"io.modelcontextprotocol/clientCapabilities":{}}}}"#,
        r#"{"params":{"x":{"requestState":1},"_meta":{"y":{"progressToken":1}}}}"#,
        r#"{"jsonrpc":"2.0","id":"x","result":{"content":[]}}"#,
        r#"{"jsonrpc":"2.0","method":"resources/read","id":2,"params":{"uri":"file:///a"}}"#,
        r#"{"jsonrpc":"2.0","method":"m","params":[1,{"k":1}]}"#,
        r#"{"jsonrpc":"2.0","method":"m","params":3}"#,
        r#"{"jsonrpc":"2.0","method":"m","params":{"_meta":[{"k":1,"k":2}]}}"#,
        r#"{"name":"a","name":"b"}"#,
        r#"{"params":{"name":"a","name":"b"}}"#,
        r#"{"params":{"arguments":{"path":"/ok","path":"/etc/passwd"}}}"#,
        r#"{"params":{"_meta":{"progressToken":1,"progressToken":2}}}"#,
        r#"{"result":{"x":[{"k":1,"k":1}]}}"#,
        r#"{"name":"a","na\u006de":"b"}"#,
        r#"{"a":"\ud800"}"#,
        r#"{"\ud800":1}"#,
        r#"{"params":{"arguments":{"a":"\udc00"}}}"#,
        r#"{"a":1} {"a":2}"#,
        r#"{"a":1"#,
        r#"{"a":{"k":1},"b":{"k":2},"c":[{"k":3},{"k":4}]}"#,
    ];

    #[test]
    fn scan_refuses_what_parse_refuses_and_keeps_what_it_reads() {
        let mut bodies: Vec<String> = BODIES.iter().map(|b| (*b).to_owned()).collect();
        // Many keys (a hash set beyond 16), with and without a late duplicate.
        let many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        bodies.push(format!("{{{}}}", many.join(",")));
        bodies.push(format!(r#"{{{},"k3":0}}"#, many.join(",")));
        bodies.push(format!(
            r#"{{"params":{{"arguments":{{{},"k39":0}}}}}}"#,
            many.join(",")
        ));
        bodies.push(format!(
            r#"{{"x":{}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        ));
        for body in &bodies {
            let parsed = parse(body.as_bytes());
            let scanned = scan(body.as_bytes());
            assert_eq!(parsed.is_ok(), scanned.is_ok(), "{body}: {scanned:?}");
            let (Ok(value), Ok(scanned)) = (parsed, scanned) else {
                continue;
            };
            let params = value.get("params").and_then(Value::as_object);
            let meta = params
                .and_then(|p| p.get("_meta"))
                .and_then(Value::as_object);
            let pairs = [
                (scanned.jsonrpc.as_ref(), value.get("jsonrpc")),
                (scanned.method.as_ref(), value.get("method")),
                (scanned.id.as_ref(), value.get("id")),
                (scanned.name.as_ref(), params.and_then(|p| p.get("name"))),
                (scanned.uri.as_ref(), params.and_then(|p| p.get("uri"))),
                (
                    scanned.arguments.as_ref(),
                    params.and_then(|p| p.get("arguments")),
                ),
                (
                    scanned.protocol_version.as_ref(),
                    meta.and_then(|m| m.get(PROTOCOL_VERSION_META)),
                ),
                (
                    scanned.progress_token.as_ref(),
                    meta.and_then(|m| m.get("progressToken")),
                ),
                (
                    scanned.request_state.as_ref(),
                    params.and_then(|p| p.get("requestState")),
                ),
                (
                    scanned.input_responses.as_ref(),
                    params.and_then(|p| p.get("inputResponses")),
                ),
                (
                    scanned.client_capabilities.as_ref(),
                    meta.and_then(|m| m.get(CLIENT_CAPABILITIES_META)),
                ),
            ];
            for (kept, read) in pairs {
                assert_eq!(kept, read, "{body}");
            }
            assert_eq!(
                scanned.params,
                value.get("params").map(|p| p.is_object() || p.is_array()),
                "{body}"
            );
            assert_eq!(
                scanned.answer,
                value.get("result").is_some() || value.get("error").is_some(),
                "{body}"
            );
        }
    }

    #[test]
    fn refuses_trailing_data_and_deep_nesting() {
        assert!(parse(br#"{"a":1} {"a":2}"#).is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
