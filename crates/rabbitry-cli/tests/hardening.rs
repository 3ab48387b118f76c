//! The command as a hostile tester and a shell user would drive it: pipes
//! that close early, hostile values for every subcommand, exit codes, log
//! filters and formats, a second Ctrl-C, the defaults a new user meets.
//! Other AMQP clients (raw amqprs) publish and read on the other side.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, QueueDeclareArguments,
    QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;

fn rabbitry_cmd(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rabbitry"));
    cmd.args(args)
        .env_remove("AMQP_URL")
        .env_remove("RUST_LOG")
        .env("RABBITRY_LOG", "error");
    cmd
}

fn rabbitry(args: &[&str]) -> Output {
    rabbitry_cmd(args).output().expect("run rabbitry")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unique(prefix: &str) -> String {
    rabbitry_test_support::unique(&format!("hard.{prefix}"))
}

fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("files"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

async fn raw() -> (Connection, Channel) {
    let conn = Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .expect("raw connection");
    let ch = conn.open_channel(None).await.unwrap();
    (conn, ch)
}

async fn declare(ch: &Channel, queue: &str) {
    ch.queue_declare(QueueDeclareArguments::new(queue).durable(true).finish())
        .await
        .unwrap();
}

async fn depth(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
        .await
        .unwrap()
        .map_or(0, |(_, n, _)| n)
}

async fn publish_n(ch: &Channel, queue: &str, n: usize) {
    for i in 0..n {
        let mut p = BasicProperties::default();
        p.with_content_type("text/plain");
        ch.basic_publish(
            p.finish(),
            format!("message {i}").into_bytes(),
            BasicPublishArguments::new("", queue),
        )
        .await
        .unwrap();
    }
    // A synchronous call after the publishes returns once they are queued.
    let _ = depth(ch, queue).await;
}

async fn eventually_depth(ch: &Channel, queue: &str, want: u32) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = depth(ch, queue).await;
        if now == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue {queue} holds {now}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the test's queues and closes the raw connection. Closing can
/// race amqprs' own channel teardown, which must not fail the test: the
/// queues are gone by then.
async fn finish(conn: Connection, ch: &Channel, queues: &[&str]) {
    for q in queues {
        ch.queue_delete(QueueDeleteArguments::new(q)).await.unwrap();
    }
    let _ = conn.close().await;
}

/// Runs rabbitry with a stdout that its reader closes after `lines` lines,
/// as `| head -n LINES` does. Returns the exit status and stderr.
fn with_reader_gone(args: &[&str], lines: usize) -> (Option<i32>, String) {
    let mut child = rabbitry_cmd(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run rabbitry");
    {
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        for _ in 0..lines {
            line.clear();
            if out.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
        }
        // Dropping the reader closes the pipe, as `head` exiting does.
    }
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap().code(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_into_head_removes_nothing_and_ack_removes_only_what_was_printed() {
    let (conn, ch) = raw().await;
    let queue = unique("peek");
    declare(&ch, &queue).await;
    publish_n(&ch, &queue, 200).await;

    // The shell's own pipe, as a user types it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' consume '{queue}' | head -3",
            env!("CARGO_BIN_EXE_rabbitry")
        ))
        .env_remove("AMQP_URL")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout).lines().count(), 3);
    assert!(
        !text(&out.stderr).contains("panicked"),
        "{}",
        text(&out.stderr)
    );
    eventually_depth(&ch, &queue, 200).await;

    // --count: the broker hands over no more than will be printed.
    let out = rabbitry(&["consume", &queue, "--count", "3", "--ack"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 3);
    eventually_depth(&ch, &queue, 197).await;
    let first: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().unwrap()).unwrap();
    assert_eq!(first["body"], "message 0", "in order, from the head");

    finish(conn, &ch, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_every_printing_command_quietly() {
    let (conn, ch) = raw().await;
    let queue = unique("pipe");
    let dead = format!("{queue}.dead");
    declare(&ch, &queue).await;
    declare(&ch, &dead).await;
    publish_n(&ch, &queue, 50).await;
    publish_n(&ch, &dead, 50).await;
    let missing_db = std::env::temp_dir().join(unique("db")).join("x.db");
    let outbox_db = format!("sqlite://{}", temp_file("outbox.db", b"").display());
    assert!(rabbitry(&["outbox", "migrate", "--database", &outbox_db])
        .status
        .success());
    for (args, lines) in [
        (vec!["dead", "list", &queue], 1),
        (vec!["dead", "list", &queue], 0),
        (vec!["consume", &queue, "--timeout", "1s"], 1),
        (vec!["queues", &queue, &dead], 1),
        (vec!["completions", "bash"], 1),
        (vec!["completions", "zsh"], 0),
        (vec!["outbox", "status", "--database", &outbox_db], 1),
        (vec!["--help"], 1),
    ] {
        let (code, err) = with_reader_gone(&args, lines);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let _ = missing_db;
    // Nothing was lost by the peeks.
    eventually_depth(&ch, &queue, 50).await;
    eventually_depth(&ch, &dead, 50).await;
    finish(conn, &ch, &[&queue, &dead]).await;
}

/// Every subcommand with hostile values: huge and non-finite durations,
/// empty, binary and missing files, malformed URLs, unknown names. None
/// may panic (exit 101); each says what is wrong.
#[test]
fn hostile_values_never_panic() {
    let binary = temp_file("binary.toml", &[0xff, 0x00, 0xfe, 0x9c, 0x01]);
    let empty = temp_file("empty.toml", b"");
    let not_url = temp_file(
        "handler.toml",
        b"[consumers.c]\nqueue = \"q\"\nhandler = \"not a url\"\n",
    );
    let ftp = temp_file(
        "ftp.toml",
        b"[consumers.c]\nqueue = \"q\"\nhandler = \"ftp://h/x\"\n",
    );
    let site = temp_file(
        "site.toml",
        b"[consumers.c]\nqueue = \"${site}.orders\"\nhandler = \"http://127.0.0.1:9/\"\n",
    );
    let huge = temp_file(
        "huge.toml",
        b"[consumers.c]\nqueue = \"q\"\ntimeout = \"99999999999999999999999s\"\n",
    );
    let nan_retry = temp_file(
        "retry.toml",
        b"[consumers.c]\nqueue = \"q\"\nretry = { attempts = 2, delays = [\"nan\"] }\n",
    );
    let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let binary_body = format!("@{}", binary.display());
    let (binary, empty, not_url, ftp, site, huge, nan_retry) = (
        p(&binary),
        p(&empty),
        p(&not_url),
        p(&ftp),
        p(&site),
        p(&huge),
        p(&nan_retry),
    );
    let missing_db = format!(
        "sqlite://{}",
        std::env::temp_dir()
            .join(unique("nodb"))
            .join("x.db")
            .display()
    );
    let q = unique("hostile");
    let cases: Vec<(Vec<&str>, Option<i32>)> = vec![
        // Durations.
        (vec!["consume", &q, "--timeout", "1e309"], Some(2)),
        (vec!["consume", &q, "--timeout", "inf"], Some(2)),
        (vec!["consume", &q, "--timeout", "nan"], Some(2)),
        (vec!["consume", &q, "--timeout", "1e20"], Some(2)),
        (vec!["consume", &q, "--timeout", "-1"], Some(2)),
        (
            vec![
                "rpc",
                "--routing-key",
                &q,
                "--timeout",
                "99999999999999999999999s",
                "x",
            ],
            Some(2),
        ),
        (
            vec!["rpc", "--routing-key", &q, "--timeout", "", "x"],
            Some(2),
        ),
        (vec!["-c", &huge, "worker"], Some(2)),
        (vec!["-c", &nan_retry, "worker"], Some(2)),
        // Files.
        (vec!["-c", &binary, "worker"], Some(2)),
        (vec!["-c", &binary, "declare"], Some(2)),
        (vec!["-c", &empty, "worker"], Some(2)),
        (vec!["-c", "/nonexistent/app.toml", "queues"], None),
        (
            vec!["publish", "--routing-key", &q, "@/nonexistent/body"],
            None,
        ),
        (
            vec![
                "publish",
                "--routing-key",
                &q,
                "--serializer",
                "msgpack",
                "not json",
            ],
            None,
        ),
        (
            vec![
                "publish",
                "--routing-key",
                &q,
                "--serializer",
                "text",
                &binary_body,
            ],
            None,
        ),
        (vec!["-c", &not_url, "worker"], Some(2)),
        (vec!["-c", &ftp, "worker"], Some(2)),
        (vec!["-c", &site, "worker"], Some(2)),
        (vec!["-c", &site, "declare"], Some(2)),
        // URLs.
        (vec!["--url", "not a url", "queues", &q], Some(2)),
        (vec!["--url", "amqp://[::1", "queues", &q], None),
        (vec!["--url", "amqp://h:99999/", "queues", &q], Some(2)),
        (vec!["--url", "amqp://%zz@h/", "queues", &q], Some(2)),
        (
            vec!["--url", "amqps://localhost?verify=sometimes", "queues", &q],
            Some(2),
        ),
        (
            vec!["--url", "amqp://localhost?cacertfile=/ca.pem", "queues", &q],
            Some(2),
        ),
        (
            vec!["outbox", "status", "--database", "mysql://h/db"],
            Some(2),
        ),
        (vec!["outbox", "status", "--database", &missing_db], Some(3)),
        (vec!["outbox", "status", "--database", ""], Some(2)),
        (
            vec![
                "demo",
                "--database",
                "mysql://h/db",
                "--listen",
                "127.0.0.1:0",
            ],
            Some(2),
        ),
        // Names and numbers.
        (vec!["dead", "list", ""], None),
        (vec!["dead", "replay", &q, "--count", "-1"], Some(2)),
        (
            vec![
                "publish",
                "--routing-key",
                &q,
                "--count",
                "99999999999999999999999",
                "x",
            ],
            Some(2),
        ),
        (
            vec!["publish", "--routing-key", &q, "--header", "novalue", "x"],
            None,
        ),
        (
            vec![
                "publish",
                "--routing-key",
                &q,
                "--exchange-type",
                "fan",
                "x",
            ],
            Some(2),
        ),
        (vec!["completions", "tcsh"], Some(2)),
        (
            vec!["demo-part", "nope", "--data-dir", "/tmp", "--instance", "x"],
            None,
        ),
        (vec!["no-such-command"], Some(2)),
    ];
    for (args, want) in &cases {
        let out = rabbitry(args);
        let err = text(&out.stderr);
        let code = out.status.code();
        assert_ne!(code, Some(101), "{args:?} panicked: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_ne!(code, Some(0), "{args:?} should fail: {err}");
        assert!(err.contains("error"), "{args:?} says what is wrong: {err}");
        if let Some(want) = want {
            assert_eq!(code, Some(*want), "{args:?}: {err}");
        }
    }
    // Names past AMQP's 255 bytes: a usage error that names the limit,
    // before the client (which panicked on them) sees them.
    let long = "n".repeat(300);
    let long_header = format!("{long}=v");
    let long_consumer = temp_file(
        "long.toml",
        format!("[consumers.{long}]\nqueue = \"q\"\nhandler = \"http://127.0.0.1:9/\"\n")
            .as_bytes(),
    );
    let long_consumer = p(&long_consumer);
    let long_names: Vec<Vec<&str>> = vec![
        vec!["queues", &long],
        vec!["rpc", "--routing-key", &long, "--timeout", "1s", "x"],
        vec!["dead", "list", &long],
        vec!["dead", "purge", &long],
        vec!["dead", "replay", &long],
        vec!["publish", "--routing-key", &long, "x"],
        vec![
            "publish",
            "--routing-key",
            &q,
            "--header",
            &long_header,
            "x",
        ],
        vec!["publish", "--exchange", &long, "--routing-key", &q, "x"],
        vec!["-c", &long_consumer, "worker"],
    ];
    for args in &long_names {
        let out = rabbitry(args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("at most 255"),
            "{args:?} names the limit: {err}"
        );
    }
    // A missing database is reported, not created.
    let path = missing_db.trim_start_matches("sqlite://");
    assert!(!std::path::Path::new(path).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_have_one_meaning_each_and_are_documented() {
    let help = text(&rabbitry(&["--help"]).stdout);
    for line in [
        "Exit codes:",
        "2    usage",
        "3    not found",
        "4    timeout",
        "5    drift",
    ] {
        assert!(help.contains(line), "{line}: {help}");
    }
    let (conn, ch) = raw().await;
    let queue = unique("codes");
    declare(&ch, &queue).await;
    // 0
    assert_eq!(rabbitry(&["queues", &queue]).status.code(), Some(0));
    // 2: a bad flag, a bad config.
    assert_eq!(rabbitry(&["queues", "--nope"]).status.code(), Some(2));
    let bad = temp_file("bad.toml", b"[connections.default]\nurll = \"x\"\n");
    assert_eq!(
        rabbitry(&["-c", bad.to_str().unwrap(), "declare"])
            .status
            .code(),
        Some(2)
    );
    // 3: a queue that does not exist.
    assert_eq!(
        rabbitry(&["queues", &unique("missing")]).status.code(),
        Some(3)
    );
    // 4: nobody answers.
    let out = rabbitry(&["rpc", "--routing-key", &queue, "--timeout", "300ms", "{}"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    // 5: drift.
    let cfg = temp_file(
        "drift.toml",
        format!("[consumers.c]\nqueue = \"{}\"\n", unique("drift")).as_bytes(),
    );
    assert_eq!(
        rabbitry(&["-c", cfg.to_str().unwrap(), "declare", "--check"])
            .status
            .code(),
        Some(5)
    );
    finish(conn, &ch, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_json_as_json_and_anything_else_as_text_by_default() {
    let (conn, ch) = raw().await;
    let queue = unique("auto");
    declare(&ch, &queue).await;
    for body in ["hello", r#"{"title": "Hi"}"#] {
        let out = rabbitry(&["publish", "--routing-key", &queue, body]);
        assert!(out.status.success(), "{body}: {}", text(&out.stderr));
    }
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        got.push((
            m.basic_properties.unwrap().content_type().cloned(),
            text(&m.content.unwrap()),
        ));
    }
    assert_eq!(got[0], (Some("text/plain".into()), "hello".into()));
    assert_eq!(
        got[1],
        (Some("application/json".into()), r#"{"title": "Hi"}"#.into()),
        "the body goes as it was typed"
    );
    finish(conn, &ch, &[&queue]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_prints_the_reply_body_alone_on_stdout() {
    let (conn, ch) = raw().await;
    let queue = unique("rpc");
    declare(&ch, &queue).await;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let responder_ch = ch.clone();
    // A text reply, then bytes.
    let responder = tokio::spawn(async move {
        for (content_type, body) in [
            ("text/plain", b"pong".to_vec()),
            ("application/octet-stream", vec![0, 1, 2, 255, b'\n']),
        ] {
            let m = rx.recv().await.unwrap();
            let props = m.basic_properties.unwrap();
            let mut p = BasicProperties::default();
            p.with_content_type(content_type)
                .with_correlation_id(props.correlation_id().unwrap());
            responder_ch
                .basic_publish(
                    p.finish(),
                    body,
                    BasicPublishArguments::new("", props.reply_to().unwrap()),
                )
                .await
                .unwrap();
        }
    });
    let out = rabbitry(&["rpc", "--routing-key", &queue, "ping"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "pong\n");
    assert!(text(&out.stderr).contains("content-type: text/plain"));
    // Bytes arrive as the bytes, not as JSON (stdout is a pipe here).
    let out = rabbitry(&["rpc", "--routing-key", &queue, "ping"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout, [0, 1, 2, 255, b'\n']);
    responder.await.unwrap();
    finish(conn, &ch, &[&queue]).await;
}

#[test]
fn log_filters_take_directives_colours_only_on_terminals_and_json_on_request() {
    let missing = unique("missing");
    // RUST_LOG with a directive, not only a level.
    let out = rabbitry_cmd(&["queues", &missing])
        .env_remove("RABBITRY_LOG")
        .env("RUST_LOG", "rabbitry=debug")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3));
    assert!(err.contains("DEBUG"), "the directive applies: {err}");
    // A queue missing where that is the expected answer is no warning.
    assert!(!err.contains("WARN"), "{err}");
    // Not a terminal: no colour codes.
    assert!(!err.contains("\u{1b}["), "{err}");
    // JSON lines on request.
    let out = rabbitry_cmd(&["--log-format", "json", "queues", &missing])
        .env("RABBITRY_LOG", "debug")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    let logs: Vec<&str> = err.lines().filter(|l| !l.starts_with("error:")).collect();
    assert!(!logs.is_empty(), "{err}");
    for line in logs {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string(), "{line}");
    }
}

#[test]
fn help_shows_no_internal_defaults_and_completions_are_generated() {
    let out = rabbitry(&["dead", "replay", "--help"]);
    let help = text(&out.stdout);
    assert!(!help.contains("18446744073709551615"), "{help}");
    assert!(help.contains("default: all"), "{help}");
    for shell in ["bash", "zsh", "fish"] {
        let out = rabbitry(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(
            script.contains("rabbitry") && script.contains("consume"),
            "{shell}: {script}"
        );
    }
}
