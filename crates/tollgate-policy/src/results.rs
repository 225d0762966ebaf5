//! Result rules (SPEC §9): what a tool's result may carry back to the agent.
//!
//! `results:` entries name detectors to redact (each match becomes `[redacted:<name>]`)
//! or to block on (the whole result is withheld). Every entry whose `tool` (and
//! `clients`, `when`) match a call applies: for each detector the strongest word wins
//! (enforced block, then enforced redaction, then what audit-mode entries only record).
//! The policy's detectors are compiled into one [`Scanner`](crate::detect::Scanner) when
//! the policy loads; applying them to a result reads each string once when nothing is
//! found in it.

use globset::GlobMatcher;
use serde_json::{Map, Value, json};

use crate::detect::{self, Found, Scanner, Wanted};
use crate::matching::{Claims, claims_match, client_matches};

mod compile;

pub(crate) use compile::compile;

/// `_meta` key of the redactions a result underwent: `[{name, count}]`.
pub const REDACTIONS_META: &str = "dev.tollgate/redactions";

/// `_meta` key of Tollgate's decision about a call (docs/errors.md).
pub const DECISION_META: &str = "dev.tollgate/decision";

/// The decision kind of a withheld result.
pub const RESULT_BLOCKED: &str = "result_blocked";

/// What one detector found in a result.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Redaction {
    /// The detector's name.
    pub name: String,
    /// How many matches.
    pub count: u64,
}

/// What applying result rules to a result found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResultVerdict {
    /// The detectors that found something, by name, with their match counts (sorted by
    /// name; every count > 0). Audit-mode finds are listed too: they changed nothing.
    pub redactions: Vec<Redaction>,
    /// The `block` detector that withheld the result (enforce mode only; in audit mode
    /// its finds are in `redactions` and the result passes).
    pub blocked: Option<String>,
    /// True when the result was modified (redacted or replaced).
    pub changed: bool,
}

/// A `results:` entry, as `tollgate explain` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultEntryInfo {
    /// 0-based position in `results:`.
    pub index: usize,
    /// Its `tool` pattern.
    pub tool: String,
    /// `results[<index>] (<tool>)`.
    pub label: String,
    /// 1-based line and column of its `tool:`.
    pub line: usize,
    /// See `line`.
    pub column: usize,
    /// The detectors it redacts, by name.
    pub redact: Vec<String>,
    /// The detectors it blocks on, by name.
    pub block: Vec<String>,
    /// Whether it only records (its own `mode: audit`, or the policy's).
    pub audit: bool,
}

#[derive(Debug)]
enum ToolMatch {
    Exact(String),
    Glob(GlobMatcher),
}

#[derive(Debug)]
struct Entry {
    info: ResultEntryInfo,
    tool: ToolMatch,
    clients: Option<Vec<String>>,
    claims: Vec<(String, Vec<Value>)>,
    /// Detector indices.
    redact: Vec<usize>,
    block: Vec<usize>,
}

impl Entry {
    fn applies(&self, tool: &str, client: Option<&str>, claims: Option<&Claims>) -> bool {
        let tool_ok = match &self.tool {
            ToolMatch::Exact(name) => name == tool,
            ToolMatch::Glob(glob) => glob.is_match(tool),
        };
        tool_ok
            && client_matches(self.clients.as_deref(), client)
            && claims_match(&self.claims, claims)
    }
}

/// The compiled `results:` of a policy (never empty).
#[derive(Debug)]
pub(crate) struct Results {
    entries: Vec<Entry>,
    scanner: Scanner,
}

/// What a detector does to one call's result, weakest first: the strongest of the
/// applying entries' wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Effect {
    Off,
    AuditRedact,
    AuditBlock,
    Redact,
    Block,
}

impl Effect {
    fn enforced(self) -> bool {
        matches!(self, Effect::Redact | Effect::Block)
    }
}

/// The result rules that apply to one call. Borrowed from the policy; cheap to make.
#[derive(Debug)]
pub struct ResultRules<'p> {
    results: &'p Results,
    tool: Box<str>,
    /// Indices of the applying entries.
    applying: Vec<usize>,
    /// Per detector: what it does, and the entry that says so.
    effects: Vec<(Effect, usize)>,
    /// Whether an enforced detector may match across a marker's edge.
    crossing: bool,
    /// The detectors to redact or block on, and those only recorded (audit mode).
    enforced: Wanted,
    audited: Wanted,
}

/// Per-detector counts of one `apply`, and scratch space reused for every string.
struct Tally {
    found: Vec<u64>,
    redacted: Vec<u64>,
    /// The lowest-indexed enforced block detector found.
    block: Option<usize>,
    matches: Vec<Found>,
}

impl Results {
    pub(crate) fn rules_for(
        &self,
        tool: &str,
        client: Option<&str>,
        claims: Option<&Claims>,
    ) -> Option<ResultRules<'_>> {
        let applying: Vec<usize> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, entry)| entry.applies(tool, client, claims))
            .map(|(index, _)| index)
            .collect();
        if applying.is_empty() {
            return None;
        }
        let mut effects = vec![(Effect::Off, 0); self.scanner.detectors().len()];
        for &index in &applying {
            let Some(entry) = self.entries.get(index) else {
                continue;
            };
            let (redact, block) = if entry.info.audit {
                (Effect::AuditRedact, Effect::AuditBlock)
            } else {
                (Effect::Redact, Effect::Block)
            };
            let said = entry
                .redact
                .iter()
                .map(|&d| (d, redact))
                .chain(entry.block.iter().map(|&d| (d, block)));
            for (detector, effect) in said {
                if let Some(slot) = effects.get_mut(detector)
                    && effect > slot.0
                {
                    *slot = (effect, index);
                }
            }
        }
        let crossing = effects
            .iter()
            .zip(self.scanner.detectors())
            .any(|((effect, _), detector)| effect.enforced() && detector.crosses_markers);
        let with = |keep: fn(Effect) -> bool| -> Vec<usize> {
            effects
                .iter()
                .enumerate()
                .filter(|(_, (effect, _))| keep(*effect))
                .map(|(d, _)| d)
                .collect()
        };
        let enforced = self.scanner.wanted(with(Effect::enforced));
        let audited = self.scanner.wanted(with(|e| {
            matches!(e, Effect::AuditRedact | Effect::AuditBlock)
        }));
        Some(ResultRules {
            results: self,
            tool: tool.into(),
            applying,
            effects,
            crossing,
            enforced,
            audited,
        })
    }

    /// Every entry, in file order.
    pub(crate) fn entries(&self) -> impl Iterator<Item = &ResultEntryInfo> {
        self.entries.iter().map(|entry| &entry.info)
    }
}

impl<'p> ResultRules<'p> {
    /// The applying entries, in file order, for `tollgate explain`.
    pub fn entries(&self) -> impl Iterator<Item = &'p ResultEntryInfo> + '_ {
        let results: &'p Results = self.results;
        self.applying
            .iter()
            .filter_map(move |&index| results.entries.get(index))
            .map(|entry| &entry.info)
    }

    /// Scans a `tools/call` result (a CallToolResult) in place, per SPEC §9: the
    /// `text` of each `content` item, the `text` of an embedded `resource`, and every
    /// string in `structuredContent` (not `_meta`, not blobs). Enforced redactions
    /// replace each match with `[redacted:<name>]` and add
    /// `_meta["dev.tollgate/redactions"]`; an enforced `block` detector found replaces the
    /// whole result with the withheld one. What audit mode finds changes nothing.
    pub fn apply(&self, result: &mut Value) -> ResultVerdict {
        let detectors = self.results.scanner.detectors().len();
        let mut tally = Tally {
            found: vec![0; detectors],
            redacted: vec![0; detectors],
            block: None,
            matches: Vec::new(),
        };
        let Some(object) = result.as_object_mut() else {
            return ResultVerdict::default();
        };
        self.scan_result(object, &mut tally);
        let name = |d: usize| self.detector_name(d);
        let mut verdict = ResultVerdict {
            redactions: self.redactions(&tally.found),
            blocked: None,
            changed: false,
        };
        if let Some(detector) = tally.block
            && let Some(blocker) = name(detector)
        {
            let entry = self
                .effects
                .get(detector)
                .and_then(|(_, entry)| self.results.entries.get(*entry));
            *result = withheld(&self.tool, blocker, entry.map(|e| e.info.label.as_str()));
            verdict.blocked = Some(blocker.to_owned());
            verdict.changed = true;
            return verdict;
        }
        let redacted = self.redactions(&tally.redacted);
        if !redacted.is_empty() {
            let meta = object
                .entry("_meta")
                .or_insert_with(|| Value::Object(Map::new()));
            if !meta.is_object() {
                *meta = Value::Object(Map::new());
            }
            if let Some(meta) = meta.as_object_mut() {
                meta.insert(REDACTIONS_META.to_owned(), json!(redacted));
            }
            verdict.changed = true;
        }
        verdict
    }

    /// Scans what SPEC §9 says a result's rules read: each `content` item's `text`,
    /// an embedded `resource`'s `text`, and every string in `structuredContent`.
    fn scan_result(&self, object: &mut Map<String, Value>, tally: &mut Tally) {
        if let Some(Value::Array(items)) = object.get_mut("content") {
            for item in items.iter_mut().filter_map(Value::as_object_mut) {
                if let Some(Value::String(text)) = item.get_mut("text") {
                    self.scan(text, tally);
                }
                if let Some(Value::String(text)) = item
                    .get_mut("resource")
                    .and_then(Value::as_object_mut)
                    .and_then(|resource| resource.get_mut("text"))
                {
                    self.scan(text, tally);
                }
            }
        }
        if let Some(structured) = object.get_mut("structuredContent") {
            // Iterative: a value built in memory may be deeper than any stack.
            let mut stack = vec![structured];
            while let Some(value) = stack.pop() {
                match value {
                    Value::String(text) => self.scan(text, tally),
                    Value::Array(items) => stack.extend(items.iter_mut()),
                    Value::Object(map) => stack.extend(map.values_mut()),
                    _ => {}
                }
            }
        }
    }

    /// The name of detector `d`.
    fn detector_name(&self, d: usize) -> Option<&str> {
        self.results
            .scanner
            .detectors()
            .get(d)
            .map(|d| d.name.as_str())
    }

    /// The detectors counted at least once, by name.
    fn redactions(&self, counts: &[u64]) -> Vec<Redaction> {
        let mut list: Vec<Redaction> = counts
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .filter_map(|(d, n)| {
                Some(Redaction {
                    name: self.detector_name(d)?.to_owned(),
                    count: *n,
                })
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }

    /// Looks for the applying detectors in one string, redacting in place.
    ///
    /// A marker can uncover a match: in `123-45-6789ghp_…` the SSN is not one (a word
    /// goes on), but once the token is redacted it is. So a redacted string is scanned
    /// again until nothing more is found (a text without findings is read once), and a
    /// result redacted twice is redacted once.
    fn scan(&self, text: &mut String, tally: &mut Tally) {
        for round in 0..MAX_ROUNDS {
            // A block withholds the whole result: nothing more to redact.
            if !self.scan_once(text, tally, round == 0) || tally.block.is_some() {
                return;
            }
        }
    }

    /// One round of [`scan`](Self::scan); true when it redacted something a marker may
    /// have uncovered a match next to (most redactions stand between spaces or quotes,
    /// where none can be: see [`detect::may_uncover`]).
    fn scan_once(&self, text: &mut String, tally: &mut Tally, first: bool) -> bool {
        let scanner = &self.results.scanner;
        // What audit mode finds is counted in the text as it came.
        if first && !self.audited.is_empty() {
            tally.matches.clear();
            scanner.find(text, &self.audited, &mut tally.matches);
            for found in &tally.matches {
                if let Some(n) = tally.found.get_mut(found.detector) {
                    *n += 1;
                }
            }
        }
        tally.matches.clear();
        scanner.find(text, &self.enforced, &mut tally.matches);
        if tally.matches.is_empty() {
            return false;
        }
        let mut redacted: Option<String> = None;
        let mut again = false;
        let mut copied = 0;
        for found in &tally.matches {
            let d = found.detector;
            if let Some(n) = tally.found.get_mut(d) {
                *n += 1;
            }
            match self.effects.get(d).map(|(effect, _)| *effect) {
                Some(Effect::Block) => {
                    tally.block = Some(tally.block.map_or(d, |b| b.min(d)));
                }
                Some(Effect::Redact) => {
                    let Some(detector) = scanner.detectors().get(d) else {
                        continue;
                    };
                    let out = redacted.get_or_insert_with(|| String::with_capacity(text.len()));
                    out.push_str(text.get(copied..found.start).unwrap_or_default());
                    out.push_str("[redacted:");
                    out.push_str(&detector.name);
                    out.push(']');
                    copied = found.end;
                    again = again
                        || self.crossing
                        || detect::may_uncover(
                            text.get(..found.start).and_then(|t| t.chars().next_back()),
                        )
                        || detect::may_uncover(
                            text.get(found.end..).and_then(|t| t.chars().next()),
                        );
                    if let Some(n) = tally.redacted.get_mut(d) {
                        *n += 1;
                    }
                }
                _ => {}
            }
        }
        match redacted {
            Some(mut out) => {
                out.push_str(text.get(copied..).unwrap_or_default());
                *text = out;
                again
            }
            None => false,
        }
    }
}

/// Scans of one string at most: each round after the first only looks at what markers
/// uncovered, which is rarely anything (a second round is the norm for a redacted string).
const MAX_ROUNDS: usize = 4;

/// The result that replaces one a `block` detector found something in.
fn withheld(tool: &str, detector: &str, rule: Option<&str>) -> Value {
    let reason = format!("Result withheld by policy: it contains {detector}");
    json!({
        "content": [{"type": "text", "text": reason}],
        "isError": true,
        "_meta": {
            DECISION_META: {
                "kind": RESULT_BLOCKED,
                "tool": tool,
                "rule": rule.unwrap_or("results"),
                "reason": reason,
            }
        }
    })
}
