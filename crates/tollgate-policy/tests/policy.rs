//! The policy language: loading errors, evaluation, and a loader that never panics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate_policy::{Action, DenyKind, Policy, RateLimiter, ToolCall, evaluate};

fn load(src: &str) -> Policy {
    Policy::from_yaml(src, "p.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn errors(src: &str) -> Vec<String> {
    match Policy::from_yaml(src, "p.yaml") {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

fn call<'a>(tool: &'a str, args: &'a Value) -> ToolCall<'a> {
    ToolCall {
        tool,
        arguments: args,
        client: None,
        session_key: "s",
        client_key: "c",
        user_key: "u",
        claims: None,
        scopes: &[],
    }
}

const HEALTHLAKE: &str = r#"
version: 1
default: deny
rules:
  - tool: start_fhir_export_job
    action: require_approval
    reason: Bulk export of patient data needs a human.
    rate_limit: { max: 10, window: 60 }
    approval: { timeout: 120 }
    arguments:
      type: object
      required: [datastore_id, output_data_config, data_access_role_arn]
      properties:
        output_data_config:
          type: object
          properties:
            s3_configuration:
              type: object
              properties:
                s3_uri: { type: string, pattern: "^s3://approved-exports/" }
  - tool: "describe_*"
    action: allow
  - tool: "delete_*"
    action: deny
    reason: Deleting data stores is never done by agents.
"#;

fn export(uri: &str) -> Value {
    json!({"datastore_id": "0123456789abcdef0123456789abcdef", "data_access_role_arn": "arn:aws:iam::1:role/x",
           "output_data_config": {"s3_configuration": {"s3_uri": uri}}})
}

#[test]
fn first_match_decides_with_reasons() {
    let p = load(HEALTHLAKE);
    let none = json!({});
    let d = p.evaluate(&call("describe_fhir_export_job", &none));
    assert_eq!(d.action, Action::Allow);
    assert_eq!(d.rule.unwrap().to_string(), "rules[1] (describe_*)");
    let d = p.evaluate(&call("delete_fhir_datastore", &none));
    assert_eq!((d.action, d.kind), (Action::Deny, Some(DenyKind::Deny)));
    assert_eq!(d.reason, "Deleting data stores is never done by agents.");
    let d = p.evaluate(&call("unknown", &none));
    assert_eq!(
        (d.action, d.kind, d.rule),
        (Action::Deny, Some(DenyKind::Deny), None)
    );
    assert!(d.reason.contains("default is deny"));
    let ok = export("s3://approved-exports/a");
    let d = p.evaluate(&call("start_fhir_export_job", &ok));
    assert_eq!(d.action, Action::RequireApproval);
    assert_eq!(d.approval.unwrap().timeout, Duration::from_secs(120));
}

#[test]
fn argument_failures_quote_the_path() {
    let p = load(HEALTHLAKE);
    let bad = export("s3://elsewhere/a");
    let d = p.evaluate(&call("start_fhir_export_job", &bad));
    assert_eq!(
        (d.action, d.kind),
        (Action::Deny, Some(DenyKind::Arguments))
    );
    assert_eq!(
        d.failing_path.as_deref(),
        Some("/output_data_config/s3_configuration/s3_uri")
    );
    assert!(
        d.reason
            .contains("/output_data_config/s3_configuration/s3_uri"),
        "{}",
        d.reason
    );
    let d = p.evaluate(&call("start_fhir_export_job", &Value::Null));
    assert_eq!(
        d.kind,
        Some(DenyKind::Arguments),
        "missing arguments are checked as {{}}"
    );
    let meta = d.meta_json();
    assert_eq!(meta["kind"], "arguments");
    assert_eq!(meta["tool"], "start_fhir_export_job");
}

#[test]
fn rate_limits_count_only_calls_let_through_and_say_when_to_retry() {
    let p = load(HEALTHLAKE);
    let mut limiter = RateLimiter::new();
    let ok = export("s3://approved-exports/a");
    let bad = export("s3://elsewhere/a");
    for _ in 0..5 {
        assert_eq!(
            evaluate(
                &p,
                &mut limiter,
                &call("start_fhir_export_job", &bad),
                Duration::ZERO
            )
            .kind,
            Some(DenyKind::Arguments)
        );
    }
    for i in 0..10 {
        let d = evaluate(
            &p,
            &mut limiter,
            &call("start_fhir_export_job", &ok),
            Duration::from_secs(i),
        );
        assert_eq!(d.action, Action::RequireApproval, "call {i}");
        assert!(d.slot.is_some());
    }
    let d = evaluate(
        &p,
        &mut limiter,
        &call("start_fhir_export_job", &ok),
        Duration::from_secs(30),
    );
    assert_eq!(d.kind, Some(DenyKind::RateLimit));
    assert_eq!(d.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(d.meta_json()["retry_after_ms"], 30_000);
    // Other sessions have their own quota.
    let other = ToolCall {
        session_key: "s2",
        ..call("start_fhir_export_job", &ok)
    };
    assert_eq!(
        evaluate(&p, &mut limiter, &other, Duration::from_secs(30)).action,
        Action::RequireApproval
    );
}

#[test]
fn per_client_and_global_limits_use_their_keys() {
    let p = load(
        "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 1m, per: client}\n  - tool: b\n    action: allow\n    rate_limit: {max: 1, window: 1h, per: global}\n",
    );
    let mut limiter = RateLimiter::new();
    let none = json!({});
    let first = ToolCall {
        session_key: "s1",
        client_key: "alice",
        ..call("a", &none)
    };
    let new_session = ToolCall {
        session_key: "s2",
        ..first
    };
    let bob = ToolCall {
        client_key: "bob",
        ..new_session
    };
    assert_eq!(
        evaluate(&p, &mut limiter, &first, Duration::ZERO).action,
        Action::Allow
    );
    assert_eq!(
        evaluate(&p, &mut limiter, &new_session, Duration::ZERO).kind,
        Some(DenyKind::RateLimit)
    );
    assert_eq!(
        evaluate(&p, &mut limiter, &bob, Duration::ZERO).action,
        Action::Allow
    );
    let g1 = ToolCall {
        client_key: "x",
        ..call("b", &none)
    };
    let g2 = ToolCall {
        client_key: "y",
        session_key: "z",
        ..call("b", &none)
    };
    assert_eq!(
        evaluate(&p, &mut limiter, &g1, Duration::ZERO).action,
        Action::Allow
    );
    assert_eq!(
        evaluate(&p, &mut limiter, &g2, Duration::from_secs(3599)).retry_after,
        Some(Duration::from_secs(1))
    );
}

#[test]
fn client_scoped_rules_and_hidden_tools() {
    let p = load(
        "version: 1\ndefault: deny\nrules:\n  - tool: deploy\n    clients: [ci-agent]\n    action: allow\n  - tool: \"*\"\n    action: deny\n  - tool: never_reached\n    action: allow\n",
    );
    let none = json!({});
    let ci = ToolCall {
        client: Some("ci-agent"),
        ..call("deploy", &none)
    };
    assert_eq!(p.evaluate(&ci).action, Action::Allow);
    assert_eq!(p.evaluate(&call("deploy", &none)).action, Action::Deny);
    assert!(p.hides_tool("deploy", None, None));
    assert!(!p.hides_tool("deploy", Some("ci-agent"), None));
    assert!(
        p.hides_tool("never_reached", None, None),
        "first match wins"
    );
    let audit = load("version: 1\nmode: audit\ndefault: deny\nrules: []\n");
    assert!(!audit.hides_tool("anything", None, None));
}

#[test]
fn globs_match_names_with_any_characters() {
    let p = load(
        "version: 1\nrules:\n  - tool: \"describe_?\"\n    action: allow\n  - tool: \"get_[ab]*\"\n    action: allow\n  - tool: \"*\"\n    action: require_approval\n",
    );
    let none = json!({});
    assert_eq!(p.evaluate(&call("describe_x", &none)).action, Action::Allow);
    assert_eq!(
        p.evaluate(&call("describe_xy", &none)).action,
        Action::RequireApproval
    );
    assert_eq!(p.evaluate(&call("get_b/../x", &none)).action, Action::Allow);
    assert_eq!(p.evaluate(&call("", &none)).action, Action::RequireApproval);
    assert_eq!(
        p.evaluate(&call("\u{0}\u{202e}evil", &none)).action,
        Action::RequireApproval
    );
}

#[test]
fn every_error_in_a_file_is_reported_with_its_location() {
    let src = "version: 1\nrules:\n  - tool: a\n    actoin: deny\n  - tool: b\n    action: allow\n    rate_limit: {max: 0, window: soon}\n  - tool: \"[oops\"\n    action: allow\n  - tool: c\n    action: allow\n    arguments: {type: 12}\n";
    let errs = errors(src);
    assert!(
        errs.iter()
            .any(|e| e.starts_with("p.yaml:4:5: unknown field `actoin`, expected one of")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("p.yaml:7:") && e.contains("max: must be at least 1")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("p.yaml:7:") && e.contains("`soon` is not a duration")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("p.yaml:8:") && e.contains("not a valid glob")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.starts_with("p.yaml:12:") && e.contains("not a valid JSON Schema")),
        "{errs:#?}"
    );
}

#[test]
fn top_level_errors_hide_neither_each_other_nor_the_rules() {
    let errs = errors(
        "version: 1\ndefualt: deny\nmode: maybe\nrules:\n  - tool: a\n    actoin: allow\n  - tool: b\n    action: allow\n    rate_limit: {max: 0, window: 1m}\n",
    );
    assert!(
        errs[0].starts_with("p.yaml:2:1: unknown field `defualt`"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("p.yaml:3:7: mode: unknown variant `maybe`"),
        "{errs:?}"
    );
    assert!(
        errs[2].starts_with("p.yaml:6:5: unknown field `actoin`"),
        "{errs:?}"
    );
    assert!(
        errs[3].contains("rate_limit.max: must be at least 1"),
        "{errs:?}"
    );
    assert_eq!(errs.len(), 4, "{errs:?}");
    let errs = errors("version: 1\nrules:\n  - tool: a\n\t  action: allow\n");
    assert!(
        errs[0].contains("tabs are not allowed for indentation in YAML"),
        "{errs:?}"
    );
}

#[test]
fn bad_files_get_clear_errors() {
    let cases: &[(&str, &str)] = &[
        ("", "empty"),
        ("# nothing\n", "empty"),
        ("version: 1\nrules: [\n", "p.yaml:"),
        ("version: 2\nrules: []\n", "expected `version: 1`"),
        ("version: one\n", "version"),
        ("rules: []\n", "missing field `version`"),
        ("version: 1\nversion: 1\n", "duplicate"),
        (
            "version: 1\nrules:\n  - tool: a\n    action: maybe\n",
            "unknown variant `maybe`",
        ),
        (
            "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 0}\n",
            "more than 0",
        ),
        (
            "version: 1\nrules:\n  - tool: a\n    action: deny\n    rate_limit: {max: 1, window: 1}\n",
            "no effect",
        ),
        ("- just\n- a list\n", "p.yaml:1:1"),
    ];
    for (src, expected) in cases {
        let errs = errors(src).join("\n");
        assert!(errs.contains(expected), "{src:?}: {errs}");
        assert!(errs.starts_with("p.yaml:"), "{errs}");
    }
    let huge = format!("version: 1\nrules: []\n#{}\n", "x".repeat(10 << 20));
    assert!(errors(&huge)[0].contains("at most 1048576 bytes"));
}

#[test]
fn flow_style_rules_are_checked_too() {
    let errs = errors("version: 1\nrules: [{tool: a, action: allow}, {tool: b, acton: deny}]\n");
    assert!(
        errs.iter()
            .any(|e| e.contains("rules[1]") && e.contains("acton")),
        "{errs:?}"
    );
    load("version: 1\nrules: [{tool: a, action: allow}]\n");
}

#[test]
fn a_thousand_exact_rules_compile_and_decide() {
    let mut src = String::from("version: 1\nrules:\n");
    for i in 0..1000 {
        src.push_str(&format!("  - tool: t{i}\n    action: allow\n"));
    }
    let p = load(&src);
    assert_eq!(p.len(), 1000);
    let none = json!({});
    assert_eq!(p.evaluate(&call("t999", &none)).rule.unwrap().index, 999);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_loader_never_panics_on_any_text(src in ".{0,400}") {
        let _ = Policy::from_yaml(&src, "fuzz.yaml");
    }

    #[test]
    fn the_loader_never_panics_on_policy_shaped_text(
        tool in "[a-z_*?\\[\\]{}]{0,12}",
        action in "(allow|deny|require_approval|x)",
        max in 0u32..5,
        window in "(0|1|30s|1m|soon|-1|1h)",
        extra in "[a-z: \\-\\[\\]{}\n]{0,40}",
    ) {
        let src = format!("version: 1\nrules:\n  - tool: \"{tool}\"\n    action: {action}\n    rate_limit: {{max: {max}, window: {window}}}\n{extra}");
        if let Ok(policy) = Policy::from_yaml(&src, "fuzz.yaml") {
            let none = json!({});
            let mut limiter = RateLimiter::new();
            let _ = evaluate(&policy, &mut limiter, &call(&tool, &none), Duration::ZERO);
        }
    }

    #[test]
    fn compiled_exact_rules_always_match_their_own_name(names in proptest::collection::vec("[a-z]{1,8}", 1..20)) {
        let mut src = String::from("version: 1\nrules:\n");
        for name in &names {
            src.push_str(&format!("  - tool: {name}\n    action: allow\n"));
        }
        let policy = load(&src);
        let none = json!({});
        for name in &names {
            let d = policy.evaluate(&call(name, &none));
            let first = names.iter().position(|n| n == name).unwrap();
            prop_assert_eq!(d.rule.unwrap().index, first);
        }
    }
}

#[test]
fn rate_limit_state_survives_a_reload_that_keeps_the_rule() {
    let before = load(
        "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 60}\n",
    );
    // Reordered, with a new rule in front: the limit of `a` is the same, so its state carries over.
    let after = load(
        "version: 1\nrules:\n  - tool: b\n    action: allow\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 60}\n",
    );
    let changed = load(
        "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 2, window: 60}\n",
    );
    let mut limiter = RateLimiter::new();
    let none = json!({});
    assert_eq!(
        evaluate(&before, &mut limiter, &call("a", &none), Duration::ZERO).action,
        Action::Allow
    );
    let d = evaluate(
        &after,
        &mut limiter,
        &call("a", &none),
        Duration::from_secs(1),
    );
    assert_eq!(
        d.kind,
        Some(DenyKind::RateLimit),
        "the reload did not reset the window"
    );
    let d = evaluate(
        &changed,
        &mut limiter,
        &call("a", &none),
        Duration::from_secs(2),
    );
    assert_eq!(d.action, Action::Allow, "a changed limit starts afresh");
}

#[test]
fn a_rule_that_can_never_decide_is_a_warning_naming_both_rules() {
    let p = load(
        "version: 1\nrules:\n  - tool: describe_*\n    action: allow\n  - tool: describe_job\n    action: deny\n  - tool: deploy\n    clients: [ci]\n    action: allow\n  - tool: deploy\n    action: deny\n  - tool: \"*\"\n    action: deny\n  - tool: anything\n    action: allow\n",
    );
    let warnings: Vec<String> = p.warnings().iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("p.yaml:5:5: rules[1] (`describe_job`) can never decide: rules[0] (`describe_*`) at p.yaml:3:5"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].starts_with(
            "p.yaml:14:5: rules[5] (`anything`) can never decide: rules[4] (`*`) at p.yaml:12:5"
        ),
        "{warnings:?}"
    );
    assert!(load(HEALTHLAKE).warnings().is_empty());
}

#[test]
fn names_tool_is_true_only_for_names_a_rule_matches() {
    let p = load(
        "version: 1\ndefault: allow\nrules:\n  - tool: deploy\n    action: deny\n  - tool: \"describe_*\"\n    action: allow\n",
    );
    assert!(p.names_tool("deploy"));
    assert!(p.names_tool("describe_job"), "a glob names what it matches");
    assert!(!p.names_tool("Deploy"));
    assert!(!p.names_tool("made_up"));
    assert!(!p.names_tool("x\",decision=\"deny\"} 1"));
}

#[test]
fn approval_wait_and_valid_for_are_read_and_checked() {
    let p = load(
        "version: 1\nrules:\n  - tool: t\n    action: require_approval\n    approval: { timeout: 1h, wait: 20s, valid_for: 2m }\n  - tool: u\n    action: require_approval\n",
    );
    let none = json!({});
    let a = p.evaluate(&call("t", &none)).approval.unwrap();
    assert_eq!(
        (a.timeout, a.wait, a.valid_for),
        (
            Duration::from_secs(3600),
            Some(Duration::from_secs(20)),
            Duration::from_secs(120)
        )
    );
    let a = p.evaluate(&call("u", &none)).approval.unwrap();
    assert_eq!(
        (a.timeout, a.wait, a.valid_for),
        (Duration::from_secs(300), None, Duration::from_secs(600))
    );
    let errs = errors(
        "version: 1\nrules:\n  - tool: t\n    action: require_approval\n    approval: { wait: soon, valid_for: 0 }\n",
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("rules[0].approval.wait: `soon` is not a duration")),
        "{errs:?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("rules[0].approval.valid_for: must be more than 0")),
        "{errs:?}"
    );
}
fn claims(value: Value) -> tollgate_policy::Claims {
    match value {
        Value::Object(map) => map,
        _ => panic!("claims must be an object"),
    }
}

#[test]
fn rules_match_on_token_claims() {
    let p = load(
        "version: 1\ndefault: deny\nrules:\n  - tool: query\n    when: {claims: {groups: [sre, data-eng], \"realm_access.roles\": admin}}\n    action: allow\n  - tool: query\n    when: {claims: {tenant: 42}}\n    action: allow\n  - tool: query\n    action: deny\n    reason: only SRE may query\n",
    );
    let none = json!({});
    let alice = claims(
        json!({"sub": "alice", "groups": ["sre"], "realm_access": {"roles": ["admin", "x"]}}),
    );
    let bob =
        claims(json!({"sub": "bob", "groups": ["dev"], "realm_access": {"roles": ["admin"]}}));
    let carol =
        claims(json!({"sub": "carol", "groups": "data-eng", "realm_access": {"roles": "admin"}}));
    let not_admin = claims(json!({"groups": ["sre"], "realm_access": {"roles": ["x"]}}));
    let tenant = claims(json!({"tenant": 42}));
    let as_caller = |c| ToolCall {
        claims: Some(c),
        ..call("query", &none)
    };
    assert_eq!(p.evaluate(&as_caller(&alice)).action, Action::Allow);
    assert_eq!(
        p.evaluate(&as_caller(&carol)).action,
        Action::Allow,
        "a string claim equal to one value"
    );
    let denied = p.evaluate(&as_caller(&bob));
    assert_eq!(denied.action, Action::Deny);
    assert_eq!(denied.reason, "only SRE may query");
    assert_eq!(
        p.evaluate(&as_caller(&not_admin)).action,
        Action::Deny,
        "every claim must match"
    );
    assert_eq!(p.evaluate(&as_caller(&tenant)).action, Action::Allow);
    assert_eq!(
        p.evaluate(&call("query", &none)).action,
        Action::Deny,
        "no token, no claims"
    );
    // Hidden from bob's tools/list, shown to alice's.
    assert!(p.hides_tool("query", None, Some(&bob)));
    assert!(!p.hides_tool("query", None, Some(&alice)));
    // A rule with `when` shadows nothing after it.
    assert!(p.warnings().is_empty(), "{:?}", p.warnings());
}

#[test]
fn rules_may_need_scopes() {
    let p = load(
        "version: 1\ndefault: deny\nrules:\n  - tool: export\n    scopes: [exports:write]\n    action: allow\n",
    );
    let none = json!({});
    let read = ["mcp".to_owned()];
    let write = ["mcp".to_owned(), "exports:write".to_owned()];
    let d = p.evaluate(&ToolCall {
        scopes: &read,
        ..call("export", &none)
    });
    assert_eq!(d.action, Action::Deny);
    assert_eq!(d.kind, Some(DenyKind::InsufficientScope));
    assert_eq!(d.required_scopes, vec!["exports:write".to_owned()]);
    assert_eq!(d.meta_json()["kind"], "insufficient_scope");
    let d = p.evaluate(&ToolCall {
        scopes: &write,
        ..call("export", &none)
    });
    assert_eq!(d.action, Action::Allow);
    // The caller may step up, so the tool stays listed.
    assert!(!p.hides_tool("export", None, None));
    let errs = errors(
        "version: 1\nrules:\n  - tool: a\n    scopes: []\n    action: allow\n  - tool: b\n    scopes: [x]\n    action: deny\n  - tool: c\n    when: {}\n    action: allow\n  - tool: d\n    scopes: [\"two words\"]\n    action: allow\n",
    );
    assert_eq!(errs.len(), 4, "{errs:?}");
    assert!(errs[0].contains("rules[0].scopes"), "{errs:?}");
    assert!(errs[1].contains("rules[1].scopes: a deny rule"), "{errs:?}");
    assert!(
        errs[2].contains("rules[2].when: names no condition"),
        "{errs:?}"
    );
}

#[test]
fn per_user_limits_follow_the_user() {
    let p = load(
        "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 1m, per: user}\n",
    );
    let mut limiter = RateLimiter::new();
    let none = json!({});
    let alice = ToolCall {
        user_key: "user:alice",
        session_key: "s1",
        client_key: "vscode",
        ..call("a", &none)
    };
    let alice_elsewhere = ToolCall {
        session_key: "s2",
        client_key: "claude",
        ..alice
    };
    let bob = ToolCall {
        user_key: "user:bob",
        ..alice
    };
    assert_eq!(
        evaluate(&p, &mut limiter, &alice, Duration::ZERO).action,
        Action::Allow
    );
    let d = evaluate(&p, &mut limiter, &alice_elsewhere, Duration::ZERO);
    assert_eq!(d.kind, Some(DenyKind::RateLimit));
    assert!(d.reason.contains("per user"), "{}", d.reason);
    assert_eq!(
        evaluate(&p, &mut limiter, &bob, Duration::ZERO).action,
        Action::Allow
    );
}

#[test]
fn route_names_the_deciding_rule_and_the_claims_rules_passed_over() {
    let policy = load(
        "version: 1\ndefault: deny\nrules:\n  - tool: deploy\n    action: allow\n    when: {claims: {groups: ops}}\n  - tool: deploy\n    action: allow\n    clients: [ci]\n  - tool: \"d*\"\n    action: require_approval\n    when: {claims: {groups: dev}}\n  - tool: \"*\"\n    action: deny\n",
    );
    let dev: tollgate_policy::Claims = serde_json::from_value(json!({"groups": ["dev"]})).unwrap();
    let route = policy.route("deploy", None, Some(&dev));
    assert_eq!(route.rule, Some(2));
    assert_eq!(route.claims_skipped, vec![0]);
    // The same rule as evaluate, for every caller.
    let args = json!({});
    for (client, claims) in [(None, None), (Some("ci"), None), (None, Some(&dev))] {
        let mut c = call("deploy", &args);
        c.client = client;
        c.claims = claims;
        let decided = policy.evaluate(&c).rule.map(|r| r.index);
        assert_eq!(policy.route("deploy", client, claims).rule, decided);
    }
    assert_eq!(
        policy.route("deploy", None, None).claims_skipped,
        vec![0, 2]
    );
    assert_eq!(policy.route("other", None, None).rule, Some(3));
    // `*` for everyone leaves nothing to the default; the rules say where they are.
    assert_eq!(policy.default_shadowed_by().map(|r| r.index), Some(3));
    let rule = policy.rule(0).unwrap();
    assert_eq!((rule.line, rule.claims, rule.shadowed_by), (4, true, None));
    assert!(
        load("version: 1\nrules:\n  - {tool: a, action: allow}\n")
            .default_shadowed_by()
            .is_none()
    );
}
