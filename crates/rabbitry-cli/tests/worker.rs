//! `rabbitry worker` and `rabbitry dead` as processes, against the real
//! broker and a real HTTP application.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, Message, Producer, ProducerSettings,
};

fn unique(prefix: &str) -> String {
    rabbitry_test_support::unique(&format!("cliw.{prefix}"))
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `text` as a worker configuration in a folder of its own.
fn config_file(text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("worker.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn write_config(queue: &str, handler: &str) -> std::path::PathBuf {
    config_file(&format!(
        "[worker]\nshutdown_timeout = \"10s\"\n\n[consumers.jobs]\nqueue = \"{queue}\"\nhandler = \"{handler}\"\nretry = {{ attempts = 2, delays = [\"100ms\"] }}\n"
    ))
}

async fn connect() -> Connection {
    Connection::open(ConnectionSettings::new(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
    ))
    .await
    .unwrap()
}

fn worker(config: &std::path::Path, extra: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["worker", "-c", config.to_str().unwrap()])
        .args(extra)
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start rabbitry worker")
}

/// Waits (up to 5 s) until the worker consumes `queue`.
async fn wait_consuming(conn: &Connection, queue: &str) {
    for _ in 0..250 {
        if conn
            .queue_status(queue)
            .await
            .unwrap()
            .is_some_and(|s| s.consumers == 1)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the worker did not start consuming {queue} within 5 s");
}

async fn wait_exit(child: &mut std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not exit within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_slow_handler_finish_and_leaves_the_rest_on_the_queue() {
    let conn = connect().await;
    let queue = unique("slow");
    let calls = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let app = {
        let (calls, finished) = (calls.clone(), finished.clone());
        Router::new().fallback(move || {
            let (calls, finished) = (calls.clone(), finished.clone());
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                StatusCode::OK
            }
        })
    };
    let config = write_config(&queue, &serve(app).await);
    let mut child = worker(&config, &[]);
    // The worker declares the queue; wait for it, then publish five.
    wait_consuming(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..5 {
        producer
            .publish(Message::new(format!("{i}")).message_id(format!("m-{i}")))
            .await
            .unwrap();
    }
    wait_for(Duration::from_secs(10), "the first request", || {
        calls.load(Ordering::SeqCst) == 1
    })
    .await;
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = wait_exit(&mut child, Duration::from_secs(15)).await;
    assert!(exit.success(), "clean exit, got {exit:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "only the message in flight was handled"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "and it was allowed to finish"
    );

    // The rest are on the queue, never delivered before; the first was acked.
    let status = conn.queue_status(&queue).await.unwrap().unwrap();
    assert_eq!(status.messages, 4, "four messages left on the queue");
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            !d.redelivered,
            "{:?} was delivered before",
            d.properties.message_id
        );
        ids.push(d.properties.message_id.clone().unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(ids, ["m-1", "m-2", "m-3", "m-4"]);
    for q in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.100ms"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_list_and_replay_from_the_command_line() {
    let conn = connect().await;
    let queue = unique("dead");
    let fixed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicUsize::new(0));
    let app = {
        let (fixed, handled) = (fixed.clone(), handled.clone());
        Router::new().fallback(move || {
            let (fixed, handled) = (fixed.clone(), handled.clone());
            async move {
                if fixed.load(Ordering::SeqCst) {
                    handled.fetch_add(1, Ordering::SeqCst);
                    (StatusCode::OK, "done")
                } else {
                    (StatusCode::UNPROCESSABLE_ENTITY, "price must be positive")
                }
            }
        })
    };
    let config = write_config(&queue, &serve(app).await);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut child = worker(&config, &["--admin", &metrics_addr]);
    wait_consuming(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("order")).await.unwrap();
    let dead = format!("{queue}.dead");
    for _ in 0..250 {
        if conn
            .queue_status(&dead)
            .await
            .unwrap()
            .is_some_and(|s| s.messages == 1)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rabbitry = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(args)
            .env_remove("AMQP_URL")
            .output()
            .unwrap()
    };
    let out = rabbitry(&["dead", "list", &queue]);
    assert!(out.status.success());
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let letter: serde_json::Value =
        serde_json::from_str(listing.lines().next().expect("one dead letter")).unwrap();
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("price must be positive"),
        "{letter}"
    );
    assert_eq!(letter["attempts"], 1);
    assert_eq!(letter["original_routing_key"], queue.as_str());

    fixed.store(true, Ordering::SeqCst);
    let out = rabbitry(&["dead", "replay", &queue]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("replayed 1"));
    wait_for(
        Duration::from_secs(10),
        "the replayed message handled",
        || handled.load(Ordering::SeqCst) == 1,
    )
    .await;

    let out = rabbitry(&["dead", "purge", &queue]);
    assert!(out.status.success());

    // What the worker did, as Prometheus metrics: one dead letter, then one ack.
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&metrics_addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let mut metrics = scrape();
    for _ in 0..250 {
        if metrics.contains("outcome=\"ack\"} 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        metrics = scrape();
    }
    assert!(
        metrics.contains("rabbitry_deliveries_total{consumer=\"jobs\",outcome=\"dead_letter\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rabbitry_deliveries_total{consumer=\"jobs\",outcome=\"ack\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rabbitry_handlers_in_flight{consumer=\"jobs\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("rabbitry_handler_duration_seconds_bucket{consumer=\"jobs\",le=\"+Inf\"} 2"),
        "{metrics}"
    );
    // The same listener answers the probes and the status.
    assert_eq!(http_get(&metrics_addr, "/livez").0, 200);
    let (ready, why) = http_get(&metrics_addr, "/readyz");
    assert_eq!(ready, 200, "{why}");
    let (_, status) = http_get(&metrics_addr, "/api/status");
    assert!(
        status.contains("\"name\":\"jobs\"") && status.contains("\"attached\":true"),
        "{status}"
    );
    assert!(terminate(&mut child).await.success());
    delete_queues(&conn, &queue).await;
}

/// Deletes the queue of the tests' worker config and its dead-letter and
/// delay queues.
async fn delete_queues(conn: &Connection, queue: &str) {
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.retry.100ms"),
    ] {
        conn.delete_queue(&q).await.unwrap();
    }
}

/// Sends SIGTERM to the worker and waits (up to 15 s) for it to exit.
async fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    wait_exit(child, Duration::from_secs(15)).await
}

/// Reads a child's stderr on a thread; the lines so far are in the vector.
fn collect_stderr(child: &mut std::process::Child) -> Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::BufRead;
    let lines: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let sink = lines.clone();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_of_a_dead_lettered_delivery_says_dead_letter() {
    let conn = connect().await;
    let queue = unique("label");
    let app = Router::new().fallback(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "boom") });
    let config = write_config(&queue, &serve(app).await);
    let mut child = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["worker", "-c", config.to_str().unwrap()])
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    wait_consuming(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("x")).await.unwrap();
    // Two attempts (500 both times): a retry, then the dead letter.
    wait_for(Duration::from_secs(10), "the dead-letter log line", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("dead-lettered"))
    })
    .await;
    let log = lines.lock().unwrap().clone();
    let dead = log.iter().find(|l| l.contains("dead-lettered")).unwrap();
    assert!(dead.contains("outcome=\"dead-letter\""), "{dead}");
    let retry = log.iter().find(|l| l.contains("will retry")).unwrap();
    assert!(retry.contains("outcome=\"retry\""), "{retry}");
    terminate(&mut child).await;
    delete_queues(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_stops_the_worker_at_once() {
    let conn = connect().await;
    let queue = unique("twice");
    let called = Arc::new(AtomicBool::new(false));
    let app = {
        let called = called.clone();
        Router::new().fallback(move || {
            called.store(true, Ordering::SeqCst);
            // Longer than the test would ever wait.
            async { tokio::time::sleep(Duration::from_secs(600)).await }
        })
    };
    let config = config_file(&format!(
        "[worker]\nshutdown_timeout = \"300s\"\n\n[consumers.jobs]\nqueue = \"{queue}\"\nhandler = \"{}\"\ntimeout = \"300s\"\nretry = {{ attempts = 2, delays = [\"100ms\"] }}\n",
        serve(app).await
    ));
    let mut child = worker(&config, &[]);
    let lines = collect_stderr(&mut child);
    wait_consuming(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("x")).await.unwrap();
    wait_for(Duration::from_secs(10), "the handler to start", || {
        called.load(Ordering::SeqCst)
    })
    .await;
    let pid = child.id().to_string();
    let interrupt = || Command::new("kill").args(["-INT", &pid]).status().unwrap();
    interrupt();
    wait_for(Duration::from_secs(10), "the first Ctrl-C noticed", || {
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("press Ctrl-C again"))
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    interrupt();
    let exit = wait_exit(&mut child, Duration::from_secs(10)).await;
    assert_eq!(exit.code(), Some(130), "{:?}", lines.lock().unwrap());
    // The message in flight was never acked: it is back on the queue.
    let mut back = false;
    for _ in 0..250 {
        if conn
            .queue_status(&queue)
            .await
            .unwrap()
            .is_some_and(|s| s.messages == 1)
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the interrupted message went back to the queue");
    delete_queues(&conn, &queue).await;
}

/// A message whose handling kills the worker process, every time. On a
/// quorum queue with `delivery_limit = 3` the broker stops delivering it
/// after its limit and dead-letters it to `.dead`, with the reason; the
/// messages behind it are handled by the next worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_that_kills_the_worker_ends_in_dead_after_its_delivery_limit() {
    let conn = connect().await;
    let queue = unique("poison");
    let poison_hits = Arc::new(AtomicUsize::new(0));
    let handled = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let app = {
        let (poison_hits, handled) = (poison_hits.clone(), handled.clone());
        Router::new().fallback(move |body: String| {
            let (poison_hits, handled) = (poison_hits.clone(), handled.clone());
            async move {
                if body == "poison" {
                    poison_hits.fetch_add(1, Ordering::SeqCst);
                    // Never answers: the test kills the worker meanwhile,
                    // as a crash (OOM, segfault) would.
                    std::future::pending::<()>().await;
                }
                handled.lock().unwrap().push(body);
                StatusCode::OK
            }
        })
    };
    let config = config_file(&format!(
        "[consumers.jobs]\nqueue = \"{queue}\"\nhandler = \"{}\"\nqueue_type = \"quorum\"\ndelivery_limit = 3\ntimeout = \"1h\"\nretry = {{ attempts = 2, delays = [\"100ms\"] }}\n",
        serve(app).await
    ));
    let mut child = worker(&config, &[]);
    wait_consuming(&conn, &queue).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for body in ["poison", "after-1", "after-2"] {
        producer.publish(Message::new(body)).await.unwrap();
    }
    let mut kills = 0;
    loop {
        // This worker took the poison (once per worker), or the rest.
        wait_for(
            Duration::from_secs(20),
            "the poison or the rest handled",
            || poison_hits.load(Ordering::SeqCst) > kills || handled.lock().unwrap().len() == 2,
        )
        .await;
        if handled.lock().unwrap().len() == 2 {
            break;
        }
        Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        let _ = wait_exit(&mut child, Duration::from_secs(5)).await;
        kills += 1;
        assert!(
            kills <= 6,
            "the poison was delivered {kills} times; the limit is 3"
        );
        child = worker(&config, &[]);
    }
    println!("the worker was killed {kills} times by the poison message");
    assert!(kills >= 3, "killed only {kills} times before the limit");
    assert_eq!(*handled.lock().unwrap(), ["after-1", "after-2"]);

    // In `.dead`, with the broker's reason, as `rabbitry dead list` shows.
    wait_for(Duration::from_secs(10), "the dead letter", || {
        let out = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(["dead", "list", &queue])
            .env_remove("AMQP_URL")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("delivery limit")
    })
    .await;
    let out = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["dead", "list", &queue])
        .env_remove("AMQP_URL")
        .output()
        .unwrap();
    let letter: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .expect("one dead letter"),
    )
    .unwrap();
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains(&format!("'{queue}'")),
        "{letter}"
    );
    assert!(terminate(&mut child).await.success());
    delete_queues(&conn, &queue).await;
}

/// `GET path` from the admin listener at `addr`: the status and the body.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_serves_a_config_files_queues_without_consuming_them() {
    let conn = connect().await;
    let queue = unique("status");
    // Consumed by someone else: this test's own consumer.
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let config = write_config(&queue, "http://127.0.0.1:9/");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["status", "-c", config.to_str().unwrap(), "--listen", &addr])
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start rabbitry status");
    wait_for(Duration::from_secs(10), "the status listener", || {
        http_get(&addr, "/livez").0 == 200
    })
    .await;
    let (status, body) = http_get(&addr, "/api/status");
    assert_eq!(status, 200);
    assert!(
        body.contains(&format!("\"queue\":\"{queue}\""))
            && body.contains("\"consumers\":1")
            && body.contains("\"attached\":null"),
        "{body}"
    );
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    // It did not consume: the broker still counts one consumer.
    assert_eq!(
        conn.queue_status(&queue).await.unwrap().unwrap().consumers,
        1
    );
    let (page_status, page) = http_get(&addr, "/status");
    assert_eq!(page_status, 200);
    assert!(page.contains("<title>rabbitry status</title>"));
    // Nobody consumes the queue any more: not ready, and it says why.
    consumer.cancel().await;
    wait_for(Duration::from_secs(10), "503 once nobody consumes", || {
        let (status, body) = http_get(&addr, "/readyz");
        status == 503 && body.contains("the broker counts 0 consumer(s)")
    })
    .await;
    assert!(terminate(&mut child).await.success());
    delete_queues(&conn, &queue).await;
}

/// Waits until every queue in `queues` has `n` consumers.
async fn wait_consumers(conn: &Connection, queues: &[String], n: u32) {
    for _ in 0..500 {
        let mut all = true;
        for q in queues {
            all &= conn
                .queue_status(q)
                .await
                .unwrap()
                .is_some_and(|s| s.consumers == n);
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the partitions did not get {n} consumers each within 10 s");
}

/// 10,000 messages over 100 keys, each with its per-key sequence number,
/// through 4 partitions consumed by 3 worker processes; the active one is
/// SIGKILLed midway. For every key, the handler's effects (deduplicated by
/// message id, as the inbox does) happen in strictly increasing sequence,
/// with none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_over_partitions_and_three_processes_when_one_is_killed() {
    use std::collections::{HashMap, HashSet};
    use std::sync::Mutex;
    const KEYS: usize = 100;
    const PER_KEY: usize = 100;
    let conn = connect().await;
    let (queue, exchange) = (unique("orders"), unique("orders-x"));
    #[derive(Default)]
    struct Effects {
        inbox: HashSet<String>,
        applied: HashMap<String, Vec<usize>>,
        duplicates: usize,
        out_of_order: Vec<String>,
        by_site: HashMap<String, usize>,
    }
    let effects = Arc::new(Mutex::new(Effects::default()));
    let app = {
        let effects = effects.clone();
        Router::new().fallback(move |headers: axum::http::HeaderMap| {
            let effects = effects.clone();
            async move {
                let h = |k: &str| headers.get(k).unwrap().to_str().unwrap().to_owned();
                let (id, key) = (h("amqp-message-id"), h("amqp-header-order_id"));
                let seq: usize = h("amqp-header-seq").parse().unwrap();
                let mut e = effects.lock().unwrap();
                *e.by_site.entry(h("amqp-site")).or_default() += 1;
                if !e.inbox.insert(id) {
                    e.duplicates += 1;
                    return StatusCode::OK;
                }
                let applied = e.applied.entry(key.clone()).or_default();
                let expected = applied.len();
                applied.push(seq);
                if seq != expected {
                    e.out_of_order
                        .push(format!("{key}: {seq} after {expected} effects"));
                }
                StatusCode::OK
            }
        })
    };
    let handler = serve(app).await;
    let config = config_file(&format!(
        "[worker]\nshutdown_timeout = \"10s\"\n\n[consumers.orders]\nqueue = \"{queue}\"\nexchange = \"{exchange}\"\npartitions = 4\npartition_key = \"header:order_id\"\nhandler = \"{handler}\"\nretry = {{ attempts = 3, delays = [\"100ms\"] }}\n"
    ));
    let partitions: Vec<String> = (0..4).map(|i| format!("{queue}.p{i}")).collect();
    // Started one after another: the first subscribes first everywhere,
    // so it is the active consumer of every partition.
    let mut workers = Vec::new();
    for n in 1..=3 {
        workers.push(worker(&config, &["--site", &format!("w{n}")]));
        wait_consumers(&conn, &partitions, n).await;
    }

    // Another client knows only the key: raw amqprs publishes to the
    // exchange with an order_id header.
    let raw = amqprs::connection::Connection::open(
        &amqprs::connection::OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"),
    )
    .await
    .unwrap();
    let ch = raw.open_channel(None).await.unwrap();
    for seq in 0..PER_KEY {
        for k in 0..KEYS {
            let mut headers = amqprs::FieldTable::new();
            headers.insert(
                "order_id".try_into().unwrap(),
                amqprs::FieldValue::S(format!("k{k}").try_into().unwrap()),
            );
            headers.insert(
                "seq".try_into().unwrap(),
                amqprs::FieldValue::S(seq.to_string().try_into().unwrap()),
            );
            let props = amqprs::BasicProperties::default()
                .with_message_id(&format!("k{k}-{seq}"))
                .with_delivery_mode(2)
                .with_headers(headers)
                .finish();
            ch.basic_publish(
                props,
                b"{}".to_vec(),
                amqprs::channel::BasicPublishArguments::new(&exchange, ""),
            )
            .await
            .unwrap();
        }
    }
    // Done publishing: the raw client goes before any worker is stopped.
    ch.close().await.unwrap();
    raw.close().await.unwrap();
    let total = KEYS * PER_KEY;
    let applied = || effects.lock().unwrap().inbox.len();
    wait_for(Duration::from_secs(60), "a third handled", || {
        applied() >= total / 3
    })
    .await;
    let first = workers.remove(0);
    Command::new("kill")
        .args(["-KILL", &first.id().to_string()])
        .status()
        .unwrap();
    let killed_at = applied();
    wait_for(Duration::from_secs(120), "every message handled", || {
        applied() >= total
    })
    .await;

    {
        let e = effects.lock().unwrap();
        assert!(
            e.out_of_order.is_empty(),
            "out of order: {:?}",
            &e.out_of_order[..e.out_of_order.len().min(10)]
        );
        assert_eq!(e.applied.len(), KEYS);
        for (key, seqs) in &e.applied {
            assert_eq!(*seqs, (0..PER_KEY).collect::<Vec<_>>(), "{key}");
        }
        // Afterwards the others took its partitions over.
        assert!(e.by_site.keys().any(|s| s != "w1"), "{:?}", e.by_site);
        println!(
            "{total} messages over {KEYS} keys: the active worker was killed after {killed_at}; handled by {:?}; {} redeliveries skipped by the inbox; every key in order",
            e.by_site, e.duplicates
        );
    }
    for mut w in workers {
        Command::new("kill")
            .args(["-TERM", &w.id().to_string()])
            .status()
            .unwrap();
        wait_exit(&mut w, Duration::from_secs(20)).await;
    }
    let mut first = first;
    let _ = first.wait();
    for p in &partitions {
        for q in [p.clone(), format!("{p}.dead"), format!("{p}.retry.100ms")] {
            conn.delete_queue(&q).await.unwrap();
        }
    }
    conn.delete_exchange(&exchange).await.unwrap();
}
