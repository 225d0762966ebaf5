//! What an answer says: the one classifier of JSON-RPC answers, from a parsed value or
//! from text (reading only the fields that tell, and the common case without parsing).

use serde::Deserialize;
use serde_json::Value;

/// What a JSON-RPC answer to a `tools/call` (or any request) says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answered {
    /// A result.
    Ok,
    /// A result with `isError: true`: the tool failed.
    ToolError,
    /// A JSON-RPC error of this code.
    RpcError(i64),
}

/// What `message` says, if it is an answer (has `result` or `error`).
pub fn answered(message: &Value) -> Option<Answered> {
    if let Some(error) = message.get("error") {
        return Some(Answered::RpcError(
            error.get("code").and_then(Value::as_i64).unwrap_or(0),
        ));
    }
    let result = message.get("result")?;
    Some(match result.get("isError") {
        Some(Value::Bool(true)) => Answered::ToolError,
        _ => Answered::Ok,
    })
}

/// The answers in a message or batch, by id (null when it has none).
pub fn answers_of(value: &Value) -> Vec<(Value, Answered)> {
    let one = |message: &Value| {
        answered(message).map(|a| (message.get("id").cloned().unwrap_or(Value::Null), a))
    };
    match value {
        Value::Array(items) => items.iter().filter_map(one).collect(),
        message => one(message).into_iter().collect(),
    }
}

/// The answers in a message or batch given as text, by id; `None` when it is not
/// JSON-RPC. Only the few fields that tell are read; results are skipped.
pub fn answers_in(text: &[u8]) -> Option<Vec<(Value, Answered)>> {
    let batch = text.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[');
    let heads = if batch {
        serde_json::from_slice::<Vec<Head>>(text).ok()?
    } else {
        vec![serde_json::from_slice::<Head>(text).ok()?]
    };
    Some(heads.into_iter().filter_map(Head::answer).collect())
}

/// The common case, told without parsing: one answer with a result, no `"error"`
/// anywhere in it, and every `"isError"` key set to `false`, is [`Answered::Ok`].
/// Inside a JSON string a quote is escaped, so `"isError"` followed by `:` is a key
/// (or a key that merely ends so, which only sends the answer to the full parse).
pub fn plainly_ok(text: &[u8]) -> bool {
    let keys = &*KEYS;
    let skip = |rest: &[u8]| -> usize {
        rest.iter()
            .position(|b| !b.is_ascii_whitespace())
            .unwrap_or(rest.len())
    };
    text.get(skip(text)) == Some(&b'{')
        && keys.result.find(text).is_some()
        // `"error"` and `"isError"` end alike: one search finds both.
        && keys.rror.find_iter(text).all(|at| {
            let (before, rest) = (&text[..at], &text[at + b"rror\"".len()..]);
            if before.ends_with(b"\"e") {
                // `"error"`, anywhere.
                return false;
            }
            if !before.ends_with(b"\"isE") {
                return true;
            }
            let rest = &rest[skip(rest)..];
            match rest.split_first() {
                Some((b':', value)) => value[skip(value)..].starts_with(b"false"),
                // A string value `"isError"`, not a key.
                _ => true,
            }
        })
}

/// Whether the text may be a message with a `method` (a request or notification, not
/// an answer); `false` means it certainly is not.
pub fn names_method(text: &[u8]) -> bool {
    KEYS.method.find(text).is_some()
}

/// The keys [`plainly_ok`] and [`names_method`] look for, each searcher built once
/// (building one costs more than a search through a small answer).
struct Keys {
    result: memchr::memmem::Finder<'static>,
    /// The end of `"error"` and of `"isError"`.
    rror: memchr::memmem::Finder<'static>,
    method: memchr::memmem::Finder<'static>,
}

static KEYS: std::sync::LazyLock<Keys> = std::sync::LazyLock::new(|| Keys {
    result: memchr::memmem::Finder::new(br#""result""#),
    rror: memchr::memmem::Finder::new(br#"rror""#),
    method: memchr::memmem::Finder::new(br#""method""#),
});

/// What an answer's outcome depends on, read without the rest of it.
#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    id: Value,
    #[serde(default)]
    error: Option<ErrorHead>,
    #[serde(default)]
    result: Option<ResultHead>,
}

#[derive(Deserialize)]
struct ErrorHead {
    #[serde(default)]
    code: Value,
}

#[derive(Deserialize)]
struct ResultHead {
    #[serde(default, rename = "isError")]
    is_error: Value,
}

impl Head {
    fn answer(self) -> Option<(Value, Answered)> {
        let answered = match (self.error, self.result) {
            (Some(error), _) => Answered::RpcError(error.code.as_i64().unwrap_or(0)),
            (None, Some(result)) if result.is_error == Value::Bool(true) => Answered::ToolError,
            (None, Some(_)) => Answered::Ok,
            (None, None) => return None,
        };
        Some((self.id, answered))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn a_plain_result_is_ok_without_parsing_and_every_way_of_reading_agrees() {
        for ok in [
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":false}}"#,
            r#" {"jsonrpc":"2.0","id":1,"result":{"isError" : false,"x":{"isError":false}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"isError"}]}}"#,
        ] {
            assert!(plainly_ok(ok.as_bytes()), "{ok}");
            assert_eq!(
                answers_in(ok.as_bytes()).unwrap(),
                [(json!(1), Answered::Ok)]
            );
            let value: Value = serde_json::from_str(ok).unwrap();
            assert_eq!(answers_of(&value), [(json!(1), Answered::Ok)]);
        }
        for (text, expected) in [
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"content":[],"isError":true}}"#,
                Answered::ToolError,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"a":{"isError":false},"isError": true}}"#,
                Answered::ToolError,
            ),
            (
                r#"{"jsonrpc":"2.0","id":1,"error":{"code":-32602,"message":"no"}}"#,
                Answered::RpcError(-32602),
            ),
            // A key that only ends in `isError` sends the answer to the full parse.
            (
                r#"{"jsonrpc":"2.0","id":1,"result":{"x\"isError":true}}"#,
                Answered::Ok,
            ),
        ] {
            assert!(!plainly_ok(text.as_bytes()), "{text}");
            assert_eq!(answers_in(text.as_bytes()).unwrap(), [(json!(1), expected)]);
            let value: Value = serde_json::from_str(text).unwrap();
            assert_eq!(answers_of(&value), [(json!(1), expected)], "{text}");
        }
        // A batch, and messages that are not answers.
        let batch = r#"[{"jsonrpc":"2.0","id":2,"error":{"code":5,"message":"x"}},{"jsonrpc":"2.0","method":"n"},{"jsonrpc":"2.0","id":"a","result":{}}]"#;
        let expected = [
            (json!(2), Answered::RpcError(5)),
            (json!("a"), Answered::Ok),
        ];
        assert_eq!(answers_in(batch.as_bytes()).unwrap(), expected);
        assert_eq!(answers_of(&serde_json::from_str(batch).unwrap()), expected);
        assert!(answers_in(b"not json").is_none());
        assert!(names_method(br#"{"method":"x"}"#) && !names_method(br#"{"result":{}}"#));
    }
}
