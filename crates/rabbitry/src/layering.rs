//! The layering claims of `docs/architecture.md`, checked against the
//! source: every module of the library is in one layer, no module imports
//! a module of a higher layer, and modules import each other with no
//! circle, among the library's modules and among the files of each module
//! directory. Test code (`mod tests`) is left out: tests may reach anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module (or file of a directory) and the modules it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layers as the architecture page lists them: `N. **Name** [`a`, `b`]`.
fn documented_layers() -> Vec<Vec<String>> {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/architecture.md");
    let text = std::fs::read_to_string(&page).expect("docs/architecture.md");
    let section = text
        .split("## Layers of the library")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("a 'Layers of the library' section");
    let mut layers = Vec::new();
    for line in section.lines() {
        let line = line.trim_start();
        let numbered = line
            .split_once(". **")
            .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !numbered {
            continue;
        }
        // The bracketed list may wrap onto the next lines.
        let start = section.find(line).unwrap();
        let rest = &section[start..];
        let open = rest.find('[').expect("a [list] after the layer's name");
        let close = rest.find(']').expect("a closed [list]");
        let names = rest[open + 1..close]
            .split(',')
            .map(|n| n.trim().trim_matches('`').to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        layers.push(names);
    }
    layers
}

/// The source without comments, string contents that look like paths
/// aside, and without its `#[cfg(test)] mod tests` block.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("//") {
                ""
            } else {
                // A trailing comment; `://` inside a URL string is kept
                // whole enough for what is looked for.
                match l.find(" //") {
                    Some(i) => &l[..i],
                    None => l,
                }
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first identifiers after every `prefix` in `code`: `prefix::a` gives
/// `a`, `prefix::{a, b::c, d}` gives `a`, `b` and `d`.
fn named_after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut element_start = true;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => element_start = true,
                    c if c.is_whitespace() => {}
                    _ if element_start && depth == 1 => {
                        out.insert(ident(&group[j..]));
                        element_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

/// The library's modules: `src/x.rs` and `src/x/` (its files merged).
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let files = std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "rs"));
            modules.entry(stem).or_default().extend(files);
        } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "layering"
        {
            modules.entry(stem).or_default().push(path);
        }
    }
    modules
}

fn module_graph(modules: &BTreeMap<String, Vec<PathBuf>>) -> Graph {
    let mut graph = Graph::new();
    for (name, files) in modules {
        let uses = graph.entry(name.clone()).or_default();
        for file in files {
            let code = code_of(&std::fs::read_to_string(file).unwrap());
            for m in named_after(&code, "crate::") {
                if m != *name && modules.contains_key(&m) {
                    uses.insert(m);
                }
            }
        }
    }
    graph
}

/// The graph among the files of directory `dir`: `super::x` and
/// `crate::dir::x` from its submodules (`mod.rs`, the parent, is left out:
/// a parent naming its children is how Rust modules are made).
fn submodule_graph(dir: &str) -> Graph {
    let path = src().join(dir);
    let files: BTreeMap<String, PathBuf> = std::fs::read_dir(&path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .map(|p| (p.file_stem().unwrap().to_string_lossy().into_owned(), p))
        .filter(|(stem, _)| stem != "mod")
        .collect();
    let mut graph = Graph::new();
    for (name, file) in &files {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let mut named = named_after(&code, "super::");
        named.extend(named_after(&code, &format!("crate::{dir}::")));
        let uses = graph.entry(name.clone()).or_default();
        for m in named {
            if m != *name && files.contains_key(&m) {
                uses.insert(m);
            }
        }
    }
    graph
}

/// A circle in `graph`, as the path that closes it, if there is one.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut found = path[i..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(graph, next, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

#[test]
fn every_module_is_in_one_documented_layer() {
    let layers = documented_layers();
    assert_eq!(layers.len(), 4, "four layers: {layers:?}");
    let listed: Vec<&String> = layers.iter().flatten().collect();
    let unique: BTreeSet<&String> = listed.iter().copied().collect();
    assert_eq!(
        listed.len(),
        unique.len(),
        "a module listed twice: {listed:?}"
    );
    let modules: BTreeSet<String> = modules().into_keys().collect();
    let listed: BTreeSet<String> = unique.into_iter().cloned().collect();
    assert_eq!(
        modules, listed,
        "docs/architecture.md lists exactly the library's modules"
    );
}

#[test]
fn no_module_imports_a_higher_layer() {
    let layer_of: BTreeMap<String, usize> = documented_layers()
        .into_iter()
        .enumerate()
        .flat_map(|(i, names)| names.into_iter().map(move |n| (n, i + 1)))
        .collect();
    let graph = module_graph(&modules());
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(from, uses)| uses.iter().map(move |to| (from, to)))
        .filter(|(from, to)| layer_of.get(*to) > layer_of.get(*from))
        .map(|(from, to)| {
            format!(
                "{from} (layer {}) imports {to} (layer {})",
                layer_of[from], layer_of[to]
            )
        })
        .collect();
    assert!(upward.is_empty(), "{upward:#?}");
}

#[test]
fn modules_import_each_other_with_no_circle() {
    let graph = module_graph(&modules());
    assert_eq!(circle(&graph), None, "the library's modules: {graph:#?}");
    for dir in modules().into_keys().filter(|m| src().join(m).is_dir()) {
        let graph = submodule_graph(&dir);
        assert_eq!(circle(&graph), None, "the files of {dir}/: {graph:#?}");
    }
}

#[test]
fn the_checks_see_what_they_claim_to() {
    // The parser finds grouped and nested imports, and the circle finder
    // finds a circle: the checks above can fail.
    let code = code_of(
        "use crate::{error::Error, message::{self, Headers}, limits};\n// crate::admin\nlet x = crate::topology::Exchange;\n#[cfg(test)]\nmod tests { use crate::worker; }",
    );
    let found: Vec<String> = named_after(&code, "crate::").into_iter().collect();
    assert_eq!(found, ["error", "limits", "message", "topology"]);
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(circle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(circle(&graph).map(|c| c.len()), Some(4));
    // Before the outbox's rows moved to `claim`, its backend and relay
    // named each other; the same shape is found in a directory's graph.
    let mut outbox = Graph::new();
    outbox
        .entry("backend".into())
        .or_default()
        .insert("relay".into());
    outbox
        .entry("relay".into())
        .or_default()
        .insert("backend".into());
    assert!(circle(&outbox).is_some());
}
