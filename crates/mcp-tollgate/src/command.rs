//! One module per subcommand, plus what they share.

pub mod approvals;
pub mod demo;
pub mod diff;
pub mod explain;
pub mod health;
pub mod instances;
pub mod listing;
pub mod lock;
pub mod scan;
pub mod serve;
pub mod simulate;
pub mod stdio;
pub mod test;
pub mod validate;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `--env` and `--inherit-env`: the environment of a stdio server started from the
/// command line (`-- CMD ARGS`), which otherwise gets only a few of Tollgate's variables
/// (`PATH`, `HOME`, locale...; docs/configuration.md, `env`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChildEnv {
    /// A variable for the stdio server: `--env AWS_REGION=us-east-1` (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = name_value)]
    pub env: Vec<(String, String)>,
    /// A variable of Tollgate's own environment passed on to the stdio server, e.g.
    /// `--inherit-env AWS_PROFILE` (repeatable).
    #[arg(long = "inherit-env", value_name = "NAME")]
    pub inherit_env: Vec<String>,
}

impl ChildEnv {
    /// Whether any was given (they apply to `-- CMD ARGS` only).
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.inherit_env.is_empty()
    }
}

fn name_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not NAME=VALUE")),
    }
}

/// `--format`, on the subcommands whose output it changes.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct FormatArg {
    /// Output format: lines for people, or JSON for scripts.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
}

impl FormatArg {
    /// The format asked for here, else before the subcommand (`tollgate --format json
    /// test`, kept for scripts written that way), else human.
    pub fn or(self, before: Option<Format>) -> Format {
        self.format.or(before).unwrap_or(Format::Human)
    }
}

/// Output format of the policy commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Lines for people.
    Human,
    /// JSON for scripts.
    Json,
}

/// `tollgate schema`.
pub fn schema() -> ExitCode {
    match serde_json::to_string_pretty(&tollgate_policy::policy_schema()) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::from(2)
        }
    }
}

/// This very binary's path, for hints a person copies (`/path/to/tollgate approvals
/// list`): the name they typed may not be on their PATH (`target/release/tollgate`).
pub fn own_binary() -> String {
    let path = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tollgate".to_owned());
    if path.contains(char::is_whitespace) {
        format!("'{path}'")
    } else {
        path
    }
}

/// Reads a file, naming it in the error (exit code 2 territory).
pub fn read_file(path: &std::path::Path) -> Result<String, String> {
    if path.is_dir() {
        return Err(format!(
            "{}: is a directory, expected a file",
            path.display()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

/// Every file under the given paths that `accept` takes; missing paths are errors.
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

/// A single-threaded runtime for the client commands (`approvals`, `health`); `None`
/// (after printing why) when it cannot be built.
pub fn client_runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Some(runtime),
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            None
        }
    }
}
