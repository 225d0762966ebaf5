//! `tollgate validate PATH...`: check policy, policy-test and config files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::json;
use tollgate_policy::Policy;

use super::{Format, read_file};

/// Arguments of `tollgate validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// `--format`.
    #[command(flatten)]
    pub output: super::FormatArg,
    /// Files, or directories searched for `*.yaml`/`*.yml`.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Treat warnings (e.g. a rule that can never decide) as errors: exit 1.
    #[arg(long)]
    pub strict: bool,
}

/// What checking one file found.
#[derive(Debug, Default)]
pub struct Checked {
    /// Problems that make the file invalid.
    pub errors: Vec<String>,
    /// Valid, but almost certainly not what was meant.
    pub warnings: Vec<String>,
}

impl Checked {
    fn policy(result: Result<Policy, tollgate_policy::PolicyErrors>) -> Checked {
        match result {
            Ok(policy) => Checked {
                errors: Vec::new(),
                warnings: policy.warnings().iter().map(ToString::to_string).collect(),
            },
            Err(errors) => Checked {
                errors: errors.errors.iter().map(ToString::to_string).collect(),
                warnings: Vec::new(),
            },
        }
    }
}

/// What a file is, judged from its name and top-level keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A policy.
    Policy,
    /// Policy test cases.
    PolicyTest,
    /// A `tollgate.yaml` configuration.
    Config,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::PolicyTest => "policy test",
            Kind::Config => "config",
        }
    }
}

/// Decides what a YAML file is.
pub fn kind_of(path: &Path, source: &str) -> Kind {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".test.yaml") || name.ends_with(".test.yml") {
        return Kind::PolicyTest;
    }
    if source.lines().any(|l| l.starts_with("servers:")) {
        return Kind::Config;
    }
    Kind::Policy
}

/// Every YAML file under the given paths; missing paths are errors.
pub fn collect(paths: &[PathBuf], accept: fn(&Path) -> bool) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for path in paths {
        if path.is_dir() {
            walk(path, accept, &mut files, &mut errors);
        } else if path.exists() {
            files.push(path.clone());
        } else {
            errors.push(format!("{}: no such file or directory", path.display()));
        }
    }
    files.sort();
    (files, errors)
}

fn walk(dir: &Path, accept: fn(&Path) -> bool, files: &mut Vec<PathBuf>, errors: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            errors.push(format!("{}: cannot read directory: {err}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, accept, files, errors);
        } else if accept(&path) {
            files.push(path);
        }
    }
}

/// Whether a path is a YAML file.
pub fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Checks one configuration file and the policies it names.
pub fn validate_config(path: &Path, source: &str) -> Checked {
    let config =
        match tollgate_proxy::Config::from_yaml(source, &path.display().to_string(), &|name| {
            std::env::var(name).ok()
        }) {
            Ok(config) => config,
            Err(err) => {
                return Checked {
                    errors: err.problems,
                    warnings: Vec::new(),
                };
            }
        };
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut checked = Checked::default();
    // The listeners' certificates, as `serve` loads them.
    let mut config = config;
    config.resolve_paths(dir);
    let admin_tls = config.admin.as_ref().and_then(|a| a.listen_tls.as_ref());
    for (key, tls) in [
        ("listen_tls", config.listen_tls.as_ref()),
        ("admin.listen_tls", admin_tls),
    ] {
        if let Some(Err(error)) = tls.map(tollgate_proxy::check_tls) {
            checked.errors.push(format!("{key}: {error}"));
        }
    }
    for server in config.servers.values() {
        let policy_path = config.policy_path(dir, server);
        match read_file(&policy_path) {
            Ok(text) => {
                let policy =
                    Checked::policy(Policy::from_yaml(&text, &policy_path.display().to_string()));
                checked.errors.extend(policy.errors);
                checked.warnings.extend(policy.warnings);
            }
            Err(err) => checked.errors.push(err),
        }
    }
    checked
}

fn validate_file(path: &Path, source: &str) -> (Kind, Checked) {
    let kind = kind_of(path, source);
    let checked = match kind {
        Kind::Policy => Checked::policy(Policy::from_yaml(source, &path.display().to_string())),
        Kind::PolicyTest => Checked {
            errors: super::test::load_suite(path, source)
                .err()
                .unwrap_or_default(),
            warnings: Vec::new(),
        },
        Kind::Config => validate_config(path, source),
    };
    (kind, checked)
}

/// Runs `tollgate validate`.
pub fn run(args: ValidateArgs, format: Format) -> ExitCode {
    let (files, mut io_errors) = collect(&args.paths, is_yaml);
    let mut invalid = 0;
    let mut report = Vec::new();
    for file in &files {
        let source = match read_file(file) {
            Ok(source) => source,
            Err(err) => {
                io_errors.push(err);
                continue;
            }
        };
        let (kind, checked) = validate_file(file, &source);
        let ok = checked.errors.is_empty() && (!args.strict || checked.warnings.is_empty());
        if format == Format::Human {
            for error in &checked.errors {
                eprintln!("error: {error}");
            }
            for warning in &checked.warnings {
                eprintln!("warning: {warning}");
            }
            if ok {
                println!("ok: {} ({})", file.display(), kind.name());
            }
        }
        if !ok {
            invalid += 1;
        }
        report.push(
            json!({"path": file.display().to_string(), "kind": kind.name(), "ok": ok,
            "errors": checked.errors, "warnings": checked.warnings}),
        );
    }
    for error in &io_errors {
        eprintln!("error: {error}");
    }
    if format == Format::Json {
        println!("{}", json!({"files": report, "io_errors": io_errors}));
    } else if files.is_empty() && io_errors.is_empty() {
        eprintln!("error: no YAML files found");
    }
    if !io_errors.is_empty() || files.is_empty() {
        ExitCode::from(2)
    } else if invalid > 0 {
        if format == Format::Human {
            eprintln!("{invalid} of {} file(s) invalid", files.len());
        }
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
