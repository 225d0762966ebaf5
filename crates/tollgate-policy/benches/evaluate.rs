//! Policy decision time: 1, 50 and 1,000 rules; exact names and globs; with and
//! without the HealthLake export argument schema.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use tollgate_policy::{Policy, ToolCall};

fn policy(rules: usize, glob: bool) -> Policy {
    let mut text = String::from("version: 1\ndefault: deny\nrules:\n");
    for i in 0..rules {
        let tool = if glob {
            format!("tool_{i}_*")
        } else {
            format!("tool_{i}")
        };
        let _ = write!(text, "  - tool: \"{tool}\"\n    action: allow\n");
    }
    Policy::from_yaml(&text, "bench.yaml").unwrap()
}

const FHIR: &str = r#"
version: 1
default: deny
rules:
  - tool: start_fhir_export_job
    action: allow
    arguments:
      type: object
      required: [datastore_id, output_data_config, data_access_role_arn]
      properties:
        datastore_id: { type: string, pattern: "^[A-Za-z0-9]{32}$" }
        data_access_role_arn: { type: string, pattern: "^arn:aws:iam::" }
        output_data_config:
          type: object
          required: [s3_configuration]
          properties:
            s3_configuration:
              type: object
              required: [s3_uri]
              properties:
                s3_uri: { type: string, pattern: "^s3://approved-exports/" }
"#;

fn bench(c: &mut Criterion) {
    let args = json!({});
    for rules in [1usize, 50, 1000] {
        for glob in [false, true] {
            let p = policy(rules, glob);
            // The last rule: the worst case for first-match.
            let tool = if glob {
                format!("tool_{}_x", rules - 1)
            } else {
                format!("tool_{}", rules - 1)
            };
            let name = format!(
                "decide/{rules}_rules/{}",
                if glob { "glob" } else { "exact" }
            );
            c.bench_function(&name, |b| {
                b.iter(|| {
                    let call = ToolCall {
                        tool: &tool,
                        arguments: &args,
                        client: None,
                        session_key: "s",
                        client_key: "c",
                        user_key: "u",
                        claims: None,
                        scopes: &[],
                    };
                    black_box(p.evaluate(black_box(&call)))
                });
            });
        }
    }
    let fhir = Policy::from_yaml(FHIR, "fhir.yaml").unwrap();
    let export = json!({
        "datastore_id": "0123456789abcdef0123456789abcdef",
        "data_access_role_arn": "arn:aws:iam::123456789012:role/export",
        "output_data_config": {"s3_configuration": {"s3_uri": "s3://approved-exports/2026/"}},
    });
    c.bench_function("decide/fhir_argument_schema", |b| {
        b.iter(|| {
            let call = ToolCall {
                tool: "start_fhir_export_job",
                arguments: &export,
                client: None,
                session_key: "s",
                client_key: "c",
                user_key: "u",
                claims: None,
                scopes: &[],
            };
            black_box(fhir.evaluate(black_box(&call)))
        });
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
