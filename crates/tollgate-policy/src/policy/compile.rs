//! Parsing, validating (collecting every error) and compiling a policy's YAML.

use hashbrown::HashMap;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::{Approval, Policy, Rule, RuleRef};
use crate::doc::{Action, DenyAs, Mode, PolicyDoc, RuleDoc, parse_window};
use crate::error::{PolicyError, PolicyErrors, PolicyWarning};
use crate::limiter::RateLimit;
use crate::matching::{Checker, compile_claims, is_glob};
use crate::yaml;

/// Compiles `rules:` (raw items, with their spans when written in block style),
/// reporting every problem to `check`.
fn compile_rules(
    check: &mut Checker<'_>,
    spans: Option<&[yaml::Span]>,
    raw: Vec<yaml::RawValue>,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (index, raw) in raw.into_iter().enumerate() {
        let span = spans.and_then(|s| s.get(index).copied());
        let parsed: Result<RuleDoc, PolicyError> = match span {
            Some(span) => yaml::item(&yaml::item_text(check.source, span), check.origin),
            None => yaml::from_value(raw).map_err(|message| PolicyError {
                origin: check.origin.to_owned(),
                line: 1,
                column: 1,
                message: format!("rules[{index}]: {message}"),
            }),
        };
        match parsed {
            Ok(rule) => {
                if let Some(rule) = compile_rule(check, span, index, rule) {
                    rules.push(rule);
                }
            }
            Err(error) => check.errors.push(error),
        }
    }
    rules
}

/// The rules by tool: exact names to their rules, and the globs (to build) with
/// the rule each stands for.
fn index_tools(
    check: &mut Checker<'_>,
    spans: Option<&[yaml::Span]>,
    rules: &[Rule],
) -> (HashMap<String, Vec<usize>>, GlobSetBuilder, Vec<usize>) {
    let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
    let mut globs = GlobSetBuilder::new();
    let mut glob_rules = Vec::new();
    for (index, rule) in rules.iter().enumerate() {
        if !is_glob(&rule.name.tool) {
            exact
                .entry(rule.name.tool.to_string())
                .or_default()
                .push(index);
            continue;
        }
        match GlobBuilder::new(&rule.name.tool)
            .literal_separator(false)
            .build()
        {
            Ok(glob) => {
                globs.add(glob);
                glob_rules.push(index);
            }
            Err(err) => {
                let span = spans.and_then(|s| s.get(rule.name.index).copied());
                check.at(
                    span,
                    "tool",
                    format!(
                        "rules[{}].tool: `{}` is not a valid glob: {}",
                        rule.name.index,
                        rule.name.tool,
                        err.kind()
                    ),
                );
            }
        }
    }
    (exact, globs, glob_rules)
}

impl Policy {
    /// Parses, validates (collecting every error) and compiles a policy. Pure.
    pub fn from_yaml(source: &str, origin: &str) -> Result<Policy, PolicyErrors> {
        let (doc, top_level_errors) = yaml::document(source, origin, lenient_doc)?;
        let mut check = Checker {
            source,
            origin,
            errors: top_level_errors,
        };
        if doc.version != 1 {
            check.at(
                Some(yaml::Span {
                    start: 0,
                    end: source.lines().count(),
                }),
                "version",
                format!("unsupported version {}: expected `version: 1`", doc.version),
            );
        }
        let spans = yaml::rule_spans(source).filter(|spans| spans.len() == doc.rules.len());
        let rules = compile_rules(&mut check, spans.as_deref(), doc.rules);
        let (exact, globs, glob_rules) = index_tools(&mut check, spans.as_deref(), &rules);
        let results = crate::results::compile(&mut check, doc.results, doc.mode);
        let globs = match globs.build() {
            Ok(set) => set,
            Err(err) => {
                check.at(
                    None,
                    "rules",
                    format!("the tool globs do not compile together: {err}"),
                );
                GlobSet::empty()
            }
        };
        if !check.errors.is_empty() {
            check.errors.sort_by_key(|e| (e.line, e.column));
            return Err(PolicyErrors {
                errors: check.errors,
            });
        }
        let shadowed = shadowed_rules(&rules);
        let warnings = shadow_warnings(&rules, &shadowed, origin);
        Ok(Policy {
            default: doc.default,
            mode: doc.mode,
            deny_as: doc.deny_as,
            rules,
            exact,
            globs,
            glob_rules,
            warnings,
            shadowed,
            results,
        })
    }
}

/// The top level of a policy whose top level has errors (already reported): the
/// rules, if they are a list, so they are checked too; defaults for the rest.
fn lenient_doc(raw: &yaml::RawValue) -> PolicyDoc<yaml::RawValue> {
    let list = |key: &str| match raw.get(key) {
        Some(yaml::RawValue::Sequence(items)) => items.clone(),
        _ => Vec::new(),
    };
    let rules = list("rules");
    let results = list("results");
    PolicyDoc {
        // A bad `version` was reported with the rest; do not report it twice.
        version: 1,
        default: Action::Deny,
        mode: Mode::default(),
        deny_as: DenyAs::default(),
        rules,
        results,
    }
}

fn shadowed_rules(rules: &[Rule]) -> Vec<(usize, usize)> {
    let shapes: Vec<crate::shadow::Shape<'_>> = rules
        .iter()
        .map(|rule| crate::shadow::Shape {
            tool: &rule.name.tool,
            clients: rule.clients.as_deref(),
            conditional: !rule.claims.is_empty(),
        })
        .collect();
    crate::shadow::shadowed(&shapes)
}

fn shadow_warnings(
    rules: &[Rule],
    shadowed: &[(usize, usize)],
    origin: &str,
) -> Vec<PolicyWarning> {
    shadowed
        .iter()
        .filter_map(|&(later, by)| {
            let (later, by) = (rules.get(later)?, rules.get(by)?);
            let arguments = if by.arguments.is_some() {
                format!(
                    " (a call failing rules[{}]'s `arguments` is denied there, not passed on)",
                    by.name.index
                )
            } else {
                String::new()
            };
            Some(PolicyWarning {
                origin: origin.to_owned(),
                line: later.at.0,
                column: later.at.1,
                message: format!(
                    "rules[{}] (`{}`) can never decide: rules[{}] (`{}`) at {origin}:{}:{} comes first and matches every call it matches{arguments}; remove it or move it above",
                    later.name.index, later.name.tool, by.name.index, by.name.tool, by.at.0, by.at.1
                ),
            })
        })
        .collect()
}

/// A rule's `rate_limit`, checked.
fn compile_rate_limit(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: &RuleDoc,
) -> Option<RateLimit> {
    match &doc.rate_limit {
        None => None,
        Some(_) if doc.action == Action::Deny => {
            check.at(span, "rate_limit", format!("rules[{index}].rate_limit: a deny rule lets nothing through, so a rate limit has no effect; remove it"));
            None
        }
        Some(limit) => {
            if limit.max == 0 {
                check.at(span, "max", format!("rules[{index}].rate_limit.max: must be at least 1 (use `action: deny` to refuse every call)"));
            }
            match parse_window(&limit.window) {
                Ok(window) => Some(RateLimit {
                    id: format!(
                        "{}|{:?}|{:?}|{}|{}|{:?}",
                        doc.tool,
                        doc.clients,
                        doc.when,
                        limit.max,
                        window.as_secs(),
                        limit.per
                    )
                    .into(),
                    max: limit.max,
                    window,
                    per: limit.per,
                }),
                Err(message) => {
                    check.at(
                        span,
                        "window",
                        format!("rules[{index}].rate_limit.window: {message}"),
                    );
                    None
                }
            }
        }
    }
}

/// A rule's `approval` settings, checked (the defaults where it has none).
fn compile_approval(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: &RuleDoc,
) -> Approval {
    let mut approval = Approval::default();
    if let Some(doc_approval) = &doc.approval {
        if doc.action != Action::RequireApproval {
            check.at(
                span,
                "approval",
                format!("rules[{index}].approval: only applies to `action: require_approval`"),
            );
        }
        approval.via = doc_approval.via;
        let mut duration = |value: &Option<crate::doc::Duration>, key: &str| {
            let parsed = parse_window(value.as_ref()?);
            parsed
                .map_err(|message| {
                    check.at(
                        span,
                        key,
                        format!("rules[{index}].approval.{key}: {message}"),
                    );
                })
                .ok()
        };
        if let Some(timeout) = duration(&doc_approval.timeout, "timeout") {
            approval.timeout = timeout;
        }
        approval.wait = duration(&doc_approval.wait, "wait");
        if let Some(valid_for) = duration(&doc_approval.valid_for, "valid_for") {
            approval.valid_for = valid_for;
        }
    }
    approval
}

fn compile_rule(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    index: usize,
    doc: RuleDoc,
) -> Option<Rule> {
    let before = check.errors.len();
    if doc.tool.is_empty() {
        check.at(span, "tool", format!("rules[{index}].tool: must not be empty: use an exact name or a glob like `describe_*`"));
    }
    if matches!(&doc.clients, Some(c) if c.is_empty()) {
        check.at(span, "clients", format!("rules[{index}].clients: an empty list matches no one; remove it to match every client"));
    }
    let claims = compile_claims(check, span, &format!("rules[{index}]"), doc.when.as_ref());
    let scopes = doc.scopes.clone().unwrap_or_default();
    if matches!(&doc.scopes, Some(s) if s.is_empty())
        || scopes
            .iter()
            .any(|s| s.is_empty() || s.contains(char::is_whitespace) || s.contains(['"', '\\']))
    {
        check.at(span, "scopes", format!("rules[{index}].scopes: list one or more scope names, each without spaces or quotes; remove it to need none"));
    }
    if !scopes.is_empty() && doc.action == Action::Deny {
        check.at(span, "scopes", format!("rules[{index}].scopes: a deny rule lets nothing through, so scopes have no effect; remove them"));
    }
    let rate_limit = compile_rate_limit(check, span, index, &doc);
    let approval = compile_approval(check, span, index, &doc);
    let arguments = match &doc.arguments {
        None => None,
        Some(schema) => match jsonschema::options().build(schema) {
            Ok(validator) => Some(validator),
            Err(err) => {
                check.at(
                    span,
                    "arguments",
                    format!("rules[{index}].arguments: not a valid JSON Schema: {err}"),
                );
                None
            }
        },
    };
    if check.errors.len() > before {
        return None;
    }
    let at = span
        .and_then(|s| yaml::find_key(check.source, s, "tool").or(Some((s.start + 1, 1))))
        .unwrap_or((1, 1));
    Some(Rule {
        name: RuleRef::new(index, &doc.tool),
        at,
        clients: doc.clients,
        claims,
        scopes,
        action: doc.action,
        reason: doc.reason,
        rate_limit,
        approval,
        arguments,
    })
}
