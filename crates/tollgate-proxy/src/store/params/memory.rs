//! Learned param headers in this process: one server's table, bounded at
//! [`MAX_TOOLS`](super::MAX_TOOLS). The Redis backend keeps one too, the replica's
//! copy of the shared table.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use tollgate_mcp::ParamHeader;

use super::{MAX_TOOLS, ParamStore};

/// One server's tools that mirror arguments into headers, by tool name.
#[derive(Debug, Default)]
pub struct Params {
    tools: RwLock<HashMap<String, Arc<[ParamHeader]>>>,
}

/// What [`Params::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learnt {
    /// Recorded (or forgotten, declaring nothing), and it is news.
    Changed,
    /// As known already.
    Same,
    /// The table is full: not recorded.
    Full,
}

impl Params {
    /// Records what a listed tool declares; a tool that declares nothing is
    /// forgotten. Says whether that is news (what the Redis backend shares).
    pub fn apply(&self, tool: &str, declared: Vec<ParamHeader>) -> Learnt {
        if self.tools.read().get(tool).map(|known| &known[..]) == Some(&declared[..])
            || (declared.is_empty() && !self.tools.read().contains_key(tool))
        {
            return Learnt::Same;
        }
        let mut tools = self.tools.write();
        if declared.is_empty() {
            tools.remove(tool);
            return Learnt::Changed;
        }
        if tools.len() >= MAX_TOOLS && !tools.contains_key(tool) {
            return Learnt::Full;
        }
        tools.insert(tool.to_owned(), declared.into());
        Learnt::Changed
    }

    /// Forgets a tool; whether it was known.
    pub fn remove(&self, tool: &str) -> bool {
        self.tools.write().remove(tool).is_some()
    }
}

impl ParamStore for Params {
    fn learn(&self, tool: &str, declared: Vec<ParamHeader>) -> bool {
        self.apply(tool, declared) != Learnt::Full
    }

    fn forget(&self, tool: &str) {
        self.remove(tool);
    }

    fn get(&self, tool: &str) -> Option<Arc<[ParamHeader]>> {
        self.tools.read().get(tool).cloned()
    }
}
