//! Result rules (SPEC §9): loading, which entries apply, and what `apply` does to a result.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use proptest::prelude::*;
use serde_json::{Value, json};
use tollgate_policy::{Policy, Redaction, ResultVerdict};

fn load(src: &str) -> Policy {
    Policy::from_yaml(src, "p.yaml").unwrap_or_else(|e| panic!("{e}"))
}

fn errors(src: &str) -> Vec<String> {
    match Policy::from_yaml(src, "p.yaml") {
        Ok(_) => panic!("expected errors for:\n{src}"),
        Err(e) => e.errors.iter().map(ToString::to_string).collect(),
    }
}

const AWS: &str = "AKIAIOSFODNN7EXAMPLE";
const PEM: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n-----END RSA PRIVATE KEY-----";

const FHIR: &str = r#"
version: 1
default: allow
rules: []
results:
  - tool: "*"
    redact: [aws_access_key, jwt]
    block: [private_key]
  - tool: read_fhir_resource
    redact: [us_ssn, email, {name: mrn, pattern: "MRN-[0-9]{8}"}]
  - tool: "search_*"
    clients: [analytics]
    redact: [us_ssn]
  - tool: audit_only
    mode: audit
    redact: [email]
    block: [private_key]
"#;

fn redactions(list: &[(&str, u64)]) -> Vec<Redaction> {
    list.iter()
        .map(|(name, count)| Redaction {
            name: (*name).to_owned(),
            count: *count,
        })
        .collect()
}

fn apply(policy: &Policy, tool: &str, result: &mut Value) -> ResultVerdict {
    policy
        .result_rules(tool, None, None)
        .expect("an entry applies")
        .apply(result)
}

#[test]
fn no_results_entry_means_no_result_rules() {
    let policy = load("version: 1\nrules: []\n");
    assert!(!policy.has_result_rules());
    assert!(policy.result_rules("anything", None, None).is_none());
    let policy = load(FHIR);
    assert!(policy.has_result_rules());
    assert_eq!(policy.result_entries().count(), 4);
}

#[test]
fn every_matching_entry_applies() {
    let policy = load(FHIR);
    let labels = |tool: &str, client: Option<&str>| -> Vec<String> {
        policy
            .result_rules(tool, client, None)
            .map(|rules| rules.entries().map(|e| e.label.clone()).collect())
            .unwrap_or_default()
    };
    assert_eq!(
        labels("read_fhir_resource", None),
        ["results[0] (*)", "results[1] (read_fhir_resource)"]
    );
    assert_eq!(labels("search_patients", None), ["results[0] (*)"]);
    assert_eq!(
        labels("search_patients", Some("analytics")),
        ["results[0] (*)", "results[2] (search_*)"]
    );
    let rules = policy
        .result_rules("read_fhir_resource", None, None)
        .unwrap();
    let entry = rules.entries().nth(1).unwrap();
    assert_eq!((entry.line, entry.column), (9, 5));
    assert_eq!(entry.redact, ["us_ssn", "email", "mrn"]);
}

#[test]
fn a_tool_no_entry_names_gets_none() {
    let policy = load(
        "version: 1\nresults:\n  - tool: read_fhir_resource\n    redact: [us_ssn]\n  - tool: search_*\n    redact: [email]\n",
    );
    assert!(policy.result_rules("list_datastores", None, None).is_none());
    assert!(policy.result_rules("search", None, None).is_none());
    assert!(policy.result_rules("search_x", None, None).is_some());
}

#[test]
fn entries_may_need_claims() {
    let policy = load(
        "version: 1\nresults:\n  - tool: '*'\n    when: {claims: {role: contractor}}\n    redact: [email]\n",
    );
    let contractor: tollgate_policy::Claims =
        serde_json::from_value(json!({"role": "contractor"})).unwrap();
    let staff: tollgate_policy::Claims = serde_json::from_value(json!({"role": "staff"})).unwrap();
    assert!(policy.result_rules("t", None, Some(&contractor)).is_some());
    assert!(policy.result_rules("t", None, Some(&staff)).is_none());
    assert!(policy.result_rules("t", None, None).is_none());
}

#[test]
fn text_resource_text_and_structured_strings_are_redacted() {
    let policy = load(FHIR);
    let mut result = json!({
        "content": [
            {"type": "text", "text": format!("patient MRN-12345678, SSN 123-45-6789, key {AWS}")},
            {"type": "resource", "resource": {"uri": "fhir://Patient/1", "mimeType": "application/fhir+json",
                "text": "{\"telecom\":[{\"system\":\"email\",\"value\":\"jane@example.org\"}]}"}},
            {"type": "image", "data": "MRN-12345678", "mimeType": "image/png"},
            {"type": "resource", "resource": {"uri": "fhir://Binary/1", "blob": "MRN-12345678"}}
        ],
        "structuredContent": {
            "identifier": [{"system": "mrn", "value": "MRN-87654321"}],
            "nested": {"deep": [[["ssn 536-22-1234"]]], "n": 123_456_789, "ok": true},
            "MRN-11111111": "key names are not values"
        },
        "_meta": {"note": "MRN-12345678 in _meta is not scanned"}
    });
    let verdict = apply(&policy, "read_fhir_resource", &mut result);
    assert_eq!(
        verdict,
        ResultVerdict {
            redactions: redactions(&[
                ("aws_access_key", 1),
                ("email", 1),
                ("mrn", 2),
                ("us_ssn", 2)
            ]),
            blocked: None,
            changed: true,
        }
    );
    assert_eq!(
        result["content"][0]["text"],
        "patient [redacted:mrn], SSN [redacted:us_ssn], key [redacted:aws_access_key]"
    );
    assert_eq!(
        result["content"][1]["resource"]["text"],
        "{\"telecom\":[{\"system\":\"email\",\"value\":\"[redacted:email]\"}]}"
    );
    // Binary content is not text: left as it is.
    assert_eq!(result["content"][2]["data"], "MRN-12345678");
    assert_eq!(result["content"][3]["resource"]["blob"], "MRN-12345678");
    assert_eq!(
        result["structuredContent"]["identifier"][0]["value"],
        "[redacted:mrn]"
    );
    assert_eq!(
        result["structuredContent"]["nested"]["deep"][0][0][0],
        "ssn [redacted:us_ssn]"
    );
    assert_eq!(
        result["structuredContent"]["MRN-11111111"],
        "key names are not values"
    );
    assert_eq!(
        result["_meta"],
        json!({
            "note": "MRN-12345678 in _meta is not scanned",
            "dev.tollgate/redactions": [
                {"name": "aws_access_key", "count": 1},
                {"name": "email", "count": 1},
                {"name": "mrn", "count": 2},
                {"name": "us_ssn", "count": 2}
            ]
        })
    );
}

#[test]
fn a_detector_an_entry_does_not_name_for_this_tool_is_left_alone() {
    let policy = load(FHIR);
    let text = format!("SSN 123-45-6789, MRN-12345678, key {AWS}");
    let mut result = json!({"content": [{"type": "text", "text": text}]});
    let verdict = apply(&policy, "list_datastores", &mut result);
    assert_eq!(verdict.redactions, redactions(&[("aws_access_key", 1)]));
    assert_eq!(
        result["content"][0]["text"],
        "SSN 123-45-6789, MRN-12345678, key [redacted:aws_access_key]"
    );
}

#[test]
fn a_result_with_nothing_found_is_unchanged() {
    let policy = load(FHIR);
    let original = json!({
        "content": [{"type": "text", "text": "Patient/1: Jane Doe, born 1970-01-01, 4111111111111112"}],
        "structuredContent": {"id": "1", "count": 3},
        "isError": false
    });
    let mut result = original.clone();
    let verdict = apply(&policy, "read_fhir_resource", &mut result);
    assert_eq!(verdict, ResultVerdict::default());
    assert_eq!(result, original);
}

#[test]
fn a_block_detector_withholds_the_whole_result() {
    let policy = load(FHIR);
    let mut result = json!({
        "content": [{"type": "text", "text": format!("config dump:\n{PEM}\nuser jane@example.org")}],
        "structuredContent": {"key": PEM},
        "_meta": {"upstream": true}
    });
    let verdict = apply(&policy, "read_fhir_resource", &mut result);
    assert_eq!(verdict.blocked.as_deref(), Some("private_key"));
    assert!(verdict.changed);
    assert_eq!(
        verdict.redactions,
        redactions(&[("email", 1), ("private_key", 2)])
    );
    assert_eq!(
        result,
        json!({
            "content": [{"type": "text", "text": "Result withheld by policy: it contains private_key"}],
            "isError": true,
            "_meta": {"dev.tollgate/decision": {
                "kind": "result_blocked",
                "tool": "read_fhir_resource",
                "rule": "results[0] (*)",
                "reason": "Result withheld by policy: it contains private_key"
            }}
        })
    );
    assert!(!result.to_string().contains("MIIE"));
}

#[test]
fn block_beats_redact_whichever_entry_says_it() {
    let policy = load(
        "version: 1\nresults:\n  - tool: '*'\n    redact: [us_ssn]\n  - tool: export\n    block: [us_ssn]\n",
    );
    let mut result = json!({"content": [{"type": "text", "text": "123-45-6789"}]});
    let verdict = apply(&policy, "export", &mut result);
    assert_eq!(verdict.blocked.as_deref(), Some("us_ssn"));
    assert_eq!(
        result["_meta"]["dev.tollgate/decision"]["rule"],
        "results[1] (export)"
    );
    let mut result = json!({"content": [{"type": "text", "text": "123-45-6789"}]});
    let verdict = apply(&policy, "read", &mut result);
    assert_eq!(verdict.blocked, None);
    assert_eq!(result["content"][0]["text"], "[redacted:us_ssn]");
}

#[test]
fn audit_mode_records_and_changes_nothing() {
    // The entry's own mode.
    let policy = load(FHIR);
    let original =
        json!({"content": [{"type": "text", "text": format!("{PEM}\njane@example.org")}]});
    let mut result = original.clone();
    let verdict = apply(&policy, "audit_only", &mut result);
    // results[0] (`*`, enforced) blocks private_key: enforced wins over the audit entry.
    assert_eq!(verdict.blocked.as_deref(), Some("private_key"));
    let mut result =
        json!({"content": [{"type": "text", "text": "jane@example.org, again jane@example.org"}]});
    let before = result.clone();
    let verdict = apply(&policy, "audit_only", &mut result);
    assert_eq!(
        verdict,
        ResultVerdict {
            redactions: redactions(&[("email", 2)]),
            blocked: None,
            changed: false
        }
    );
    assert_eq!(result, before);
    // The policy's mode: every entry only records, block included.
    let audit = FHIR.replace("default: allow", "default: allow\nmode: audit");
    let policy = load(&audit);
    let mut result = original.clone();
    let verdict = apply(&policy, "read_fhir_resource", &mut result);
    assert_eq!(
        verdict,
        ResultVerdict {
            redactions: redactions(&[("email", 1), ("private_key", 1)]),
            blocked: None,
            changed: false
        }
    );
    assert_eq!(result, original);
}

#[test]
fn an_enforced_detector_is_not_hidden_by_an_audited_one_overlapping_it() {
    let policy = load(
        "version: 1\nresults:\n  - tool: t\n    redact: [us_ssn]\n  - tool: t\n    mode: audit\n    redact: [{name: row, pattern: 'row: [0-9-]+'}]\n",
    );
    let mut result = json!({"content": [{"type": "text", "text": "row: 123-45-6789"}]});
    let verdict = apply(&policy, "t", &mut result);
    assert_eq!(verdict.redactions, redactions(&[("row", 1), ("us_ssn", 1)]));
    assert_eq!(result["content"][0]["text"], "row: [redacted:us_ssn]");
}

#[test]
fn a_result_that_is_not_an_object_is_left_alone() {
    let policy = load(FHIR);
    for mut odd in [json!(null), json!("AKIAIOSFODNN7EXAMPLE"), json!([1, 2])] {
        let before = odd.clone();
        assert_eq!(apply(&policy, "x", &mut odd), ResultVerdict::default());
        assert_eq!(odd, before);
    }
    // `content` not a list, items not objects, `_meta` not an object.
    let mut result =
        json!({"content": "AKIAIOSFODNN7EXAMPLE", "structuredContent": [AWS], "_meta": 5});
    let verdict = apply(&policy, "x", &mut result);
    assert_eq!(verdict.redactions, redactions(&[("aws_access_key", 1)]));
    assert_eq!(result["content"], AWS);
    assert_eq!(
        result["_meta"],
        json!({"dev.tollgate/redactions": [{"name": "aws_access_key", "count": 1}]})
    );
}

// ---- validation ----------------------------------------------------------------------

#[test]
fn unknown_detectors_and_bad_patterns_are_refused_with_their_lines() {
    let errs = errors(
        "version: 1\nresults:\n  - tool: '*'\n    redact: [aws_access_key, aws_secret]\n  - tool: read_*\n    redact:\n      - name: mrn\n        pattern: 'MRN-[0-9'\n    block: [privat_key]\n",
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(errs[0].starts_with("p.yaml:4:30: results[0].redact: `aws_secret` is not a detector: use one of aws_access_key, private_key, jwt, github_token, slack_token, us_ssn, credit_card, email"), "{}", errs[0]);
    assert!(
        errs[1].starts_with("p.yaml:7:15: results[1].redact: the pattern of `mrn` is not valid:"),
        "{}",
        errs[1]
    );
    assert!(errs[1].contains("unclosed character class"), "{}", errs[1]);
    assert!(
        errs[2].starts_with("p.yaml:9:13: results[1].block: `privat_key` is not a detector"),
        "{}",
        errs[2]
    );
}

#[test]
fn entries_are_checked_like_rules() {
    let errs = errors(
        "version: 1\nresults:\n  - tool: ''\n    redact: [email]\n  - tool: x\n  - tool: y\n    redact: [email]\n    block: [email]\n  - tool: z\n    redact: [{name: email, pattern: x}, {name: a-b, pattern: x}, {name: e, pattern: 'x*'}]\n  - tool: '[x'\n    clients: []\n    redact: [email]\n  - tool: w\n    redact: [{name: m, pattern: '[0-9]+'}]\n  - tool: v\n    redact: [{name: m, pattern: '[a-z]+'}]\n    unknown: 1\n",
    );
    let joined = errs.join("\n");
    for expected in [
        "p.yaml:3:5: results[0].tool: must not be empty",
        "p.yaml:5:5: results[1]: names no detector",
        "p.yaml:8:5: results[2]: `email` is in both `redact` and `block`",
        "p.yaml:10:21: results[3].redact: `email` is a built-in detector",
        "p.yaml:10:48: results[3].redact: `a-b` is not a detector name",
        "p.yaml:10:73: results[3].redact: the pattern of `e` is not valid: it can match empty text",
        "p.yaml:11:5: results[4].tool: `[x` is not a valid glob",
        "p.yaml:12:5: results[4].clients: an empty list matches no one",
        "p.yaml:18:5: unknown field `unknown`",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in\n{joined}"
        );
    }
    // A custom name given two patterns, in an entry that otherwise parses.
    let errs = errors(
        "version: 1\nresults:\n  - tool: w\n    redact: [{name: m, pattern: '[0-9]+'}]\n  - tool: v\n    redact: [{name: m, pattern: '[a-z]+'}]\n",
    );
    assert_eq!(
        errs,
        [
            "p.yaml:6:21: results[1].redact: `m` is defined with another pattern in results[0] at p.yaml:4:21; give one of them another name"
        ]
    );
    // The same custom detector twice is one detector.
    load(
        "version: 1\nresults:\n  - tool: w\n    redact: [{name: m, pattern: 'M[0-9]+'}]\n  - tool: v\n    block: [{name: m, pattern: 'M[0-9]+'}]\n",
    );
}

#[test]
fn a_pattern_that_matches_a_marker_is_refused() {
    let errs = errors(
        "version: 1\nresults:\n  - tool: w\n    redact: [email, {name: word, pattern: 'redacted:[a-z]+'}]\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with(
            "p.yaml:4:28: results[0]: the pattern of `word` matches the marker `[redacted:email]`"
        ),
        "{}",
        errs[0]
    );
}

#[test]
fn flow_style_results_and_detector_shapes() {
    let policy = load(
        "version: 1\nresults: [{tool: t, redact: [email, {name: mrn, pattern: 'MRN-[0-9]{8}'}]}]\n",
    );
    let mut result = json!({"content": [{"type": "text", "text": "MRN-12345678 a@b.co"}]});
    apply(&policy, "t", &mut result);
    assert_eq!(
        result["content"][0]["text"],
        "[redacted:mrn] [redacted:email]"
    );
    let errs = errors("version: 1\nresults:\n  - tool: t\n    redact: [{name: x}]\n");
    assert!(errs[0].starts_with("p.yaml:4:"), "{errs:?}");
    assert!(errs[0].contains("missing field `pattern`"), "{errs:?}");
    let errs = errors("version: 1\nresults:\n  - tool: t\n    redact: [[email]]\n");
    assert!(
        errs[0].contains("a built-in's name (like `aws_access_key`) or `{name, pattern}`"),
        "{errs:?}"
    );
    // Top-level errors hide no entry error.
    let errs = errors("version: 1\nbogus: 1\nresults:\n  - tool: t\n    redact: [nope]\n");
    assert_eq!(errs.len(), 2, "{errs:?}");
}

// ---- properties ----------------------------------------------------------------------

const ALL: &str = r#"
version: 1
results:
  - tool: "*"
    redact: [aws_access_key, private_key, jwt, github_token, slack_token, us_ssn, credit_card, email, {name: mrn, pattern: "MRN-[0-9]{8}"}]
"#;

/// With a custom detector that can match across a marker's edge.
const CROSSING: &str = r#"
version: 1
results:
  - tool: "*"
    redact: [aws_access_key, us_ssn, email, {name: tail, pattern: "\\][a-z]{2}[0-9]"}]
"#;

/// Text that is mostly secrets, their pieces, and the characters around them.
fn secretish() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        AWS.to_owned(),
        "AKIA".to_owned(),
        PEM.to_owned(),
        "-----BEGIN PRIVATE KEY-----\nMIIE".to_owned(),
        "-----END RSA PRIVATE KEY-----".to_owned(),
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig_-x".to_owned(),
        "eyJhbGci".to_owned(),
        "ghp_16C7e42F292c6912E7710c838347Ae178B4a".to_owned(),
        "xoxb-123456789012-AbCdEfGhIjKl".to_owned(),
        "123-45-6789".to_owned(),
        "666-45-6789".to_owned(),
        "4111 1111 1111 1111".to_owned(),
        "4111111111111111".to_owned(),
        "jane.doe@example.org".to_owned(),
        "@".to_owned(),
        "MRN-12345678".to_owned(),
        "[redacted:email]".to_owned(),
        "[redacted:".to_owned(),
        "]".to_owned(),
    ]);
    let filler = "[ a-z0-9.@_\\-:\n\\[\\]é]{0,4}";
    prop::collection::vec((pieces, filler), 0..8).prop_map(|parts| {
        parts
            .into_iter()
            .flat_map(|(piece, filler)| [piece, filler])
            .collect()
    })
}

fn redact_text(policy: &Policy, text: &str) -> (String, ResultVerdict) {
    let mut result = json!({"content": [{"type": "text", "text": text}]});
    let verdict = apply(policy, "t", &mut result);
    (
        result["content"][0]["text"].as_str().unwrap().to_owned(),
        verdict,
    )
}

static ALL_POLICY: std::sync::LazyLock<Policy> = std::sync::LazyLock::new(|| load(ALL));
static CROSSING_POLICY: std::sync::LazyLock<Policy> = std::sync::LazyLock::new(|| load(CROSSING));

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn redaction_is_idempotent_and_leaves_no_match(text in secretish()) {
        let policy = &*ALL_POLICY;
        let (once, _) = redact_text(policy, &text);
        let (twice, verdict) = redact_text(policy, &once);
        prop_assert_eq!(&twice, &once);
        // Nothing any detector finds survives (the second pass found nothing).
        prop_assert_eq!(verdict, ResultVerdict::default());
    }

    #[test]
    fn redaction_is_idempotent_with_a_pattern_crossing_markers(text in secretish()) {
        let policy = &*CROSSING_POLICY;
        let (once, _) = redact_text(policy, &text);
        let (twice, verdict) = redact_text(policy, &once);
        prop_assert_eq!(&twice, &once);
        prop_assert_eq!(verdict, ResultVerdict::default());
    }

    #[test]
    fn structured_content_of_any_shape_is_redacted_everywhere(
        text in secretish(),
        depth in 0usize..6,
    ) {
        let policy = &*ALL_POLICY;
        let mut value = json!(text.clone());
        for level in 0..depth {
            value = if level % 2 == 0 { json!([value, 1]) } else { json!({"k": value, "n": null}) };
        }
        let mut result = json!({"structuredContent": value});
        apply(policy, "t", &mut result);
        let (flat, _) = redact_text(policy, &text);
        let mut inner = &result["structuredContent"];
        for level in 0..depth {
            let back = depth - 1 - level;
            inner = if back % 2 == 0 { &inner[0] } else { &inner["k"] };
        }
        prop_assert_eq!(inner.as_str().unwrap(), flat.as_str());
    }
}

#[test]
fn a_pattern_that_can_take_in_a_marker_is_looked_for_again() {
    // `]:1` is there only once the address is a marker: found in the same pass.
    let policy = load(
        "version: 1\nresults:\n  - tool: t\n    redact: [email, {name: port, pattern: '\\]:[0-9]'}]\n",
    );
    let (once, verdict) = redact_text(&policy, "a@b.co:1 and c@d.co, done");
    assert_eq!(
        once,
        "[redacted:email[redacted:port] and [redacted:email], done"
    );
    assert_eq!(verdict.redactions, redactions(&[("email", 2), ("port", 1)]));
    assert_eq!(redact_text(&policy, &once).0, once);
}
