//! Tollgate's policy language: which tool calls an agent may make.
//!
//! The pipeline is `parse → validate → compile → evaluate`. It is pure: no I/O,
//! no async and no clock of its own (time is passed in), so it is easy to test,
//! fuzz and embed. Parsing collects every error in a file, each with its line
//! and column; evaluation is first-match over compiled patterns (a hash map for
//! exact names, one glob set for the rest).
//!
//! ```
//! use std::time::Duration;
//! use serde_json::json;
//! use tollgate_policy::{Action, Policy, RateLimiter, ToolCall, evaluate};
//!
//! let policy = Policy::from_yaml(
//!     "version: 1\ndefault: deny\nrules:\n  - tool: describe_*\n    action: allow\n    rate_limit: {max: 1, window: 60}\n",
//!     "example.yaml",
//! )?;
//! let args = json!({});
//! let call = ToolCall { tool: "describe_job", arguments: &args, client: None, session_key: "s1", client_key: "c1", user_key: "u1", claims: None, scopes: &[] };
//! let mut limiter = RateLimiter::new();
//! assert_eq!(evaluate(&policy, &mut limiter, &call, Duration::ZERO).action, Action::Allow);
//! assert_eq!(evaluate(&policy, &mut limiter, &call, Duration::from_secs(1)).action, Action::Deny);
//! # Ok::<(), tollgate_policy::PolicyErrors>(())
//! ```

mod detect;
mod doc;
mod error;
mod limiter;
mod policy;
mod results;
mod shadow;
mod yaml;

pub use detect::built_in_names as built_in_detectors;
pub use doc::{
    Action, ApprovalDoc, ApprovalVia, ClaimValue, ClaimValues, CustomDetectorDoc, DenyAs,
    DetectorDoc, Duration as DurationDoc, Mode, Per, PolicyDoc, RateLimitDoc, ResultDoc, RuleDoc,
    WhenDoc, parse_window, policy_schema,
};
pub use error::{PolicyError, PolicyErrors, PolicyWarning};
pub use limiter::{RateLimit, RateLimiter, Slot};
pub use policy::{
    Approval, Claims, DEFAULT_APPROVAL_TIMEOUT, DEFAULT_APPROVAL_VALID_FOR, Decision, DenyKind,
    Policy, Route, RuleInfo, RuleRef, ToolCall, counted_on, evaluate, limit_of, over_limit,
};
pub use results::{
    DECISION_META, REDACTIONS_META, RESULT_BLOCKED, Redaction, ResultEntryInfo, ResultRules,
    ResultVerdict,
};
pub use yaml::{MAX_SOURCE_BYTES, from_yaml_str};
