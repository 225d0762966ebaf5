//! The streamed responses both HTTP doors send: an SSE body with keep-alive
//! comments, and a response that closes a connection whose request was not read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body as HttpBody;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::StreamExt;

use super::counted;
use crate::state::Shared;

/// A response sent without reading the request's body: the connection cannot carry
/// another request, so the client is told to open a new one (a client retrying with a
/// token after a 401 would otherwise send it on a connection that is being closed).
pub fn unread(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// An SSE response of `frames` (encoded by [`tollgate_mcp::encode`]), counted as an
/// open stream, with a keep-alive comment after each quiet `interval`.
pub fn sse_response(
    shared: &Arc<Shared>,
    status: StatusCode,
    frames: impl futures::Stream<Item = Bytes> + Send + 'static,
    interval: Duration,
) -> Response {
    let body = KeepAlive {
        inner: Box::pin(counted(shared, frames)),
        quiet: Box::pin(tokio::time::sleep(interval)),
        interval,
    };
    let mut response = HttpBody::from_stream(body.map(Ok::<_, Infallible>)).into_response();
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A stream of SSE frames with a keep-alive comment after each quiet interval.
struct KeepAlive<S> {
    inner: std::pin::Pin<Box<S>>,
    quiet: std::pin::Pin<Box<tokio::time::Sleep>>,
    interval: Duration,
}

impl<S: futures::Stream<Item = Bytes>> futures::Stream for KeepAlive<S> {
    type Item = Bytes;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Bytes>> {
        use std::task::Poll;
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            let next = tokio::time::Instant::now() + self.interval;
            self.quiet.as_mut().reset(next);
            return Poll::Ready(item);
        }
        match self.quiet.as_mut().poll(cx) {
            Poll::Ready(()) => {
                let next = tokio::time::Instant::now() + self.interval;
                self.quiet.as_mut().reset(next);
                Poll::Ready(Some(Bytes::from_static(b": keep-alive\n\n")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}
