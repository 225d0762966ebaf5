//! Result rules (SPEC §9): what a tool's result may carry back to the agent.
//!
//! `results:` entries name detectors to redact (each match becomes `[redacted:<name>]`)
//! or to block on (the whole result is withheld). Every entry whose `tool` (and
//! `clients`, `when`) match a call applies: for each detector the strongest word wins
//! (enforced block, then enforced redaction, then what audit-mode entries only record).
//! The policy's detectors are compiled into one [`Scanner`](crate::detect::Scanner) when
//! the policy loads; applying them to a result reads each string once when nothing is
//! found in it.

use globset::{GlobBuilder, GlobMatcher};
use serde_json::{Map, Value, json};

use crate::detect::{self, Detector, Found, Scanner, Wanted};
use crate::doc::{DetectorDoc, Mode, ResultDoc};
use crate::error::PolicyError;
use crate::matching::{Checker, Claims, claims_match, client_matches, compile_claims, is_glob};
use crate::yaml;

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

/// Compiles `results:` (raw items, with their spans when written in block style),
/// reporting every problem to `check`. `None` when there are no entries, or errors.
pub(crate) fn compile(
    check: &mut Checker<'_>,
    raw: Vec<yaml::RawValue>,
    policy_mode: Mode,
) -> Option<Results> {
    if raw.is_empty() {
        return None;
    }
    let before = check.errors.len();
    let spans = yaml::list_spans(check.source, "results").filter(|s| s.len() == raw.len());
    let mut registry = Registry::default();
    let mut entries = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let span = spans.as_ref().and_then(|s| s.get(index).copied());
        let parsed: Result<ResultDoc, PolicyError> = match span {
            Some(span) => yaml::item(&yaml::item_text(check.source, span), check.origin),
            None => yaml::from_value(raw).map_err(|message| PolicyError {
                origin: check.origin.to_owned(),
                line: 1,
                column: 1,
                message: format!("results[{index}]: {message}"),
            }),
        };
        match parsed {
            Ok(doc) => {
                if let Some(entry) =
                    compile_entry(check, &mut registry, span, index, doc, policy_mode)
                {
                    entries.push(entry);
                }
            }
            Err(error) => check.errors.push(error),
        }
    }
    markers_unmatched(check, &registry);
    if check.errors.len() > before {
        return None;
    }
    match Scanner::new(registry.detectors) {
        Ok(scanner) => Some(Results { entries, scanner }),
        Err(err) => {
            check.error_at(
                spans.as_ref().and_then(|s| s.first()).map(|s| (s.start + 1, 1)),
                format!("results: the detectors do not compile together ({err}); use fewer or simpler custom patterns"),
            );
            None
        }
    }
}

/// A custom pattern that matches a marker would change redacted text again: an
/// error for each.
fn markers_unmatched(check: &mut Checker<'_>, registry: &Registry) {
    let markers: Vec<String> = registry
        .detectors
        .iter()
        .map(|d| detect::marker(&d.name))
        .collect();
    for (detector, (span, index)) in registry.detectors.iter().zip(&registry.defined_at) {
        if detect::is_built_in(&detector.name) {
            continue;
        }
        if let Some(marker) = markers.iter().find(|m| detector.is_match(m)) {
            let at = span.and_then(|s| yaml::find_word(check.source, s, &detector.name));
            check.error_at(
                at.or(span.map(|s| (s.start + 1, 1))),
                format!(
                    "results[{index}]: the pattern of `{}` matches the marker `{marker}` that redaction leaves, so redacting again would change the text; make it more specific",
                    detector.name
                ),
            );
        }
    }
}

/// The detectors of a policy, each compiled once however many entries name it.
#[derive(Default)]
struct Registry {
    detectors: Vec<Detector>,
    /// Where each was (first) named: its entry's span and index.
    defined_at: Vec<(Option<yaml::Span>, usize)>,
}

impl Registry {
    fn index_of(&self, name: &str) -> Option<usize> {
        self.detectors.iter().position(|d| d.name == name)
    }

    /// The names of the detectors `list` holds the indices of.
    fn names(&self, list: &[usize]) -> Vec<String> {
        list.iter()
            .filter_map(|&d| self.detectors.get(d))
            .map(|d| d.name.clone())
            .collect()
    }

    /// Adds a detector first defined at `site`; its index.
    fn add(&mut self, detector: Detector, site: Site<'_>) -> Option<usize> {
        self.detectors.push(detector);
        self.defined_at.push((site.span, site.index));
        Some(self.detectors.len() - 1)
    }
}

/// An entry's `tool`: an exact name or a glob.
fn compile_tool(check: &mut Checker<'_>, site: Site<'_>, tool: &str) -> Option<ToolMatch> {
    let (span, label) = (site.span, site.label);
    if tool.is_empty() {
        check.at(
            span,
            "tool",
            format!("{label}.tool: must not be empty: use an exact name or a glob like `read_*`"),
        );
    }
    if !is_glob(tool) {
        return Some(ToolMatch::Exact(tool.to_owned()));
    }
    match GlobBuilder::new(tool).literal_separator(false).build() {
        Ok(glob) => Some(ToolMatch::Glob(glob.compile_matcher())),
        Err(err) => {
            check.at(
                span,
                "tool",
                format!("{label}.tool: `{tool}` is not a valid glob: {}", err.kind()),
            );
            None
        }
    }
}

/// The registry index of a detector named under the entry's `key` (`redact` or
/// `block`): a built-in one, or one of the policy's own, defined here or before.
fn resolve_detector(
    check: &mut Checker<'_>,
    registry: &mut Registry,
    site: Site<'_>,
    doc: &DetectorDoc,
    key: &str,
) -> Option<usize> {
    let (span, label) = (site.span, site.label);
    let (name, pattern) = match doc {
        DetectorDoc::BuiltIn(name) => (name.as_str(), None),
        DetectorDoc::Custom(custom) => (custom.name.as_str(), Some(custom.pattern.as_str())),
    };
    let at = span.and_then(|s| {
        yaml::find_word(check.source, s, name).or_else(|| yaml::find_key(check.source, s, key))
    });
    let at = at.or(span.map(|s| (s.start + 1, 1)));
    let Some(pattern) = pattern else {
        if !detect::is_built_in(name) {
            let known: Vec<&str> = detect::built_in_names().collect();
            check.error_at(at, format!(
                "{label}.{key}: `{name}` is not a detector: use one of {}, or `{{name: ..., pattern: ...}}` for one of your own",
                known.join(", ")
            ));
            return None;
        }
        if let Some(index) = registry.index_of(name) {
            return Some(index);
        }
        return registry.add(Detector::built_in(name)?, site);
    };
    if name.is_empty()
        || name.len() > 64
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        check.error_at(
            at,
            format!(
                "{label}.{key}: `{name}` is not a detector name: use 1 to 64 letters, digits or `_`"
            ),
        );
        return None;
    }
    if detect::is_built_in(name) {
        check.error_at(at, format!("{label}.{key}: `{name}` is a built-in detector; give yours another name, or write just `{name}`"));
        return None;
    }
    let compiled = match Detector::custom(name, pattern) {
        Ok(compiled) => compiled,
        Err(err) => {
            check.error_at(
                at,
                format!("{label}.{key}: the pattern of `{name}` is not valid: {err}"),
            );
            return None;
        }
    };
    match registry.index_of(name) {
        Some(existing) => same_pattern(check, registry, existing, (name, pattern), at, site, key),
        None => registry.add(compiled, site),
    }
}

/// `existing`, when the detector defined again under `name` has its first
/// pattern; else an error naming where it was first defined.
fn same_pattern(
    check: &mut Checker<'_>,
    registry: &Registry,
    existing: usize,
    (name, pattern): (&str, &str),
    at: Option<(usize, usize)>,
    site: Site<'_>,
    key: &str,
) -> Option<usize> {
    let same = registry
        .detectors
        .get(existing)
        .is_some_and(|d| d.pattern() == pattern);
    if same {
        return Some(existing);
    }
    let (first_span, first_index) = registry
        .defined_at
        .get(existing)
        .copied()
        .unwrap_or((None, 0));
    let first = first_span
        .and_then(|s| yaml::find_word(check.source, s, name))
        .map_or_else(String::new, |(l, c)| {
            format!(" at {}:{l}:{c}", check.origin)
        });
    let label = site.label;
    check.error_at(at, format!(
        "{label}.{key}: `{name}` is defined with another pattern in results[{first_index}]{first}; give one of them another name"
    ));
    None
}

/// Where a `results` entry is, for its messages and for the detectors it defines.
#[derive(Clone, Copy)]
struct Site<'a> {
    span: Option<yaml::Span>,
    index: usize,
    label: &'a str,
}

fn compile_entry(
    check: &mut Checker<'_>,
    registry: &mut Registry,
    span: Option<yaml::Span>,
    index: usize,
    doc: ResultDoc,
    policy_mode: Mode,
) -> Option<Entry> {
    let before = check.errors.len();
    let label = format!("results[{index}]");
    let site = Site {
        span,
        index,
        label: &label,
    };
    let tool = compile_tool(check, site, &doc.tool);
    if matches!(&doc.clients, Some(c) if c.is_empty()) {
        check.at(
            span,
            "clients",
            format!(
                "{label}.clients: an empty list matches no one; remove it to match every client"
            ),
        );
    }
    let claims = compile_claims(check, span, &label, doc.when.as_ref());
    if doc.redact.is_empty() && doc.block.is_empty() {
        check.at(span, "tool", format!("{label}: names no detector; add `redact: [...]` or `block: [...]` (e.g. `redact: [aws_access_key, private_key]`)"));
    }
    let mut detectors = |check: &mut Checker<'_>, docs: &[DetectorDoc], key: &str| -> Vec<usize> {
        docs.iter()
            .filter_map(|doc| resolve_detector(check, registry, site, doc, key))
            .collect()
    };
    let redact = detectors(check, &doc.redact, "redact");
    let block = detectors(check, &doc.block, "block");
    let (redact_names, block_names) = (registry.names(&redact), registry.names(&block));
    for name in redact_names.iter().filter(|n| block_names.contains(n)) {
        let at = span.and_then(|s| yaml::find_key(check.source, s, "block"));
        check.error_at(at, format!("{label}: `{name}` is in both `redact` and `block`; a block withholds the whole result, so remove it from one"));
    }
    if check.errors.len() > before {
        return None;
    }
    let (line, column) = span
        .and_then(|s| yaml::find_key(check.source, s, "tool").or(Some((s.start + 1, 1))))
        .unwrap_or((1, 1));
    Some(Entry {
        info: ResultEntryInfo {
            index,
            label: format!("{label} ({})", doc.tool),
            tool: doc.tool,
            line,
            column,
            redact: redact_names,
            block: block_names,
            audit: policy_mode == Mode::Audit || doc.mode == Some(Mode::Audit),
        },
        tool: tool?,
        clients: doc.clients,
        claims,
        redact,
        block,
    })
}
