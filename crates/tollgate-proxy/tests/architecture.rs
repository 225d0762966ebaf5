//! The module layering, checked from the source: in the proxy, imports point one
//! way, from the front doors down to the state, and the core's stages only reach
//! the stages after them; in every crate of the workspace, no two modules import
//! each other, directly or around a circle (`crate::` and `super::` paths alike).
//! docs/architecture.md draws the same picture.

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
    "lock",
    "store",
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

/// The code of a file without its `#[cfg(test)]` modules (tests may reach anywhere).
fn code(text: &str) -> &str {
    text.split("#[cfg(test)]\nmod ").next().unwrap_or(text)
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

/// Every crate of the workspace: its directory name and its `src`.
fn workspace_crates() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut crates: Vec<(String, PathBuf)> = std::fs::read_dir(root)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|dir| dir.join("src").is_dir())
        .map(|dir| {
            let name = dir.file_name().unwrap().to_string_lossy().into_owned();
            (name, dir.join("src"))
        })
        .collect();
    crates.sort();
    crates
}

/// The module a file holds: `lib.rs`/`main.rs` are the root (`[]`), `a/b.rs` is `a::b`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let mut path = module_of(src, file);
    if path.len() == 1 && (path[0] == "lib" || path[0] == "main") {
        path.clear();
    }
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    path
}

/// The code without its `//` comments (doc links name modules without importing them).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads one path (or `use` tree) from `text`, starting below `base`; pushes every
/// absolute path it names to `out` and returns how much of `text` it read.
fn use_tree(text: &str, mut base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut at = 0;
    loop {
        let rest = &text[at..];
        let skipped = rest.len() - rest.trim_start().len();
        at += skipped;
        let rest = &text[at..];
        if let Some(group) = rest.strip_prefix('{') {
            at += 1;
            let mut inner = 0;
            loop {
                let read = use_tree(&group[inner..], base.clone(), out);
                inner += read;
                // Skip `as name` and spaces up to the next member or the group's end.
                let tail = &group[inner..];
                let Some(stop) = tail.find([',', '}']) else {
                    return at + group.len();
                };
                inner += stop + 1;
                if tail.as_bytes()[stop] == b'}' {
                    return at + inner;
                }
            }
        }
        let len = rest.find(|c: char| !is_ident(c)).unwrap_or(rest.len());
        if len == 0 {
            break;
        }
        match &rest[..len] {
            "self" => {}
            "super" => {
                base.pop();
            }
            name => base.push(name.to_owned()),
        }
        at += len;
        match text[at..].strip_prefix("::") {
            Some(_) => at += 2,
            None => break,
        }
    }
    out.push(base);
    at
}

/// The absolute paths a module's code names through `crate::` and `super::`.
fn named_paths(text: &str, module: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for keyword in ["crate::", "super::"] {
        for (at, _) in text.match_indices(keyword) {
            let before = text[..at].chars().next_back();
            if before.is_some_and(|c| is_ident(c) || c == ':') {
                continue; // `a::super::` is read from its start; `$crate::` counts.
            }
            let base = if keyword == "crate::" {
                Vec::new()
            } else {
                module[..module.len().saturating_sub(1)].to_vec()
            };
            use_tree(&text[at + keyword.len()..], base, &mut out);
        }
    }
    out
}

#[test]
fn use_trees_are_read_whole() {
    let module = ["a".to_owned(), "b".to_owned()];
    let paths = named_paths(
        "use crate::{x::{self, Y as Z}, w};\nlet v = super::c::run();\nsuper::super::d::E;",
        &module,
    );
    let paths: Vec<String> = paths.iter().map(|p| p.join("::")).collect();
    assert_eq!(paths, ["x", "x::Y", "w", "a::c::run", "d::E"]);
}

/// The imports between siblings in one crate: (scope, from child, to child) → one
/// place that makes the edge. An import is counted between the top-most distinct
/// ancestors of the two modules; a module's own ancestors and descendants are not.
fn sibling_edges(src: &Path) -> BTreeMap<(Vec<String>, String, String), String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let modules: Vec<Vec<String>> = files.iter().map(|f| module_path(src, f)).collect();
    let mut edges = BTreeMap::new();
    for (file, module) in files.iter().zip(&modules) {
        let text = without_comments(code(&std::fs::read_to_string(file).unwrap()));
        for path in named_paths(&text, module) {
            let Some(target) = modules
                .iter()
                .filter(|m| path.starts_with(m))
                .max_by_key(|m| m.len())
            else {
                continue;
            };
            let shared = module
                .iter()
                .zip(target)
                .take_while(|(a, b)| a == b)
                .count();
            if shared == module.len() || shared == target.len() {
                continue; // a module and its own ancestor or descendant
            }
            let key = (
                module[..shared].to_vec(),
                module[shared].clone(),
                target[shared].clone(),
            );
            let relative = file.strip_prefix(src).unwrap().display().to_string();
            edges
                .entry(key)
                .or_insert_with(|| format!("{relative} names {}", path.join("::")));
        }
    }
    edges
}

/// No module imports a sibling that imports it back, directly or around a circle:
/// for each module, the modules below it form a DAG when each import between two of
/// them is counted as one between their top-most distinct ancestors.
#[test]
fn no_module_circles_in_any_crate() {
    let mut circles = Vec::new();
    for (name, src) in workspace_crates() {
        let edges = sibling_edges(&src);
        for ((scope, from, to), place) in &edges {
            let mut seen = vec![to.clone()];
            let mut next = vec![to.clone()];
            while let Some(at) = next.pop() {
                for (s, f, t) in edges.keys() {
                    if s == scope && *f == at && !seen.contains(t) {
                        seen.push(t.clone());
                        next.push(t.clone());
                    }
                }
            }
            if seen.contains(from) {
                let within = if scope.is_empty() {
                    String::from("crate")
                } else {
                    scope.join("::")
                };
                circles.push(format!(
                    "{name}, in {within}: {from} → {to} ({place}), and {to} leads back to {from}"
                ));
            }
        }
    }
    assert!(
        circles.is_empty(),
        "modules in a circle (move what both need to a module both import):\n{}",
        circles.join("\n")
    );
}
