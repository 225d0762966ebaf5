//! The tool lock's learned definitions shared by the replicas through Redis
//! (`state.backend: redis`): each listing learned, and each forgotten, is published,
//! and every replica applies the others' to its own copy
//! ([`memory`](super::memory)), judging each tool against its own lock in force; a
//! call reads this process's memory only. Nothing is kept in Redis: after a gap in
//! the feed (and when it starts) a replica forgets what it learned, and lists the
//! tools again when a call needs them. Sharing is best effort: a listing that
//! cannot be published stays on its replica.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{DefinitionStore, Found, Judge, Listing, memory};
use crate::store::remote::{Remote, Unavailable};

/// A listing learned (or, with `forget`, a session's forgotten) as published.
#[derive(serde::Serialize, serde::Deserialize)]
struct Change {
    server: String,
    key: String,
    /// Each tool's name and digest.
    tools: Vec<(String, String)>,
    complete: bool,
    forget: bool,
}

/// Most changes waiting to be published; past it a change stays on its replica.
const QUEUE: usize = 4096;

/// Most changes published in one round trip.
const BATCH: usize = 64;

/// One server's definitions, shared.
pub struct Definitions {
    local: Arc<memory::Definitions>,
    /// The changes to publish, in order, by the writer task.
    writes: mpsc::Sender<Change>,
    server: Arc<str>,
}

impl Definitions {
    /// The definitions of `server`: a task publishes this replica's changes in
    /// order, another applies the other replicas', judged by `judge`.
    pub fn new(remote: Arc<Remote>, server: &str, judge: Judge) -> Definitions {
        let local = Arc::new(memory::Definitions::default());
        let channel = remote.key(&["lock", "learned"]);
        let (writes, mut queued) = mpsc::channel::<Change>(QUEUE);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (remote, channel) = (remote.clone(), channel.clone());
            runtime.spawn(async move {
                let mut batch = Vec::with_capacity(BATCH);
                while queued.recv_many(&mut batch, BATCH).await > 0 {
                    if let Err(err) = publish(&remote, &channel, &batch).await {
                        tracing::warn!(error = %err, "the tools learned for the tool lock could not be shared; the other replicas list them themselves");
                    }
                    batch.clear();
                }
            });
        }
        let (on_change, on_gap) = (local.clone(), local.clone());
        let own = Arc::<str>::from(server);
        remote.follow(
            channel,
            move |text| {
                let Ok(change) = serde_json::from_str::<Change>(text) else {
                    return;
                };
                if *change.server != *own {
                    return;
                }
                if change.forget {
                    on_change.forget(&change.key);
                } else {
                    on_change.learn_judged(&change.key, change.tools, change.complete, &*judge);
                }
            },
            // Changes may have been missed: what was learned may be out of date.
            move || on_gap.clear(),
        );
        Definitions {
            local,
            writes,
            server: server.into(),
        }
    }

    fn share(&self, key: &str, tools: Vec<(String, String)>, complete: bool, forget: bool) {
        let change = Change {
            server: self.server.to_string(),
            key: key.to_owned(),
            tools,
            complete,
            forget,
        };
        if self.writes.try_send(change).is_err() {
            tracing::warn!(server = %self.server, "tools learned for the tool lock were not shared: too many changes wait to be published");
        }
    }
}

/// This replica's copy answers; changes are published to the others.
impl DefinitionStore for Definitions {
    fn find<R>(&self, key: &str, tool: &str, read: impl FnOnce(Found<'_>) -> R) -> R {
        self.local.find(key, tool, read)
    }

    /// Here, and by the writer task for every replica.
    fn learn(&self, key: &str, listed: Vec<Listing<'_>>, complete: bool) {
        let tools = listed
            .iter()
            .map(|t| (t.name.to_owned(), t.digest.clone()))
            .collect();
        self.local.learn(key, listed, complete);
        self.share(key, tools, complete, false);
    }

    fn forget(&self, key: &str) {
        self.local.forget(key);
        self.share(key, Vec::new(), false, true);
    }

    /// This replica's copy only: each replica judges with its own lock.
    fn restamp(&self, unchanged: impl Fn(&str, &str) -> bool, then: impl FnOnce()) {
        self.local.restamp(unchanged, then);
    }
}

async fn publish(remote: &Remote, channel: &str, changes: &[Change]) -> Result<(), Unavailable> {
    let mut conn = remote.connection();
    let mut pipe = ::redis::pipe();
    for change in changes {
        let text = serde_json::to_string(change).unwrap_or_default();
        pipe.cmd("PUBLISH")
            .arg(channel)
            .arg(format!("{}\n{text}", remote.replica()))
            .ignore();
    }
    remote.run(pipe.query_async::<()>(&mut conn)).await
}
