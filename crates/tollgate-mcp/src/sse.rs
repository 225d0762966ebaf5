//! Server-Sent Events: decoding an upstream byte stream and encoding events downstream.
//!
//! The decoder follows the WHATWG `text/event-stream` parsing rules (lines end with
//! CRLF, LF or CR; a blank line dispatches; `:` starts a comment; one space after the
//! colon is dropped; an event without data is not dispatched; `id` persists). It is
//! linear in its input: each byte is looked at once, and only the unfinished line is
//! kept between chunks. Every line and every event is bounded (`max`, default
//! [`DEFAULT_MAX_EVENT_BYTES`]); past it the stream ends with [`SseError`], so a peer
//! that never sends a line end or a blank line cannot grow Tollgate's memory.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::{Stream, StreamExt};

/// The default bound on one SSE line and on one event (its `data`, `event` and `id`
/// together): 16 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One SSE event, as relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (empty means the default, `message`).
    pub event: String,
    /// `data:` lines joined with `\n`.
    pub data: String,
    /// `id:`, used for resumability (`Last-Event-ID`).
    pub id: String,
    /// `retry:` in milliseconds, when the upstream set one.
    pub retry: Option<u64>,
}

/// Why an SSE stream ended early. After one error the stream yields nothing more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SseError {
    /// One line (up to its line end) is longer than the limit.
    #[error("an SSE line is longer than the limit of {limit} bytes")]
    LineTooLong {
        /// The limit, in bytes.
        limit: usize,
    },
    /// One event's `data`, `event` and `id` together are larger than the limit.
    #[error("an SSE event is larger than the limit of {limit} bytes")]
    EventTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// A line is not valid UTF-8.
    #[error("the SSE stream is not valid UTF-8")]
    Utf8,
    /// The underlying byte stream failed.
    #[error("{0}")]
    Transport(String),
}

/// A push decoder: feed it chunks, collect events. Linear in its input, bounded by `max`.
#[derive(Debug)]
pub struct SseDecoder {
    max: usize,
    /// The unfinished line: bytes after the last line end, across chunks.
    line: Vec<u8>,
    /// The previous chunk ended with CR, so an LF opening this one ends no line.
    after_cr: bool,
    /// No line has been finished yet (a BOM may open the first one).
    first_line: bool,
    event: String,
    data: String,
    /// Whether a `data` field was seen in this event (data may be empty).
    has_data: bool,
    id: String,
    retry: Option<u64>,
    failed: bool,
}

impl SseDecoder {
    /// A decoder bounding every line and every event to `max` bytes.
    pub fn new(max: usize) -> SseDecoder {
        SseDecoder {
            max,
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            event: String::new(),
            data: String::new(),
            has_data: false,
            id: String::new(),
            retry: None,
            failed: false,
        }
    }

    /// Decodes one chunk, appending every event it completes to `out`. After an error
    /// every later call returns the same kind of error and decodes nothing.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        self.feed_framed(chunk, out).map(|_| ())
    }

    /// [`SseDecoder::feed`], also telling where in `chunk` the last blank line ended
    /// (`None` when none ended in it): the bytes before it, with those held from
    /// earlier chunks, are whole events that a relay may pass on (or re-encode) as a
    /// block, while the rest belongs to an event not yet finished.
    pub fn feed_framed(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<Option<usize>, SseError> {
        if self.failed {
            return Err(SseError::Transport("the SSE stream already failed".into()));
        }
        let result = self.feed_inner(chunk, out);
        if result.is_err() {
            self.failed = true;
            self.line = Vec::new();
            self.data = String::new();
        }
        result
    }

    fn feed_inner(
        &mut self,
        whole: &[u8],
        out: &mut Vec<SseEvent>,
    ) -> Result<Option<usize>, SseError> {
        let mut chunk = whole;
        let mut boundary = None;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if let Some(rest) = chunk.strip_prefix(b"\n") {
                chunk = rest;
            }
        }
        while let Some(end) = memchr::memchr2(b'\n', b'\r', chunk) {
            let (head, tail) = chunk.split_at(end);
            // tail starts with the line end.
            let crlf = tail.starts_with(b"\r\n");
            let skip = if crlf { 2 } else { 1 };
            if tail.first() == Some(&b'\r') && tail.len() == 1 {
                self.after_cr = true;
            }
            chunk = tail.get(skip..).unwrap_or_default();
            if self.line.is_empty() {
                self.check_line(head.len())?;
                self.process_line(head, out)?;
                if head.is_empty() {
                    boundary = Some(whole.len() - chunk.len());
                }
            } else {
                self.check_line(self.line.len() + head.len())?;
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(head);
                self.process_line(&line, out)?;
                line.clear();
                // Keep the allocation for the next long line only if it is small.
                if line.capacity() <= 64 * 1024 {
                    self.line = line;
                }
            }
        }
        self.check_line(self.line.len() + chunk.len())?;
        self.line.extend_from_slice(chunk);
        Ok(boundary)
    }

    fn check_line(&self, len: usize) -> Result<(), SseError> {
        if len > self.max {
            return Err(SseError::LineTooLong { limit: self.max });
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let mut line = std::str::from_utf8(line).map_err(|_| SseError::Utf8)?;
        if std::mem::take(&mut self.first_line) {
            line = line.strip_prefix('\u{feff}').unwrap_or(line);
        }
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "id" if !value.contains('\0') => {
                self.id.clear();
                self.id.push_str(value);
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry = Some(value.parse().unwrap_or(u64::MAX));
            }
            _ => {}
        }
        if self.event.len() + self.data.len() + self.id.len() > self.max {
            return Err(SseError::EventTooLarge { limit: self.max });
        }
        Ok(())
    }

    /// A blank line: an event with data is dispatched; the event type and data reset,
    /// the id persists (WHATWG "dispatch the event").
    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let retry = self.retry.take();
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            self.data.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(SseEvent {
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            id: self.id.clone(),
            retry,
        });
    }
}

/// The stream returned by [`events_with_limit`].
struct EventStream<S> {
    bytes: S,
    decoder: SseDecoder,
    ready: VecDeque<SseEvent>,
    scratch: Vec<SseEvent>,
    /// An error found after some events of the same chunk: yielded once they are out.
    error: Option<SseError>,
    done: bool,
}

impl<S, E> Stream for EventStream<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    type Item = Result<SseEvent, SseError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(err) = this.error.take() {
                return Poll::Ready(Some(Err(err)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.bytes.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                // An unfinished event at the end of the stream is dropped, as SSE says.
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(SseError::Transport(err.to_string()))));
                }
                Poll::Ready(Some(Ok(chunk))) => {
                    let result = this.decoder.feed(&chunk, &mut this.scratch);
                    this.ready.extend(this.scratch.drain(..));
                    if let Err(err) = result {
                        // Events completed before the error still go out first.
                        this.done = true;
                        this.error = Some(err);
                    }
                }
            }
        }
    }
}

/// Decodes a byte stream into SSE events, each line and event bounded by
/// [`DEFAULT_MAX_EVENT_BYTES`]. A transport error or a limit ends the stream with that
/// error, as text.
pub fn events<S, E>(bytes: S) -> impl Stream<Item = Result<SseEvent, String>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    events_with_limit(bytes, DEFAULT_MAX_EVENT_BYTES).map(|item| item.map_err(|e| e.to_string()))
}

/// Decodes a byte stream into SSE events, each line and each event bounded by `max`
/// bytes. A transport error or a limit ends the stream with that error.
pub fn events_with_limit<S, E>(
    bytes: S,
    max: usize,
) -> impl Stream<Item = Result<SseEvent, SseError>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    EventStream {
        bytes,
        decoder: SseDecoder::new(max),
        ready: VecDeque::new(),
        scratch: Vec::new(),
        error: None,
        done: false,
    }
}

/// Encodes one event. Multi-line data becomes several `data:` lines, as SSE requires.
pub fn encode_event(event: &SseEvent) -> Bytes {
    encode(
        &event.event,
        Some(&event.id),
        event.retry,
        event.data.as_bytes(),
    )
}

/// Encodes one event of type `event` (`message` when empty): the one SSE encoder of
/// every front door and relay. An id SSE cannot carry (empty, or with NUL, CR or LF)
/// is left out, as a client would ignore it; data becomes one `data:` line per line,
/// a raw CR (in JSON only whitespace between tokens, but an SSE line end) a space.
pub fn encode(event: &str, id: Option<&str>, retry: Option<u64>, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    if let Some(id) = id.filter(|id| !id.is_empty() && !id.contains(['\0', '\r', '\n'])) {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    let event = if event.is_empty() { "message" } else { event };
    if !event.contains(['\r', '\n']) {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event.as_bytes());
        out.push(b'\n');
    }
    if let Some(retry) = retry {
        out.extend_from_slice(format!("retry: {retry}\n").as_bytes());
    }
    for line in data.split(|b| *b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend(line.iter().map(|&b| if b == b'\r' { b' ' } else { b }));
        out.push(b'\n');
    }
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[tokio::test]
    async fn decodes_events_split_across_chunks() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"id: 1\nevent: mess")),
            Ok(Bytes::from_static(b"age\ndata: {\"a\":\n")),
            Ok(Bytes::from_static(
                b"data: 1}\n\n: keep-alive\n\ndata: x\n\n",
            )),
        ];
        let got: Vec<_> = events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(got.len(), 2);
        let first = got[0].as_ref().unwrap();
        assert_eq!(first.id, "1");
        assert_eq!(first.event, "message");
        assert_eq!(first.data, "{\"a\":\n1}");
        assert_eq!(got[1].as_ref().unwrap().data, "x");
    }

    #[tokio::test]
    async fn encoding_round_trips() {
        let event = SseEvent {
            event: "message".into(),
            data: "a\nb".into(),
            id: "7".into(),
            retry: Some(1000),
        };
        let bytes = encode_event(&event);
        assert_eq!(
            &bytes[..],
            b"id: 7\nevent: message\nretry: 1000\ndata: a\ndata: b\n\n"
        );
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(bytes)];
        let got: Vec<_> = events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(got[0].as_ref().unwrap(), &event);
    }

    fn decode(chunks: &[&[u8]], max: usize) -> (Vec<SseEvent>, Option<SseError>) {
        let mut decoder = SseDecoder::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            if let Err(err) = decoder.feed(chunk, &mut out) {
                return (out, Some(err));
            }
        }
        (out, None)
    }

    fn data_of(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn every_line_end_is_a_line_end_even_split_across_chunks() {
        let (got, err) = decode(
            &[
                b"data: a\r",
                b"\ndata: b\r",
                b"\r",
                b"data: c\n\ndata: d\r\r",
            ],
            1024,
        );
        assert_eq!(err, None);
        assert_eq!(data_of(&got), ["a\nb", "c", "d"]);
    }

    #[test]
    fn follows_the_whatwg_field_rules() {
        let input = "\u{feff}: comment\nid: 7\nretry: 250\nevent: custom\ndata\ndata:no-space\ndata:  two\n\n\
                     id: 8\0x\ndata: keeps id 7\n\nretry: x\nevent: dropped\n\ndata: last";
        let (got, err) = decode(&[input.as_bytes()], 1024);
        assert_eq!(err, None);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0],
            SseEvent {
                event: "custom".into(),
                data: "\nno-space\n two".into(),
                id: "7".into(),
                retry: Some(250),
            }
        );
        // An id with NUL is ignored; the id persists; an event without data is not
        // dispatched; the unfinished event at the end is dropped.
        assert_eq!(got[1].id, "7");
        assert_eq!(got[1].event, "message");
        assert_eq!(got[1].retry, None);
    }

    #[test]
    fn an_empty_data_line_is_an_event() {
        // The priming event of SEP-1699 resumability: an id, a retry and empty data.
        let (got, _) = decode(&[b"id: p1\nretry: 500\ndata: \n\n"], 1024);
        assert_eq!(
            got,
            [SseEvent {
                event: "message".into(),
                data: String::new(),
                id: "p1".into(),
                retry: Some(500)
            }]
        );
    }

    #[test]
    fn invalid_utf8_ends_the_stream_with_an_error() {
        let (got, err) = decode(&[b"data: ok\n\ndata: \xff\n\n"], 1024);
        assert_eq!(data_of(&got), ["ok"]);
        assert_eq!(err, Some(SseError::Utf8));
        // Multi-byte characters split across chunks are fine.
        let (got, err) = decode(&[b"data: \xc3", b"\xa9\n\n"], 1024);
        assert_eq!((data_of(&got), err), (vec!["é"], None));
    }

    #[test]
    fn feed_framed_tells_where_the_last_whole_event_ends() {
        let mut decoder = SseDecoder::new(1024);
        let mut out = Vec::new();
        // No blank line yet; then one inside the chunk; CRLF; a lone CR at the end.
        assert_eq!(decoder.feed_framed(b"data: a\n", &mut out), Ok(None));
        assert_eq!(decoder.feed_framed(b"\ndata: b", &mut out), Ok(Some(1)));
        assert_eq!(data_of(&out), ["a"]);
        assert_eq!(
            decoder.feed_framed(b"\r\n\r\n: c\n\ndata: d\r\r", &mut out),
            Ok(Some(18))
        );
        assert_eq!(data_of(&out), ["a", "b", "d"]);
        // The LF after that CR ends no line, so no event.
        assert_eq!(decoder.feed_framed(b"\n", &mut out), Ok(None));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn the_encoder_leaves_out_what_sse_cannot_carry() {
        assert_eq!(
            &encode("", Some("a\nb"), None, b"{\"a\":\r1}\n")[..],
            b"event: message\ndata: {\"a\": 1}\ndata: \n\n"
        );
        assert_eq!(
            &encode("message", Some(""), Some(5), b"x")[..],
            b"event: message\nretry: 5\ndata: x\n\n"
        );
    }

    #[test]
    fn a_line_at_the_limit_passes_and_one_byte_more_fails() {
        let line = format!("data: {}", "x".repeat(94));
        assert_eq!(line.len(), 100);
        let (got, err) = decode(&[line.as_bytes(), b"\n\n"], 100);
        assert_eq!((got.len(), err), (1, None));
        let (_, err) = decode(&[line.as_bytes(), b"y\n\n"], 100);
        assert_eq!(err, Some(SseError::LineTooLong { limit: 100 }));
        // Also when the line never ends.
        let (_, err) = decode(&[line.as_bytes(), b"y"], 100);
        assert_eq!(err, Some(SseError::LineTooLong { limit: 100 }));
    }

    #[test]
    fn data_lines_without_a_blank_line_are_bounded() {
        let (_, err) = decode(&[&b"data: 0123456789\n".repeat(20)], 100);
        assert_eq!(err, Some(SseError::EventTooLarge { limit: 100 }));
        // Many small events, each under the limit, are fine.
        let (got, err) = decode(&[&b"data: 0123456789\n\n".repeat(200)], 100);
        assert_eq!((got.len(), err), (200, None));
    }

    #[test]
    fn after_an_error_the_decoder_stays_failed() {
        let mut decoder = SseDecoder::new(4);
        let mut out = Vec::new();
        assert!(decoder.feed(b"data: toolong", &mut out).is_err());
        assert!(decoder.feed(b"\n\ndata: x\n\n", &mut out).is_err());
        assert!(out.is_empty());
    }

    /// An endless line of 64 MiB, in chunks of 1 byte to 64 KiB: the decoder looks at
    /// each byte once, so this ends (at the 16 MiB default) instead of rescanning its
    /// buffer on every chunk (quadratic: hours for 1-byte chunks). No time is asserted;
    /// `benches/framing.rs` (`sse/endless_line`) measures the linearity.
    #[tokio::test]
    async fn an_endless_line_is_cut_at_the_limit_whatever_the_chunk_size() {
        const TOTAL: usize = 64 << 20;
        for chunk in [1usize, 7, 4096, 64 << 10] {
            let piece = Bytes::from(vec![b'a'; chunk]);
            let input = futures::stream::repeat(piece)
                .take(TOTAL / chunk)
                .map(Ok::<_, std::io::Error>);
            let got: Vec<_> = events_with_limit(input, DEFAULT_MAX_EVENT_BYTES)
                .collect()
                .await;
            assert_eq!(
                got,
                [Err(SseError::LineTooLong {
                    limit: DEFAULT_MAX_EVENT_BYTES
                })],
                "chunks of {chunk} bytes"
            );
        }
    }

    #[tokio::test]
    async fn events_reports_limits_and_transport_errors_as_text() {
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
            Ok(Bytes::from_static(b"data: a\n\n")),
            Err(std::io::Error::other("connection reset")),
        ];
        let got: Vec<_> = events(futures::stream::iter(chunks)).collect().await;
        assert_eq!(got[0].as_ref().unwrap().data, "a");
        assert_eq!(got[1], Err("connection reset".to_owned()));
        assert_eq!(got.len(), 2);
        let long = Bytes::from(vec![b'a'; DEFAULT_MAX_EVENT_BYTES + 1]);
        let got: Vec<_> = events(futures::stream::iter([Ok::<_, std::io::Error>(long)]))
            .collect()
            .await;
        assert_eq!(
            got,
            [Err(format!(
                "an SSE line is longer than the limit of {DEFAULT_MAX_EVENT_BYTES} bytes"
            ))]
        );
    }

    mod chunking {
        #![allow(clippy::unwrap_used)]
        use super::*;
        use proptest::prelude::*;

        fn line() -> impl Strategy<Value = String> {
            let field = prop_oneof![
                Just(String::new()),
                "data(: ?[a-zé:]{0,6})?".prop_map(|s| s),
                "event: [a-z]{0,4}".prop_map(|s| s),
                "id(: [0-9]{0,3})?".prop_map(|s| s),
                "retry: [0-9x]{0,3}".prop_map(|s| s),
                ": [a-z ]{0,5}".prop_map(|s| s),
                "[a-z]{1,3}:[a-z]{0,3}".prop_map(|s| s),
            ];
            let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
            (field, end).prop_map(|(f, e)| f + e)
        }

        proptest! {
            /// However the bytes are split into chunks, the same events come out: the
            /// decoder is a function of the byte sequence only.
            #[test]
            fn chunking_does_not_change_the_events(
                lines in proptest::collection::vec(line(), 0..40),
                cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
            ) {
                let input = lines.concat().into_bytes();
                let (whole, err) = decode(&[&input], 1 << 20);
                prop_assert_eq!(err, None);
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(input.len() + 1)).collect();
                points.sort_unstable();
                let mut chunks = Vec::new();
                let mut last = 0;
                for p in points {
                    chunks.push(&input[last..p]);
                    last = p;
                }
                chunks.push(&input[last..]);
                let (split, err) = decode(&chunks, 1 << 20);
                prop_assert_eq!(err, None);
                prop_assert_eq!(split, whole);
            }
        }
    }
}
