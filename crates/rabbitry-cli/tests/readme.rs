//! The README's examples, run as a user would run them. Every fenced block
//! in the README (other than `text` pictures) carries a marker above it:
//! `<!-- readme-test: NAME -->` names the test here that runs it (or
//! `doctest`: a Rust block compiled by `cargo test --doc`), and
//! `<!-- not run: WHY -->` says why it is not run. A block with neither
//! fails the first test.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Demo;

const README: &str = include_str!("../../../README.md");
const THIS_FILE: &str = include_str!("readme.rs");

struct Block {
    marker: String,
    lang: String,
    text: String,
    line: usize,
}

fn blocks() -> Vec<Block> {
    let lines: Vec<&str> = README.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(lang) = lines[i].strip_prefix("```") {
            let start = i;
            let marker = lines[..i]
                .iter()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map_or(String::new(), |l| l.trim().to_owned());
            i += 1;
            let mut text = String::new();
            while i < lines.len() && !lines[i].starts_with("```") {
                text.push_str(lines[i]);
                text.push('\n');
                i += 1;
            }
            out.push(Block {
                marker,
                lang: lang.to_owned(),
                text,
                line: start + 1,
            });
        }
        i += 1;
    }
    out
}

fn blocks_for(test: &str) -> Vec<Block> {
    let marker = format!("<!-- readme-test: {test} -->");
    let found: Vec<Block> = blocks()
        .into_iter()
        .filter(|b| b.marker == marker)
        .collect();
    assert!(!found.is_empty(), "no README block is marked for {test}");
    found
}

#[test]
fn every_readme_block_is_tested_or_says_why_not() {
    let all = blocks();
    assert!(all.len() >= 8, "the README has its examples");
    for b in all.iter().filter(|b| b.lang != "text") {
        if let Some(name) = b
            .marker
            .strip_prefix("<!-- readme-test: ")
            .and_then(|m| m.strip_suffix(" -->"))
        {
            if name == "doctest" {
                assert!(
                    b.lang.starts_with("rust"),
                    "README line {}: only Rust blocks are doctests",
                    b.line
                );
            } else {
                assert!(
                    THIS_FILE.contains(&format!("fn {name}(")),
                    "README line {}: no test named {name} in tests/readme.rs",
                    b.line
                );
            }
        } else {
            let why = b
                .marker
                .strip_prefix("<!-- not run: ")
                .and_then(|m| m.strip_suffix(" -->"))
                .unwrap_or_else(|| {
                    panic!(
                        "README line {}: a ```{} block with neither `<!-- readme-test: NAME -->` nor `<!-- not run: WHY -->` above it",
                        b.line, b.lang
                    )
                });
            assert!(why.len() > 10, "README line {}: say why", b.line);
        }
    }
}

/// One shell command of a block and the output its comments promise.
struct Step {
    command: String,
    expected: Vec<String>,
}

fn steps(block: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let t = line.trim();
        if let Some(comment) = t.strip_prefix("# ") {
            if let Some(last) = steps.last_mut() {
                last.expected.push(comment.to_owned());
            }
            continue;
        }
        if t.is_empty() {
            continue;
        }
        // A command's own trailing comment is a note, not an expectation.
        let code = match t.find("  #") {
            Some(i) => t[..i].trim_end(),
            None => t,
        };
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        steps.push(Step {
            command: std::mem::take(&mut pending),
            expected: Vec::new(),
        });
    }
    steps
}

/// `"key":value` pairs of an expected JSON line, without elided ones (`…`).
fn json_pairs(expected: &str) -> Vec<String> {
    let mut pairs = Vec::new();
    let mut rest = expected;
    while let Some(start) = rest.find('"') {
        let after = &rest[start + 1..];
        let Some(key_end) = after.find("\":") else {
            break;
        };
        let value_start = &after[key_end + 2..];
        let value_end = if let Some(quoted) = value_start.strip_prefix('"') {
            quoted.find('"').map(|i| i + 2)
        } else {
            value_start.find([',', '}', ']'])
        };
        let Some(value_end) = value_end else { break };
        let pair = format!("\"{}\":{}", &after[..key_end], &value_start[..value_end]);
        if !pair.contains('…') {
            pairs.push(pair);
        }
        rest = &value_start[value_end..];
    }
    pairs
}

/// Whether `actual` says what `expected` promises: every JSON pair for a
/// JSON line, the text with any number in place of numbers otherwise.
fn promised(expected: &str, actual: &str) -> bool {
    let e = expected.trim();
    if e.starts_with(['{', '[', '"']) {
        return json_pairs(e).iter().all(|p| actual.contains(p.as_str()));
    }
    let words: Vec<&str> = e.split_whitespace().collect();
    actual.lines().any(|line| {
        let got: Vec<&str> = line.split_whitespace().collect();
        got.len() >= words.len()
            && words.iter().zip(&got).all(|(w, g)| {
                w == g || (w.chars().all(|c| c.is_ascii_digit()) && g.parse::<u64>().is_ok())
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_walkthrough() {
    let demo = Demo::start();
    let work = std::env::temp_dir().join(format!("readme-{}", demo.instance));
    std::fs::create_dir_all(&work).unwrap();
    let exe = env!("CARGO_BIN_EXE_rabbitry");
    let mut id: Option<String> = None;
    let substitute = |text: &str, id: &Option<String>| {
        let mut t = text
            .replace("http://127.0.0.1:8080", &demo.base)
            .replace("demo-3fa2c1", &demo.instance)
            .replace(".data/demo", &demo.data_dir.display().to_string());
        if let Some(id) = id {
            t = t.replace("8adbe3cae7d4", id);
        }
        if let Some(rest) = t.strip_prefix("rabbitry ") {
            t = format!("'{exe}' {rest}");
        }
        t
    };
    for block in blocks_for("demo_walkthrough") {
        for step in steps(&block.text) {
            let command = substitute(&step.command, &id);
            let once = command.contains("-X POST") || command.contains(" rpc ");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let out = Command::new("sh")
                    .arg("-c")
                    .arg(&command)
                    .current_dir(&work)
                    .env_remove("AMQP_URL")
                    .output()
                    .unwrap();
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                if id.is_none() && command.contains("-X POST") {
                    let v: serde_json::Value = serde_json::from_str(&stdout)
                        .unwrap_or_else(|e| panic!("{command}: {e}: {stdout}"));
                    id = Some(v["id"].as_str().unwrap().to_owned());
                }
                let kept = step.expected.iter().all(|e| {
                    let e = substitute(e, &id);
                    match e.split_once("(on stderr)") {
                        Some((text, _)) => promised(text, &stderr),
                        None => promised(&e, &stdout),
                    }
                });
                if out.status.success() && kept {
                    break;
                }
                assert!(
                    !once && tokio::time::Instant::now() < deadline,
                    "README line {}: `{command}` exited {:?}\nstdout: {stdout}\nstderr: {stderr}\nexpected: {:?}",
                    block.line,
                    out.status.code(),
                    step.expected
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // The file the commands wrote is a PDF.
    let bytes = std::fs::read(work.join("hello.pdf")).unwrap();
    assert!(bytes.starts_with(b"%PDF-"));
    let instance = demo.instance.clone();
    assert!(demo.stop().success());
    common::cleanup(&instance).await;
}

#[test]
fn configuration_example_loads() {
    let block = blocks_for("configuration_example_loads")
        .into_iter()
        .next()
        .unwrap();
    let settings = rabbitry::Settings::from_toml(&block.text, "README.md").unwrap();
    assert_eq!(
        settings.producers["render"].producer.routing_key.as_deref(),
        Some("service.my_template")
    );
    assert_eq!(settings.worker.site.as_deref(), Some("site-a"));
    let site = settings.for_site("site-a");
    site.check_substituted().unwrap();
    assert_eq!(site.consumers["orders"].consumer.queue, "site-a.orders");
    assert!(settings.outbox.is_some());
}

#[test]
fn command_synopsis_matches_the_help() {
    let help = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} --help");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let global = help(&[]);
    let mut command: Vec<String> = Vec::new();
    for block in blocks_for("command_synopsis_matches_the_help") {
        for line in block.text.lines() {
            let code = line.split("  #").next().unwrap_or_default();
            let words: Vec<&str> = code.split_whitespace().collect();
            if words.first() == Some(&"rabbitry") {
                command = vec![words[1].to_owned()];
                if let Some(sub) = words.get(2).filter(|w| {
                    w.chars().all(|c| c.is_ascii_lowercase() || c == '|') && w.contains('|')
                }) {
                    command.push((*sub).to_owned());
                }
            }
            let texts: Vec<String> = match command.as_slice() {
                [cmd, subs] if cmd != "completions" => {
                    subs.split('|').map(|s| help(&[cmd.as_str(), s])).collect()
                }
                [cmd, ..] => vec![help(&[cmd.as_str()])],
                [] => continue,
            };
            for flag in code
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .filter(|w| w.starts_with("--") && w.len() > 2)
            {
                assert!(
                    texts.iter().any(|t| t.contains(flag)) || global.contains(flag),
                    "README: `rabbitry {}` has no flag {flag}",
                    command.join(" ")
                );
            }
        }
    }
}
