//! Learned param headers shared by the replicas through Redis (`state.backend:
//! redis`): a tool list learned on one replica is known to every other. Each
//! server's table is a hash in Redis; each change is also published, and every
//! replica applies the others' to its own copy ([`memory`](super::memory)), so a
//! call reads this process's memory only. A replica reads the whole hash when it
//! starts following the changes (and again after a gap in the feed). Sharing is
//! best effort: a change that cannot be written stays on its replica.

use std::sync::Arc;

use tokio::sync::mpsc;
use tollgate_mcp::ParamHeader;

use super::ParamStore;
use super::memory::{self, Learnt};
use crate::store::remote::{Remote, Unavailable};

/// A tool's declarations as Redis keeps them: `[[name, header, [path…]], …]`.
type Stored = Vec<(String, String, Vec<String>)>;

/// A change as published: the server, the tool and its declarations (none: forgotten).
#[derive(serde::Serialize, serde::Deserialize)]
struct Change {
    server: String,
    tool: String,
    declared: Stored,
}

fn stored(declared: &[ParamHeader]) -> Stored {
    declared
        .iter()
        .map(|p| (p.name.clone(), p.header.clone(), p.path.clone()))
        .collect()
}

fn declared(stored: Stored) -> Vec<ParamHeader> {
    stored
        .into_iter()
        .map(|(name, header, path)| ParamHeader { name, header, path })
        .collect()
}

/// One server's table, shared.
pub struct Params {
    local: Arc<memory::Params>,
    /// The changes to write, in order, by the writer task.
    writes: mpsc::Sender<Change>,
    server: Arc<str>,
}

/// Most changes waiting to be written; past it a change stays on its replica.
const QUEUE: usize = 2 * super::MAX_TOOLS;

/// Most changes written in one round trip.
const BATCH: usize = 256;

impl Params {
    /// The table of `server` in the shared Redis: a task writes this replica's
    /// changes in order, another reads the whole table and then follows the other
    /// replicas' changes.
    pub fn new(remote: Arc<Remote>, server: &str) -> Params {
        let local = Arc::new(memory::Params::default());
        let key = remote.key(&["params", server]);
        let (writes, mut queued) = mpsc::channel::<Change>(QUEUE);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (remote, key) = (remote.clone(), key.clone());
            runtime.spawn(async move {
                // The changes of one listing go in one round trip (up to `BATCH`).
                let mut batch = Vec::with_capacity(BATCH);
                while queued.recv_many(&mut batch, BATCH).await > 0 {
                    if let Err(err) = write(&remote, &key, &batch).await {
                        tracing::warn!(error = %err, changes = batch.len(), "tools' learned param headers could not be shared; the other replicas learn them from their own tools/list");
                    }
                    batch.clear();
                }
            });
        }
        let (on_change, on_start) = (local.clone(), local.clone());
        let (own, reader) = (Arc::<str>::from(server), remote.clone());
        remote.follow_from(
            remote.key(&["params", "changed"]),
            move |text| {
                if let Ok(change) = serde_json::from_str::<Change>(text)
                    && *change.server == *own
                {
                    on_change.apply(&change.tool, declared(change.declared));
                }
            },
            move || {
                let (local, remote, key) = (on_start.clone(), reader.clone(), key.clone());
                async move { load(&local, &remote, &key).await }
            },
            || {},
        );
        Params {
            local,
            writes,
            server: server.into(),
        }
    }

    fn share(&self, tool: &str, declared: Stored) {
        let change = Change {
            server: self.server.to_string(),
            tool: tool.to_owned(),
            declared,
        };
        if self.writes.try_send(change).is_err() {
            tracing::warn!(server = %self.server, tool, "a tool's learned param headers were not shared: too many changes wait to be written");
        }
    }
}

impl ParamStore for Params {
    /// Here, and by the writer task for every replica.
    fn learn(&self, tool: &str, declared: Vec<ParamHeader>) -> bool {
        let shared = stored(&declared);
        match self.local.apply(tool, declared) {
            Learnt::Full => false,
            Learnt::Same => true,
            Learnt::Changed => {
                self.share(tool, shared);
                true
            }
        }
    }

    fn forget(&self, tool: &str) {
        if self.local.remove(tool) {
            self.share(tool, Vec::new());
        }
    }

    /// This replica's copy.
    fn get(&self, tool: &str) -> Option<Arc<[ParamHeader]>> {
        self.local.get(tool)
    }
}

async fn write(remote: &Remote, key: &str, changes: &[Change]) -> Result<(), Unavailable> {
    let mut conn = remote.connection();
    let mut pipe = ::redis::pipe();
    for change in changes {
        let text = serde_json::to_string(change).unwrap_or_default();
        if change.declared.is_empty() {
            pipe.cmd("HDEL").arg(key).arg(&change.tool).ignore();
        } else {
            let value = serde_json::to_string(&change.declared).unwrap_or_default();
            pipe.cmd("HSET")
                .arg(key)
                .arg(&change.tool)
                .arg(value)
                .ignore();
        }
        pipe.cmd("PUBLISH")
            .arg(remote.key(&["params", "changed"]))
            .arg(format!("{}\n{text}", remote.replica()))
            .ignore();
    }
    remote.run(pipe.query_async::<()>(&mut conn)).await
}

/// Reads the whole shared table into this replica's copy.
async fn load(local: &memory::Params, remote: &Remote, key: &str) {
    let mut conn = remote.connection();
    let all: Result<Vec<(String, String)>, _> = remote
        .run(::redis::cmd("HGETALL").arg(key).query_async(&mut conn))
        .await;
    match all {
        Ok(all) => {
            for (tool, text) in all {
                if let Ok(stored) = serde_json::from_str::<Stored>(&text) {
                    local.apply(&tool, declared(stored));
                }
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "the tools' learned param headers could not be read from the shared state");
        }
    }
}
