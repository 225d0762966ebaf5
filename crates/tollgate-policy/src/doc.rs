//! The policy file as written: serde types, also the source of `tollgate schema`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What a rule (or the default) does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Forward the call.
    Allow,
    /// Refuse it with the rule's reason.
    Deny,
    /// Hold it until a human approves.
    RequireApproval,
}

/// Enforce decisions, or only log them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Refuse what the policy denies.
    #[default]
    Enforce,
    /// Decide and log, but let everything through.
    Audit,
}

/// How a refusal is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DenyAs {
    /// A tool result with `isError: true` the model can read.
    #[default]
    Result,
    /// A JSON-RPC error, code -32001.
    Error,
}

/// Which calls share a rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// Each downstream MCP session (in the stateless era: the client, else the peer address).
    #[default]
    Session,
    /// Each client: an API key's name, an OAuth token's client (`azp` / `client_id`),
    /// else the peer address.
    Client,
    /// Each user: an OAuth token's `sub`, an API key's client name, else the peer address.
    User,
    /// All calls the rule matches.
    Global,
}

/// How a human is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalVia {
    /// The admin queue: API, web page, CLI, webhook.
    #[default]
    Queue,
    /// The MCP client's own user, with an `elicitation/create` form (on the open stream in
    /// the handshake era, in an `InputRequiredResult` in the stateless era).
    Elicitation,
}

/// Seconds, or a number with `s`, `m` or `h`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Duration {
    /// Seconds.
    Seconds(u64),
    /// `30s`, `1m`, `1h`.
    Text(String),
}

/// `rate_limit:` of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    /// At most this many calls…
    pub max: u32,
    /// …in any rolling window of this length.
    pub window: Duration,
    /// Who shares the limit.
    #[serde(default)]
    pub per: Per,
}

/// `approval:` of a rule.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDoc {
    /// How long a human has (default 300 seconds, may be hours); then the call is denied.
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// How long one request is held open waiting (default `approvals.wait` of the
    /// configuration, 45 s); then the client is told the approval is pending and to retry.
    #[serde(default)]
    pub wait: Option<Duration>,
    /// How long after the decision an approved call may be retried (default 10 minutes);
    /// the first matching retry uses the approval up.
    #[serde(default)]
    pub valid_for: Option<Duration>,
    /// Where the human is asked.
    #[serde(default)]
    pub via: ApprovalVia,
}

/// A value a claim is compared with.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ClaimValue {
    /// A string claim, or an element of an array claim.
    Text(String),
    /// A number.
    Integer(i64),
    /// A boolean.
    Bool(bool),
}

/// One value, or a list of which the claim must match one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ClaimValues {
    /// One value.
    One(ClaimValue),
    /// Any of these.
    Any(Vec<ClaimValue>),
}

/// `when:` of a rule: what the caller must be for the rule to apply.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenDoc {
    /// Claims of the caller's OAuth token, by name (a name with dots, like
    /// `realm_access.roles`, also reaches into nested objects). A string claim must
    /// equal one of the values, an array claim contain one; every claim listed must
    /// match. A caller without a token (an API key, anonymous) matches no claims.
    #[serde(default)]
    pub claims: std::collections::BTreeMap<String, ClaimValues>,
}

/// One rule. Rules are ordered; the first whose `tool` (and `clients`, `when`) match decides.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    /// Exact tool name, or a glob: `*`, `?`, `[abc]`.
    pub tool: String,
    /// Only for these authenticated clients.
    #[serde(default)]
    pub clients: Option<Vec<String>>,
    /// What to do.
    pub action: Action,
    /// Shown to the agent and the approver.
    #[serde(default)]
    pub reason: Option<String>,
    /// At most `max` calls per rolling `window`, counted only for calls let through.
    #[serde(default)]
    pub rate_limit: Option<RateLimitDoc>,
    /// Settings of `require_approval`.
    #[serde(default)]
    pub approval: Option<ApprovalDoc>,
    /// A JSON Schema the call's arguments must satisfy, else the call is denied.
    #[serde(default)]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub arguments: Option<serde_json::Value>,
    /// Only for callers whose token's claims match.
    #[serde(default)]
    pub when: Option<WhenDoc>,
    /// OAuth scopes the caller's token must carry for the rule to let a call through;
    /// without them the call is refused with `insufficient_scope` (HTTP 403), so the
    /// client can ask for them and retry.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// A detector of a result rule: a built-in's name, or a pattern of one's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum DetectorDoc {
    /// A built-in detector: `aws_access_key`, `private_key`, `jwt`, `github_token`,
    /// `slack_token`, `us_ssn`, `credit_card`, `email`.
    BuiltIn(#[schemars(schema_with = "built_in_detector_schema")] String),
    /// A detector of one's own.
    Custom(CustomDetectorDoc),
}

/// The built-in detectors' names, as the detectors themselves list them.
fn built_in_detector_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let names: Vec<&str> = crate::detect::built_in_names().collect();
    schemars::Schema::try_from(serde_json::json!({"type": "string", "enum": names}))
        .unwrap_or_default()
}

/// `{name, pattern}`: a detector of one's own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CustomDetectorDoc {
    /// Shown in the `[redacted:<name>]` marker, the audit log and metrics: letters,
    /// digits and `_`, not a built-in's name.
    pub name: String,
    /// A regular expression in the `regex` crate's syntax (linear time: no
    /// backreferences, no look-around), matching at least one character.
    pub pattern: String,
}

// By hand: an untagged enum's error says only that nothing matched.
impl<'de> Deserialize<'de> for DetectorDoc {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = DetectorDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "a detector: a built-in's name (like `aws_access_key`) or `{name, pattern}`",
                )
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<DetectorDoc, E> {
                Ok(DetectorDoc::BuiltIn(name.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DetectorDoc, A::Error> {
                CustomDetectorDoc::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(DetectorDoc::Custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// One entry of `results:`. Every entry whose `tool` (and `clients`, `when`) match a
/// call applies to its result.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResultDoc {
    /// Exact tool name, or a glob: `*`, `?`, `[abc]`.
    pub tool: String,
    /// Only for these authenticated clients.
    #[serde(default)]
    pub clients: Option<Vec<String>>,
    /// Only for callers whose token's claims match.
    #[serde(default)]
    pub when: Option<WhenDoc>,
    /// Detectors whose matches are replaced by `[redacted:<name>]`.
    #[serde(default)]
    pub redact: Vec<DetectorDoc>,
    /// Detectors whose match withholds the whole result.
    #[serde(default)]
    pub block: Vec<DetectorDoc>,
    /// `audit`: record what the entry finds without changing the result (the policy's
    /// own `mode: audit` does so for every entry).
    #[serde(default)]
    pub mode: Option<Mode>,
}

/// A policy file. `R` is the rule type: [`RuleDoc`], or a raw value while loading; `S`
/// the type of a `results:` entry: [`ResultDoc`], or a raw value.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc<R, S = R> {
    /// Always 1.
    pub version: u32,
    /// The decision when no rule matches.
    #[serde(default = "default_action")]
    pub default: Action,
    /// `enforce` (default) or `audit`.
    #[serde(default)]
    pub mode: Mode,
    /// `result` (default) or `error`.
    #[serde(default)]
    pub deny_as: DenyAs,
    /// Ordered rules; the first match decides.
    #[serde(default)]
    pub rules: Vec<R>,
    /// What to redact or withhold in tools' results; every matching entry applies.
    #[serde(default)]
    pub results: Vec<S>,
}

fn default_action() -> Action {
    Action::Deny
}

/// Parses `30`, `30s`, `5m`, `1h` into seconds; 0 and anything else is refused.
pub fn parse_window(duration: &Duration) -> Result<std::time::Duration, String> {
    let seconds = match duration {
        Duration::Seconds(n) => Some(*n),
        Duration::Text(text) => {
            let text = text.trim();
            let split = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            let (digits, unit) = text.split_at(split);
            let n = digits.parse::<u64>().ok();
            match (n, unit) {
                (Some(n), "" | "s") => Some(n),
                (Some(n), "m") => n.checked_mul(60),
                (Some(n), "h") => n.checked_mul(3600),
                _ => None,
            }
        }
    };
    match seconds {
        Some(0) => Err("must be more than 0 seconds".to_owned()),
        Some(n) => Ok(std::time::Duration::from_secs(n)),
        None => Err(format!(
            "`{}` is not a duration: expected seconds, or a number with s, m or h (e.g. 30s, 1m, 1h)",
            match duration {
                Duration::Text(t) => t.clone(),
                Duration::Seconds(n) => n.to_string(),
            }
        )),
    }
}

/// What the schema says about a whole policy file, for someone editing one.
const SCHEMA_DESCRIPTION: &str = "A Tollgate policy: which MCP tool calls an agent may make. \
Rules are tried in order and the first whose `tool` (and `clients`, `when`) match decides: allow, deny, or \
require_approval (a human decides). A rule may also rate-limit calls and check their arguments \
against a JSON Schema. `default` decides calls no rule matches. `results` entries redact or withhold \
secrets and personal data in what tools return. Check a file with `tollgate validate`.";

/// The JSON Schema of a policy file, for editors.
pub fn policy_schema() -> serde_json::Value {
    let schema = schemars::schema_for!(PolicyDoc<RuleDoc, ResultDoc>);
    let mut value = serde_json::to_value(schema).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert("title".into(), "Tollgate policy".into());
        // The type's own doc comment is for Rust readers (it explains `R`).
        map.insert("description".into(), SCHEMA_DESCRIPTION.into());
    }
    value
}
