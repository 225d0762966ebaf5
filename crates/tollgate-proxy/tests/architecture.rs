//! The proxy's module layering, checked from its source: imports point one way,
//! from the front doors down to the state, and the core's stages only reach the
//! stages after them. docs/architecture.md draws the same picture.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules, from the top (may import anything below) to the bottom.
const LAYERS: &[&str] = &[
    "admin",
    "app",
    "downstream",
    "pipeline",
    "approvals",
    "reload",
    "state",
    "upstream",
    "error",
    "store",
    "lock",
    "tls",
    "audit",
    "telemetry",
    "metrics",
    "config",
];

/// The core's stages, in order; each may use only the ones after it.
const STAGES: &[&str] = &[
    "batch", "held", "tasks", "call", "relay", "respond", "session", "decide", "tools", "inbound",
    "context",
];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/pipeline/call.rs` → ["pipeline", "call"].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).unwrap().with_extension("");
    relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect()
}

/// The code of a file without its `#[cfg(test)]` module (tests may reach anywhere).
fn code(text: &str) -> &str {
    text.split("#[cfg(test)]\nmod tests").next().unwrap_or(text)
}

/// Names following `prefix` in `text`, e.g. `crate::` → `state`, `store`, ….
fn references<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.match_indices(prefix)
        .map(|(at, _)| {
            let rest = &text[at + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| !name.is_empty())
        .collect()
}

/// `use super::{call, relay}` and `super::session::recover` → the sibling names used.
fn sibling_references(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    for (at, _) in text.match_indices("super::") {
        let rest = &text[at + "super::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            names.extend(
                group
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or("").trim().to_owned()),
            );
        } else {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            names.push(rest[..end].to_owned());
        }
    }
    names
}

#[test]
fn imports_point_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let rank: BTreeMap<&str, usize> = LAYERS.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut wrong = Vec::new();
    for file in &files {
        let module = module_of(&src, file);
        let top = module[0].as_str();
        if top == "lib" {
            continue;
        }
        let own = *rank
            .get(top)
            .unwrap_or_else(|| panic!("{top} is not in LAYERS: add it where it belongs"));
        let text = std::fs::read_to_string(file).unwrap();
        for used in references(code(&text), "crate::") {
            let Some(&theirs) = rank.get(used) else {
                continue;
            };
            if used != top && theirs <= own {
                wrong.push(format!("{} imports crate::{used}", file.display()));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_core_stages_use_only_later_stages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/pipeline");
    let rank: BTreeMap<&str, usize> = STAGES.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut wrong = Vec::new();
    for stage in STAGES {
        let text = std::fs::read_to_string(dir.join(format!("{stage}.rs"))).unwrap();
        let own = rank[stage];
        for used in sibling_references(code(&text)) {
            match rank.get(used.as_str()) {
                Some(&theirs) if theirs > own || used == *stage => {}
                Some(_) => wrong.push(format!("stage {stage} uses the earlier stage {used}")),
                // Anything else of `super::` is the orchestrator above the stages.
                None => wrong.push(format!("stage {stage} uses super::{used}")),
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
