//! Server-Sent Events: decoding an upstream byte stream and encoding events downstream.

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::{Stream, StreamExt};

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

/// Decodes a byte stream into SSE events. A transport error ends the stream with that error.
pub fn events<S, E>(bytes: S) -> impl Stream<Item = Result<SseEvent, String>>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    bytes.eventsource().map(|item| match item {
        Ok(event) => Ok(SseEvent {
            event: event.event,
            data: event.data,
            id: event.id,
            retry: event
                .retry
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }),
        Err(err) => Err(err.to_string()),
    })
}

/// Encodes one event. Multi-line data becomes several `data:` lines, as SSE requires.
pub fn encode_event(event: &SseEvent) -> Bytes {
    let mut out = String::with_capacity(event.data.len() + 32);
    if !event.id.is_empty() {
        out.push_str("id: ");
        out.push_str(&event.id);
        out.push('\n');
    }
    if !event.event.is_empty() {
        out.push_str("event: ");
        out.push_str(&event.event);
        out.push('\n');
    }
    if let Some(retry) = event.retry {
        out.push_str(&format!("retry: {retry}\n"));
    }
    for line in event.data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
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
}
