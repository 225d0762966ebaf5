//! The tool lock's learned definitions (SPEC §10): per upstream session, the digest
//! of each tool as last listed and whether it is as locked, worked out when it is
//! listed (or the lock reloaded), so that a call looks its tool up once. What is
//! locked and how a definition compares with it stays the lock's (`lock.rs`
//! judges; this store only keeps).
//!
//! [`Definitions`] is the front: a table in this process ([`memory`]), or one the
//! replicas share through Redis ([`redis`], `state.backend: redis`), where a tool
//! list learned on one replica is known to the others. Either way a call reads this
//! process's memory only. Both are held to one behaviour by `definitions/contract.rs`.

use std::sync::Arc;

use super::dispatch;
use super::remote::Remote;

#[cfg(test)]
mod contract;
mod memory;
mod redis;

/// What is known of a tool's current definition in one upstream session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found<'a> {
    /// Listed with this digest; `unchanged` when it is as locked.
    Listed {
        /// Its digest.
        digest: &'a str,
        /// Whether it is as locked (in the lock in force).
        unchanged: bool,
    },
    /// A full listing did not have it.
    NotListed,
    /// Not learned: the tools must be listed first.
    Unknown,
}

/// One tool of a listing, judged against the lock in force.
pub struct Listing<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its digest.
    pub digest: String,
    /// Whether it is as locked.
    pub unchanged: bool,
}

/// Whether a tool (a name and a digest) is as locked in the lock in force: how a
/// replica judges what another one listed.
pub type Judge = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// What a backend of learned definitions does: per upstream session, each listed
/// tool's digest and whether it is as locked. [`memory::Definitions`] and
/// [`redis::Definitions`] implement it; `definitions/contract.rs` holds both to one
/// behaviour.
pub trait DefinitionStore {
    /// What is known of `tool` in the upstream session `key`, given to `read`
    /// (borrowed: a lookup allocates nothing), from this process's memory only:
    /// `Listed`, `NotListed` (a complete listing of the session lacked it) or
    /// `Unknown`.
    fn find<R>(&self, key: &str, tool: &str, read: impl FnOnce(Found<'_>) -> R) -> R;

    /// Learns the tools of one listing in the upstream session `key` (every page of
    /// it when `complete`; a session once complete stays so until forgotten). Known
    /// here at once, to the other replicas of a shared table soon (best effort),
    /// each judging it against its own lock. Past a bound of sessions everything
    /// learned is forgotten, to be listed again.
    fn learn(&self, key: &str, listed: Vec<Listing<'_>>, complete: bool);

    /// Forgets what the upstream session `key` listed (here at once, on the other
    /// replicas soon).
    fn forget(&self, key: &str);

    /// Judges every tool learned here again with `unchanged` (a lock was
    /// reloaded), and runs `then` (putting that lock in force) before any lookup
    /// sees the result.
    fn restamp(&self, unchanged: impl Fn(&str, &str) -> bool, then: impl FnOnce());
}

/// One server's learned definitions.
pub struct Definitions {
    store: Backend,
}

/// The backends, dispatched without boxing: a call's lookup costs one match.
enum Backend {
    Memory(memory::Definitions),
    Redis(redis::Definitions),
}

impl Default for Definitions {
    fn default() -> Definitions {
        Definitions {
            store: Backend::Memory(memory::Definitions::default()),
        }
    }
}

impl Definitions {
    /// The definitions of `server`, shared by the replicas through the shared Redis;
    /// what another replica listed is judged here by `judge`.
    pub fn shared(remote: Arc<Remote>, server: &str, judge: Judge) -> Definitions {
        Definitions {
            store: Backend::Redis(redis::Definitions::new(remote, server, judge)),
        }
    }

    /// What is known of `tool` in the upstream session `key`, given to `read`
    /// (borrowed: a lookup allocates nothing).
    pub fn find<R>(&self, key: &str, tool: &str, read: impl FnOnce(Found<'_>) -> R) -> R {
        dispatch!(&self.store, store => store.find(key, tool, read))
    }

    /// Learns the tools of one listing in the upstream session `key` (every page of
    /// it when `complete`), here and for every replica.
    pub fn learn(&self, key: &str, listed: Vec<Listing<'_>>, complete: bool) {
        dispatch!(&self.store, store => store.learn(key, listed, complete));
    }

    /// Forgets what the upstream session `key` listed (its tools changed), here and
    /// for every replica.
    pub fn forget(&self, key: &str) {
        dispatch!(&self.store, store => store.forget(key));
    }

    /// Judges every learned tool again with `unchanged` (a lock was reloaded), and
    /// runs `then` (putting that lock in force) before any lookup sees the result.
    pub fn restamp(&self, unchanged: impl Fn(&str, &str) -> bool, then: impl FnOnce()) {
        dispatch!(&self.store, store => store.restamp(unchanged, then));
    }
}
