//! `tollgate health`: exit 0 when a Tollgate (or an MCP endpoint) answers; for
//! container HEALTHCHECKs, which should not need curl in the image.

use std::process::ExitCode;
use std::time::Duration;

/// Arguments of `tollgate health`.
#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The admin listener; `GET /healthz` must answer 200. The image's HEALTHCHECK
    /// takes it from TOLLGATE_HEALTH_ADMIN when `admin.listen` is not on port 9090.
    #[arg(
        long,
        env = "TOLLGATE_HEALTH_ADMIN",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// Instead (`--admin` is then not asked), an MCP endpoint: a `ping` POST must get
    /// an HTTP answer below 500.
    #[arg(long)]
    pub url: Option<String>,
}

/// Runs `tollgate health`.
pub fn run(args: HealthArgs) -> ExitCode {
    let Some(runtime) = super::client_runtime() else {
        return ExitCode::from(2);
    };
    let result = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()?;
        let response = match &args.url {
            Some(url) => {
                client
                    .post(url)
                    .header("accept", "application/json, text/event-stream")
                    .header("content-type", "application/json")
                    .body(r#"{"jsonrpc":"2.0","id":"health","method":"ping"}"#)
                    .send()
                    .await?
            }
            None => {
                client
                    .get(format!("{}/healthz", args.admin.trim_end_matches('/')))
                    .send()
                    .await?
            }
        };
        Ok::<_, reqwest::Error>(response.status())
    });
    match result {
        Ok(status) if args.url.is_some() && status.as_u16() < 500 => ExitCode::SUCCESS,
        Ok(status) if status.is_success() => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("unhealthy: HTTP {status}");
            ExitCode::from(1)
        }
        Err(err) => {
            eprintln!("unhealthy: {err}");
            ExitCode::from(1)
        }
    }
}
