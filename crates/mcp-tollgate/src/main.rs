//! `tollgate`: a policy-enforcing proxy for the Model Context Protocol.
//!
//! A thin clap dispatcher; each subcommand lives in its own module under `command/`.
//! Exit codes (docs/configuration.md): 0 ok, 1 a policy/config/test failure the user must fix,
//! 2 usage or I/O error.

mod command;

// A fifth of the proxy's instructions per call went to glibc's malloc and free
// (callgrind, docs/benchmarks.md); mimalloc is markedly cheaper for this pattern of
// many small, short-lived allocations.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// `version (git hash)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("TOLLGATE_GIT_HASH"),
    ")"
);

/// Tollgate: decide every MCP tool call against a policy kept in git.
#[derive(Debug, Parser)]
#[command(name = "tollgate", version = VERSION, about, propagate_version = true)]
struct Cli {
    /// Output format of validate, test and explain, given before the subcommand
    /// (still accepted; documented on those subcommands).
    #[arg(long, value_enum, hide = true)]
    format: Option<command::Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(command::serve::ServeArgs),
    /// Speak MCP on stdin/stdout, for clients that launch a command.
    Stdio(command::stdio::StdioArgs),
    /// Run the proxy in front of a built-in demo upstream, for a first try.
    Demo(command::demo::DemoArgs),
    /// Run only the built-in demo MCP server (for containers, tests and benchmarks).
    DemoUpstream(command::demo::DemoUpstreamArgs),
    /// Check policy and config files; exit 1 on any error.
    Validate(command::validate::ValidateArgs),
    /// Run policy test cases (`*.test.yaml`).
    Test(command::test::TestArgs),
    /// Show the calls (from test cases and audit logs) whose decision a policy change changes.
    Diff(command::diff::DiffArgs),
    /// Say which rule decides a call, and why.
    Explain(command::explain::ExplainArgs),
    /// Approve or deny held calls through the admin API.
    Approvals(command::approvals::ApprovalsArgs),
    /// Print the JSON Schema of the policy file.
    Schema,
    /// List an upstream's tools and print a starter policy.
    Scan(command::scan::ScanArgs),
    /// Exit 0 when a Tollgate admin listener (or an MCP endpoint) is healthy.
    Health(command::health::HealthArgs),
}

fn main() -> ExitCode {
    use tollgate_proxy::upstream::stdio;
    let args: Vec<String> = std::env::args().collect();
    // `tollgate __stdio-guard -- CMD ARGS`: how Tollgate starts stdio upstreams (not for people).
    if args.get(1).map(String::as_str) == Some(stdio::GUARD_ARG) {
        let command = args.get(3..).unwrap_or_default();
        let code = stdio::run_guard(command);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    // /proc/self/exe is this very binary even after an upgrade replaced the file.
    let own = std::path::Path::new("/proc/self/exe");
    match std::env::current_exe() {
        _ if own.exists() => stdio::use_guard(own.to_owned()),
        Ok(exe) => stdio::use_guard(exe),
        Err(_) => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match cli.command {
        Command::Serve(args) => command::serve::run(args),
        Command::Stdio(args) => command::stdio::run(args),
        Command::Demo(args) => command::demo::run(args),
        Command::DemoUpstream(args) => command::demo::run_upstream(args),
        Command::Validate(args) => {
            let format = args.output.or(cli.format);
            command::validate::run(args, format)
        }
        Command::Test(args) => {
            let format = args.output.or(cli.format);
            command::test::run(args, format)
        }
        Command::Diff(args) => {
            let format = args.output.or(cli.format);
            command::diff::run(args, format)
        }
        Command::Explain(args) => {
            let format = args.output.or(cli.format);
            command::explain::run(args, format)
        }
        Command::Approvals(args) => command::approvals::run(args),
        Command::Schema => command::schema(),
        Command::Health(args) => command::health::run(args),
        Command::Scan(args) => command::scan::run(args),
    }
}
