//! Result rules: scanning a tool's result with a five-detector `redact` entry, for
//! results of 1 KiB, 64 KiB, 1 MiB and 16 MiB (throughput in bytes of text scanned).
//!
//! The text is FHIR-like patient data (a Bundle of Patients as JSON text, the way
//! `read_fhir_resource` answers), with an SSN and an e-mail address in about one patient
//! of eight: most strings are scanned and found clean, some are redacted. The same data as
//! `structuredContent` (many small strings) is measured at 1 MiB too, and a text with
//! nothing to find (the cost of a clean answer).

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::fmt::Write as _;
use std::hint::black_box;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use serde_json::{Value, json};
use tollgate_policy::Policy;

const POLICY: &str = r#"
version: 1
results:
  - tool: read_fhir_resource
    redact: [us_ssn, email, credit_card, aws_access_key, {name: mrn, pattern: "MRN-[0-9]{8}"}]
"#;

/// One Patient resource; every eighth carries an SSN and an e-mail address.
fn patient(i: usize, secrets: bool) -> Value {
    let (ssn, email) = if secrets && i.is_multiple_of(8) {
        (
            format!(
                "{:03}-{:02}-{:04}",
                100 + i % 500,
                10 + i % 80,
                1000 + i % 9000
            ),
            format!("patient{i}@example-hospital.org"),
        )
    } else {
        (String::new(), String::new())
    };
    json!({
        "resourceType": "Patient",
        "id": format!("pat-{i:08}"),
        "meta": {"versionId": "3", "lastUpdated": "2026-11-30T08:15:00.000Z"},
        "identifier": [
            {"system": "http://hospital.example.org/mrn", "value": format!("H{:08}", i * 7)},
            {"system": "http://hl7.org/fhir/sid/us-ssn", "value": ssn}
        ],
        "name": [{"use": "official", "family": "Doe", "given": ["Jane", "Q."]}],
        "telecom": [{"system": "email", "value": email}, {"system": "phone", "value": "+1 555 0100"}],
        "gender": "female",
        "birthDate": "1970-01-01",
        "address": [{"line": ["1 Main Street"], "city": "Springfield", "state": "IL", "postalCode": "62701"}],
        "note": "Seen on 2026-11-28 for a follow-up; blood pressure 128/82, heart rate 71, no changes to medication."
    })
}

/// A Bundle of patients whose JSON text is about `size` bytes.
fn bundle(size: usize, secrets: bool) -> Value {
    let mut entries = Vec::new();
    let mut bytes = 0;
    let mut i = 0;
    while bytes < size {
        let p = patient(i, secrets);
        bytes += p.to_string().len() + 12;
        entries.push(json!({"resource": p}));
        i += 1;
    }
    json!({"resourceType": "Bundle", "type": "searchset", "entry": entries})
}

fn text_result(size: usize, secrets: bool) -> (Value, u64) {
    let mut text = bundle(size, secrets).to_string();
    text.truncate(text.floor_char_boundary(size));
    let len = text.len() as u64;
    (json!({"content": [{"type": "text", "text": text}]}), len)
}

fn structured_result(size: usize) -> (Value, u64) {
    let structured = bundle(size, true);
    let len = structured.to_string().len() as u64;
    (json!({"content": [], "structuredContent": structured}), len)
}

/// The CPU time of the measuring thread: on shared cores (the CI machine has two, with other
/// jobs on them) wall-clock time counts the time other processes ran, and the figure asked
/// for is per core.
struct ThreadCpuTime(WallTime);

fn thread_cpu_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("the thread's CPU clock");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns().saturating_sub(start)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    #[allow(clippy::cast_precision_loss)]
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        self.0.formatter()
    }
}

fn bench(c: &mut Criterion<ThreadCpuTime>) {
    let policy = Policy::from_yaml(POLICY, "bench.yaml").unwrap();
    let rules = policy
        .result_rules("read_fhir_resource", None, None)
        .unwrap();
    let mut group = c.benchmark_group("results");
    let mut cases = Vec::new();
    for (label, size) in [
        ("1KiB", 1 << 10),
        ("64KiB", 64 << 10),
        ("1MiB", 1 << 20),
        ("16MiB", 16 << 20),
    ] {
        cases.push((format!("text/{label}"), text_result(size, true)));
    }
    cases.push(("text_clean/1MiB".to_owned(), text_result(1 << 20, false)));
    cases.push(("structured/1MiB".to_owned(), structured_result(1 << 20)));
    for (name, (result, bytes)) in cases {
        // The data is what it says: redactions happen (or, clean, none do).
        let verdict = rules.apply(&mut result.clone());
        assert_eq!(verdict.changed, !name.starts_with("text_clean"), "{name}");
        let mut summary = String::new();
        for r in &verdict.redactions {
            let _ = write!(summary, " {}={}", r.name, r.count);
        }
        eprintln!("{name}: {bytes} bytes,{summary}");
        if bytes >= 16 << 20 {
            group.sample_size(10);
        }
        group.throughput(Throughput::Bytes(bytes));
        group.bench_function(&name, |b| {
            b.iter_batched(
                || result.clone(),
                // The result is returned, to be freed outside the measurement.
                |mut result| {
                    black_box(rules.apply(&mut result));
                    result
                },
                BatchSize::LargeInput,
            );
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime(WallTime));
    targets = bench
}
criterion_main!(benches);
