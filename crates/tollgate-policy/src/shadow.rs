//! Rules that can never decide: an earlier rule matches every call they match.
//!
//! Rules match on `tool`, `clients` and `when` only (a rule with `when` covers no later rule) (a failing `arguments` schema denies the
//! call at that rule; later rules are not consulted), so a rule is shadowed when an
//! earlier rule's tool pattern covers its pattern and the earlier rule applies to at
//! least the clients it applies to. Whether one glob covers another is undecidable in
//! general here; the check knows identical patterns, match-everything globs, `prefix*`
//! and `*suffix`, and exact names, and stays silent otherwise (no false warnings).

use globset::{GlobBuilder, GlobMatcher};

/// What the shadowing check needs of a rule.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape<'a> {
    /// Its `tool` pattern.
    pub tool: &'a str,
    /// Its `clients`, `None` for everyone.
    pub clients: Option<&'a [String]>,
    /// Whether it applies only to callers whose claims match (`when`).
    pub conditional: bool,
}

/// Characters with a meaning in a glob (`\` escapes one).
const META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// Whether every name `later` matches is matched by `earlier` (`matcher` is
/// `earlier` compiled, when it is a glob).
fn pattern_covers(earlier: &str, matcher: Option<&GlobMatcher>, later: &str) -> bool {
    if earlier == later || (!earlier.is_empty() && earlier.chars().all(|c| c == '*')) {
        return true;
    }
    if !is_glob(earlier) {
        // An exact name covers only itself.
        return false;
    }
    if !is_glob(later) {
        return matcher.is_some_and(|m| m.is_match(later));
    }
    // Both globs: `P*` covers whatever starts with P, `*S` whatever ends with S.
    let later_prefix = later.split(META).next().unwrap_or("");
    let later_suffix = later.rsplit(META).next().unwrap_or("");
    if let Some(prefix) = earlier.strip_suffix('*')
        && !prefix.contains(META)
    {
        return later_prefix.starts_with(prefix);
    }
    if let Some(suffix) = earlier.strip_prefix('*')
        && !suffix.contains(META)
    {
        return later_suffix.ends_with(suffix);
    }
    false
}

/// Whether `earlier` applies to every client `later` applies to.
fn clients_cover(earlier: Option<&[String]>, later: Option<&[String]>) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(earlier), Some(later)) => later.iter().all(|c| earlier.contains(c)),
    }
}

/// For each rule that can never decide: `(its index, the index of the first earlier
/// rule that decides every call it matches)`.
pub(crate) fn shadowed(rules: &[Shape<'_>]) -> Vec<(usize, usize)> {
    // Compiled once each: a policy may have a thousand exact names after its globs.
    let matchers: Vec<Option<GlobMatcher>> = rules
        .iter()
        .map(|rule| {
            is_glob(rule.tool)
                .then(|| GlobBuilder::new(rule.tool).literal_separator(false).build())
                .and_then(Result::ok)
                .map(|glob| glob.compile_matcher())
        })
        .collect();
    let mut found = Vec::new();
    for (later, shape) in rules.iter().enumerate() {
        let by = rules
            .iter()
            .zip(&matchers)
            .take(later)
            .position(|(earlier, matcher)| {
                !earlier.conditional
                    && pattern_covers(earlier.tool, matcher.as_ref(), shape.tool)
                    && clients_cover(earlier.clients, shape.clients)
            });
        if let Some(by) = by {
            found.push((later, by));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn shape(tool: &str) -> Shape<'_> {
        Shape {
            tool,
            clients: None,
            conditional: false,
        }
    }

    #[test]
    fn everything_after_a_star_is_shadowed() {
        let rules = [shape("a"), shape("*"), shape("b"), shape("c_*")];
        assert_eq!(shadowed(&rules), vec![(2, 1), (3, 1)]);
    }

    #[test]
    fn a_glob_shadows_the_names_and_narrower_globs_it_covers() {
        let rules = [
            shape("describe_*"),
            shape("describe_job"),
            shape("describe_fhir_*"),
            shape("list_*"),
            shape("*_job"),
            shape("cancel_job"),
            shape("x*_job"),
            shape("describe_[ab]"),
            shape("describe_*"),
        ];
        assert_eq!(
            shadowed(&rules),
            vec![(1, 0), (2, 0), (5, 4), (6, 4), (7, 0), (8, 0)]
        );
    }

    #[test]
    fn no_warning_when_it_is_not_certain() {
        // `a?c` matches `abc` but the check cannot prove glob-over-glob beyond prefix/suffix.
        let rules = [
            shape("a?c"),
            shape("a[b]c"),
            shape("exact"),
            shape("exact_*"),
        ];
        assert_eq!(shadowed(&rules), vec![]);
        let rules = [shape("describe_*"), shape("describe")];
        assert_eq!(shadowed(&rules), vec![]);
    }

    #[test]
    fn clients_narrow_what_a_rule_covers() {
        let ci = ["ci".to_owned()];
        let both = ["ci".to_owned(), "ops".to_owned()];
        let rules = [
            Shape {
                tool: "deploy",
                clients: Some(&ci),
                conditional: false,
            },
            shape("deploy"),
            Shape {
                tool: "deploy",
                clients: Some(&both),
                conditional: false,
            },
        ];
        // The client-scoped rule first leaves room for everyone else; the unscoped one
        // then decides every call, whoever makes it.
        assert_eq!(shadowed(&rules), vec![(2, 1)]);
        let rules = [
            Shape {
                tool: "*",
                clients: Some(&both),
                conditional: false,
            },
            Shape {
                tool: "deploy",
                clients: Some(&ci),
                conditional: false,
            },
        ];
        assert_eq!(shadowed(&rules), vec![(1, 0)]);
    }
}
