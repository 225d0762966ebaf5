//! The PROXY protocol (HAProxy's, v1 text and v2 binary, parsed by `ppp`): a load
//! balancer in `trusted_proxies` that passes TCP through starts each connection with
//! a header naming the client. The listener reads it before anything else, within
//! the connection's header deadline, and at most [`MAX_HEADER`] bytes of it, so that
//! a peer sending half a header and stalling holds its slot no longer than a slow
//! request would. What arrived after the header is handed on ([`Rewind`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use ppp::{HeaderResult, PartialResult};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The largest header read: a v1 header is at most 107 bytes; a v2 header is 16
/// bytes and its addresses, then TLVs (a cloud balancer's endpoint id, a TLS
/// summary), which are skipped, so far fewer than the 64 KiB the format allows.
pub const MAX_HEADER: usize = 4096;

/// Why a connection's PROXY header was refused.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The connection ended, or failed, before the header was in.
    #[error("the connection ended before its PROXY protocol header was complete ({0})")]
    Closed(String),
    /// What came is not a PROXY protocol header.
    #[error("the connection did not start with a valid PROXY protocol header: {0}")]
    Invalid(String),
    /// The header is longer than [`MAX_HEADER`].
    #[error("the PROXY protocol header is longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// A connection's PROXY header, read.
#[derive(Debug)]
pub struct Proxied {
    /// The client the header names: `None` for a health check of the balancer's own
    /// (v2 `LOCAL`, v1 `UNKNOWN`) or an address family other than IPv4/IPv6.
    pub client: Option<SocketAddr>,
    /// What the peer sent after the header.
    pub rest: Bytes,
}

/// Reads the PROXY header at the start of `stream`.
pub async fn read_header<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Proxied, HeaderError> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        let (length, client) = match HeaderResult::parse(&buf) {
            result if result.is_incomplete() => {
                if buf.len() >= MAX_HEADER {
                    return Err(HeaderError::TooLong);
                }
                let room = MAX_HEADER - buf.len();
                let read = (&mut *stream)
                    .take(room as u64)
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| HeaderError::Closed(e.to_string()))?;
                if read == 0 {
                    return Err(HeaderError::Closed("closed by the peer".to_owned()));
                }
                continue;
            }
            HeaderResult::V1(Ok(header)) => (header.header.len(), v1_client(&header.addresses)),
            HeaderResult::V2(Ok(header)) => (header.len(), v2_client(&header)),
            HeaderResult::V1(Err(err)) => return Err(HeaderError::Invalid(err.to_string())),
            HeaderResult::V2(Err(err)) => return Err(HeaderError::Invalid(err.to_string())),
        };
        buf.advance(length);
        return Ok(Proxied {
            client,
            rest: buf.freeze(),
        });
    }
}

fn v1_client(addresses: &ppp::v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        ppp::v1::Addresses::Tcp4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Tcp6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v1::Addresses::Unknown => None,
    }
}

fn v2_client(header: &ppp::v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == ppp::v2::Command::Local {
        return None;
    }
    match &header.addresses {
        ppp::v2::Addresses::IPv4(a) => {
            Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::IPv6(a) => {
            Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
        }
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    read: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    /// `inner`, to be read from after `read`.
    pub fn new(read: Bytes, inner: S) -> Rewind<S> {
        Rewind { read, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | command);
        out.push(family);
        let len = u16::try_from(addresses.len() + tlvs.len()).unwrap();
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(addresses);
        out.extend_from_slice(tlvs);
        out
    }

    async fn read_all(bytes: &[u8]) -> Result<(Proxied, Vec<u8>), HeaderError> {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(bytes).await.unwrap();
        drop(client);
        let mut server = server;
        let header = read_header(&mut server).await?;
        let mut rewound = Rewind::new(header.rest.clone(), server);
        let mut after = Vec::new();
        rewound.read_to_end(&mut after).await.unwrap();
        Ok((header, after))
    }

    #[tokio::test]
    async fn reads_v1_headers_and_keeps_what_follows() {
        let (h, after) =
            read_all(b"PROXY TCP4 203.0.113.9 10.0.0.1 4711 443\r\nGET / HTTP/1.1\r\n\r\n")
                .await
                .unwrap();
        assert_eq!(h.client, Some("203.0.113.9:4711".parse().unwrap()));
        assert_eq!(after, b"GET / HTTP/1.1\r\n\r\n");
        let (h, _) = read_all(b"PROXY TCP6 2001:db8::9 2001:db8::1 4711 443\r\n")
            .await
            .unwrap();
        assert_eq!(h.client, Some("[2001:db8::9]:4711".parse().unwrap()));
        let (h, after) = read_all(b"PROXY UNKNOWN\r\nX").await.unwrap();
        assert_eq!((h.client, after.as_slice()), (None, &b"X"[..]));
    }

    #[tokio::test]
    async fn reads_v2_headers_with_tlvs_and_local_commands() {
        let mut v4 = Vec::new();
        v4.extend_from_slice(&[203, 0, 113, 9, 10, 0, 0, 1]);
        v4.extend_from_slice(&4711u16.to_be_bytes());
        v4.extend_from_slice(&443u16.to_be_bytes());
        // A TLV (type 0xEA, AWS's VPC endpoint id) is skipped.
        let tlv = [0xEA, 0x00, 0x03, b'v', b'p', b'c'];
        let mut bytes = v2(1, 0x11, &v4, &tlv);
        bytes.extend_from_slice(b"POST /mcp");
        let (h, after) = read_all(&bytes).await.unwrap();
        assert_eq!(h.client, Some("203.0.113.9:4711".parse().unwrap()));
        assert_eq!(after, b"POST /mcp");

        let mut v6 = Vec::new();
        v6.extend_from_slice(
            &"2001:db8::9"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        v6.extend_from_slice(&[0x12, 0x67, 0x01, 0xbb]);
        let (h, _) = read_all(&v2(1, 0x21, &v6, &[])).await.unwrap();
        assert_eq!(h.client, Some("[2001:db8::9]:4711".parse().unwrap()));

        // LOCAL: the balancer's own health check, no client named.
        let (h, _) = read_all(&v2(0, 0x00, &[], &[])).await.unwrap();
        assert_eq!(h.client, None);
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_header_and_headers_too_long() {
        for bad in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 203.0.113.9 10.0.0.1 4711 99999\r\n",
            b"PROXY SCTP 1.2.3.4 1.2.3.4 1 2\r\n",
        ] {
            let got = read_all(bad).await;
            assert!(
                matches!(got, Err(HeaderError::Invalid(_))),
                "{:?}: {got:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A v1 line that never ends.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        assert!(read_all(&long).await.is_err());
        // A v2 header announcing more than MAX_HEADER bytes of TLVs.
        let tlvs = vec![0u8; MAX_HEADER];
        let got = read_all(&v2(1, 0x11, &[0; 12], &tlvs)).await;
        assert!(matches!(got, Err(HeaderError::TooLong)), "{got:?}");
        // Half a header, then the peer hangs up.
        let got = read_all(b"PROXY TCP4 203.0.11").await;
        assert!(matches!(got, Err(HeaderError::Closed(_))), "{got:?}");
    }

    #[tokio::test]
    async fn a_peer_that_stalls_mid_header_is_timed_out() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        client.write_all(b"\r\n\r\n\0\r\nQUIT\n\x21").await.unwrap();
        // The peer keeps the connection open and sends nothing more: the read would
        // wait forever; the listener's deadline ends it.
        let read = tokio::time::timeout(Duration::from_millis(200), read_header(&mut server)).await;
        assert!(read.is_err(), "{read:?}");
        drop(client);
    }
}
