//! State that outlives one request and that several replicas would share: sessions,
//! rate-limit windows, pending approvals, the tools' learned `Mcp-Param-*` headers,
//! the tool lock's learned definitions and the owners of the MCP tasks Tollgate relayed.
//!
//! Each store is a narrow interface (a handful of methods, private fields) over an
//! in-memory implementation. A shared backend (Redis, for several replicas) is a
//! second implementation of the same methods; nothing above this module reaches
//! into a store's insides. The rate-limit windows are split so already: `limits`
//! is the facade (with `state.on_failure`), `limits/memory.rs` and `limits/redis.rs`
//! the two backends, held to one behaviour by `limits/contract.rs`. This module
//! imports nothing else of the proxy but the configuration.

pub mod approvals;
pub mod definitions;
pub mod limits;
pub mod params;
pub mod principal;
pub mod remote;
pub mod sessions;
pub mod tasks;
#[cfg(test)]
pub mod test_redis;

/// A fresh unguessable id: `bytes` random bytes in hex.
pub fn random_hex(bytes: usize) -> String {
    use rand::RngCore as _;
    use std::fmt::Write as _;
    let mut raw = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut raw);
    raw.iter()
        .fold(String::with_capacity(bytes * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}
