//! The `rabbitry` command against the real broker, checked from the
//! outside: another AMQP client (raw amqprs, not the gateway) publishes
//! what `rabbitry consume` reads and reads what `rabbitry publish` sends.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;

fn rabbitry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(args)
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "error")
        .output()
        .expect("run rabbitry")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn unique(prefix: &str) -> String {
    rabbitry_test_support::unique(&format!("cli.{prefix}"))
}

async fn raw() -> Connection {
    Connection::open(&OpenConnectionArguments::new(
        "127.0.0.1",
        5672,
        "guest",
        "guest",
    ))
    .await
    .expect("raw connection")
}

async fn declare(conn: &Connection, queue: &str) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::new(queue).durable(true).finish())
        .await
        .unwrap();
    ch.close().await.unwrap();
}

async fn delete(conn: &Connection, queue: &str) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_delete(QueueDeleteArguments::new(queue))
        .await
        .unwrap();
    ch.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_msgpack_is_read_by_another_client_as_a_map() {
    let conn = raw().await;
    let queue = unique("pub");
    declare(&conn, &queue).await;
    let out = rabbitry(&[
        "publish",
        "--routing-key",
        &queue,
        "--serializer",
        "msgpack",
        "--correlation-id",
        "corr-42",
        "--reply-to",
        "my_queue",
        "--header",
        "tenant=a",
        r#"{"title":"Hello World!"}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let ch = conn.open_channel(None).await.unwrap();
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a message within 5 s")
        .unwrap();
    let props = m.basic_properties.unwrap();
    assert_eq!(
        props.content_type().map(String::as_str),
        Some("application/x-msgpack")
    );
    assert_eq!(props.correlation_id().map(String::as_str), Some("corr-42"));
    assert_eq!(props.reply_to().map(String::as_str), Some("my_queue"));
    assert_eq!(
        props.delivery_mode(),
        Some(2),
        "persistent unless --transient"
    );
    let body: BTreeMap<String, String> = rmp_serde::from_slice(&m.content.unwrap()).unwrap();
    assert_eq!(
        body,
        BTreeMap::from([("title".to_owned(), "Hello World!".to_owned())])
    );
    delete(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_decodes_msgpack_and_json_from_another_client_and_shows_bad_bodies() {
    let conn = raw().await;
    let queue = unique("con");
    declare(&conn, &queue).await;
    let ch = conn.open_channel(None).await.unwrap();
    let send = |ct: &str, body: Vec<u8>| {
        let mut p = BasicProperties::default();
        p.with_content_type(ct).with_correlation_id("c1");
        let props = p.finish();
        let ch = ch.clone();
        let queue = queue.clone();
        async move {
            ch.basic_publish(props, body, BasicPublishArguments::new("", &queue))
                .await
                .unwrap()
        }
    };
    let mut map = BTreeMap::new();
    map.insert("title", "Hello World!");
    send(
        "application/x-msgpack",
        rmp_serde::to_vec_named(&map).unwrap(),
    )
    .await;
    send("application/json", br#"{"n":[1,2,3]}"#.to_vec()).await;
    send("application/json", b"{not json".to_vec()).await;
    send("application/pdf", b"%PDF-1.4".to_vec()).await;
    // The queue's count can lag the publishes a little: wait for all four.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let depth = ch
            .queue_declare(QueueDeclareArguments::new(&queue).passive(true).finish())
            .await
            .unwrap()
            .map(|(_, n, _)| n);
        if depth == Some(4) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "depth {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let out = rabbitry(&[
        "consume",
        &queue,
        "--count",
        "4",
        "--timeout",
        "10",
        "--ack",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[0]["body"],
        serde_json::json!({"title": "Hello World!"})
    );
    assert_eq!(
        lines[0]["properties"]["content_type"],
        "application/x-msgpack"
    );
    assert_eq!(lines[0]["properties"]["correlation_id"], "c1");
    assert_eq!(lines[0]["routing_key"], queue.as_str());
    assert_eq!(lines[0]["redelivered"], false);
    assert_eq!(lines[1]["body"], serde_json::json!({"n": [1, 2, 3]}));
    assert_eq!(lines[2]["body"]["base64"], "e25vdCBqc29u");
    assert!(
        lines[2]["decode_error"].as_str().unwrap().contains("json"),
        "{}",
        lines[2]
    );
    assert_eq!(lines[3]["body"]["base64"], "JVBERi0xLjQ=");

    // With --ack, removed after printing: the queue is empty; the timeout exits 0.
    let out = rabbitry(&["consume", &queue, "--timeout", "0.5"]);
    assert!(out.status.success());
    assert!(text(&out.stdout).is_empty());
    assert!(
        text(&out.stderr).contains("0 message"),
        "{}",
        text(&out.stderr)
    );
    delete(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_requeue_leaves_messages_on_the_queue() {
    let conn = raw().await;
    let queue = unique("req");
    declare(&conn, &queue).await;
    let out = rabbitry(&[
        "publish",
        "--routing-key",
        &queue,
        "--serializer",
        "text",
        "--count",
        "3",
        "hi",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = rabbitry(&["consume", &queue, "--count", "3", "--requeue"]);
    assert_eq!(text(&out.stdout).lines().count(), 3);
    let out = rabbitry(&["queues", &queue]);
    assert!(text(&out.stdout).contains(" 3 "), "{}", text(&out.stdout));
    delete(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_count_goes_through_the_producers_pipeline_in_order() {
    // More messages than the pipeline holds: each is handed to the
    // publisher in order and confirmed, so they arrive in order.
    let conn = raw().await;
    let queue = unique("pipeline");
    declare(&conn, &queue).await;
    let n = 2500;
    let out = rabbitry(&[
        "publish",
        "--routing-key",
        &queue,
        "--serializer",
        "text",
        "--message-id",
        "m",
        "--count",
        &n.to_string(),
        "hi",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("published {n} (confirmed)")),
        "{}",
        text(&out.stderr)
    );
    let out = rabbitry(&["consume", &queue, "--count", &n.to_string(), "--ack"]);
    let ids: Vec<String> = text(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["properties"]["message_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    assert!(
        ids == expected,
        "{} ids, first out of order at {:?}",
        ids.len(),
        ids.iter().zip(&expected).position(|(a, b)| a != b)
    );
    delete(&conn, &queue).await;
}

#[test]
fn wrong_credentials_and_host_give_clear_errors_without_panic() {
    let out = rabbitry(&[
        "--url",
        "amqp://guest:nope@127.0.0.1:5672/%2f",
        "queues",
        "x",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("127.0.0.1:5672") && err.contains("access refused"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let out = rabbitry(&["--url", "amqp://guest:guest@127.0.0.1:1/%2f", "queues", "x"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("connection refused"),
        "{err}"
    );
}

#[test]
fn each_connection_logs_its_nodes_and_where_they_came_from() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("nodes.toml");
    std::fs::write(
        &file,
        "[connections.default]\nurls = [\"amqp://guest:guest@127.0.0.1:5672/%2f\", \"amqp://guest:guest@localhost:5672/%2f\"]\n",
    )
    .unwrap();
    let run = |env_url: Option<&str>, flag: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rabbitry"));
        cmd.env_remove("AMQP_URL").env("RABBITRY_LOG", "info");
        if let Some(url) = env_url {
            cmd.env("AMQP_URL", url);
        }
        cmd.arg("-c").arg(&file);
        if let Some(url) = flag {
            cmd.args(["--url", url]);
        }
        let out = cmd.args(["queues", "no-such-queue"]).output().unwrap();
        text(&out.stderr)
    };
    let err = run(None, None);
    assert!(
        err.contains("nodes.toml")
            && err.contains("127.0.0.1:5672")
            && err.contains("localhost:5672"),
        "{err}"
    );
    assert!(!err.contains("replaces"), "{err}");
    let other = "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30";
    let err = run(Some(other), None);
    assert!(
        err.contains("AMQP_URL replaces the URLs the configuration gives"),
        "{err}"
    );
    assert!(err.contains("from=AMQP_URL"), "{err}");
    let err = run(None, Some(other));
    assert!(
        err.contains("--url replaces the URLs the configuration gives")
            && err.contains("from=--url"),
        "{err}"
    );
}

#[test]
fn config_errors_name_file_key_and_valid_values() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[consumers.orders]\nqueue = \"q\"\nexchange_type = \"topik\"\n",
    )
    .unwrap();
    let out = rabbitry(&["-c", file.to_str().unwrap(), "declare"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("consumers.orders.exchange_type"),
        "{err}"
    );
    assert!(err.contains("`topic`") && err.contains("`fanout`"), "{err}");
    std::fs::write(
        &file,
        "[consumers.orders]\nqueue = \"q\"\nroutingkeys = [\"a\"]\n",
    )
    .unwrap();
    let err = text(&rabbitry(&["-c", file.to_str().unwrap(), "declare"]).stderr);
    assert!(
        err.contains("consumers.orders")
            && err.contains("routingkeys")
            && err.contains("`routing_keys`"),
        "{err}"
    );
    let out = rabbitry(&["publish", "--serializer", "yaml", "x"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("yaml") && err.contains("msgpack, json, text, csv, bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_check_reports_drift_and_queues_never_creates() {
    let conn = raw().await;
    let queue = unique("drift");
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("topology.toml");
    let exchange = unique("ex");
    std::fs::write(
        &file,
        format!(
            "[consumers.c]\nqueue = \"{queue}\"\nexchange = \"{exchange}\"\nexchange_type = \"topic\"\nrouting_keys = [\"a.*\", \"b.#\"]\narguments = {{ \"x-max-length\" = 10 }}\n"
        ),
    )
    .unwrap();
    let cfg = file.to_str().unwrap();

    // Nothing declared yet: both are missing, exit 5 (drift).
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    assert!(
        report.contains(&format!("queue '{queue}': missing")),
        "{report}"
    );
    assert!(
        report.contains(&format!("exchange '{exchange}': missing")),
        "{report}"
    );
    // `queues` reports missing and does not create it.
    let out = rabbitry(&["queues", &queue]);
    assert!(text(&out.stdout).contains("missing"));
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert!(text(&out.stdout).contains(&format!("queue '{queue}': missing")));

    let out = rabbitry(&["-c", cfg, "declare"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("no drift"));

    // Change an argument in the file: the check names it.
    std::fs::write(
        &file,
        format!("[consumers.c]\nqueue = \"{queue}\"\nexchange = \"{exchange}\"\nexchange_type = \"topic\"\narguments = {{ \"x-max-length\" = 20 }}\n"),
    )
    .unwrap();
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(out.status.code(), Some(5));
    let report = text(&out.stdout);
    assert!(
        report.contains(&queue) && report.contains("x-max-length"),
        "{report}"
    );
    // A refused declaration names the queue and the argument, exits non-zero.
    let out = rabbitry(&["-c", cfg, "declare"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&queue) && err.contains("PRECONDITION_FAILED") && err.contains("x-max-length"),
        "{err}"
    );

    delete(&conn, &queue).await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&exchange))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_against_another_client_and_a_clean_timeout() {
    let conn = raw().await;
    let queue = unique("rpc");
    declare(&conn, &queue).await;
    // A responder written with another client: the seed's service, replying
    // with a PDF to reply_to with the request's correlation id.
    let ch = conn.open_channel(None).await.unwrap();
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(&queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .unwrap();
    let responder_ch = ch.clone();
    let responder = tokio::spawn(async move {
        let m = rx.recv().await.unwrap();
        let props = m.basic_properties.unwrap();
        let request: BTreeMap<String, String> = rmp_serde::from_slice(&m.content.unwrap()).unwrap();
        let mut p = BasicProperties::default();
        p.with_content_type("application/pdf")
            .with_correlation_id(props.correlation_id().unwrap());
        let pdf = format!("%PDF-1.4\n% {}\n%%EOF\n", request["title"]);
        responder_ch
            .basic_publish(
                p.finish(),
                pdf.into_bytes(),
                BasicPublishArguments::new("", props.reply_to().unwrap()),
            )
            .await
            .unwrap();
    });
    let out_file = std::env::temp_dir().join(format!("{}.pdf", unique("reply")));
    let out = rabbitry(&[
        "rpc",
        "--routing-key",
        &queue,
        "--serializer",
        "msgpack",
        "--timeout",
        "5s",
        "--output",
        out_file.to_str().unwrap(),
        r#"{"title":"Hello World!"}"#,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("content-type: application/pdf"),
        "{}",
        text(&out.stderr)
    );
    assert!(text(&out.stdout).is_empty(), "stdout is the body alone");
    let pdf = std::fs::read(&out_file).unwrap();
    assert!(pdf.starts_with(b"%PDF-") && String::from_utf8_lossy(&pdf).contains("Hello World!"));
    responder.await.unwrap();

    // Nothing answers now: a clean, non-zero exit that says so.
    let started = std::time::Instant::now();
    let out = rabbitry(&[
        "rpc",
        "--routing-key",
        &queue,
        "--timeout",
        "500ms",
        r#"{"title":"x"}"#,
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("timed out after 500ms"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    delete(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_migrate_and_status_show_backlog_and_failed_rows() {
    let dir = std::env::temp_dir().join(unique("outbox"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/app.db", dir.display());
    let out = rabbitry(&["outbox", "migrate", "--database", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let outbox = rabbitry::outbox::Outbox::connect(&url).await.unwrap();
    let rabbitry::outbox::Database::Sqlite(pool) = outbox.database() else {
        unreachable!()
    };
    let mut tx = pool.begin().await.unwrap();
    let nowhere = unique("nowhere");
    rabbitry::outbox::publish(
        &mut *tx,
        rabbitry::Message::new("x")
            .routing_key(&nowhere)
            .mandatory(true),
    )
    .await
    .unwrap();
    rabbitry::outbox::publish(&mut *tx, rabbitry::Message::new("y").routing_key(&nowhere))
        .await
        .unwrap();
    outbox.commit(tx).await.unwrap();
    let out = rabbitry(&["outbox", "status", "--database", &url]);
    let report = text(&out.stdout);
    assert!(report.contains("pending: 2"), "{report}");
    assert!(report.contains("failed: 0"), "{report}");

    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let relay = outbox
        .spawn_relay(&conn, rabbitry::outbox::RelayOptions::default())
        .await
        .unwrap();
    for _ in 0..250 {
        if outbox.status().await.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay.stop().await.unwrap();
    let out = rabbitry(&["outbox", "status", "--database", &url]);
    let report = text(&out.stdout);
    assert!(
        report.contains("pending: 0") && report.contains("failed: 1"),
        "{report}"
    );
    assert!(
        report.contains(&nowhere) && report.contains("NO_ROUTE"),
        "{report}"
    );

    let out = rabbitry(&[
        "outbox",
        "status",
        "--database",
        "postgres://postgres@127.0.0.1:1/x",
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("Connection refused"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_list_cancel_and_relay_from_the_command_line() {
    let dir = std::env::temp_dir().join(unique("schedule"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/app.db", dir.display());
    let queue = unique("scheduled");
    let conn = raw().await;
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_declare(QueueDeclareArguments::durable_client_named(&queue))
        .await
        .unwrap();
    let schedule = |when: &[&str], body: &str| {
        let mut args = vec!["schedule", "--database", &url];
        args.extend_from_slice(when);
        args.extend_from_slice(&["--routing-key", &queue, "--header", "kind=reminder", body]);
        let out = rabbitry(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let soon = schedule(&["--in", "1s"], "soon");
    let cancelled = schedule(&["--in", "1h"], "never");
    let past = schedule(&["--at", "2001-01-01T00:00:00Z"], "at once");

    let out = rabbitry(&["scheduled", "list", "--database", &url]);
    let listed = text(&out.stdout);
    assert!(
        listed.contains(&soon) && listed.contains(&cancelled) && listed.contains(&past),
        "{listed}"
    );
    assert!(listed.contains("2001-01-01T00:00:00.000Z"), "{listed}");
    let out = rabbitry(&["scheduled", "cancel", &cancelled, "--database", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Cancelled twice: nothing to cancel, and it says why.
    let out = rabbitry(&["scheduled", "cancel", &cancelled, "--database", &url]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("published already"),
        "{}",
        text(&out.stderr)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("127.0.0.1:{port}");
    let mut relay = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["relay", "--database", &url, "--admin", &admin])
        .env_remove("AMQP_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
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
        let m = tokio::time::timeout(Duration::from_secs(15), rx.recv())
            .await
            .expect("a scheduled message")
            .unwrap();
        got.push(String::from_utf8(m.content.unwrap()).unwrap());
    }
    assert_eq!(got, ["at once", "soon"]);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), rx.recv())
            .await
            .is_err(),
        "the cancelled one never comes"
    );
    drop(rx);
    ch.close().await.unwrap();
    conn.close().await.unwrap();
    // A published message cannot be cancelled either.
    let out = rabbitry(&["scheduled", "cancel", &soon, "--database", &url]);
    assert_eq!(out.status.code(), Some(3));
    // The relay's admin listener shows the outbox: nothing due, nothing
    // scheduled, as the broker and the database say.
    let metrics = get(&admin, "/metrics").await;
    for line in [
        "rabbitry_outbox_backlog{",
        "rabbitry_outbox_scheduled{",
        "rabbitry_connection_up{",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    assert!(get(&admin, "/readyz").await.contains("\"ready\":true"));
    Command::new("kill")
        .args(["-TERM", &relay.id().to_string()])
        .status()
        .unwrap();
    // Waited for off the runtime's threads: the raw client's tasks run there.
    let status = tokio::task::spawn_blocking(move || relay.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let conn = raw().await;
    let cleanup = conn.open_channel(None).await.unwrap();
    cleanup
        .queue_delete(QueueDeleteArguments::new(&queue))
        .await
        .unwrap();
    conn.close().await.unwrap();
}

/// The body of `GET path` from the listener at `addr`.
async fn get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[test]
fn schedule_refuses_what_it_cannot_do_with_a_clear_error() {
    let dir = std::env::temp_dir().join(unique("schedule-bad"));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/app.db", dir.display());
    for (args, says) in [
        (
            vec!["schedule", "--database", &url, "--routing-key", "q", "x"],
            "--in DURATION or --at TIME",
        ),
        (
            vec![
                "schedule",
                "--database",
                &url,
                "--at",
                "tomorrow",
                "--routing-key",
                "q",
                "x",
            ],
            "not an RFC 3339 time",
        ),
        (
            vec![
                "schedule",
                "--database",
                &url,
                "--at",
                "2026-12-01T09:00:00",
                "--routing-key",
                "q",
                "x",
            ],
            "no offset",
        ),
        (
            vec![
                "schedule",
                "--database",
                &url,
                "--in",
                "soon",
                "--routing-key",
                "q",
                "x",
            ],
            "invalid duration",
        ),
        (
            vec![
                "schedule",
                "--database",
                "mysql://h/db",
                "--in",
                "1s",
                "--routing-key",
                "q",
                "x",
            ],
            "expected sqlite://PATH or postgres://",
        ),
        (vec!["relay"], "at least one --database"),
        (
            vec!["relay", "--database", "redis://h"],
            "expected sqlite://PATH or postgres://",
        ),
    ] {
        let out = rabbitry(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_check_covers_a_workers_retry_and_dead_letter_queues() {
    let queue = unique("drift-worker");
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("worker.toml");
    std::fs::write(
        &file,
        format!(
            "[consumers.c]\nqueue = \"{queue}\"\nhandler = \"http://127.0.0.1:9/\"\nretry = {{ attempts = 2, delays = [\"1s\"] }}\n"
        ),
    )
    .unwrap();
    let cfg = file.to_str().unwrap();
    let (dead, delay) = (format!("{queue}.dead"), format!("{queue}.retry.1s"));
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    let report = text(&out.stdout);
    for q in [&queue, &dead, &delay] {
        assert!(
            report.contains(&format!("queue '{q}': missing")),
            "{report}"
        );
    }
    let out = rabbitry(&["-c", cfg, "declare"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&dead), "{}", text(&out.stdout));
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    // The dead-letter queue deleted: the check says so.
    let conn = rabbitry::Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    conn.delete_queue(&dead).await.unwrap();
    let out = rabbitry(&["-c", cfg, "declare", "--check"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(text(&out.stdout).contains(&format!("queue '{dead}': missing")));
    for q in [&queue, &delay] {
        conn.delete_queue(q).await.unwrap();
    }
    conn.close().await;
}
