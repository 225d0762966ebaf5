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

/// A parsed body.
pub(crate) struct Parsed {
    /// The value.
    pub value: Value,
    /// Whether every number in it is an integer, which any parser reads exactly. A
    /// fraction or exponent (or an integer beyond 64 bits) was rounded to an `f64`,
    /// which a parser with more precision would read differently: such a body is
    /// forwarded re-serialised, as the number the policy saw.
    pub exact: bool,
}

/// Parses `body` as one JSON value, refusing duplicate object keys at any depth.
pub(crate) fn parse(body: &[u8]) -> Result<Parsed, serde_json::Error> {
    let mut exact = true;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = Strict { exact: &mut exact }.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(Parsed { value, exact })
}

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
                Entry::Occupied(taken) => {
                    let quoted: String = taken.key().chars().take(QUOTED_KEY).collect();
                    return Err(de::Error::custom(format_args!(
                        "duplicate object key {quoted:?}: each key may appear once per object"
                    )));
                }
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn refused(body: &str) -> String {
        match parse(body.as_bytes()) {
            Ok(parsed) => panic!("accepted {body}: {}", parsed.value),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn reads_what_serde_json_reads() {
        let body = r#"{"a":[1,-2,"x\n\u00e9",true,null,{"b":{}}],"c":"\ud83d\ude00"}"#;
        let parsed = parse(body.as_bytes()).unwrap();
        assert_eq!(parsed.value, serde_json::from_str::<Value>(body).unwrap());
        assert!(parsed.exact);
        // Key order is kept (serde_json's `preserve_order`).
        let keys: Vec<_> = parsed.value.as_object().unwrap().keys().collect();
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
            parse(br#"{"a":[1,-1,18446744073709551615,-9223372036854775808]}"#)
                .unwrap()
                .exact
        );
        for body in [
            "[0.5]",
            "[1e2]",
            "[18446744073709551616]",
            r#"{"a":{"b":-0.0}}"#,
        ] {
            assert!(!parse(body.as_bytes()).unwrap().exact, "{body}");
        }
    }

    #[test]
    fn refuses_trailing_data_and_deep_nesting() {
        assert!(parse(br#"{"a":1} {"a":2}"#).is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(parse(deep.as_bytes()).is_err());
    }
}
