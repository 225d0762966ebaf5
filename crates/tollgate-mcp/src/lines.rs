//! Newline-delimited JSON-RPC (the stdio transport), read with a bound on each line.
//!
//! A line longer than the bound is skipped up to its newline, not kept, and the
//! reader goes on with the next line: one over-long message costs that message,
//! never the stream. (A `tokio_util` codec with `max_length` ends its stream at the
//! first over-long line, which is what a peer could use to cut everyone off.)

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

/// How much of an over-long line is kept, to find the id of the message it held.
const PREFIX_KEPT: usize = 4096;

/// One line read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line within the bound, without its `\n` (and `\r`).
    Text(Vec<u8>),
    /// A line longer than the bound, skipped: its length and its first bytes.
    TooLong {
        /// Its length in bytes, without the newline.
        length: usize,
        /// Its first bytes (at most 4 KiB), to attribute it with [`sniff_id`].
        prefix: Vec<u8>,
    },
}

/// Reads lines of at most `max` bytes from `reader`.
pub struct LineReader<R> {
    reader: R,
    max: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    /// A reader of lines of at most `max` bytes.
    pub fn new(reader: R, max: usize) -> LineReader<R> {
        LineReader { reader, max }
    }

    /// The next line; `None` at the end of the input. A final line without a
    /// newline counts as a line.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut line = Vec::new();
        let mut length = 0usize;
        let mut too_long = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if length == 0 {
                    return Ok(None);
                }
                break;
            }
            let (chunk, found) = match memchr(available) {
                Some(at) => (&available[..at], true),
                None => (available, false),
            };
            length += chunk.len();
            if !too_long && length > self.max {
                too_long = true;
                line.truncate(PREFIX_KEPT);
            }
            let room = if too_long {
                PREFIX_KEPT.saturating_sub(line.len())
            } else {
                chunk.len()
            };
            line.extend_from_slice(&chunk[..room.min(chunk.len())]);
            let consumed = chunk.len() + usize::from(found);
            self.reader.consume(consumed);
            if found {
                break;
            }
        }
        if too_long {
            return Ok(Some(Line::TooLong {
                length,
                prefix: line,
            }));
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(Some(Line::Text(line)))
    }
}

fn memchr(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// The top-level `id` of a JSON-RPC message from the first bytes of its text, when
/// they hold it (a number or a string); nested `id`s are not mistaken for it.
pub fn sniff_id(prefix: &[u8]) -> Option<serde_json::Value> {
    let mut depth = 0usize;
    let mut i = 0usize;
    let mut expecting_key = false;
    while i < prefix.len() {
        match prefix[i] {
            b'{' => {
                depth += 1;
                expecting_key = depth == 1;
                i += 1;
            }
            b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            b',' => {
                expecting_key = depth == 1;
                i += 1;
            }
            b'"' => {
                let end = string_end(prefix, i)?;
                let key = expecting_key && depth == 1;
                expecting_key = false;
                if key && &prefix[i..end] == b"\"id\"" {
                    return value_at(prefix, end);
                }
                i = end;
            }
            _ => i += 1,
        }
    }
    None
}

/// The index just past the string starting at `start` (a `"`).
fn string_end(text: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The number or string after `: ` at `at`.
fn value_at(text: &[u8], at: usize) -> Option<serde_json::Value> {
    let rest = &text[at..];
    let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    if rest[colon] != b':' {
        return None;
    }
    let rest = &rest[colon + 1..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &rest[start..];
    let end = if rest.first() == Some(&b'"') {
        string_end(rest, 0)?
    } else {
        rest.iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'-'))?
    };
    match serde_json::from_slice::<serde_json::Value>(&rest[..end]).ok()? {
        id @ (serde_json::Value::Number(_) | serde_json::Value::String(_)) => Some(id),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    async fn read_all(input: &[u8], max: usize) -> Vec<Line> {
        // A small buffer, so lines span several reads.
        let reader = tokio::io::BufReader::with_capacity(7, input);
        let mut lines = LineReader::new(reader, max);
        let mut all = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            all.push(line);
        }
        all
    }

    #[tokio::test]
    async fn a_long_line_is_skipped_and_reading_goes_on() {
        let long = format!("{{\"id\":7,\"x\":\"{}\"}}", "y".repeat(100));
        let input = format!("{{\"a\":1}}\r\n{long}\nlast");
        let lines = read_all(input.as_bytes(), 32).await;
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], Line::Text(b"{\"a\":1}".to_vec()));
        let Line::TooLong { length, prefix } = &lines[1] else {
            panic!("{lines:?}")
        };
        assert_eq!(*length, long.len());
        assert_eq!(sniff_id(prefix), Some(json!(7)));
        assert_eq!(lines[2], Line::Text(b"last".to_vec()));
    }

    #[test]
    fn sniffs_only_the_top_level_id() {
        assert_eq!(
            sniff_id(br#"{"jsonrpc":"2.0","id":"a\"b","method":"x"#),
            Some(json!("a\"b"))
        );
        assert_eq!(sniff_id(br#"{"params":{"id":1},"id": 2,"#), Some(json!(2)));
        assert_eq!(sniff_id(br#"{"params":{"id":1},"result":"#), None);
        assert_eq!(sniff_id(br#"{"method":"id","id":null}"#), None);
        assert_eq!(sniff_id(br#"{"id":12"#), None, "the number may go on");
    }
}
