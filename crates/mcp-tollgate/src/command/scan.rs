//! `tollgate scan --upstream URL` / `tollgate scan -- CMD ARGS`: list an upstream's
//! tools (every page) and print a starter policy, and with `--lock FILE` write their
//! lock beside it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::Value;

use super::listing::{self, TIMEOUT, UpstreamArgs};

/// Arguments of `tollgate scan`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["upstream", "command"])))]
pub struct ScanArgs {
    #[command(flatten)]
    pub upstream: UpstreamArgs,
    /// Also write the tools' lock (`tollgate lock`) to this file.
    #[arg(long, value_name = "FILE")]
    pub lock: Option<PathBuf>,
}

/// Runs `tollgate scan`.
pub fn run(args: ScanArgs) -> ExitCode {
    let Some(source) = args.upstream.source() else {
        eprintln!("error: give `--upstream URL` or `-- CMD ARGS`");
        return ExitCode::from(2);
    };
    let (location, tools) = match listing::list_blocking(source, TIMEOUT) {
        Ok(listed) => listed,
        Err(err) => {
            eprintln!("error: {}", super::serve::error_chain(&err));
            return ExitCode::from(2);
        }
    };
    if let Some(path) = &args.lock {
        if let Err(err) = super::lock::write(path, &location, &tools) {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
        eprintln!(
            "wrote the lock of {} tools to {}",
            tools.len(),
            path.display()
        );
    }
    print!("{}", starter_policy(&location, &tools));
    ExitCode::SUCCESS
}

/// `text` as comment lines, each starting with `prefix`.
fn comment(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// A starter policy: deny by default, reads allowed, destructive tools denied,
/// everything else held for a human, each input schema as a commented skeleton.
pub fn starter_policy(upstream: &str, tools: &[Value]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Starter policy for {upstream}, written by `tollgate scan`."
    );
    let _ = writeln!(
        out,
        "# Review every rule: annotations are the server's own claims, not guarantees."
    );
    let _ = writeln!(out, "version: 1\ndefault: deny\nrules:");
    if tools.is_empty() {
        let _ = writeln!(out, "  []");
    }
    for tool in tools {
        let Some(name) = tool.get("name").and_then(Value::as_str) else {
            continue;
        };
        let hint = |key: &str| {
            tool.pointer(&format!("/annotations/{key}"))
                .and_then(Value::as_bool)
                == Some(true)
        };
        if let Some(description) = tool.get("description").and_then(Value::as_str) {
            out.push_str(&comment(description, "  # "));
        }
        let _ = writeln!(out, "  - tool: {}", Value::from(name));
        if hint("readOnlyHint") {
            let _ = writeln!(out, "    action: allow");
        } else if hint("destructiveHint") {
            let _ = writeln!(out, "    action: deny");
            let _ = writeln!(
                out,
                "    reason: {}",
                Value::from(format!(
                    "`{name}` is destructive; edit this rule to allow it"
                ))
            );
        } else {
            let _ = writeln!(out, "    action: require_approval");
            let _ = writeln!(
                out,
                "    reason: {}",
                Value::from(format!(
                    "`{name}` may change things; a human approves each call"
                ))
            );
        }
        if let Some(schema) = tool.get("inputSchema") {
            let _ = writeln!(
                out,
                "    # arguments:  # the tool's input schema; tighten it (patterns, enums) and uncomment"
            );
            let yaml = serde_yaml::to_string(schema).unwrap_or_default();
            out.push_str(&comment(yaml.trim_end(), "    #   "));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn the_starter_policy_compiles_and_follows_the_annotations() {
        let tools = json!([
            {"name": "read_x", "description": "Reads.\nTwo lines.", "annotations": {"readOnlyHint": true}, "inputSchema": {"type": "object"}},
            {"name": "drop: \"all\"", "annotations": {"destructiveHint": true}},
            {"name": "write_x", "inputSchema": {"type": "object", "properties": {"a": {"type": "string"}}}},
        ]);
        let text = starter_policy("http://x/mcp", tools.as_array().unwrap());
        let policy = tollgate_policy::Policy::from_yaml(&text, "scan.yaml").unwrap();
        let none = json!({});
        let call = |tool| tollgate_policy::ToolCall {
            tool,
            arguments: &none,
            client: None,
            session_key: "s",
            client_key: "c",
            user_key: "u",
            claims: None,
            scopes: &[],
        };
        assert_eq!(
            policy.evaluate(&call("read_x")).action,
            tollgate_policy::Action::Allow
        );
        assert_eq!(
            policy.evaluate(&call("drop: \"all\"")).action,
            tollgate_policy::Action::Deny
        );
        assert_eq!(
            policy.evaluate(&call("write_x")).action,
            tollgate_policy::Action::RequireApproval
        );
        assert!(text.contains("  # Reads.\n  # Two lines.\n"));
        assert!(text.contains("#   properties:"));
        let empty = starter_policy("http://x/mcp", &[]);
        tollgate_policy::Policy::from_yaml(&empty, "empty.yaml").unwrap();
    }
}
