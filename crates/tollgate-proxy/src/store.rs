//! State that outlives one request and that several replicas would share: sessions,
//! rate-limit windows, pending approvals, the tools' learned `Mcp-Param-*` headers,
//! the tool lock's learned definitions and the owners of the MCP tasks Tollgate relayed.
//!
//! Each store is a trait saying what a backend does and what a caller may rely on
//! ([`limits::WindowStore`], [`sessions::SessionStore`], [`approvals::ApprovalStore`],
//! [`params::ParamStore`], [`definitions::DefinitionStore`], [`tasks::TaskStore`]),
//! implemented by two backends: `memory` (this process) and `redis` (shared by the
//! replicas, through [`remote`]). Callers use the store's front (a handful of methods,
//! private fields): an enum of the two backends, each operation one `match`
//! ([`dispatch!`]) calling the trait, without boxing, plus what both backends share
//! (`state.on_failure`, replica pinning). One contract suite per trait
//! (`X/contract.rs`), generic over it, holds both backends to one behaviour. The `redis` crate is used in this module only, and nothing
//! above it names a backend. This module imports nothing else of the proxy but the
//! configuration.

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

/// Runs `$body` with `$backend` bound to whichever backend a front's `Backend`
/// enum (`Memory(..)`, `Redis(..)`) holds: one match, no boxing; both arms are the
/// same code, each backend's implementation of the store's trait.
macro_rules! dispatch {
    ($backends:expr, $backend:ident => $body:expr) => {
        match $backends {
            Backend::Memory($backend) => $body,
            Backend::Redis($backend) => $body,
        }
    };
}
use dispatch;

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
