//! Compiling `results:`: each entry's tool, clients and claims, and its detectors,
//! each compiled once into the policy's [`Scanner`] however many entries name it.

use globset::GlobBuilder;

use super::{Entry, ResultEntryInfo, Results, ToolMatch};
use crate::detect::{self, Detector, Scanner};
use crate::doc::{DetectorDoc, Mode, ResultDoc};
use crate::error::PolicyError;
use crate::matching::{Checker, compile_claims, is_glob};
use crate::yaml;

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
