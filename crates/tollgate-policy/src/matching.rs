//! What the rules and the `results` entries share: the error collector of the file
//! being compiled, and whom a rule or an entry applies to (clients, token claims,
//! tool globs).

use serde_json::Value;

use crate::doc::{ClaimValue, ClaimValues, WhenDoc};
use crate::error::PolicyError;
use crate::yaml;

/// A token's claims, as decoded JSON.
pub type Claims = serde_json::Map<String, Value>;

pub(crate) fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '[', '{'])
}

/// Collects the errors of one file, each located.
pub(crate) struct Checker<'a> {
    pub(crate) source: &'a str,
    pub(crate) origin: &'a str,
    pub(crate) errors: Vec<PolicyError>,
}

impl Checker<'_> {
    /// An error at `key:` of the item `span` (at the item when the key is not found).
    pub(crate) fn at(&mut self, span: Option<yaml::Span>, key: &str, message: String) {
        let at = span.and_then(|s| yaml::find_key(self.source, s, key).or(Some((s.start + 1, 1))));
        self.error_at(at, message);
    }

    /// An error at 1-based (line, column), or at the file's start.
    pub(crate) fn error_at(&mut self, at: Option<(usize, usize)>, message: String) {
        let (line, column) = at.unwrap_or((1, 1));
        self.errors.push(PolicyError {
            origin: self.origin.to_owned(),
            line,
            column,
            message,
        });
    }
}

/// Whether `client` is one of `clients` (no list: anyone is).
pub(crate) fn client_matches(clients: Option<&[String]>, client: Option<&str>) -> bool {
    match clients {
        None => true,
        Some(clients) => client.is_some_and(|c| clients.iter().any(|allowed| allowed == c)),
    }
}

/// Whether `claims` satisfy every condition (no conditions: anyone does).
pub(crate) fn claims_match(conditions: &[(String, Vec<Value>)], claims: Option<&Claims>) -> bool {
    if conditions.is_empty() {
        return true;
    }
    let Some(claims) = claims else {
        return false;
    };
    conditions
        .iter()
        .all(|(name, wanted)| match claim(claims, name) {
            Some(Value::Array(items)) => items.iter().any(|item| wanted.contains(item)),
            Some(value) => wanted.contains(value),
            None => false,
        })
}

/// A claim by its name, else by a dotted path into nested objects (Keycloak's
/// `realm_access.roles`); a name is tried whole first, as namespaced claims
/// (`https://example.com/groups`) contain dots.
fn claim<'c>(claims: &'c Claims, name: &str) -> Option<&'c Value> {
    if let Some(value) = claims.get(name) {
        return Some(value);
    }
    let mut parts = name.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// `when.claims` of a rule or a `results` entry (`label`: `rules[0]`): each claim (by
/// name) and the values one of which it must match.
pub(crate) fn compile_claims(
    check: &mut Checker<'_>,
    span: Option<yaml::Span>,
    label: &str,
    when: Option<&WhenDoc>,
) -> Vec<(String, Vec<Value>)> {
    let mut claims = Vec::new();
    for (name, values) in when.iter().flat_map(|w| &w.claims) {
        let values = match values {
            ClaimValues::One(one) => vec![one],
            ClaimValues::Any(any) => any.iter().collect(),
        };
        if name.is_empty() || values.is_empty() {
            check.at(span, "when", format!("{label}.when.claims: `{name}` needs a claim name and at least one value; remove it to match everyone"));
            continue;
        }
        let values = values
            .into_iter()
            .map(|v| match v {
                ClaimValue::Text(t) => Value::from(t.as_str()),
                ClaimValue::Integer(n) => Value::from(*n),
                ClaimValue::Bool(b) => Value::from(*b),
            })
            .collect();
        claims.push((name.clone(), values));
    }
    if when.is_some_and(|w| w.claims.is_empty()) {
        check.at(
            span,
            "when",
            format!("{label}.when: names no condition; add `claims:` or remove it"),
        );
    }
    claims
}
