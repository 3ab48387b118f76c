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

/// Declares a fresh queue for a README example's messages.
async fn example_queue(conn: &rabbitry::Connection, prefix: &str) -> String {
    let queue = rabbitry_test_support::unique(prefix);
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    queue
}

/// `rabbitry relay` for `databases`, as a child process.
fn relay(databases: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rabbitry"));
    cmd.arg("relay");
    for db in databases {
        cmd.args(["--database", db]);
    }
    cmd.stderr(std::process::Stdio::piped())
        .spawn()
        .expect("rabbitry relay")
}

/// Stops a relay as an operator's SIGTERM would; it must stop cleanly.
/// Waited for off the runtime's threads, where the test's clients run.
async fn stop_relay(child: std::process::Child) {
    tokio::task::spawn_blocking(move || stop_relay_now(child))
        .await
        .unwrap();
}

fn stop_relay_now(child: std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "relay: {err}");
    assert!(err.contains("relay: stopped"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_sqlite() {
    let sql = blocks_for("foreign_rows_sqlite")[0].text.clone();
    let dir = std::env::temp_dir().join(rabbitry_test_support::unique("foreign"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.db");
    let url = format!("sqlite://{}", path.display());
    let exe = env!("CARGO_BIN_EXE_rabbitry");
    let migrated = Command::new(exe)
        .args(["outbox", "migrate", "--database", &url])
        .output()
        .unwrap();
    assert!(migrated.status.success(), "{migrated:?}");
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let queue = example_queue(&conn, "foreign").await;

    // Another program (Python, its standard sqlite3) writes 1,000 rows in
    // one transaction with the README's SQL; row 500 has a typo in its
    // properties.
    let script = r#"
import json, sqlite3, sys, uuid
sql, path, queue = sys.argv[1], sys.argv[2], sys.argv[3]
db = sqlite3.connect(path)
with db:
    for i in range(1000):
        props = json.dumps({"content_type": "application/json", "correlation_id": f"c-{i}",
                            "headers": {"order_id": str(i % 7), "seq": i}})
        if i == 500:
            props = '{"content-type": "application/json"}'
        body = json.dumps({"n": i}).encode()
        db.execute(sql, (str(uuid.uuid4()), "", queue, props, body, 0, None))
"#;
    let written = Command::new("python3")
        .args(["-c", script, &sql, &path.display().to_string(), &queue])
        .output()
        .expect("python3");
    assert!(
        written.status.success(),
        "{}",
        String::from_utf8_lossy(&written.stderr)
    );

    let child = relay(&[&url]);
    let mut consumer = rabbitry::Consumer::start(&conn, rabbitry::ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 999 {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 999 arrived", seen.len()))
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
        let n = body["n"].as_i64().unwrap();
        assert_eq!(
            d.properties.content_type.as_deref(),
            Some("application/json")
        );
        assert_eq!(d.properties.correlation_id, Some(format!("c-{n}")));
        assert_eq!(d.properties.headers["seq"], rabbitry::HeaderValue::Int(n));
        assert_eq!(
            d.properties.headers["order_id"],
            rabbitry::HeaderValue::String((n % 7).to_string())
        );
        d.ack().await.unwrap();
        seen.push(n);
    }
    let expected: Vec<i64> = (0..1000).filter(|n| *n != 500).collect();
    assert_eq!(seen, expected, "in order, all but the malformed one");

    // The relay deletes rows after their confirms, a moment after the
    // consumer may have them.
    let outbox_status = || {
        let out = Command::new(exe)
            .args(["outbox", "status", "--database", &url, "--json"])
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        let status = outbox_status();
        if status["pending"] == 0 || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status["pending"], 0, "{status}");
    let failed = status["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{status}");
    let why = failed[0]["error"].as_str().unwrap();
    assert!(
        why.contains("malformed properties") && why.contains("content-type"),
        "{why}"
    );
    println!("the malformed row: {why}");
    stop_relay(child).await;
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

/// The README's `retry-failed` block: a row refused for a bad TTL is fixed
/// by hand, sent again by the command, and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_retry_failed() {
    let block = blocks_for("outbox_retry_failed")[0].text.clone();
    let dir = std::env::temp_dir().join(rabbitry_test_support::unique("retry"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("app.db").display());
    let outbox = rabbitry::outbox::Outbox::connect(&url).await.unwrap();
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let queue = example_queue(&conn, "retry-failed").await;
    let rabbitry::outbox::Database::Sqlite(pool) = outbox.database() else {
        unreachable!()
    };
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, created_at) \
         VALUES ('order-7', '', ?1, '{\"expiration\": \"1 day\"}', 'order 7 paid', 0) RETURNING id",
    )
    .bind(&queue)
    .fetch_one(pool)
    .await
    .unwrap();
    let child = relay(&[&url]);
    let exe = env!("CARGO_BIN_EXE_rabbitry");
    let run = |command: &str| {
        let command = command
            .replace("sqlite://app.db", &url)
            .replace("--id 42", &format!("--id {id}"));
        let args: Vec<&str> = command.split_whitespace().skip(1).collect();
        let out = Command::new(exe).args(&args).output().unwrap();
        assert!(out.status.success(), "{command}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let commands: Vec<String> = steps(&block).into_iter().map(|s| s.command).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let status = run(&commands[0]);
        if status.contains("failed: 1") || std::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.contains("expiration") && status.contains(&format!("#{id}")),
        "{status}"
    );
    sqlx::query("UPDATE rabbitry_outbox SET properties = '{}' WHERE id = ?1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
    let said = run(&commands[1]);
    assert!(said.starts_with("1 failed row(s) pending again"), "{said}");
    let mut consumer = rabbitry::Consumer::start(&conn, rabbitry::ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("the fixed row, relayed")
        .unwrap();
    assert_eq!(&d.body[..], b"order 7 paid");
    assert_eq!(d.properties.message_id.as_deref(), Some("order-7"));
    d.ack().await.unwrap();
    stop_relay(child).await;
    drop(consumer);
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_postgres() {
    let block = blocks_for("foreign_rows_postgres")[0].text.clone();
    let (insert, notify) = block.split_once(';').unwrap();
    let url = rabbitry_test_support::db::pg_url().await;
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let queue = example_queue(&conn, "foreign-pg").await;
    // The relay makes the tables, and listens.
    let child = relay(&[&url]);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let ready = async {
        loop {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT to_regclass('rabbitry_outbox')::text")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if exists.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), ready)
        .await
        .expect("the relay made the tables");
    let mut consumer = rabbitry::Consumer::start(&conn, rabbitry::ConsumerSettings::new(&queue))
        .await
        .unwrap();
    // One row now and one a second later, in one transaction of the
    // application's, with the README's NOTIFY.
    let due = rabbitry::clock::now_millis() + 1000;
    let mut tx = pool.begin().await.unwrap();
    for (body, not_before) in [("later", Some(due)), ("now", None)] {
        sqlx::query(sqlx::AssertSqlSafe(insert.trim().to_owned()))
            .bind(uuid::Uuid::new_v4().to_string())
            .bind("")
            .bind(&queue)
            .bind(r#"{"content_type": "text/plain", "headers": {"from": "psql"}}"#)
            .bind(body.as_bytes())
            .bind(false)
            .bind(not_before)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(notify.trim().to_owned()))
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        // Well under the relay's 30 s safety poll: the NOTIFY woke it.
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("woken by the NOTIFY")
            .unwrap();
        assert_eq!(
            d.properties.headers["from"],
            rabbitry::HeaderValue::String("psql".into())
        );
        got.push((
            String::from_utf8(d.body.to_vec()).unwrap(),
            rabbitry::clock::now_millis(),
        ));
        d.ack().await.unwrap();
    }
    assert_eq!(got[0].0, "now");
    assert_eq!(got[1].0, "later");
    assert!(
        got[1].1 >= due,
        "the scheduled row came {} ms early",
        due - got[1].1
    );
    stop_relay(child).await;
    pool.close().await;
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[test]
fn partitions_example_loads() {
    let block = blocks_for("partitions_example_loads").remove(0);
    let settings = rabbitry::Settings::from_toml(&block.text, "README.md").unwrap();
    let orders = &settings.consumers["orders"];
    let p = orders.options.partitions.clone().expect("partitions");
    assert_eq!(p.count, 4);
    assert_eq!(
        p.key,
        rabbitry::worker::PartitionKey::Header("order_id".into())
    );
    let topology = settings.topology_for("default");
    let queues: Vec<&str> = topology.queues.iter().map(|q| q.name.as_str()).collect();
    for i in 0..4 {
        assert!(
            queues.contains(&format!("orders.p{i}").as_str()),
            "{queues:?}"
        );
    }
    assert_eq!(
        topology.exchanges[0].kind,
        rabbitry::ExchangeKind::ConsistentHash
    );
}
