//! Replaying an audit log: its decision records, in the recorded order and at the
//! recorded times, with the limit keys the proxy used.

use std::borrow::Cow;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tollgate_policy::{Policy, RateLimiter, ToolCall};

use super::{Known, Report, Side, who};

/// `Some(value)` for a member that is present, `null` included.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The members of an audit record the replay reads (docs/audit.md).
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow, default)]
    time: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    server: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tool: Option<Cow<'a, str>>,
    #[serde(default, deserialize_with = "present")]
    arguments: Option<Value>,
}

/// Replays the decision records of one audit log, streamed, in the recorded order and
/// at the recorded times.
pub(super) fn replay_audit(
    path: &Path,
    server: Option<&str>,
    old: &Policy,
    new: &Policy,
    report: &mut Report,
) -> Result<(), String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 16, file);
    let mut sides = [
        Side {
            policy: old,
            limiter: RateLimiter::new(),
        },
        Side {
            policy: new,
            limiter: RateLimiter::new(),
        },
    ];
    let mut line = String::new();
    let mut number = 0u64;
    let mut clock = Clock::default();
    let unreadable = |report: &mut Report, number: u64, why: String| {
        report.unreadable += 1;
        report
            .first_unreadable
            .get_or_insert_with(|| format!("{}:{number}: {why}", path.display()));
    };
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                return Err(format!(
                    "{}:{}: cannot read: {e}",
                    path.display(),
                    number + 1
                ));
            }
        }
        number += 1;
        let text = line.trim_end();
        if text.is_empty() {
            continue;
        }
        let record = match decision_record(text, server) {
            Ok(Some(record)) => record,
            Ok(None) => continue,
            Err(why) => {
                unreadable(report, number, why);
                continue;
            }
        };
        let Some(tool) = record.tool.as_deref() else {
            unreadable(
                report,
                number,
                "a decision record without `tool`".to_owned(),
            );
            continue;
        };
        let now = clock.at(record.time.as_deref());
        replay_record(&record, tool, now, &mut sides, report);
    }
    Ok(())
}

/// The record on one line when it is a decision (of `server`, when given); `Err` says
/// why the line is no audit record.
fn decision_record<'a>(text: &'a str, server: Option<&str>) -> Result<Option<Record<'a>>, String> {
    let record: Record<'a> =
        serde_json::from_str(text).map_err(|e| format!("not an audit record: {e}"))?;
    let wanted =
        record.event == "decision" && server.is_none_or(|s| record.server.as_deref() == Some(s));
    Ok(wanted.then_some(record))
}

/// Time since the log's first decision, never going back (records written together
/// may be a millisecond out of order).
#[derive(Default)]
struct Clock {
    start: Option<SystemTime>,
    now: Duration,
}

impl Clock {
    /// The time of a record written at `time` (RFC 3339); one without a readable time
    /// is taken to be as late as the one before it.
    fn at(&mut self, time: Option<&str>) -> Duration {
        if let Some(at) = time.and_then(|t| humantime::parse_rfc3339_weak(t).ok()) {
            let start = *self.start.get_or_insert(at);
            self.now = self.now.max(at.duration_since(start).unwrap_or_default());
        }
        self.now
    }
}

/// The keys the proxy counted limits under (pipeline/context.rs): client, user and
/// session. The log keeps no peer address, so calls with neither client nor token
/// share one.
fn limit_keys(record: &Record<'_>) -> (String, String, String) {
    let (client_key, user_key) = match (record.client.as_deref(), record.user.as_deref()) {
        (Some(c), _) => {
            let key = format!("client:{c}");
            (key.clone(), key)
        }
        (None, Some(u)) => {
            let user_key = format!("user:{u}");
            match record.client_id.as_deref() {
                Some(id) => (format!("oauth-client:{id}"), user_key),
                None => (user_key.clone(), user_key),
            }
        }
        (None, None) => ("peer:unknown".to_owned(), "peer:unknown".to_owned()),
    };
    let session_key = match record.session.as_deref() {
        Some(id) => format!("session:{id}"),
        None => user_key.clone(),
    };
    (client_key, user_key, session_key)
}

/// Decides one recorded call under both policies, at `now`, and adds the pair to
/// the report.
fn replay_record(
    record: &Record<'_>,
    tool: &str,
    now: Duration,
    [old, new]: &mut [Side<'_>; 2],
    report: &mut Report,
) {
    let (client, user) = (record.client.as_deref(), record.user.as_deref());
    let (client_key, user_key, session_key) = limit_keys(record);
    let null = Value::Null;
    let call = ToolCall {
        tool,
        arguments: record.arguments.as_ref().unwrap_or(&null),
        client,
        session_key: &session_key,
        client_key: &client_key,
        user_key: &user_key,
        claims: None,
        scopes: &[],
    };
    let known = Known {
        arguments: record.arguments.is_some(),
        // Without a token there are no claims and no scopes: that is known.
        identity: user.is_none(),
    };
    let before = old.decide(&call, now, known, false);
    let after = new.decide(&call, now, known, false);
    report.add(tool, || who(client, user), before, after);
}
