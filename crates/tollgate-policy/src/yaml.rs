//! The one module that reads YAML. Errors keep the file's line and column.
//!
//! serde stops at the first error, so a policy's rules are deserialized one by
//! one: each block-sequence item under `rules:` is cut out of the text (with its
//! line numbers kept) and parsed on its own, so one bad rule hides no other.

use serde::de::DeserializeOwned;

use crate::error::{PolicyError, PolicyErrors};

/// Largest file accepted: policies are small; anything bigger is a mistake.
pub const MAX_SOURCE_BYTES: usize = 1 << 20;

/// What YAML's scanner says about a tab, which names neither the tab nor the rule.
const TAB_HINT: &str = "tabs are not allowed for indentation in YAML; indent with spaces";

fn convert(err: &serde_yaml::Error, source: &str, origin: &str) -> PolicyError {
    let text = err.to_string();
    // Location is reported separately, so drop serde_yaml's " at line L column C".
    let mut message = match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    };
    let (line, column) = err.location().map_or((1, 1), |l| (l.line(), l.column()));
    let indented_with_tab = source
        .lines()
        .nth(line.saturating_sub(1))
        .is_some_and(|l| l[..l.len() - l.trim_start().len()].contains('\t'));
    if indented_with_tab {
        message = format!("{message} ({TAB_HINT})");
    }
    PolicyError {
        origin: origin.to_owned(),
        line,
        column,
        message,
    }
}

fn check_size_and_emptiness(source: &str, origin: &str, what: &str) -> Result<(), PolicyErrors> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(PolicyErrors::one(
            origin,
            1,
            1,
            format!(
                "the file is {} bytes; a {what} may be at most {MAX_SOURCE_BYTES} bytes",
                source.len()
            ),
        ));
    }
    let meaningful = source.lines().any(|l| {
        let l = l.trim();
        !l.is_empty() && !l.starts_with('#') && l != "---"
    });
    if !meaningful {
        return Err(PolicyErrors::one(
            origin,
            1,
            1,
            format!("the file is empty: expected a {what}"),
        ));
    }
    Ok(())
}

/// Deserializes a whole YAML document, with a located error.
pub fn from_yaml_str<T: DeserializeOwned>(source: &str, origin: &str) -> Result<T, PolicyErrors> {
    check_size_and_emptiness(source, origin, "YAML document")?;
    serde_yaml::from_str(source).map_err(|e| PolicyErrors {
        errors: vec![convert(&e, source, origin)],
    })
}

/// Lines `[start, end)` (0-based) of one item of the top-level `rules:` list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub start: usize,
    pub end: usize,
}

fn is_blank(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Finds the items of a block-style top-level `rules:` list. `None` when the list
/// is written another way (flow style), in which case rules are located less precisely.
pub(crate) fn rule_spans(source: &str) -> Option<Vec<Span>> {
    list_spans(source, "rules")
}

/// Finds the items of the block-style top-level list `key:` (`rules`, `results`).
pub(crate) fn list_spans(source: &str, key: &str) -> Option<Vec<Span>> {
    let lines: Vec<&str> = source.lines().collect();
    let key = lines.iter().position(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .is_some_and(|rest| {
                let rest = rest.trim();
                rest.is_empty() || rest.starts_with('#')
            })
    })?;
    let mut spans: Vec<Span> = Vec::new();
    let mut item_indent = None;
    let mut last_content = key;
    for (n, line) in lines.iter().enumerate().skip(key + 1) {
        if is_blank(line) {
            continue;
        }
        let col = indent(line);
        let rest = &line[col..];
        let is_item = rest == "-" || rest.starts_with("- ");
        match item_indent {
            None if is_item => item_indent = Some(col),
            None => return None,
            Some(i) if col == i && is_item => {}
            Some(i) if col > i => {
                last_content = n;
                continue;
            }
            Some(_) => break,
        }
        if let Some(previous) = spans.last_mut() {
            previous.end = last_content + 1;
        }
        spans.push(Span {
            start: n,
            end: n + 1,
        });
        last_content = n;
    }
    if let Some(previous) = spans.last_mut() {
        previous.end = last_content + 1;
    }
    Some(spans)
}

/// The text of one item as a document of its own, with line and column numbers
/// unchanged: earlier lines become empty and the item's `-` becomes a space.
pub(crate) fn item_text(source: &str, span: Span) -> String {
    let mut text = "\n".repeat(span.start);
    for (n, line) in source
        .lines()
        .enumerate()
        .skip(span.start)
        .take(span.end - span.start)
    {
        if n == span.start {
            let col = indent(line);
            text.push_str(&line[..col]);
            text.push(' ');
            text.push_str(&line[col + 1..]);
        } else {
            text.push_str(line);
        }
        text.push('\n');
    }
    text
}

/// Deserializes one rule's item text.
pub(crate) fn item<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, PolicyError> {
    serde_yaml::from_str(text).map_err(|e| convert(&e, text, origin))
}

/// Deserializes a raw YAML value (used when rules are not in block style).
pub(crate) fn from_value<T: DeserializeOwned>(value: serde_yaml::Value) -> Result<T, String> {
    serde_yaml::from_value(value).map_err(|e| {
        let text = e.to_string();
        match text.rfind(" at line ") {
            Some(at) => text[..at].to_owned(),
            None => text,
        }
    })
}

/// A raw, not yet typed, YAML value.
pub(crate) type RawValue = serde_yaml::Value;

/// Where `text` first appears in the given lines as a whole word (a detector's name), as
/// 1-based (line, column).
pub(crate) fn find_word(source: &str, span: Span, text: &str) -> Option<(usize, usize)> {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    if text.is_empty() {
        return None;
    }
    source
        .lines()
        .enumerate()
        .skip(span.start)
        .take(span.end - span.start)
        .find_map(|(n, line)| {
            line.match_indices(text).find_map(|(col, _)| {
                let before = line[..col].chars().last();
                let after = line[col + text.len()..].chars().next();
                (!word(before) && !word(after)).then_some((n + 1, col + 1))
            })
        })
}

/// Where `key:` first appears in the given lines, as 1-based (line, column).
pub(crate) fn find_key(source: &str, span: Span, key: &str) -> Option<(usize, usize)> {
    let needle = format!("{key}:");
    source
        .lines()
        .enumerate()
        .skip(span.start)
        .take(span.end - span.start)
        .find_map(|(n, line)| {
            let col = line.find(&needle)?;
            let before = line[..col].chars().last();
            matches!(before, None | Some(' ' | '{' | ',' | '-')).then_some((n + 1, col + 1))
        })
}

/// The policy's top level, typed as `T` (whose rules stay raw values), with every
/// top-level error found.
///
/// serde stops at the first unknown key, which would hide every error after it (the
/// rules' too), so each unknown top-level key is reported, blanked out (line numbers
/// kept) and the text parsed again. When the top level still does not parse, `T` is
/// rebuilt from the raw document with `fallback`, so the rules are checked anyway.
/// Text that is not YAML at all is one error.
pub(crate) fn document<T: DeserializeOwned>(
    source: &str,
    origin: &str,
    fallback: impl FnOnce(&RawValue) -> T,
) -> Result<(T, Vec<PolicyError>), PolicyErrors> {
    check_size_and_emptiness(source, origin, "policy (version: 1, rules: [...])")?;
    let raw: RawValue = serde_yaml::from_str(source).map_err(|e| PolicyErrors {
        errors: vec![convert(&e, source, origin)],
    })?;
    let mut text = source.to_owned();
    let mut errors = Vec::new();
    // Each round blanks one key, so there are at most as many rounds as lines.
    for _ in 0..=source.lines().count() {
        let err = match serde_yaml::from_str::<T>(&text) {
            Ok(doc) => return Ok((doc, errors)),
            Err(err) => convert(&err, &text, origin),
        };
        let unknown = err.message.starts_with("unknown field");
        let blanked = unknown
            .then(|| blank_top_level_key(&text, err.line))
            .flatten();
        errors.push(err);
        match blanked {
            Some(next) => text = next,
            None => break,
        }
    }
    Ok((fallback(&raw), errors))
}

/// `source` with the top-level key on 1-based `line` (and its indented block) replaced
/// by empty lines; `None` when that line holds no top-level key.
fn blank_top_level_key(source: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = source.lines().collect();
    let start = line.checked_sub(1)?;
    let first = lines.get(start)?;
    if first.starts_with([' ', '\t', '#', '-']) || !first.contains(':') {
        return None;
    }
    let end = lines
        .iter()
        .enumerate()
        .skip(start + 1)
        .find(|(_, l)| !l.is_empty() && !l.starts_with([' ', '\t', '#']))
        .map_or(lines.len(), |(n, _)| n);
    let mut text = String::with_capacity(source.len());
    for (n, l) in lines.iter().enumerate() {
        if !(start..end).contains(&n) {
            text.push_str(l);
        }
        text.push('\n');
    }
    Some(text)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const SRC: &str = "version: 1\nrules:\n  - tool: a\n    action: allow\n\n  # comment\n  - tool: b\n    action: deny\ndefault: deny\n";

    #[test]
    fn finds_rule_items_and_keeps_their_lines() {
        let spans = rule_spans(SRC).unwrap();
        assert_eq!(
            spans,
            vec![Span { start: 2, end: 4 }, Span { start: 6, end: 8 }]
        );
        let text = item_text(SRC, spans[1]);
        assert_eq!(text.lines().nth(6), Some("    tool: b"));
        assert_eq!(find_key(SRC, spans[1], "action"), Some((8, 5)));
    }

    #[test]
    fn flow_style_rules_have_no_spans() {
        assert_eq!(
            rule_spans("version: 1\nrules: [{tool: a, action: allow}]\n"),
            None
        );
        assert_eq!(
            rule_spans("version: 1\nrules:\n- tool: a\n  action: allow\n")
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn errors_are_located() {
        let err = from_yaml_str::<serde_json::Value>("a: [1,\n", "x.yaml").unwrap_err();
        assert_eq!(err.errors[0].origin, "x.yaml");
        assert!(err.errors[0].line >= 1);
        let err = from_yaml_str::<serde_json::Value>("# only a comment\n", "x.yaml").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
