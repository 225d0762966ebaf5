//! The README and docs/ against the binary and the code: configuration keys, policy
//! keys, commands and their flags, admin routes, audit fields, links and paths.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn tollgate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .output()
        .expect("run tollgate")
}

/// README.md and every docs/*.md, by path.
fn documents() -> Vec<(String, String)> {
    let mut docs = vec![("README.md".to_owned(), read("README.md"))];
    let mut names: Vec<_> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".md"))
        .collect();
    names.sort();
    for name in names {
        let path = format!("docs/{name}");
        let text = read(&path);
        docs.push((path, text));
    }
    docs
}

/// Every backticked word (`` `x` ``) in `text`.
fn backticked(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The first cell of each row of the Markdown tables in `text` that start with a
/// backticked key (header and separator rows have none).
fn table_keys(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| {
            let cell = line.strip_prefix("| `")?;
            Some(cell.split('`').next()?.to_owned())
        })
        .collect()
}

/// The lines of fenced code blocks and the inline code spans of `text`.
fn code(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            out.push(line.to_owned());
        } else {
            out.extend(backticked(line));
        }
    }
    out
}

// ---- configuration ----------------------------------------------------------------

/// The keys `tollgate validate` accepts at one level of a configuration, from its
/// "unknown field `zz_bogus`, expected one of ..." error.
fn accepted_keys(config: &str) -> BTreeSet<String> {
    let dir = std::env::temp_dir().join(format!("tollgate-docs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.yaml"), "version: 1\nrules: []\n").unwrap();
    let file = dir.join("tollgate.yaml");
    std::fs::write(&file, config).unwrap();
    let out = tollgate(&["validate", &file.display().to_string()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let expected = err
        .split("unknown field `zz_bogus`, expected")
        .nth(1)
        .unwrap_or_else(|| panic!("no unknown-field error for:\n{config}\n{err}"));
    let line = expected.lines().next().unwrap_or("");
    backticked(line).into_iter().collect()
}

#[test]
fn the_configuration_reference_lists_exactly_the_keys_the_binary_accepts() {
    let doc = read("docs/configuration.md");
    let keys = doc
        .split("\n## Keys")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let documented: BTreeSet<String> = table_keys(keys).into_iter().collect();
    let server = "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n";
    let levels: [(&str, String); 16] = [
        ("", format!("zz_bogus: 1\n{server}")),
        (
            "listen_tls.",
            format!("listen_tls: {{cert: c, key: k, zz_bogus: 1}}\n{server}"),
        ),
        (
            "admin.listen_tls.",
            format!(
                "admin: {{listen: 127.0.0.1:0, listen_tls: {{cert: c, key: k, zz_bogus: 1}}}}\n{server}"
            ),
        ),
        (
            "admin.",
            format!("admin: {{listen: 127.0.0.1:0, zz_bogus: 1}}\n{server}"),
        ),
        (
            "admin.approvers[].",
            format!(
                "admin: {{listen: 127.0.0.1:0, approvers: [{{name: a, token: 0123456789abcdef, zz_bogus: 1}}]}}\n{server}"
            ),
        ),
        (
            "clients[].",
            format!("clients: [{{name: a, key: 0123456789abcdef, zz_bogus: 1}}]\n{server}"),
        ),
        (
            "audit.",
            format!("audit: {{path: '-', zz_bogus: 1}}\n{server}"),
        ),
        ("limits.", format!("limits: {{zz_bogus: 1}}\n{server}")),
        ("state.", format!("state: {{zz_bogus: 1}}\n{server}")),
        ("auth.", format!("auth: {{zz_bogus: 1}}\n{server}")),
        (
            "auth.oauth.",
            format!(
                "auth: {{oauth: {{issuer: 'https://i', resource: 'https://r', zz_bogus: 1}}}}\n{server}"
            ),
        ),
        (
            "approvals.",
            format!("approvals: {{zz_bogus: 1}}\n{server}"),
        ),
        ("servers.<name>.", format!("{server}    zz_bogus: 1\n")),
        (
            "telemetry.",
            format!("telemetry: {{zz_bogus: 1}}\n{server}"),
        ),
        (
            "telemetry.otlp.",
            format!("telemetry: {{otlp: {{zz_bogus: 1}}}}\n{server}"),
        ),
        (
            "telemetry.traces.",
            format!("telemetry: {{traces: {{zz_bogus: 1}}}}\n{server}"),
        ),
    ];
    let mut accepted = BTreeSet::new();
    for (prefix, config) in &levels {
        for key in accepted_keys(config) {
            accepted.insert(format!("{prefix}{key}"));
        }
    }
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "not in docs/configuration.md: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        unknown.is_empty(),
        "documented but not accepted: {unknown:?}"
    );
}

// ---- policies -----------------------------------------------------------------------

#[test]
fn the_policy_reference_covers_the_schema() {
    let doc = read("docs/policy.md");
    let out = tollgate(&["schema"]);
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys = |value: &serde_json::Value| -> BTreeSet<String> {
        value["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let documented: BTreeSet<String> = table_keys(&doc).into_iter().collect();
    let defs = &schema["$defs"];
    let mut expected = keys(&schema);
    expected.extend(keys(&defs["RuleDoc"]));
    expected.extend(keys(&defs["ResultDoc"]));
    // The table of built-in detectors names each one.
    for variant in defs["DetectorDoc"]["anyOf"].as_array().unwrap() {
        for name in variant["enum"].as_array().into_iter().flatten() {
            expected.insert(name.as_str().unwrap().to_owned());
        }
    }
    assert_eq!(documented, expected, "the key tables of docs/policy.md");
    // Nested keys and every enum value are named in the text.
    let words: BTreeSet<String> = backticked(&doc)
        .iter()
        .flat_map(|code| {
            code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    let mut names = keys(&defs["RateLimitDoc"]);
    names.extend(keys(&defs["ApprovalDoc"]));
    for def in defs.as_object().unwrap().values() {
        for variant in def["oneOf"].as_array().into_iter().flatten() {
            if let Some(value) = variant["const"].as_str() {
                names.insert(value.to_owned());
            }
        }
        for value in def["enum"].as_array().into_iter().flatten() {
            names.insert(value.as_str().unwrap().to_owned());
        }
    }
    assert!(names.contains("elicitation"), "{names:?}");
    let missing: Vec<_> = names.difference(&words).collect();
    assert!(missing.is_empty(), "not in docs/policy.md: {missing:?}");
}

// ---- commands -----------------------------------------------------------------------

/// `(subcommand words, flags)` of every `tollgate ...` command line in the docs.
fn commands(text: &str) -> Vec<(Vec<String>, Vec<String>)> {
    let mut found = Vec::new();
    for line in code(text) {
        let mut rest = line.as_str();
        while let Some(at) = rest.find("tollgate ") {
            let before = rest[..at].chars().last();
            let after = &rest[at + "tollgate ".len()..];
            rest = after;
            // A path ending in the binary (target/release/tollgate) is the binary too;
            // a repository URL (github.com/tollgate-dev/tollgate mcp-tollgate) is not.
            if matches!(before, Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                continue;
            }
            let command = after
                .split(['#', '`', '|', '>', ';'])
                .next()
                .unwrap_or("")
                .split(" -- ")
                .next()
                .unwrap_or("");
            let mut words = command.split_whitespace();
            let Some(sub) = words.next() else { continue };
            if !sub.chars().next().is_some_and(|c| c.is_ascii_lowercase()) || sub == "mcp-tollgate"
            {
                continue;
            }
            let mut path = vec![sub.to_owned()];
            if sub == "approvals"
                && let Some(action) = command.split_whitespace().nth(1)
                && action.chars().all(|c| c.is_ascii_lowercase())
            {
                path.push(action.to_owned());
            }
            let flags = command
                .split_whitespace()
                .filter(|w| w.starts_with("--") && w.len() > 2)
                .map(|w| {
                    w.split(['=', ')', ']', ',', '`'])
                        .next()
                        .unwrap_or(w)
                        .to_owned()
                })
                .collect();
            found.push((path, flags));
        }
    }
    found
}

#[test]
fn every_command_and_flag_in_the_docs_exists() {
    let mut checked = 0;
    for (path, text) in documents() {
        for (words, flags) in commands(&text) {
            let mut args: Vec<&str> = words.iter().map(String::as_str).collect();
            args.push("--help");
            let out = tollgate(&args);
            let help = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                out.status.code(),
                Some(0),
                "{path}: `tollgate {}` is no command",
                words.join(" ")
            );
            for flag in flags {
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{path}: `tollgate {}` has no {flag}",
                    words.join(" ")
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 30,
        "only {checked} flags found: is the parser broken?"
    );
}

#[test]
fn the_install_commands_name_the_real_package_and_binary() {
    let readme = read("README.md");
    assert!(readme.contains("cargo install --path crates/mcp-tollgate --locked"));
    assert!(readme.contains("target/release/tollgate"));
    let manifest = read("crates/mcp-tollgate/Cargo.toml");
    assert!(manifest.contains("name = \"mcp-tollgate\""));
    assert!(manifest.contains("[[bin]]\nname = \"tollgate\""));
    assert!(
        Path::new(env!("CARGO_BIN_EXE_tollgate")).ends_with("tollgate"),
        "the binary cargo builds is target/<profile>/tollgate"
    );
}

// ---- standing alone -----------------------------------------------------------------

#[test]
fn the_docs_stand_alone() {
    for (path, text) in documents() {
        assert!(
            !text.contains("SPEC"),
            "{path} points at a SPEC that is not in the repository"
        );
        assert!(
            !text.contains("static binary"),
            "{path}: the binary links glibc dynamically; say \"one binary\""
        );
        let dir = Path::new(&path).parent().unwrap().to_owned();
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap();
            if target.starts_with("http") || target.starts_with('#') {
                continue;
            }
            let file = target.split('#').next().unwrap();
            assert!(
                root().join(&dir).join(file).exists(),
                "{path}: link to {target}, which does not exist"
            );
        }
    }
    for command in ["serve", "stdio", "validate", "test"] {
        let out = tollgate(&[command, "--help"]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(!help.contains("SPEC"), "tollgate {command} --help: {help}");
    }
    let readme = read("README.md");
    for doc in [
        "docs/configuration.md",
        "docs/policy.md",
        "docs/errors.md",
        "docs/admin-api.md",
        "docs/audit.md",
    ] {
        assert!(readme.contains(&format!("]({doc})")), "README links {doc}");
    }
}

// ---- admin API and audit records ---------------------------------------------------

/// The paths of `.route("...")` calls in a source file.
fn routes(source: &str) -> BTreeSet<String> {
    source
        .split(".route(\"")
        .skip(1)
        .map(|r| r.split('"').next().unwrap().to_owned())
        .collect()
}

#[test]
fn the_admin_api_reference_lists_exactly_the_routes_served() {
    let mut served = routes(&read("crates/tollgate-proxy/src/admin.rs"));
    served.extend(routes(&read("crates/tollgate-proxy/src/admin/ops.rs")));
    let doc = read("docs/admin-api.md");
    let documented: BTreeSet<String> = table_keys(&doc)
        .iter()
        .filter_map(|k| k.split_once(' '))
        .map(|(_, path)| path.replace("<id>", "{id}"))
        .collect();
    assert_eq!(documented, served);
}

/// The fields a record serialises to, every optional field present.
fn record_fields(record: &tollgate_proxy::Record<'_>) -> BTreeSet<String> {
    match serde_json::to_value(record).unwrap() {
        serde_json::Value::Object(map) => map.keys().filter(|k| *k != "event").cloned().collect(),
        other => panic!("a record is an object, not {other}"),
    }
}

#[test]
fn the_audit_reference_names_every_field_written() {
    use tollgate_proxy::Record;
    let doc = read("docs/audit.md");
    let arguments = serde_json::json!({"a": 1});
    let decision = Record::Decision {
        call_id: "0190b8a0-0000-7000-8000-000000000001",
        server: "s",
        client: Some("c"),
        client_address: std::net::IpAddr::from([203, 0, 113, 9]),
        user: Some("alice"),
        client_id: Some("vscode"),
        jti: Some("j"),
        session: Some("x"),
        tool: "t",
        decision: "deny",
        kind: Some("arguments"),
        rule: "default",
        reason: "r",
        mode: "enforce",
        arguments_digest: "sha256:0".into(),
        arguments: Some(&arguments),
        failing_path: Some("/a"),
    };
    let documented: BTreeSet<String> = table_keys(&doc).into_iter().collect();
    assert_eq!(
        documented,
        record_fields(&decision),
        "the decision table of docs/audit.md"
    );
    let text: BTreeSet<String> = backticked(&doc).into_iter().collect();
    let redactions = [tollgate_policy::Redaction {
        name: "us_ssn".into(),
        count: 1,
    }];
    let others = [
        Record::Outcome {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            server: "s",
            tool: "t",
            upstream_latency_ms: 1.0,
            outcome: "rpc_error",
            code: Some(-32603),
            redactions: &redactions,
        },
        Record::ApprovalRequested {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            approval_id: "a",
            server: "s",
            tool: "t",
            via: "queue",
        },
        Record::Approval {
            call_id: "0190b8a0-0000-7000-8000-000000000001",
            approval_id: "a",
            server: "s",
            tool: "t",
            verdict: "approved",
            decided_by: Some("b"),
            reason: Some("r"),
        },
    ];
    for record in &others {
        for field in record_fields(record) {
            assert!(
                text.contains(&field),
                "docs/audit.md does not name `{field}` of {record:?}"
            );
        }
    }
}

// ---- configuration examples -------------------------------------------------------

/// The fenced ```yaml blocks of `text`.
fn yaml_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut open: Option<String> = None;
    for line in text.lines() {
        match (&mut open, line.trim_start()) {
            (None, "```yaml") => open = Some(String::new()),
            (Some(block), "```") => {
                blocks.push(std::mem::take(block));
                open = None;
            }
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[test]
fn every_yaml_block_of_the_observability_guide_is_a_valid_configuration() {
    let doc = read("docs/observability.md");
    let blocks = yaml_blocks(&doc);
    assert!(blocks.len() >= 3, "{blocks:?}");
    // Every `${VAR}` is set, so only the YAML and the keys are judged.
    let env = |_: &str| Some("s3cr3t".to_owned());
    let server = "servers:\n  a:\n    url: http://127.0.0.1:9/mcp\n    policy: p.yaml\n";
    let mut configs = 0;
    for block in blocks {
        // The OpenTelemetry Collector's file is YAML, not Tollgate's.
        if block.starts_with("# otel-collector.yaml") {
            serde_yaml::from_str::<serde_yaml::Value>(&block)
                .unwrap_or_else(|e| panic!("docs/observability.md: not YAML: {e}\n{block}"));
            continue;
        }
        let config = tollgate_proxy::Config::from_yaml(
            &format!("{block}{server}"),
            "docs/observability.md",
            &env,
        )
        .unwrap_or_else(|e| panic!("{e}\n{block}"));
        let telemetry = config.telemetry.expect("a telemetry: example");
        if let Some(headers) = telemetry.otlp.headers.get("authorization") {
            assert_eq!(headers, "Bearer s3cr3t", "{block}");
        }
        configs += 1;
    }
    assert!(configs >= 3, "the configuration and both examples");
}
