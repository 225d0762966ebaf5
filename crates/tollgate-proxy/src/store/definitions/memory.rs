//! The tool lock's learned definitions in this process: per upstream session, each
//! listed tool's digest and whether it is as locked. The Redis backend keeps one
//! too, the replica's copy of what every replica learned.

use parking_lot::RwLock;

use super::{DefinitionStore, Found, Listing};

/// Upstream sessions whose tools are remembered at most; past it all are forgotten
/// (and listed again when needed).
const MAX_LISTINGS: usize = 4096;

/// What the upstream sessions listed.
#[derive(Default)]
pub struct Definitions {
    learned: RwLock<Learned>,
}

#[derive(Default)]
struct Learned {
    /// Each listed tool, by upstream session and name.
    tools: hashbrown::HashMap<Key, Listed>,
    /// The sessions whose tools were listed, and whether every page was read (so
    /// that a tool not in `tools` is not listed).
    sessions: hashbrown::HashMap<Box<str>, bool>,
}

/// An upstream session and a tool's name.
#[derive(Hash, PartialEq, Eq)]
struct Key(Box<str>, Box<str>);

/// [`Key`], borrowed: hashed the same way.
#[derive(Hash)]
struct KeyRef<'a>(&'a str, &'a str);

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *key.0 == *self.0 && *key.1 == *self.1
    }
}

/// A tool as one upstream session listed it.
struct Listed {
    digest: String,
    /// Whether it is as locked (in the lock in force).
    unchanged: bool,
}

impl DefinitionStore for Definitions {
    fn find<R>(&self, key: &str, tool: &str, read: impl FnOnce(Found<'_>) -> R) -> R {
        let learned = self.learned.read();
        if let Some(listed) = learned.tools.get(&KeyRef(key, tool)) {
            return read(Found::Listed {
                digest: &listed.digest,
                unchanged: listed.unchanged,
            });
        }
        read(match learned.sessions.get(key) {
            Some(true) => Found::NotListed,
            _ => Found::Unknown,
        })
    }

    fn learn(&self, key: &str, listed: Vec<Listing<'_>>, complete: bool) {
        let mut learned = self.learned.write();
        learned.start(key, complete);
        for tool in listed {
            learned.tools.insert(
                Key(key.into(), tool.name.into()),
                Listed {
                    digest: tool.digest,
                    unchanged: tool.unchanged,
                },
            );
        }
    }

    fn forget(&self, key: &str) {
        let mut learned = self.learned.write();
        if learned.sessions.remove(key).is_some() {
            learned.tools.retain(|k, _| *k.0 != *key);
        }
    }

    fn restamp(&self, unchanged: impl Fn(&str, &str) -> bool, then: impl FnOnce()) {
        let mut learned = self.learned.write();
        for (key, listed) in &mut learned.tools {
            listed.unchanged = unchanged(&key.1, &listed.digest);
        }
        then();
    }
}

impl Definitions {
    /// [`DefinitionStore::learn`] of `(name, digest)` pairs, each judged by `unchanged`
    /// under the table's lock (so that a lock reloaded meanwhile judges them all).
    pub fn learn_judged(
        &self,
        key: &str,
        listed: Vec<(String, String)>,
        complete: bool,
        unchanged: &dyn Fn(&str, &str) -> bool,
    ) {
        let mut learned = self.learned.write();
        learned.start(key, complete);
        for (name, digest) in listed {
            let unchanged = unchanged(&name, &digest);
            learned
                .tools
                .insert(Key(key.into(), name.into()), Listed { digest, unchanged });
        }
    }

    /// Forgets everything learned.
    pub fn clear(&self) {
        *self.learned.write() = Learned::default();
    }
}

impl Learned {
    /// Makes room for a listing of `key`, forgetting its earlier tools if it is complete.
    fn start(&mut self, key: &str, complete: bool) {
        if self.sessions.len() >= MAX_LISTINGS && !self.sessions.contains_key(key) {
            *self = Learned::default();
        }
        if complete {
            self.tools.retain(|k, _| *k.0 != *key);
        }
        let was_complete = self.sessions.get(key).copied().unwrap_or(false);
        self.sessions.insert(key.into(), complete || was_complete);
    }
}
