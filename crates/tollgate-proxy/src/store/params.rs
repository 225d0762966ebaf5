//! The `x-mcp-header` annotations learned from a server's `tools/list` answers:
//! which `Mcp-Param-*` headers each tool's calls carry, and which argument each
//! mirrors. Bounded, so an upstream listing endless tools cannot grow it without end.
//!
//! [`ToolParams`] is the front: a table in this process ([`memory`]), or one the
//! replicas share through Redis ([`redis`], `state.backend: redis`), where what one
//! replica learned is known to the others. Either way a call reads this process's
//! memory only. Both are held to one behaviour by `params/contract.rs`.

use std::sync::Arc;

use tollgate_mcp::ParamHeader;

use super::dispatch;
use super::remote::Remote;

#[cfg(test)]
mod contract;
mod memory;
mod redis;

/// Most tools with annotations remembered per server.
pub const MAX_TOOLS: usize = 4096;

/// What a backend of learned param headers does: one server's table, by tool
/// name, bounded at [`MAX_TOOLS`]. [`memory::Params`] and [`redis::Params`]
/// implement it; `params/contract.rs` holds both to one behaviour.
pub trait ParamStore {
    /// Records what a listed tool declares (replacing what it declared before); a
    /// tool that declares nothing is forgotten. `false` when the table is full
    /// and the tool is not in it: then it is not recorded. A shared table tells
    /// the other replicas soon (best effort).
    fn learn(&self, tool: &str, declared: Vec<ParamHeader>) -> bool;

    /// Forgets a tool (here at once, on the other replicas soon).
    fn forget(&self, tool: &str);

    /// What `tool` declares, if anything: read from this process's memory only,
    /// so what another replica learned shows a moment later.
    fn get(&self, tool: &str) -> Option<Arc<[ParamHeader]>>;
}

/// One server's tools that mirror arguments into headers, by tool name.
pub struct ToolParams {
    store: Backend,
}

/// The backends, dispatched without boxing.
enum Backend {
    Memory(memory::Params),
    Redis(redis::Params),
}

impl Default for ToolParams {
    fn default() -> ToolParams {
        ToolParams {
            store: Backend::Memory(memory::Params::default()),
        }
    }
}

impl std::fmt::Debug for ToolParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolParams").finish_non_exhaustive()
    }
}

impl ToolParams {
    /// The table of `server`, shared by the replicas through the shared Redis.
    pub fn shared(remote: Arc<Remote>, server: &str) -> ToolParams {
        ToolParams {
            store: Backend::Redis(redis::Params::new(remote, server)),
        }
    }

    /// Records what a listed tool declares; a tool that declares nothing is forgotten.
    /// Returns `false` when the table is full and the tool could not be recorded.
    pub fn learn(&self, tool: &str, declared: Vec<ParamHeader>) -> bool {
        dispatch!(&self.store, store => store.learn(tool, declared))
    }

    /// Forgets a tool (listed with annotations that are not valid).
    pub fn forget(&self, tool: &str) {
        dispatch!(&self.store, store => store.forget(tool));
    }

    /// What `tool` declares, if it declares anything: from this process's memory.
    pub fn get(&self, tool: &str) -> Option<Arc<[ParamHeader]>> {
        dispatch!(&self.store, store => store.get(tool))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn declared(name: &str) -> Vec<ParamHeader> {
        vec![ParamHeader {
            name: name.to_owned(),
            header: format!("mcp-param-{name}"),
            path: vec![name.to_owned()],
        }]
    }

    #[test]
    fn learns_replaces_and_forgets() {
        let params = ToolParams::default();
        assert!(params.learn("read", declared("path")));
        assert_eq!(params.get("read").unwrap()[0].header, "mcp-param-path");
        assert!(params.learn("read", declared("file")));
        assert_eq!(params.get("read").unwrap()[0].header, "mcp-param-file");
        assert!(params.learn("read", Vec::new()));
        assert!(params.get("read").is_none());
        params.learn("read", declared("path"));
        params.forget("read");
        assert!(params.get("read").is_none());
    }

    #[test]
    fn is_bounded() {
        let params = ToolParams::default();
        for i in 0..MAX_TOOLS {
            assert!(params.learn(&format!("t{i}"), declared("a")));
        }
        assert!(!params.learn("one-more", declared("a")));
        assert!(params.get("one-more").is_none());
        // A known tool can still change.
        assert!(params.learn("t0", declared("b")));
    }
}
