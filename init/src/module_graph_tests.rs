//! The modules of this crate import each other without circles: a module that two others
//! share lives in its own file (as `machine` does for the boot, the drain, the lifecycle and
//! the power events), never in one of the modules acting on it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`boot`, `services::engine`) → its source, tests left out.
fn modules() -> BTreeMap<String, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.last().cloned().unwrap_or_default();
            if last.ends_with("_tests") || last == "main" {
                continue;
            }
            if last == "mod" || last == "lib" {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // What only the tests use does not count.
            let code = text
                .split("#[cfg(test)]\nmod tests")
                .next()
                .unwrap()
                .to_owned();
            out.insert(parts.join("::"), code);
        }
    }
    out
}

/// The modules `code` (of module `name`) refers to through `crate::` or `super::` paths.
fn references(name: &str, code: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect()
    };
    let mut found = BTreeSet::new();
    let parent = name.rsplit_once("::").map(|(p, _)| p.to_owned());
    for (prefix, base) in [("crate::", None), ("super::", parent.as_deref())] {
        for (i, _) in code.match_indices(prefix) {
            let rest = &code[i + prefix.len()..];
            let first = ident(rest);
            if first.is_empty() {
                continue;
            }
            // `super::` of a top-level module is the crate root.
            let head = match base {
                Some(parent) => format!("{parent}::{first}"),
                None => first.clone(),
            };
            let after = &rest[first.len()..];
            let deeper = after
                .strip_prefix("::")
                .map(ident)
                .filter(|s| !s.is_empty())
                .map(|second| format!("{head}::{second}"));
            let target = match deeper {
                Some(d) if known.contains_key(&d) => d,
                _ => head,
            };
            if target != name && known.contains_key(&target) {
                found.insert(target);
            }
        }
    }
    found
}

#[test]
fn no_two_modules_import_each_other_directly_or_around_a_loop() {
    let modules = modules();
    assert!(modules.contains_key("boot") && modules.contains_key("services::engine"));
    let graph: BTreeMap<&str, BTreeSet<String>> = modules
        .iter()
        .map(|(name, code)| (name.as_str(), references(name, code, &modules)))
        .collect();
    // From every module, walk what it imports; reaching itself again is a circle.
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[start]
            .iter()
            .map(|n| (n.clone(), vec![start.to_string(), n.clone()]))
            .collect();
        while let Some((at, path)) = stack.pop() {
            assert!(
                at != *start,
                "modules import each other in a circle: {}",
                path.join(" → ")
            );
            if !seen.insert(at.clone()) {
                continue;
            }
            for next in graph.get(at.as_str()).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
}

#[test]
fn the_reference_reader_sees_crate_and_super_paths() {
    let known: BTreeMap<String, String> = ["boot", "services", "services::engine", "machine"]
        .into_iter()
        .map(|m| (m.to_owned(), String::new()))
        .collect();
    let code = "use crate::machine::{Machine};\nuse super::engine::Engine;\ncrate::boot::boot();";
    let refs = references("services::containers", code, &known);
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["boot", "machine", "services::engine"]
    );
}
