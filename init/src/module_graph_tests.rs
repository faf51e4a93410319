//! The modules of this crate import each other without circles: a type that two modules share
//! lives in a module of its own that both import (as `machine` does for the boot, the drain, the
//! lifecycle and the power events, or `sys::system` for `sys`'s children), never in one of the
//! modules acting on it. A parent counts as importing a child when it names `child::`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`boot`, `services::engine`; `""` for the crate root) → its code, with comments,
/// string literals and the unit tests left out.
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
            let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
            out.insert(parts.join("::"), code_only(code));
        }
    }
    out
}

/// `text` without `//` comments and with string literals emptied.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                out.push_str("\"\"");
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            _ => out.push(c),
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The lower-case segments of a path starting at `rest` (`a::b::Type` → `[a, b]`).
fn segments(rest: &str) -> Vec<String> {
    let mut segs = Vec::new();
    let mut rest = rest;
    loop {
        let seg: String = rest.chars().take_while(|c| is_ident(*c)).collect();
        if seg.is_empty() || !seg.starts_with(|c: char| c.is_ascii_lowercase()) {
            break;
        }
        segs.push(seg.clone());
        match rest[seg.len()..].strip_prefix("::") {
            Some(r) => rest = r,
            None => break,
        }
    }
    segs
}

/// The deepest known module along `base::segs`.
fn resolve(base: &str, segs: &[String], known: &BTreeMap<String, String>) -> String {
    let mut at = base.to_owned();
    for seg in segs {
        let next = if at.is_empty() {
            seg.clone()
        } else {
            format!("{at}::{seg}")
        };
        if !known.contains_key(&next) {
            break;
        }
        at = next;
    }
    at
}

/// The modules `code` (of module `name`) uses: through `crate::` and `super::` paths (a
/// `super::{..}` or `super::Type` is the parent itself), and its children named as `child::`.
fn references(name: &str, code: &str, known: &BTreeMap<String, String>) -> BTreeSet<String> {
    let parent = name.rsplit_once("::").map_or("", |(p, _)| p);
    let mut found = BTreeSet::new();
    for (prefix, base) in [("crate::", ""), ("super::", parent)] {
        for (i, _) in code.match_indices(prefix) {
            if code[..i].ends_with(is_ident) {
                continue;
            }
            let segs = segments(&code[i + prefix.len()..]);
            found.insert(resolve(base, &segs, known));
        }
    }
    for child in known.keys() {
        let Some(short) = child
            .strip_prefix(name)
            .map(|c| c.trim_start_matches("::"))
            .filter(|c| {
                !c.is_empty()
                    && !c.contains("::")
                    && (name.is_empty() || child.starts_with(&format!("{name}::")))
            })
        else {
            continue;
        };
        let needle = format!("{short}::");
        let named = code.match_indices(&needle).any(|(i, _)| {
            let before = &code[..i];
            !before.ends_with(is_ident) && (!before.ends_with("::") || before.ends_with("self::"))
        });
        if named {
            found.insert(child.clone());
        }
    }
    found.remove(name);
    found
}

/// A circle in `graph`, if there is one: the path from a module back to itself.
fn circle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    for start in graph.keys() {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = graph[start]
            .iter()
            .map(|n| (n.clone(), vec![start.clone(), n.clone()]))
            .collect();
        while let Some((at, path)) = stack.pop() {
            if at == *start {
                return Some(path);
            }
            if !seen.insert(at.clone()) {
                continue;
            }
            for next in graph.get(&at).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                stack.push((next.clone(), p));
            }
        }
    }
    None
}

#[test]
fn no_two_modules_import_each_other_directly_or_around_a_loop() {
    let modules = modules();
    assert!(modules.contains_key("boot") && modules.contains_key("services::engine"));
    let graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|(name, code)| (name.clone(), references(name, code, &modules)))
        .collect();
    if let Some(path) = circle(&graph) {
        panic!(
            "modules import each other in a circle: {}",
            path.join(" → ")
        );
    }
}

#[test]
fn a_circle_is_found_however_long() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(circle(&graph(&[("a", "b"), ("b", "c")])), None);
    assert!(circle(&graph(&[("boot", "shutdown"), ("shutdown", "boot")])).is_some());
    let long = circle(&graph(&[("a", "b"), ("b", "c"), ("c", "d"), ("d", "b")])).unwrap();
    assert_eq!(long.first(), long.last());
}

#[test]
fn the_reader_sees_every_kind_of_reference_and_no_comment() {
    let known: BTreeMap<String, String> = [
        "",
        "boot",
        "machine",
        "services",
        "services::engine",
        "services::containers",
        "sys",
        "sys::linux",
    ]
    .into_iter()
    .map(|m| (m.to_owned(), String::new()))
    .collect();
    let code = code_only(
        "use crate::machine::{Machine};\nuse super::engine::Engine;\nuse super::{A, B};\n\
         // crate::boot::boot() in a comment\nlet s = \"crate::sys\";\n",
    );
    let refs = references("services::containers", &code, &known);
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        ["machine", "services", "services::engine"]
    );
    // A parent naming its child.
    let refs = references("sys", "pub use linux::Linux;\nmod linux;", &known);
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["sys::linux"]);
    // A path through something else's child is not the parent naming its own.
    let refs = references("sys", "nix::linux::x();", &known);
    assert!(refs.is_empty(), "{refs:?}");
}
