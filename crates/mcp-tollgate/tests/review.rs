//! Policy review on the real binary: `tollgate test --coverage` (what the cases leave
//! unexercised) and `tollgate diff` (the calls whose decision a change changes).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn tollgate_in(dir: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command.output().expect("run tollgate")
}

fn tollgate(args: &[&str]) -> Output {
    tollgate_in(None, args)
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(out)))
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("tollgate-review-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const POLICY: &str = "version: 1
default: deny
rules:
  - tool: search_logs
    action: allow
    rate_limit: {max: 2, window: 1m}
  - tool: get_object
    action: allow
  - tool: delete_*
    action: deny
  - tool: export
    action: require_approval
    arguments:
      type: object
      properties: {bucket: {const: approved}}
";

const SOME_CASES: &str = "policy: p.yaml
cases:
  - {name: search, tool: search_logs, expect: allow}
  - {name: delete, tool: delete_bucket, expect: deny}
  - {name: export, tool: export, arguments: {bucket: approved}, expect: require_approval}
  - {name: unknown, tool: drop_table, expect: deny}
";

const MORE_CASES: &str = "
  - {name: search burst, tool: search_logs, session: b, repeat: 3, expect: allow, expect_last: deny, kind: rate_limit}
  - {name: get, tool: get_object, expect: allow}
  - {name: bad export, tool: export, arguments: {bucket: elsewhere}, expect: deny, kind: arguments}
";

#[test]
fn coverage_names_the_unexercised_rule_and_rate_limit_refusal_with_their_lines() {
    let dir = Dir::new("names");
    dir.write("p.yaml", POLICY);
    let tests = dir.write("p.test.yaml", SOME_CASES);
    let out = tollgate(&["test", "--coverage", &tests]);
    let report = text(&out);
    assert_eq!(code(&out), 0, "{report}");
    // rules[0] is line 4, rules[1] line 7, rules[3] line 11.
    let line = |needle: &str| {
        report
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}: {report}"))
            .to_owned()
    };
    let search = line("rules[0] (search_logs)");
    assert!(search.contains("MISSING"), "{search}");
    assert!(search.contains("p.yaml:4"), "{search}");
    assert!(search.contains("exercised allow"), "{search}");
    assert!(search.contains("never: rate_limit"), "{search}");
    let get = line("rules[1] (get_object)");
    assert!(
        get.contains("MISSING") && get.contains("p.yaml:7") && get.contains("never: allow"),
        "{get}"
    );
    let export = line("rules[3] (export)");
    assert!(export.contains("never: arguments"), "{export}");
    assert!(line("rules[2] (delete_*)").trim_start().starts_with("ok"));
    assert!(line("default (deny)").trim_start().starts_with("ok"));
    assert!(report.contains("4 of 7 outcomes"), "{report}");

    let out = tollgate(&["test", "--coverage", "--format", "json", &tests]);
    let report = json(&out);
    let items = &report["coverage"][0]["items"];
    assert_eq!(items[0]["missing"], serde_json::json!(["rate_limit"]));
    assert_eq!(items[1]["missing"], serde_json::json!(["allow"]));
    assert_eq!(items[4]["item"], "default");
    assert_eq!(report["coverage"][0]["covered"], 4);
    assert_eq!(report["coverage"][0]["total"], 7);
}

#[test]
fn min_coverage_fails_below_and_passes_at_it() {
    let dir = Dir::new("min");
    dir.write("p.yaml", POLICY);
    let tests = dir.write("p.test.yaml", SOME_CASES);
    let out = tollgate(&["test", "--min-coverage", "100", &tests]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        text(&out).contains("below --min-coverage 100%"),
        "{}",
        text(&out)
    );
    // 4 of 7 is 57.1 %.
    let out = tollgate(&["test", "--min-coverage", "57", &tests]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = tollgate(&["test", "--min-coverage", "58", &tests]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let out = tollgate(&["test", "--min-coverage", "101", &tests]);
    assert_eq!(code(&out), 2, "{}", text(&out));

    let tests = dir.write("p.test.yaml", &format!("{SOME_CASES}{MORE_CASES}"));
    let out = tollgate(&["test", "--min-coverage", "100", &tests]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("7 of 7 outcomes exercised (100.0%)"));
}

#[test]
fn shadowed_rules_are_unreachable_and_claims_mismatches_are_counted() {
    let dir = Dir::new("shadow");
    dir.write(
        "p.yaml",
        "version: 1
default: allow
rules:
  - tool: deploy
    action: allow
    when: {claims: {groups: ops}}
  - tool: \"*\"
    action: deny
  - tool: read
    action: allow
",
    );
    let tests = dir.write(
        "p.test.yaml",
        "policy: p.yaml
cases:
  - {name: ops deploy, tool: deploy, claims: {groups: [ops]}, expect: allow}
  - {name: dev deploy, tool: deploy, claims: {groups: [dev]}, expect: deny}
",
    );
    let out = tollgate(&["test", "--coverage", "--format", "json", &tests]);
    let report = json(&out);
    let cov = &report["coverage"][0];
    assert_eq!(
        cov["items"][0]["exercised"],
        serde_json::json!(["allow", "claims"])
    );
    assert_eq!(cov["items"][2]["unreachable"], true);
    assert_eq!(cov["items"][2]["shadowed_by"], "rules[1] (*)");
    // After `*` the default never decides either.
    assert_eq!(cov["items"][3]["item"], "default");
    assert_eq!(cov["items"][3]["unreachable"], true);
    // deploy: allow + claims; `*`: deny.
    assert_eq!(cov["covered"], 3);
    assert_eq!(cov["total"], 3);
    let out = tollgate(&["test", "--coverage", &tests]);
    assert!(
        text(&out).contains("unreachable rules[2] (read)"),
        "{}",
        text(&out)
    );
}

const OLD: &str = "version: 1
default: deny
rules:
  - tool: list_*
    action: allow
  - tool: export
    action: allow
    arguments:
      type: object
      properties: {bucket: {const: approved}}
";

const NEW: &str = "version: 1
default: deny
rules:
  - tool: list_secrets
    action: deny
  - tool: list_*
    action: allow
  - tool: export
    action: allow
    rate_limit: {max: 2, window: 1m}
    arguments:
      type: object
      properties: {bucket: {const: approved}}
";

#[test]
fn diff_reports_the_calls_that_change_with_old_and_new_rule_and_not_the_others() {
    let dir = Dir::new("diff");
    let old = dir.write("old.yaml", OLD);
    let new = dir.write("new.yaml", NEW);
    let cases = dir.write(
        "p.test.yaml",
        "policy: new.yaml
cases:
  - {name: secrets, tool: list_secrets, client: ci, repeat: 2, expect: deny}
  - {name: buckets, tool: list_buckets, client: ci, expect: allow}
",
    );
    let out = tollgate(&["diff", &old, &new, "--cases", &cases]);
    let report = text(&out);
    assert_eq!(code(&out), 0, "{report}");
    assert!(
        report.contains(
            "2 x client ci: allow by rules[0] (list_*) -> deny by rules[0] (list_secrets)"
        ),
        "{report}"
    );
    assert!(!report.contains("list_buckets"), "{report}");
    assert!(report.contains("3 call(s) replayed"), "{report}");

    let out = tollgate(&["diff", &old, &new, "--cases", &cases, "--fail-on-change"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let out = tollgate(&["diff", &old, &old, "--cases", &cases, "--fail-on-change"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(text(&out).contains("0 change decision"));

    let out = tollgate(&["diff", &old, &new, "--cases", &cases, "--format", "json"]);
    let report = json(&out);
    assert_eq!(report["changed"], 2);
    assert_eq!(report["unchanged"], 1);
    let change = &report["changes"][0];
    assert_eq!(change["tool"], "list_secrets");
    assert_eq!(change["client"], "ci");
    assert_eq!(change["old"]["decision"], "allow");
    assert_eq!(change["old"]["rule"], "rules[0] (list_*)");
    assert_eq!(change["new"]["decision"], "deny");
    assert_eq!(change["new"]["rule"], "rules[0] (list_secrets)");
    assert_eq!(change["count"], 2);
}

fn record(time: &str, tool: &str, client: &str, arguments: Option<&str>) -> String {
    let arguments = arguments
        .map(|a| format!(",\"arguments\":{a}"))
        .unwrap_or_default();
    format!(
        "{{\"event\":\"decision\",\"call_id\":\"x\",\"server\":\"s\",\"client\":\"{client}\",\"session\":null,\"tool\":\"{tool}\",\"decision\":\"allow\",\"kind\":null,\"rule\":\"rules[0] (list_*)\",\"reason\":\"r\",\"mode\":\"enforce\",\"arguments_digest\":\"sha256:0\"{arguments},\"time\":\"{time}\",\"run\":\"r\"}}\n"
    )
}

#[test]
fn diff_replays_an_audit_log_in_its_times_and_counts_calls_it_cannot_decide() {
    let dir = Dir::new("audit");
    let old = dir.write("old.yaml", OLD);
    let new = dir.write("new.yaml", NEW);
    let mut log = String::new();
    // Three exports in one minute with their arguments: the third is over NEW's limit.
    for second in ["00", "10", "20"] {
        log += &record(
            &format!("2026-01-01T00:00:{second}.000Z"),
            "export",
            "ci",
            Some("{\"bucket\":\"approved\"}"),
        );
    }
    // A minute after the first two, slots are free again: unchanged.
    log += &record(
        "2026-01-01T00:01:10.500Z",
        "export",
        "ci",
        Some("{\"bucket\":\"approved\"}"),
    );
    // Two exports whose arguments were not logged: counted, not guessed.
    log += &record("2026-01-01T00:02:00.000Z", "export", "ops", None);
    log += &record("2026-01-01T00:02:01.000Z", "export", "ops", None);
    // An unchanged call, an outcome record and a line that is not JSON.
    log += &record("2026-01-01T00:02:02.000Z", "list_buckets", "ci", None);
    log += "{\"event\":\"outcome\",\"call_id\":\"x\",\"server\":\"s\",\"tool\":\"export\",\"outcome\":\"ok\"}\n";
    log += "not json\n";
    let audit = dir.write("audit.jsonl", &log);

    let out = tollgate(&["diff", &old, &new, "--audit", &audit, "--format", "json"]);
    let report = json(&out);
    assert_eq!(code(&out), 0, "{report}");
    assert_eq!(report["calls"], 7, "{report}");
    assert_eq!(report["changed"], 1, "{report}");
    assert_eq!(report["unchanged"], 4, "{report}");
    assert_eq!(report["undetermined"], 2, "{report}");
    assert_eq!(report["unreadable_lines"], 1, "{report}");
    let change = &report["changes"][0];
    assert_eq!(change["tool"], "export");
    assert_eq!(change["count"], 1);
    assert_eq!(change["old"]["rule"], "rules[1] (export)");
    assert_eq!(change["new"]["kind"], "rate_limit");
    assert_eq!(change["new"]["rule"], "rules[2] (export)");
    let unknown = &report["undetermined_calls"][0];
    assert_eq!(unknown["tool"], "export");
    assert_eq!(unknown["client"], "ops");
    assert_eq!(unknown["needs"], "arguments");
    assert_eq!(unknown["count"], 2);

    let out = tollgate(&["diff", &old, &new, "--audit", &audit]);
    let report = text(&out);
    assert!(report.contains("undetermined: 2 call(s)"), "{report}");
    assert!(report.contains("audit.arguments: true"), "{report}");
    let out = tollgate(&["diff", &old, &new, "--audit", &audit, "--fail-on-change"]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    // Another server's records are not this policy's calls.
    let out = tollgate(&[
        "diff",
        &old,
        &new,
        "--audit",
        &audit,
        "--server",
        "other",
        "--fail-on-change",
        "--format",
        "json",
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(json(&out)["calls"], 0);
}

#[test]
fn diff_reads_the_old_policy_from_a_git_revision() {
    let dir = Dir::new("git");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(&dir.0)
            .output()
            .expect("run git");
        assert!(out.status.success(), "git {args:?}: {}", text(&out));
    };
    git(&["init", "-q", "-b", "main"]);
    std::fs::create_dir_all(dir.0.join("policies")).unwrap();
    dir.write("policies/p.yaml", OLD);
    git(&["add", "."]);
    git(&["commit", "-q", "-m", "old"]);
    dir.write("policies/p.yaml", NEW);
    let cases = dir.write(
        "c.test.yaml",
        "policy: policies/p.yaml\ncases:\n  - {name: s, tool: list_secrets, expect: deny}\n",
    );
    let out = tollgate_in(
        Some(&dir.0),
        &[
            "diff",
            "main:policies/p.yaml",
            "policies/p.yaml",
            "--cases",
            &cases,
            "--fail-on-change",
        ],
    );
    assert_eq!(code(&out), 1, "{}", text(&out));
    assert!(
        text(&out).contains("allow by rules[0] (list_*) -> deny by rules[0] (list_secrets)"),
        "{}",
        text(&out)
    );
    let out = tollgate_in(
        Some(&dir.0),
        &[
            "diff",
            "main:policies/missing.yaml",
            "policies/p.yaml",
            "--cases",
            &cases,
        ],
    );
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("git show"), "{}", text(&out));
}

#[test]
fn coverage_counts_what_results_entries_did_to_the_cases_results() {
    let dir = Dir::new("results");
    dir.write(
        "p.yaml",
        "version: 1
default: allow
results:
  - tool: read_record
    redact: [us_ssn]
    block: [private_key]
  - tool: export
    block: [us_ssn]
",
    );
    let tests = dir.write(
        "p.test.yaml",
        "policy: p.yaml
cases:
  - name: an SSN in a record is redacted
    tool: read_record
    expect: allow
    result: {content: [{type: text, text: 'ssn 123-45-6789'}]}
  - name: an export without a result scans nothing
    tool: export
    expect: allow
",
    );
    let out = tollgate(&["test", "--coverage", "--format", "json", &tests]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let items = &json(&out)["coverage"][0]["items"];
    assert_eq!(items[0]["item"], "result");
    assert_eq!(items[0]["label"], "results[0] (read_record)");
    assert_eq!(
        items[0]["at"],
        format!("{}:4", dir.0.join("p.yaml").display())
    );
    assert_eq!(items[0]["exercised"], serde_json::json!(["redact"]));
    assert_eq!(items[0]["missing"], serde_json::json!(["block"]));
    assert_eq!(items[1]["missing"], serde_json::json!(["block"]));
}

#[test]
fn diff_says_which_calls_depend_on_a_tokens_claims_or_scopes_the_log_does_not_keep() {
    let dir = Dir::new("identity");
    let old = dir.write("old.yaml", "version: 1\ndefault: allow\n");
    let new = dir.write(
        "new.yaml",
        "version: 1
default: deny
rules:
  - tool: deploy
    action: allow
    when: {claims: {groups: ops}}
  - tool: report
    action: allow
    scopes: [reports:read]
",
    );
    let line = |tool: &str, user: Option<&str>| {
        let user = user
            .map(|u| format!("\"user\":\"{u}\","))
            .unwrap_or_default();
        format!(
            "{{\"event\":\"decision\",\"server\":\"s\",\"client\":null,{user}\"session\":null,\"tool\":\"{tool}\",\"time\":\"2026-01-01T00:00:00.000Z\"}}\n"
        )
    };
    let log = [
        line("deploy", Some("alice")),
        line("report", Some("alice")),
        // Without a token there are no claims and no scopes: both are known, and refused.
        line("deploy", None),
        line("report", None),
    ]
    .concat();
    let audit = dir.write("audit.jsonl", &log);
    let out = tollgate(&["diff", &old, &new, "--audit", &audit, "--format", "json"]);
    let report = json(&out);
    assert_eq!(report["undetermined"], 2, "{report}");
    let needs: Vec<(String, String)> = report["undetermined_calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| {
            (
                u["needs"].as_str().unwrap().to_owned(),
                u["rule"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        needs.contains(&("claims".to_owned(), "rules[0] (deploy)".to_owned())),
        "{report}"
    );
    assert!(
        needs.contains(&("scopes".to_owned(), "rules[1] (report)".to_owned())),
        "{report}"
    );
    assert_eq!(report["changed"], 2, "{report}");
    let kinds: Vec<&str> = report["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["new"]["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains(&"deny") && kinds.contains(&"insufficient_scope"),
        "{report}"
    );
}
