//! The real `tollgate` binary on good and bad files: exit codes (0 ok,
//! 1 a file the user must fix, 2 usage or I/O) and located messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate")
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path = std::env::temp_dir().join(format!("tollgate-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
        .display()
        .to_string()
}

#[test]
fn the_starter_policies_validate_and_pass_their_tests() {
    let out = tollgate(&["validate", &repo("policies")]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("healthlake.yaml (policy)"));
    let out = tollgate(&["test", &repo("policies")]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("0 failed"));
}

#[test]
fn validate_reports_every_error_with_its_location_and_exits_1() {
    let dir = Dir::new("errors");
    let file = dir.write(
        "x.yaml",
        "version: 1\nrules:\n  - tool: a\n    action: allow\n  - tool: b\n    actoin: deny\n  - tool: c\n    action: allow\n    rate_limit: {max: 0, window: soon}\n",
    );
    let out = tollgate(&["validate", &file]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{file}:6:5: unknown field `actoin`, expected one of `tool`, `clients`, `action`"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:9:")) && err.contains("max: must be at least 1"),
        "{err}"
    );
    assert!(err.contains("`soon` is not a duration"), "{err}");
}

#[test]
fn bad_input_of_every_kind_gets_a_clear_error_never_a_panic() {
    let dir = Dir::new("bad");
    let cases: &[(&str, &str, &str)] = &[
        ("empty.yaml", "", "empty"),
        (
            "malformed.yaml",
            "version: 1\nrules: [\n",
            "malformed.yaml:",
        ),
        ("types.yaml", "version: 1\nrules: 7\n", "invalid type"),
        (
            "dupe.yaml",
            "version: 1\ndefault: deny\ndefault: allow\n",
            "duplicate",
        ),
        (
            "glob.yaml",
            "version: 1\nrules:\n  - tool: \"[a\"\n    action: allow\n",
            "not a valid glob",
        ),
        (
            "schema.yaml",
            "version: 1\nrules:\n  - tool: a\n    action: allow\n    arguments: {type: 3}\n",
            "not a valid JSON Schema",
        ),
        (
            "regex.yaml",
            "version: 1\nrules:\n  - tool: a\n    action: allow\n    arguments: {type: string, pattern: \"([\"}\n",
            "not a valid JSON Schema",
        ),
        (
            "window.yaml",
            "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 1, window: 0}\n",
            "more than 0",
        ),
        (
            "max.yaml",
            "version: 1\nrules:\n  - tool: a\n    action: allow\n    rate_limit: {max: 0, window: 1m}\n",
            "at least 1",
        ),
    ];
    for (name, text, expected) in cases {
        let file = dir.write(name, text);
        let out = tollgate(&["validate", &file]);
        assert_eq!(code(&out), 1, "{name}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{name}: {err}");
        assert!(
            err.contains(&format!("{file}:")),
            "{name} is located: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let huge = dir.write(
        "huge.yaml",
        &format!("version: 1\nrules: []\n# {}\n", "x".repeat(10 << 20)),
    );
    let out = tollgate(&["validate", &huge]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("at most 1048576 bytes"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn io_problems_exit_2() {
    let dir = Dir::new("io");
    let out = tollgate(&[
        "validate",
        &dir.path().join("missing.yaml").display().to_string(),
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("no such file"), "{}", stderr(&out));
    let out = tollgate(&[
        "explain",
        "--policy",
        &dir.path().display().to_string(),
        "--tool",
        "x",
    ]);
    assert_eq!(code(&out), 2);
    assert!(stderr(&out).contains("is a directory"), "{}", stderr(&out));
    let file = dir.write("unreadable.yaml", "version: 1\n");
    std::fs::write(&file, [0xff, 0xfe, 0x00]).unwrap();
    let out = tollgate(&["validate", &file]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = tollgate(&["validate"]);
    assert_eq!(code(&out), 2, "usage error");
    let out = tollgate(&["frobnicate"]);
    assert_eq!(code(&out), 2);
}

#[test]
fn test_prints_each_failing_case_with_the_deciding_rule() {
    let dir = Dir::new("test");
    dir.write("p.yaml", "version: 1\ndefault: deny\nrules:\n  - tool: read_*\n    action: allow\n    rate_limit: {max: 2, window: 1m}\n");
    let file = dir.write(
        "p.test.yaml",
        "policy: p.yaml\ncases:\n  - {name: reads pass, tool: read_x, session: a, expect: allow}\n  - {name: wrong on purpose, tool: write_x, expect: allow}\n  - {name: third read limited, tool: read_x, session: a, repeat: 2, expect: allow, expect_last: deny, kind: rate_limit}\n  - {name: a minute later fine, tool: read_x, session: a, at: 60, expect: allow}\n  - {name: other session fresh, tool: read_x, session: b, expect: allow}\n  - {name: a case naming no session starts afresh, tool: read_x, repeat: 2, expect: allow}\n  - {name: and so does the next, tool: read_x, repeat: 2, expect: allow}\n  - {name: a client shares with its own cases, tool: read_x, client: c, repeat: 2, expect: allow}\n  - {name: the same client later, tool: read_x, client: c, expect: deny, kind: rate_limit}\n",
    );
    let out = tollgate(&["test", &file]);
    assert_eq!(code(&out), 1);
    let text = stdout(&out);
    assert!(
        text.contains("FAIL")
            && text.contains(
                "wrong on purpose: call 1 of 1: expected allow, got deny (deny) by default"
            ),
        "{text}"
    );
    assert!(!text.contains("third read limited"), "{text}");
    assert!(text.contains("8 passed, 1 failed"), "{text}");
    let out = tollgate(&["--format", "json", "test", &file]);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["failed"], 1);
}

#[test]
fn explain_and_test_see_an_active_grant() {
    let dir = Dir::new("grant");
    let policy = dir.write(
        "p.yaml",
        "version: 1\nrules:\n  - tool: export\n    action: require_approval\n    arguments: {properties: {to: {const: ok}}}\n  - tool: drop\n    action: deny\n",
    );
    let explain = |tool: &str, args: &str, grant: bool| {
        let mut argv = vec![
            "--format", "json", "explain", "--policy", &policy, "--tool", tool, "--args", args,
        ];
        if grant {
            argv.push("--grant");
        }
        let out = tollgate(&argv);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
        json["decision"].as_str().unwrap().to_owned()
    };
    assert_eq!(
        explain("export", r#"{"to":"ok"}"#, false),
        "require_approval"
    );
    assert_eq!(explain("export", r#"{"to":"ok"}"#, true), "allow");
    // A grant never lets through what the rule's schema or a deny rule refuses.
    assert_eq!(explain("export", r#"{"to":"elsewhere"}"#, true), "deny");
    assert_eq!(explain("drop", "{}", true), "deny");
    let file = dir.write(
        "p.test.yaml",
        "policy: p.yaml\ncases:\n  - {name: held, tool: export, arguments: {to: ok}, expect: require_approval}\n  - {name: granted, tool: export, arguments: {to: ok}, grant: true, expect: allow}\n  - {name: granted bad args, tool: export, arguments: {to: x}, grant: true, expect: deny, kind: arguments}\n",
    );
    let out = tollgate(&["test", &file]);
    assert_eq!(code(&out), 0, "{}", stdout(&out));
    assert!(stdout(&out).contains("3 passed"), "{}", stdout(&out));
}

#[test]
fn explain_names_the_rule_and_the_failing_argument() {
    let out = tollgate(&[
        "explain",
        "--policy",
        &repo("policies/healthlake.yaml"),
        "--tool",
        "start_fhir_export_job",
        "--args",
        r#"{"datastore_id":"0123456789abcdef0123456789abcdef","data_access_role_arn":"arn:aws:iam::1:role/x","output_data_config":{"s3_configuration":{"s3_uri":"s3://elsewhere/x"}}}"#,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("decision: deny (arguments)"), "{text}");
    assert!(text.contains("rules[0] (start_fhir_export_job)"), "{text}");
    assert!(
        text.contains("argument: /output_data_config/s3_configuration/s3_uri"),
        "{text}"
    );
    let out = tollgate(&[
        "--format",
        "json",
        "explain",
        "--policy",
        &repo("policies/healthlake.yaml"),
        "--tool",
        "delete_fhir_datastore",
    ]);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["decision"], "deny");
    assert_eq!(json["rule"], "rules[4] (delete_*)");
    let out = tollgate(&[
        "explain",
        "--policy",
        &repo("policies/healthlake.yaml"),
        "--tool",
        "x",
        "--args",
        "{nope",
    ]);
    assert_eq!(code(&out), 2);
}

#[test]
fn schema_is_json_schema_generated_from_the_types() {
    let out = tollgate(&["schema"]);
    assert_eq!(code(&out), 0);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "Tollgate policy");
    assert!(schema["properties"]["rules"].is_object());
    let text = stdout(&out);
    for field in [
        "rate_limit",
        "require_approval",
        "deny_as",
        "arguments",
        "per",
    ] {
        assert!(text.contains(field), "{field}");
    }
    // The committed copy that policies reference stays in sync.
    let committed = std::fs::read_to_string(repo("docs/policy.schema.json")).unwrap();
    assert_eq!(
        committed.trim(),
        text.trim(),
        "regenerate docs/policy.schema.json with `tollgate schema`"
    );
}

#[test]
fn config_files_are_validated_with_their_policies() {
    let dir = Dir::new("config");
    dir.write("p.yaml", "version: 1\nrules: []\n");
    let good = dir.write(
        "tollgate.yaml",
        "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n",
    );
    let out = tollgate(&["validate", &good]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).contains("(config)"));
    let bad = dir.write(
        "bad.yaml",
        "listen: 127.0.0.1:0\nservers:\n  a:\n    url: ${TOLLGATE_TEST_SURELY_UNSET}\n    policy: p.yaml\n    timout: 3s\n",
    );
    let out = tollgate(&["validate", &bad]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains("bad.yaml:6:5: ") && err.contains("unknown field `timout`"),
        "{err}"
    );
    let unset = dir.write(
        "unset.yaml",
        "servers:\n  a:\n    url: ${TOLLGATE_TEST_SURELY_UNSET}\n    policy: p.yaml\n",
    );
    let out = tollgate(&["validate", &unset]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("environment variable `TOLLGATE_TEST_SURELY_UNSET` is not set"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn validate_refuses_what_serve_refuses() {
    let dir = Dir::new("same-checks");
    dir.write("p.yaml", "version: 1\nrules: []\n");
    let server = "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n";
    let cases = [
        (
            "listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0', token: '${TOLLGATE_ADMIN_TOKEN}'}\n",
            "admin.token is empty",
        ),
        (
            "listen: 127.0.0.1:0\nadmin: {listen: '0.0.0.0:0'}\n",
            "admin.token is required",
        ),
        (
            "listen: 127.0.0.1:0\nadmin: {listen: '127.0.0.1:0', token: replace-me-with-a-long-random-admin-token}\n",
            "admin.token is still a placeholder",
        ),
        (
            "listen: 127.0.0.1:0\nclients:\n  - {name: agent, key: replace-me-with-a-long-random-agent-key}\n",
            "the key of `agent` is still a placeholder",
        ),
    ];
    for (i, (head, expected)) in cases.iter().enumerate() {
        let config = dir.write(&format!("t{i}.yaml"), &format!("{head}{server}"));
        for command in ["validate", "serve"] {
            let mut args = vec![command];
            if command == "serve" {
                args.push("--config");
            }
            args.push(&config);
            let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(&args)
                .env("TOLLGATE_ADMIN_TOKEN", "")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            // A `serve` that accepted the file would run: bounded, then ended.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            assert_eq!(code(&out), 1, "{command} {head}: {}", stderr(&out));
            assert!(
                stderr(&out).contains(expected),
                "{command}: {}",
                stderr(&out)
            );
        }
    }
}

#[test]
fn version_names_the_commit() {
    let out = tollgate(&["--version"]);
    assert_eq!(code(&out), 0);
    assert!(
        stdout(&out).starts_with("tollgate 0.1.0 ("),
        "{}",
        stdout(&out)
    );
}

// Issue 18, point 14: every error at once, tabs named, an error said once.

#[test]
fn validate_reports_top_level_and_rule_errors_together() {
    let dir = Dir::new("toplevel");
    let file = dir.write(
        "x.yaml",
        "version: 1\ndefualt: deny\nmdoe: audit\nrules:\n  - tool: a\n    actoin: allow\n",
    );
    let out = tollgate(&["validate", &file]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{file}:2:1: unknown field `defualt`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:3:1: unknown field `mdoe`")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:6:5: unknown field `actoin`")),
        "{err}"
    );
}

#[test]
fn a_tab_in_the_indentation_is_named() {
    let dir = Dir::new("tabs");
    for (name, text) in [
        ("item.yaml", "version: 1\nrules:\n\t- tool: a\n"),
        (
            "key.yaml",
            "version: 1\nrules:\n  - tool: a\n\t  action: allow\n",
        ),
    ] {
        let file = dir.write(name, text);
        let out = tollgate(&["validate", &file]);
        assert_eq!(code(&out), 1, "{name}");
        assert!(
            stderr(&out).contains("tabs are not allowed for indentation in YAML"),
            "{name}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn an_io_error_is_said_once() {
    let dir = Dir::new("once");
    dir.write("p.yaml", "version: 1\nrules: []\n");
    let config = dir.write(
        "tollgate.yaml",
        "listen: 127.0.0.1:0\naudit:\n  path: /nonexistent-tollgate-dir/audit.jsonl\nservers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n",
    );
    let out = tollgate(&["serve", "--config", &config]);
    assert_ne!(code(&out), 0);
    let err = stderr(&out);
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

// Issue 18, point 15: shadowed rules.

#[test]
fn a_shadowed_rule_is_a_warning_and_strict_makes_it_fail() {
    let dir = Dir::new("shadow");
    let file = dir.write(
        "p.yaml",
        "version: 1\nrules:\n  - tool: \"*\"\n    action: deny\n  - tool: describe_job\n    action: allow\n",
    );
    let out = tollgate(&["validate", &file]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "warning: {file}:5:5: rules[1] (`describe_job`) can never decide: rules[0] (`*`) at {file}:3:5"
        )),
        "{err}"
    );
    let out = tollgate(&["validate", "--strict", &file]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("can never decide"));
    let out = tollgate(&["validate", "--format", "json", &file]);
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["files"][0]["ok"], true);
    assert_eq!(report["files"][0]["warnings"].as_array().unwrap().len(), 1);
    // Through a configuration file too.
    let config = dir.write(
        "tollgate.yaml",
        "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n",
    );
    let out = tollgate(&["validate", "--strict", &config]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    // The starter policies have none.
    let out = tollgate(&["validate", "--strict", &repo("policies")]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

// Issue 18, point 16: the schema speaks to users; --format only where it applies.

#[test]
fn the_schema_description_is_for_users() {
    let out = tollgate(&["schema"]);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let description = schema["description"].as_str().unwrap();
    assert!(description.contains("Tollgate"), "{description}");
    for internal in ["`R`", "[`", "raw value", "rule type"] {
        assert!(!description.contains(internal), "{internal}: {description}");
    }
    assert!(
        !stdout(&out).contains("[`"),
        "rustdoc links leak into the schema"
    );
}

#[test]
fn format_is_offered_only_where_it_changes_the_output() {
    for command in ["validate", "test", "explain", "approvals"] {
        let out = tollgate(&[command, "--help"]);
        assert!(stdout(&out).contains("--format"), "{command}");
    }
    for command in ["demo", "serve", "stdio", "scan", "health", "schema"] {
        let out = tollgate(&[command, "--help"]);
        assert_eq!(code(&out), 0, "{command}");
        assert!(
            !stdout(&out).contains("--format"),
            "{command}: {}",
            stdout(&out)
        );
    }
    let out = tollgate(&["--help"]);
    assert!(!stdout(&out).contains("--format"), "{}", stdout(&out));
    let out = tollgate(&[
        "explain",
        "--format",
        "json",
        "--policy",
        &repo("policies/healthlake.yaml"),
        "--tool",
        "x",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let _: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let out = tollgate(&["demo", "--format", "json"]);
    assert_eq!(code(&out), 2, "demo has no --format");
}

#[test]
fn a_bad_value_names_its_key() {
    let dir = Dir::new("bad-value");
    dir.write("p.yaml", "version: 1\nrules: []\n");
    let config = dir.write(
        "tollgate.yaml",
        "limits:\n  max_body: 4MiB\n  session_idle: 1 hour\nservers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n    timeout: ${TOLLGATE_TEST_TIMEOUT}\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["validate", &config])
        .env("TOLLGATE_TEST_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains("limits.session_idle: invalid duration `1 hour`"),
        "{err}"
    );
    // `${VAR}` works in every field; a bad value it brings is named by its key too.
    let fixed = dir.write(
        "fixed.yaml",
        "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n    timeout: ${TOLLGATE_TEST_TIMEOUT}\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["validate", &fixed])
        .env("TOLLGATE_TEST_TIMEOUT", "soon")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("servers.a.timeout: invalid duration `soon`"),
        "{}",
        stderr(&out)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["validate", &fixed])
        .env("TOLLGATE_TEST_TIMEOUT", "5s")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn test_and_explain_take_the_callers_claims_and_scopes() {
    let dir = Dir::new("identity");
    let policy = dir.write(
        "p.yaml",
        "version: 1\ndefault: deny\nrules:\n  - tool: query\n    when: {claims: {groups: [sre]}}\n    action: allow\n    rate_limit: {max: 1, window: 1h, per: user}\n  - tool: export\n    scopes: [exports:write]\n    action: allow\n",
    );
    let file = dir.write(
        "p.test.yaml",
        "policy: p.yaml\ncases:\n  - {name: alice is sre, tool: query, claims: {sub: alice, groups: [sre]}, expect: allow}\n  - {name: alice again in another session, tool: query, session: s2, claims: {sub: alice, groups: [sre]}, expect: deny, kind: rate_limit}\n  - {name: carol has her own quota, tool: query, claims: {sub: carol, groups: [sre]}, expect: allow}\n  - {name: bob is not, tool: query, claims: {sub: bob, groups: [dev]}, expect: deny, kind: deny}\n  - {name: export needs the scope, tool: export, scopes: [mcp], expect: deny, kind: insufficient_scope}\n  - {name: export with it, tool: export, scopes: [mcp, exports:write], expect: allow}\n",
    );
    let out = tollgate(&["test", &file]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("6 passed, 0 failed"),
        "{}",
        stdout(&out)
    );
    let explain = |extra: &[&str]| {
        let mut args = vec!["--format", "json", "explain", "--policy", &policy];
        args.extend_from_slice(extra);
        let out = tollgate(&args);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };
    let sre = explain(&[
        "--tool",
        "query",
        "--claims",
        r#"{"sub": "a", "groups": ["sre"]}"#,
    ]);
    assert_eq!(sre["decision"], "allow", "{sre}");
    let dev = explain(&["--tool", "query", "--claims", r#"{"groups": "dev"}"#]);
    assert_eq!(dev["decision"], "deny", "{dev}");
    let from_claims = explain(&[
        "--tool",
        "export",
        "--claims",
        r#"{"scope": "mcp exports:write"}"#,
    ]);
    assert_eq!(from_claims["decision"], "allow", "{from_claims}");
    let lacking = explain(&["--tool", "export", "--scopes", "mcp"]);
    assert_eq!(lacking["kind"], "insufficient_scope", "{lacking}");
    let out = tollgate(&[
        "explain", "--policy", &policy, "--tool", "x", "--claims", "[1]",
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("--claims is not a JSON object"),
        "{}",
        stderr(&out)
    );
}

/// `tollgate demo-upstream` on a free port, ended on drop.
struct DemoUpstream {
    child: std::process::Child,
    url: String,
}

impl DemoUpstream {
    fn start(extra_tools: &str) -> DemoUpstream {
        use std::io::BufRead as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["demo-upstream", "--listen", "127.0.0.1:0"])
            .args(["--extra-tools", extra_tools])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line.trim().rsplit(' ').next().unwrap().to_owned();
        assert!(url.starts_with("http://127.0.0.1:"), "{line}");
        DemoUpstream { child, url }
    }
}

impl Drop for DemoUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn lock_writes_the_same_bytes_twice_and_check_tells_a_difference() {
    let dir = Dir::new("lock");
    let demo = DemoUpstream::start("0");
    let (a, b) = (dir.path().join("a.lock"), dir.path().join("b.lock"));
    for path in [&a, &b] {
        let out = tollgate(&[
            "lock",
            "--upstream",
            &demo.url,
            "--output",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let text = std::fs::read_to_string(&a).unwrap();
    assert_eq!(text, std::fs::read_to_string(&b).unwrap());
    assert!(text.contains("\nversion: 1\n"), "{text}");
    assert!(
        text.contains("- name: list_fhir_datastores\n  digest: sha256:"),
        "{text}"
    );
    let check = tollgate(&[
        "lock",
        "--upstream",
        &demo.url,
        "--output",
        a.to_str().unwrap(),
        "--check",
    ]);
    assert_eq!(code(&check), 0, "{}", stderr(&check));
    assert_eq!(
        std::fs::read_to_string(&a).unwrap(),
        text,
        "--check writes nothing"
    );
    // Another upstream with one more tool: a difference, named, and exit 1.
    let more = DemoUpstream::start("1");
    let check = tollgate(&[
        "lock",
        "--upstream",
        &more.url,
        "--output",
        a.to_str().unwrap(),
        "--check",
    ]);
    assert_eq!(code(&check), 1, "{}", stderr(&check));
    assert!(
        stdout(&check).contains(
            "tool `filler_tool_0` added\n--- locked/filler_tool_0\n+++ live/filler_tool_0\n"
        ),
        "{}",
        stdout(&check)
    );
    // `scan --lock` writes the same lock beside the starter policy.
    let c = dir.path().join("c.lock");
    let scan = tollgate(&[
        "scan",
        "--upstream",
        &demo.url,
        "--lock",
        c.to_str().unwrap(),
    ]);
    assert_eq!(code(&scan), 0, "{}", stderr(&scan));
    assert!(stdout(&scan).contains("default: deny"));
    assert_eq!(std::fs::read_to_string(&c).unwrap(), text);
    // From a configuration: the server's `tools_lock:` is written, relative to the file.
    let policy = dir.write("p.yaml", "version: 1\ndefault: deny\n");
    let config = dir.write(
        "tollgate.yaml",
        &format!("servers:\n  demo:\n    url: {}\n    policy: {policy}\n    tools_lock: demo.tools.lock\n", demo.url),
    );
    let out = tollgate(&["lock", "--config", &config]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let locked = std::fs::read_to_string(dir.path().join("demo.tools.lock")).unwrap();
    assert!(locked.contains("\nserver: demo\n"), "{locked}");
    let out = tollgate(&["lock", "--config", &config, "--server", "nope"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("no server `nope`"),
        "{}",
        stderr(&out)
    );
    // A bad lock is an error naming the file.
    let bad = dir.write("bad.lock", "version: 7\nserver: x\ntools: []\n");
    let out = tollgate(&["lock", "--upstream", &demo.url, "--output", &bad, "--check"]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("bad.lock: not a valid tool lock: version 7"),
        "{}",
        stderr(&out)
    );
}

// Issue 25: result rules in `validate`, `test` and `explain`.
const RESULTS_POLICY: &str = "version: 1\ndefault: allow\nresults:\n  - tool: '*'\n    block: [private_key]\n  - tool: read_*\n    redact: [us_ssn, {name: mrn, pattern: 'MRN-[0-9]{8}'}]\n";

#[test]
fn validate_refuses_unknown_detectors_and_bad_patterns_with_their_lines() {
    let dir = Dir::new("results-validate");
    let file = dir.write(
        "p.yaml",
        "version: 1\nresults:\n  - tool: '*'\n    redact: [aws_access_key, aws_secret]\n  - tool: read_*\n    redact:\n      - name: mrn\n        pattern: 'MRN-[0-9'\n",
    );
    let out = tollgate(&["validate", &file]);
    assert_eq!(code(&out), 1);
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{file}:4:30: results[0].redact: `aws_secret` is not a detector: use one of aws_access_key, private_key,")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:7:15: results[1].redact: the pattern of `mrn` is not valid: unclosed character class (at character 5 of `MRN-[0-9`)")),
        "{err}"
    );
    let good = dir.write("q.yaml", RESULTS_POLICY);
    let out = tollgate(&["validate", &good]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
}

#[test]
fn test_cases_expect_redactions_and_blocks() {
    let dir = Dir::new("results-test");
    dir.write("p.yaml", RESULTS_POLICY);
    let cases = "policy: p.yaml\ncases:\n  - name: ssn and mrn redacted\n    tool: read_chart\n    result:\n      content: [{type: text, text: 'SSN 123-45-6789'}]\n      structuredContent: {id: MRN-12345678}\n    expect_redacted: [us_ssn, mrn]\n  - name: a key withholds\n    tool: anything\n    result: {content: [{type: resource, resource: {uri: 'x:k', text: \"-----BEGIN PRIVATE KEY-----\\nMIIE\\n-----END PRIVATE KEY-----\"}}]}\n    expect_blocked: true\n  - name: other tools keep the ssn\n    tool: list_x\n    result: {content: [{type: text, text: 'SSN 123-45-6789'}]}\n    expect_redacted: []\n    expect_blocked: false\n";
    let file = dir.write("p.test.yaml", cases);
    let out = tollgate(&["test", &file]);
    assert_eq!(code(&out), 0, "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("3 passed, 0 failed"),
        "{}",
        stdout(&out)
    );
    // Without the detector the case expecting it fails, saying what was found instead.
    dir.write("p.yaml", &RESULTS_POLICY.replace("us_ssn, ", ""));
    let out = tollgate(&["test", &file]);
    assert_eq!(code(&out), 1);
    let text = stdout(&out);
    assert!(
        text.contains("ssn and mrn redacted: expected the result redacted by [mrn, us_ssn], got [mrn] (found: [mrn])"),
        "{text}"
    );
    // Without the block entry, the withheld case fails.
    dir.write(
        "p.yaml",
        &RESULTS_POLICY.replace("block: [private_key]", "redact: [email]"),
    );
    let text = stdout(&tollgate(&["test", &file]));
    assert!(
        text.contains("a key withholds: expected the result withheld, but no `block` detector applying to `anything` found anything"),
        "{text}"
    );
    // Expectations need the `result` they check.
    let broken = dir.write(
        "b.test.yaml",
        "policy: p.yaml\ncases:\n  - {name: no result, tool: x, expect_redacted: [mrn]}\n",
    );
    let out = tollgate(&["test", &broken]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("`expect_redacted` / `expect_blocked` need the `result` they check"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn explain_lists_the_results_entries_that_apply() {
    let dir = Dir::new("results-explain");
    let policy = dir.write("p.yaml", RESULTS_POLICY);
    let out = tollgate(&["explain", "--policy", &policy, "--tool", "read_chart"]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "results:  results[0] (*) at {policy}:4:5: withholds a result with private_key"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "          results[1] (read_*) at {policy}:6:5: redacts us_ssn, mrn"
        )),
        "{text}"
    );
    let out = tollgate(&[
        "--format", "json", "explain", "--policy", &policy, "--tool", "list_x",
    ]);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(
        json["results"],
        serde_json::json!([{"entry": "results[0] (*)", "at": format!("{policy}:4:5"),
            "redact": [], "block": ["private_key"], "mode": "enforce"}])
    );
    let none = dir.write(
        "n.yaml",
        "version: 1\nresults:\n  - tool: read_*\n    redact: [email]\n",
    );
    let text = stdout(&tollgate(&[
        "explain", "--policy", &none, "--tool", "list_x",
    ]));
    assert!(
        text.contains("results:  no `results` entry applies"),
        "{text}"
    );
}
