//! The `x-mcp-header` annotations learned from a server's `tools/list` answers:
//! which `Mcp-Param-*` headers each tool's calls carry, and which argument each
//! mirrors. Bounded, so an upstream listing endless tools cannot grow it without end.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use tollgate_mcp::ParamHeader;

/// Most tools with annotations remembered per server.
pub const MAX_TOOLS: usize = 4096;

/// One server's tools that mirror arguments into headers, by tool name.
#[derive(Debug, Default)]
pub struct ToolParams {
    tools: RwLock<HashMap<String, Arc<[ParamHeader]>>>,
}

impl ToolParams {
    /// Records what a listed tool declares; a tool that declares nothing is forgotten.
    /// Returns `false` when the table is full and the tool could not be recorded.
    pub fn learn(&self, tool: &str, declared: Vec<ParamHeader>) -> bool {
        let mut tools = self.tools.write();
        if declared.is_empty() {
            tools.remove(tool);
            return true;
        }
        if tools.len() >= MAX_TOOLS && !tools.contains_key(tool) {
            return false;
        }
        tools.insert(tool.to_owned(), declared.into());
        true
    }

    /// Forgets a tool (listed with annotations that are not valid).
    pub fn forget(&self, tool: &str) {
        self.tools.write().remove(tool);
    }

    /// What `tool` declares, if it declares anything.
    pub fn get(&self, tool: &str) -> Option<Arc<[ParamHeader]>> {
        self.tools.read().get(tool).cloned()
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
