//! Prometheus metrics (`GET /metrics` on the admin listener).
//!
//! Tool names come from clients, so they are bounded before they become label
//! values: only a name some rule of the policy names (exactly or by a glob), of at most
//! [`MAX_TOOL_LABEL_BYTES`], is a label (and at most [`MAX_TOOL_LABELS`] of them);
//! every other call counts as `other`. prometheus-client writes label values as
//! they are, so every label value is escaped here (`\\`, `\"`, `\n`, as the text
//! exposition format says): no value can close its quotes and forge a series.

use parking_lot::{Mutex, RwLock};
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Distinct tool names kept as label values.
pub const MAX_TOOL_LABELS: usize = 1000;

/// Longest tool name kept as a label value; longer names count as `other`.
pub const MAX_TOOL_LABEL_BYTES: usize = 128;

/// A label value in the text exposition format: backslash, double quote and line feed
/// escaped (`\\`, `\"`, `\n`). Other characters are allowed in label values.
fn label(value: &str) -> String {
    // Most values need nothing escaped: copied whole, not character by character.
    if memchr::memchr3(b'\\', b'"', b'\n', value.as_bytes()).is_none() {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// The series a call has counted into, found again by its labels as the call holds
/// them (borrowed, unescaped): a call costs one hash and an atomic add, not four
/// `String`s and a lookup in the family. Holds no more entries than the families
/// they come from.
struct Handles<M, const N: usize> {
    made: RwLock<hashbrown::HashMap<Box<[Box<str>]>, M>>,
}

/// Labels as a call has them; hashes as the `Box<[Box<str>]>` key holding them does
/// (a slice of strings, either way).
#[derive(Hash)]
struct Borrowed<'a, const N: usize>([&'a str; N]);

impl<const N: usize> hashbrown::Equivalent<Box<[Box<str>]>> for Borrowed<'_, N> {
    fn equivalent(&self, key: &Box<[Box<str>]>) -> bool {
        key.len() == N
            && key
                .iter()
                .zip(self.0)
                .all(|(made, wanted)| **made == *wanted)
    }
}

impl<M: Clone, const N: usize> Handles<M, N> {
    fn new() -> Self {
        Handles {
            made: RwLock::new(hashbrown::HashMap::new()),
        }
    }

    /// The handle kept for `labels`.
    fn get(&self, labels: [&str; N]) -> Option<M> {
        self.made.read().get(&Borrowed(labels)).cloned()
    }

    /// Keeps `made` as the handle for `labels`.
    fn keep(&self, labels: [&str; N], made: &M) {
        let key = labels.iter().map(|&label| Box::from(label)).collect();
        self.made.write().insert(key, made.clone());
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    server: String,
    tool: String,
    decision: String,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServerLabels {
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamErrorLabels {
    server: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedactionLabels {
    server: String,
    detector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    server: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    listener: String,
    reason: String,
}

/// The metrics of the listeners' connections (`limits.max_connections`, …).
struct ConnectionMetrics {
    active: Family<ListenerLabels, Gauge>,
    refused: Family<RefusedLabels, Counter>,
    timeouts: Family<RefusedLabels, Counter>,
}

impl ConnectionMetrics {
    fn register(registry: &mut Registry) -> ConnectionMetrics {
        let metrics = ConnectionMetrics {
            active: Family::default(),
            refused: Family::default(),
            timeouts: Family::default(),
        };
        registry.register(
            "connections_active",
            "Open client connections, by listener (proxy, admin)",
            metrics.active.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before their first request, by listener and reason (max_connections, connections_per_peer, handshake: a bad PROXY header or TLS handshake)",
            metrics.refused.clone(),
        );
        registry.register(
            "client_timeouts",
            "Requests whose headers or body did not arrive in time, by listener and part (header, body, handshake: a PROXY header or TLS handshake)",
            metrics.timeouts.clone(),
        );
        metrics
    }
}

/// The state counted at each scrape: sessions, streams, approvals, failures, processes.
struct Gauges {
    sessions: Gauge,
    streams: Gauge,
    pending_approvals: Gauge,
    audit_failures: Gauge,
    webhook_failures: Gauge,
    upstream_processes: Family<ServerLabels, Gauge>,
}

impl Gauges {
    fn register(registry: &mut Registry) -> Gauges {
        let sessions = Gauge::default();
        registry.register(
            "sessions_active",
            "Open handshake-era sessions",
            sessions.clone(),
        );
        let streams = Gauge::default();
        registry.register(
            "streams_active",
            "Open downstream SSE response streams",
            streams.clone(),
        );
        let pending_approvals = Gauge::default();
        registry.register(
            "approvals_pending",
            "Calls waiting for a human",
            pending_approvals.clone(),
        );
        let audit_failures = Gauge::default();
        registry.register(
            "audit_write_failures",
            "Audit records that could not be written",
            audit_failures.clone(),
        );
        let webhook_failures = Gauge::default();
        registry.register(
            "webhook_failures",
            "Approval webhooks that failed after every retry",
            webhook_failures.clone(),
        );
        let upstream_processes = Family::<ServerLabels, Gauge>::default();
        registry.register(
            "upstream_processes",
            "Live processes of each stdio upstream",
            upstream_processes.clone(),
        );
        Gauges {
            sessions,
            streams,
            pending_approvals,
            audit_failures,
            webhook_failures,
            upstream_processes,
        }
    }
}

/// What the safeguards counted: calls refused for the audit log, tool changes, the
/// shared state unreachable and its round trips, telemetry dropped.
struct Safeguards {
    audit_refusals: Family<ServerLabels, Counter>,
    tool_changes: Family<ServerLabels, Counter>,
    state_unavailable: Family<UpstreamErrorLabels, Counter>,
    state_round_trips: Mutex<Counter>,
    telemetry_dropped: Counter,
}

impl Safeguards {
    fn register(registry: &mut Registry) -> Safeguards {
        let audit_refusals = Family::<ServerLabels, Counter>::default();
        registry.register(
        "audit_refusals",
        "Calls refused because their decision could not be written to the audit log (audit.on_failure: refuse)",
        audit_refusals.clone(),
    );
        let tool_changes = Family::<ServerLabels, Counter>::default();
        registry.register(
        "tool_changes",
        "Tool definitions the upstream advertised that differ from the tool lock (or that it does not name), each counted once",
        tool_changes.clone(),
    );
        let state_unavailable = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
        "state_unavailable",
        "Requests that needed the shared state (Redis) while it could not be reached, by server and kind (refused, allowed)",
        state_unavailable.clone(),
    );
        let state_round_trips = Counter::default();
        registry.register(
            "state_round_trips",
            "Round trips to the shared state (Redis) made for requests (state.backend: redis)",
            state_round_trips.clone(),
        );
        let telemetry_dropped = Counter::default();
        registry.register(
        "telemetry_dropped",
        "Spans and log records dropped before export: the queue was full, or the collector failed or timed out (telemetry:)",
        telemetry_dropped.clone(),
    );
        Safeguards {
            audit_refusals,
            tool_changes,
            state_unavailable,
            state_round_trips: Mutex::new(state_round_trips),
            telemetry_dropped,
        }
    }
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~26 s.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 19,
    ))
}

/// All of Tollgate's metrics.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    /// By server, tool (as counted: `other` for tools no rule names), decision, rule.
    decision_handles: Handles<Counter, 4>,
    upstream_latency: Family<ServerLabels, Histogram, fn() -> Histogram>,
    latency_handles: Handles<Histogram, 1>,
    upstream_errors: Family<UpstreamErrorLabels, Counter>,
    result_redactions: Family<RedactionLabels, Counter>,
    reloads: Family<ReloadLabels, Counter>,
    gauges: Gauges,
    tools_seen: Mutex<HashSet<String>>,
    safeguards: Safeguards,
    connections: ConnectionMetrics,
    /// Open downstream response streams (SSE), counted by the relay.
    pub open_streams: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Tool-call decisions by server, tool, decision and rule",
            decisions.clone(),
        );
        let upstream_latency =
            Family::<ServerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram as fn() -> Histogram,
            );
        registry.register(
            "upstream_latency_seconds",
            "Time until the upstream's response headers, by server",
            upstream_latency.clone(),
        );
        let upstream_errors = Family::<UpstreamErrorLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Upstream failures by server and kind",
            upstream_errors.clone(),
        );
        let result_redactions = Family::<RedactionLabels, Counter>::default();
        registry.register(
            "result_redactions",
            "Matches found in tool results by the policy's `results` rules, by server and detector",
            result_redactions.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads by server and result (ok, failed)",
            reloads.clone(),
        );
        let gauges = Gauges::register(&mut registry);
        let safeguards = Safeguards::register(&mut registry);
        let connections = ConnectionMetrics::register(&mut registry);
        Metrics {
            safeguards,
            connections,
            registry,
            decisions,
            decision_handles: Handles::new(),
            upstream_latency,
            latency_handles: Handles::new(),
            upstream_errors,
            result_redactions,
            reloads,
            gauges,
            tools_seen: Mutex::new(HashSet::new()),
            open_streams: AtomicU64::new(0),
        }
    }

    fn tool_label(&self, tool: &str, named_by_policy: bool) -> String {
        if !named_by_policy || tool.len() > MAX_TOOL_LABEL_BYTES {
            return "other".into();
        }
        let mut seen = self.tools_seen.lock();
        if seen.contains(tool) {
            return label(tool);
        }
        if seen.len() < MAX_TOOL_LABELS {
            seen.insert(tool.to_owned());
            return label(tool);
        }
        "other".into()
    }

    /// Counts one decision. `named_by_policy`: whether some rule names `tool`
    /// ([`tollgate_policy::Policy::names_tool`]); other tools count as `other`.
    pub fn decision(
        &self,
        server: &str,
        tool: &str,
        named_by_policy: bool,
        decision: &str,
        rule: &str,
    ) {
        let counted = if !named_by_policy || tool.len() > MAX_TOOL_LABEL_BYTES {
            "other"
        } else {
            tool
        };
        let key = [server, counted, decision, rule];
        if let Some(counter) = self.decision_handles.get(key) {
            counter.inc();
            return;
        }
        let labels = DecisionLabels {
            server: label(server),
            tool: self.tool_label(tool, named_by_policy),
            decision: label(decision),
            rule: label(rule),
        };
        let counter = self.decisions.get_or_create_owned(&labels);
        // A tool past MAX_TOOL_LABELS counts as `other` and is not kept: the
        // handles stay as few as the series.
        if labels.tool != "other" || counted == "other" {
            self.decision_handles.keep(key, &counter);
        }
        counter.inc();
    }

    /// Records the time to the upstream's response headers.
    pub fn upstream_latency(&self, server: &str, seconds: f64) {
        let histogram = self.latency_handles.get([server]).unwrap_or_else(|| {
            let histogram = self.upstream_latency.get_or_create_owned(&ServerLabels {
                server: label(server),
            });
            self.latency_handles.keep([server], &histogram);
            histogram
        });
        histogram.observe(seconds);
    }

    /// Counts an upstream failure (`unreachable`, `timeout`, `status_5xx`, `status_not_ok`, …).
    pub fn upstream_error(&self, server: &str, kind: &str) {
        self.upstream_errors
            .get_or_create(&UpstreamErrorLabels {
                server: label(server),
                kind: label(kind),
            })
            .inc();
    }

    /// Counts `count` matches of `detector` in a tool result of `server`.
    pub fn result_redactions(&self, server: &str, detector: &str, count: u64) {
        self.result_redactions
            .get_or_create(&RedactionLabels {
                server: label(server),
                detector: label(detector),
            })
            .inc_by(count);
    }

    /// Sets a stdio upstream's live processes (read at scrape time).
    pub fn upstream_processes(&self, server: &str, live: usize) {
        self.gauges
            .upstream_processes
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .set(i64::try_from(live).unwrap_or(i64::MAX));
    }

    /// Counts a tool definition that differs from the lock.
    pub fn tool_change(&self, server: &str) {
        self.safeguards
            .tool_changes
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .inc();
    }

    /// Counts a call refused because its decision could not be recorded.
    pub fn audit_refusal(&self, server: &str) {
        self.safeguards
            .audit_refusals
            .get_or_create(&ServerLabels {
                server: server.to_owned(),
            })
            .inc();
    }

    /// Counts a request that needed the shared state while it was unreachable:
    /// `refused` (`state.on_failure: refuse`) or `allowed` without its limit.
    pub fn state_unavailable(&self, server: &str, refused: bool) {
        self.safeguards
            .state_unavailable
            .get_or_create(&UpstreamErrorLabels {
                server: label(server),
                kind: if refused { "refused" } else { "allowed" }.to_owned(),
            })
            .inc();
    }

    /// Brings the shared state's round-trip count up to `total` (read from the store).
    pub fn state_round_trips(&self, total: u64) {
        let counter = self.safeguards.state_round_trips.lock();
        let seen = counter.get();
        if total > seen {
            counter.inc_by(total - seen);
        }
    }

    /// Counts a connection opened (`1`) or closed (`-1`) on `listener`.
    pub fn connection(&self, listener: &str, delta: i64) {
        self.connections
            .active
            .get_or_create(&ListenerLabels {
                listener: listener.to_owned(),
            })
            .inc_by(delta);
    }

    /// Counts a connection closed at once because of `limit`.
    pub fn connection_refused(&self, listener: &str, limit: &str) {
        self.connections
            .refused
            .get_or_create(&RefusedLabels {
                listener: listener.to_owned(),
                reason: limit.to_owned(),
            })
            .inc();
    }

    /// Counts a request whose `part` (header, body) did not arrive in time.
    pub fn client_timeout(&self, listener: &str, part: &str) {
        self.connections
            .timeouts
            .get_or_create(&RefusedLabels {
                listener: listener.to_owned(),
                reason: part.to_owned(),
            })
            .inc();
    }

    /// The counter of telemetry dropped before export (`telemetry:`).
    pub fn telemetry_dropped(&self) -> Counter {
        self.safeguards.telemetry_dropped.clone()
    }

    /// Counts a policy reload.
    pub fn reload(&self, server: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads
            .get_or_create(&ReloadLabels {
                server: label(server),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Renders the text format, after setting the gauges read at scrape time.
    pub fn render(
        &self,
        sessions: usize,
        pending: usize,
        audit_failures: u64,
        webhook_failures: u64,
    ) -> String {
        let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.gauges.sessions.set(as_i64(sessions as u64));
        self.gauges.pending_approvals.set(as_i64(pending as u64));
        self.gauges.audit_failures.set(as_i64(audit_failures));
        self.gauges.webhook_failures.set(as_i64(webhook_failures));
        self.gauges.streams.set(as_i64(
            self.open_streams.load(std::sync::atomic::Ordering::Relaxed),
        ));
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn renders_counters_with_labels() {
        let metrics = Metrics::new();
        metrics.decision("hl", "delete_x", true, "deny", "rules[2] (delete_*)");
        metrics.decision("hl", "delete_x", true, "deny", "rules[2] (delete_*)");
        metrics.reload("hl", false);
        metrics.upstream_latency("hl", 0.002);
        metrics.upstream_processes("fs", 2);
        let text = metrics.render(3, 1, 0, 0);
        assert!(
            text.contains(r#"tollgate_decisions_total{server="hl",tool="delete_x",decision="deny",rule="rules[2] (delete_*)"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tollgate_policy_reloads_total{server="hl",result="failed"} 1"#),
            "{text}"
        );
        assert!(text.contains("tollgate_sessions_active 3"), "{text}");
        assert!(
            text.contains(r#"tollgate_upstream_processes{server="fs"} 2"#),
            "{text}"
        );
        assert!(text.contains("tollgate_approvals_pending 1"), "{text}");
        assert!(
            text.contains("tollgate_upstream_latency_seconds_count{server=\"hl\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn bounds_tool_label_cardinality() {
        let metrics = Metrics::new();
        for i in 0..MAX_TOOL_LABELS + 50 {
            metrics.decision("s", &format!("tool{i}"), true, "deny", "default");
        }
        let text = metrics.render(0, 0, 0, 0);
        assert!(text.contains(r#"tool="other""#));
        assert_eq!(
            text.matches("tollgate_decisions_total{").count(),
            MAX_TOOL_LABELS + 1
        );
        // The handles kept are no more than the series, and a call past the bound
        // still counts, as `other`.
        assert!(metrics.decision_handles.made.read().len() <= MAX_TOOL_LABELS + 1);
        metrics.decision("s", "tool_late", true, "deny", "default");
        let text = metrics.render(0, 0, 0, 0);
        assert!(
            text.contains(r#"tool="other",decision="deny",rule="default"} 51"#),
            "{text}"
        );
    }

    #[test]
    fn label_values_cannot_forge_series() {
        let metrics = Metrics::new();
        let forged = "x\",decision=\"deny\",rule=\"r\"} 1\ntollgate_approvals_pending 1337";
        metrics.decision("s", forged, true, "deny", "rules[0] (a\\b\"c)");
        let text = metrics.render(0, 0, 0, 0);
        assert!(
            !text
                .lines()
                .any(|l| l.starts_with("tollgate_approvals_pending 1337")),
            "{text}"
        );
        assert!(
            text.contains(
                r#"tool="x\",decision=\"deny\",rule=\"r\"} 1\ntollgate_approvals_pending 1337""#
            ),
            "{text}"
        );
        assert!(text.contains(r#"rule="rules[0] (a\\b\"c)""#), "{text}");
        // Every sample line is one series: no line starts inside a label value.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("tollgate_"), "{line}");
        }
    }

    #[test]
    fn only_short_names_a_rule_names_are_labels() {
        let metrics = Metrics::new();
        metrics.decision("s", "made_up", false, "deny", "default");
        metrics.decision(
            "s",
            &"n".repeat(MAX_TOOL_LABEL_BYTES + 1),
            true,
            "deny",
            "default",
        );
        metrics.decision(
            "s",
            &"n".repeat(MAX_TOOL_LABEL_BYTES),
            true,
            "deny",
            "default",
        );
        let text = metrics.render(0, 0, 0, 0);
        assert!(!text.contains("made_up"), "{text}");
        assert!(
            text.contains(r#"tool="other",decision="deny",rule="default"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(&format!("tool=\"{}\"", "n".repeat(MAX_TOOL_LABEL_BYTES))),
            "{text}"
        );
    }
}
