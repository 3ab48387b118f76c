//! The admin routes over real HTTP against a real worker: readiness that
//! follows the broker, dead letters listed and replayed behind the token,
//! and Prometheus metrics after a known sequence of deliveries.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rabbitry::admin::Admin;
use rabbitry::worker::{HandlerError, RunningWorker, State, Worker};
use rabbitry::{
    Connection, ConnectionSettings, ConsumerSettings, Message, Producer, ProducerSettings, Queue,
    Topology,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{connect, eventually, unique, url};

/// Serves `admin` on a free loopback port.
async fn serve(admin: Admin) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = admin.router();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

/// One HTTP/1.1 request without a body; the status and the body.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    http_with(addr, method, path, token, "").await
}

/// One HTTP/1.1 request with a JSON `body`; the status and the body.
async fn http_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    raw_http(addr, method, path, &format!("Host: {addr}\r\n{auth}"), body).await
}

/// One HTTP/1.1 request with the given header lines (each ending in CRLF).
async fn raw_http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A worker on `conn` whose one consumer, `name` on `queue`, counts what
/// it handles and dead-letters while `refuse` is set.
async fn worker(
    conn: &Connection,
    name: &str,
    queue: &str,
    handled: Arc<AtomicUsize>,
    refuse: Arc<AtomicBool>,
) -> RunningWorker {
    Worker::new(conn, (handled, refuse))
        .consumer(
            ConsumerSettings::new(queue).name(name),
            |State((handled, refuse)): State<(Arc<AtomicUsize>, Arc<AtomicBool>)>| async move {
                if refuse.load(Ordering::SeqCst) {
                    return Err(HandlerError::invalid("missing field title"));
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            },
        )
        .start()
        .await
        .unwrap()
}

async fn cleanup(conn: &Connection, queue: &str) {
    for q in [
        queue.to_owned(),
        format!("{queue}.dead"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ] {
        let _ = conn.delete_queue(&q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_consumer_and_the_connection_as_the_broker_sees_them() {
    let name = unique("admin.ready");
    let conn = Connection::open(ConnectionSettings::new(url()).name(&name))
        .await
        .unwrap();
    let (queue, consumer) = (unique("ready"), unique("ready-consumer"));
    let running = worker(&conn, &consumer, &queue, Arc::default(), Arc::default()).await;
    let addr = serve(Admin::new().token("t").worker(&running)).await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);

    // The queue is deleted and declared again by someone else with other
    // arguments: the consumer cannot come back.
    let other = connect().await;
    other.delete_queue(&queue).await.unwrap();
    let mut conflicting = Topology::default();
    let mut q = Queue::durable(&queue);
    q.arguments
        .insert("x-max-length".into(), rabbitry::HeaderValue::Int(5));
    conflicting.queue(q);
    other.declare_once(&conflicting).await.unwrap();
    eventually(
        Duration::from_secs(10),
        "503 naming the consumer",
        || async {
            let (status, body) = http(addr, "GET", "/readyz", None).await;
            status == 503 && body.contains(&format!("consumer '{consumer}'"))
        },
    )
    .await;
    assert_eq!(http(addr, "GET", "/livez", None).await.0, 200);
    // The conflict goes: the consumer declares its queue and is back.
    other.delete_queue(&queue).await.unwrap();
    eventually(Duration::from_secs(15), "ready again", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;

    // The broker closes the connection: not ready until it is back.
    assert!(rabbitry_test_support::broker::close_connection(&name) >= 1);
    eventually(
        Duration::from_secs(10),
        "503 naming the connection",
        || async {
            let (status, body) = http(addr, "GET", "/readyz", None).await;
            status == 503 && body.contains(&format!("connection '{name}' is down"))
        },
    )
    .await;
    assert_eq!(http(addr, "GET", "/livez", None).await.0, 200);
    eventually(Duration::from_secs(15), "ready after recovery", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    running.shutdown().await;
    cleanup(&other, &queue).await;
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_only_with_the_token() {
    let conn = connect().await;
    let (queue, consumer) = (unique("admin.dead"), unique("dead-consumer"));
    let handled = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(true));
    let running = worker(&conn, &consumer, &queue, handled.clone(), refuse.clone()).await;
    let token = unique("token");
    let addr = serve(Admin::new().token(&token).worker(&running)).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for id in ["m-one", "m-two"] {
        producer
            .publish(Message::new("x").message_id(id))
            .await
            .unwrap();
    }
    let list = format!("/api/dead/{queue}");
    eventually(
        Duration::from_secs(10),
        "the dead letters listed",
        || async {
            let (status, body) = http(addr, "GET", &list, None).await;
            status == 200 && body.contains("missing field title") && body.contains("m-two")
        },
    )
    .await;
    // The status names the failures and the consumer's last error.
    let (_, body) = http(addr, "GET", "/api/status", None).await;
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    let failures = status["failures"].as_array().unwrap();
    let mine: Vec<_> = failures.iter().filter(|f| f["queue"] == queue).collect();
    assert_eq!(mine.len(), 2, "{body}");
    assert_eq!(mine[0]["message_id"], "m-two", "newest first: {body}");
    assert_eq!(mine[0]["outcome"], "dead_letter");
    assert_eq!(mine[0]["error"], "missing field title");
    let me = &status["consumers"][0];
    assert_eq!(me["last_error"]["message_id"], "m-two", "{body}");
    assert_eq!(
        (me["expected"].as_u64(), me["consumers"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(me["dead_letters"].as_u64(), Some(2), "{body}");

    // Without the token (or with another): 401, and it stays.
    let replay = format!("/api/dead/{queue}/replay");
    assert_eq!(http(addr, "POST", &replay, None).await.0, 401);
    assert_eq!(http(addr, "POST", &replay, Some("wrong")).await.0, 401);
    assert_eq!(
        http(addr, "POST", &format!("/api/dead/{queue}/purge"), None)
            .await
            .0,
        401
    );
    let (_, body) = http(addr, "GET", &list, None).await;
    assert!(body.contains("missing field title"), "{body}");
    assert_eq!(
        http(
            addr,
            "POST",
            &format!("/api/dead/{queue}/nope"),
            Some(&token)
        )
        .await
        .0,
        404
    );
    // A queue no consumer here reads is not served.
    assert_eq!(
        http(addr, "GET", "/api/dead/somebody.else", None).await.0,
        404
    );

    // With the token, the one named is replayed and handled; the other
    // stays. Then the rest go.
    refuse.store(false, Ordering::SeqCst);
    let one = r#"{"message_ids": ["m-two"]}"#;
    // Replays what `body` picks (one letter) and waits until the worker
    // has handled `total` messages.
    let replay_one = |body: &'static str, total: usize| {
        let (replay, token, handled) = (replay.clone(), token.clone(), handled.clone());
        async move {
            let (status, answer) = http_with(addr, "POST", &replay, Some(&token), body).await;
            assert_eq!(
                (status, answer.contains("\"replayed\":1")),
                (200, true),
                "{answer}"
            );
            eventually(
                Duration::from_secs(10),
                "the replayed message handled",
                || {
                    let handled = handled.clone();
                    async move { handled.load(Ordering::SeqCst) == total }
                },
            )
            .await;
        }
    };
    replay_one(one, 1).await;
    let (_, body) = http(addr, "GET", &list, None).await;
    assert!(body.contains("m-one") && !body.contains("m-two"), "{body}");
    let bad = http_with(addr, "POST", &replay, Some(&token), r#"{"ids": 1}"#).await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    replay_one(r#"{"count": 5}"#, 2).await;
    let (_, body) = http(addr, "GET", &list, None).await;
    assert!(body.contains("\"dead_letters\":[]"), "{body}");
    running.shutdown().await;
    cleanup(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_pages_are_bounded_bodies_need_the_token_and_foreign_hosts_are_refused() {
    let conn = connect().await;
    let (queue, consumer) = (unique("admin.bounds"), unique("bounds-consumer"));
    let handled = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(true));
    let running = worker(&conn, &consumer, &queue, handled.clone(), refuse.clone()).await;
    let token = unique("token");
    let addr = serve(
        Admin::new()
            .token(&token)
            .allowed_host("status.example")
            .worker(&running),
    )
    .await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..5 {
        producer
            .publish(Message::new(format!("secret {i}")).message_id(format!("m{i}")))
            .await
            .unwrap();
    }
    let list = format!("/api/dead/{queue}?limit=100000000");
    eventually(Duration::from_secs(10), "five dead letters", || async {
        let (_, body) = http(addr, "GET", &list, Some(&token)).await;
        body.matches("\"message_id\"").count() == 5
    })
    .await;
    // The page size has a bound; the bodies need the token.
    let (_, body) = http(addr, "GET", &list, None).await;
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["limit"], rabbitry::admin::MAX_DEAD_PAGE, "{body}");
    assert!(!body.contains("secret"), "{body}");
    assert!(page["dead_letters"][0]["body"].is_null(), "{body}");
    // The scheme is case-insensitive.
    let lower = format!("Host: {addr}\r\nAuthorization: bearer {token}\r\n");
    let (_, body) = raw_http(addr, "GET", &list, &lower, "").await;
    assert!(body.contains("secret 0"), "{body}");
    // `count` is honoured: the oldest one goes, four stay.
    let purge = format!("/api/dead/{queue}/purge");
    let (status, answer) = http_with(addr, "POST", &purge, Some(&token), r#"{"count": 1}"#).await;
    assert_eq!(
        (status, answer.contains("\"purged\":1")),
        (200, true),
        "{answer}"
    );
    let (_, body) = http(addr, "GET", &list, Some(&token)).await;
    assert!(
        !body.contains("secret 0") && body.contains("secret 4"),
        "{body}"
    );
    // Another site's name pointed here (DNS rebinding) gets nothing; a
    // name the listener was given, an address, and localhost do.
    for (host, want) in [
        ("evil.example", 421),
        ("evil.example:8080", 421),
        ("status.example", 200),
        ("localhost:9", 200),
        ("[::1]:9", 200),
        ("10.1.2.3", 200),
    ] {
        let headers = format!("Host: {host}\r\n");
        let (status, body) = raw_http(addr, "GET", "/api/status", &headers, "").await;
        assert_eq!(status, want, "{host}: {body}");
    }
    // Scrapers and probes reach /metrics and /readyz by any name.
    let (status, _) = raw_http(addr, "GET", "/metrics", "Host: prometheus.internal\r\n", "").await;
    assert_eq!(status, 200);
    running.shutdown().await;
    cleanup(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_not_ready_while_a_publisher_cannot_get_its_messages_confirmed() {
    let mut settings = crate::support::settings(&url(), &unique("admin.stall"));
    settings.recovery_timeout = Duration::from_secs(60);
    let conn = Connection::open(settings).await.unwrap();
    // A full queue that refuses publishes: the broker nacks, the publisher
    // tries again, and its oldest message waits.
    let queue = unique("admin.full");
    let mut q = Queue::durable(&queue);
    q.arguments.insert("x-max-length".into(), 1i64.into());
    q.arguments
        .insert("x-overflow".into(), "reject-publish".into());
    let mut t = Topology::default();
    t.queue(q);
    conn.declare(&t).await.unwrap();
    let mut ps = ProducerSettings::default().routing_key(&queue);
    ps.confirm_timeout = Duration::from_millis(200);
    let producer = Producer::new(&conn, ps).await.unwrap();
    producer.publish(Message::new("fits")).await.unwrap();
    let addr = serve(Admin::new().token("t").connection(&conn)).await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);
    let waiting = {
        let producer = producer.clone();
        tokio::spawn(async move { producer.publish(Message::new("refused")).await })
    };
    eventually(
        Duration::from_secs(20),
        "503 naming the stalled publisher",
        || async {
            let (status, body) = http(addr, "GET", "/readyz", None).await;
            status == 503 && body.contains("waited") && body.contains("confirm")
        },
    )
    .await;
    // Room again: the message goes, and the process is ready.
    conn.purge(&queue).await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the refused message confirmed once there is room")
        .unwrap()
        .unwrap();
    eventually(Duration::from_secs(20), "ready again", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence_of_deliveries() {
    // Before the connection and the worker make their handles.
    assert!(rabbitry::admin::install_prometheus().is_some());
    let name = unique("admin.metrics");
    let conn = Connection::open(ConnectionSettings::new(url()).name(&name))
        .await
        .unwrap();
    let (queue, consumer) = (unique("admin.metrics"), unique("metrics-consumer"));
    let handled = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(false));
    let running = worker(&conn, &consumer, &queue, handled.clone(), refuse.clone()).await;
    let addr = serve(Admin::new().token("t").worker(&running)).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for _ in 0..3 {
        producer.publish(Message::new("ok")).await.unwrap();
    }
    eventually(Duration::from_secs(10), "three handled", || async {
        handled.load(Ordering::SeqCst) == 3
    })
    .await;
    refuse.store(true, Ordering::SeqCst);
    producer.publish(Message::new("bad")).await.unwrap();
    let dead =
        format!("rabbitry_deliveries_total{{consumer=\"{consumer}\",outcome=\"dead_letter\"}} 1");
    eventually(
        Duration::from_secs(10),
        "the dead letter counted",
        || async { http(addr, "GET", "/metrics", None).await.1.contains(&dead) },
    )
    .await;
    let (status, text) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for line in [
        format!("rabbitry_deliveries_total{{consumer=\"{consumer}\",outcome=\"ack\"}} 3"),
        format!("rabbitry_handler_duration_seconds_count{{consumer=\"{consumer}\"}} 4"),
        format!("rabbitry_handlers_in_flight{{consumer=\"{consumer}\"}} 0"),
        // Five publishes went out on the publishing connection, each
        // confirmed once: the test's four and the worker's dead letter.
        format!("rabbitry_publishes_total{{connection=\"{name}.publish\"}} 5"),
        format!("rabbitry_confirms_total{{connection=\"{name}.publish\"}} 5"),
        format!("rabbitry_confirm_duration_seconds_count{{connection=\"{name}.publish\"}} 5"),
        format!("rabbitry_connection_up{{connection=\"{name}\"}} 1"),
        format!("rabbitry_consumer_attached{{consumer=\"{consumer}\"}} 1"),
        format!("rabbitry_queue_consumers{{queue=\"{queue}\"}} 1"),
        format!("rabbitry_consumers_expected{{queue=\"{queue}\"}} 1"),
    ] {
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    // Real histograms: buckets, not summaries.
    assert!(
        text.contains(&format!(
            "rabbitry_handler_duration_seconds_bucket{{consumer=\"{consumer}\",le=\"+Inf\"}} 4"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "rabbitry_confirm_duration_seconds_bucket{{connection=\"{name}.publish\",le=\"0.1\"}}"
    )));
    running.shutdown().await;
    cleanup(&conn, &queue).await;
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_a_dead_letter_live_as_text_and_replays_it() {
    use rabbitry_test_support::browser::Browser;
    let conn = connect().await;
    let (queue, consumer) = (unique("admin.page"), unique("page-consumer"));
    let handled = Arc::new(AtomicUsize::new(0));
    let refuse = Arc::new(AtomicBool::new(true));
    let running = worker(&conn, &consumer, &queue, handled.clone(), refuse.clone()).await;
    let token = unique("token");
    let addr = serve(Admin::new().token(&token).worker(&running)).await;

    // At phone width; the page is open before the message fails.
    let page = format!("http://{addr}/status");
    let browser = tokio::task::spawn_blocking(move || {
        let b = Browser::start(375);
        b.goto(&page);
        b.wait_until(Duration::from_secs(10), "the page goes live", |b| {
            b.find_all("#live")
                .first()
                .is_some_and(|e| b.text(e) == "live")
        });
        b
    })
    .await
    .unwrap();
    let hostile = "<img src=x onerror=alert(1)>";
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer
        .publish(Message::new(hostile).content_type("text/plain"))
        .await
        .unwrap();

    let selector = format!("section.dead-queue[data-queue=\"{queue}\"]");
    let browser = tokio::task::spawn_blocking(move || {
        // It appears without a reload, its body shown as text.
        browser.wait_until(Duration::from_secs(15), "the dead letter shown", |b| {
            b.find_all(&format!("{selector} .letter")).len() == 1
        });
        let letter = &browser.find_all(&format!("{selector} .letter"))[0];
        let text = browser.text(letter);
        assert!(text.contains("missing field title"), "{text}");
        assert!(text.contains(hostile), "the body as text: {text}");
        assert!(
            browser.find_all("img").is_empty(),
            "no element made from the body"
        );
        // The page fits the phone's width.
        let widths =
            browser.execute("return [window.innerWidth, document.documentElement.scrollWidth];");
        assert_eq!(widths[0], 375, "a phone's viewport");
        assert!(widths[1].as_u64().unwrap() <= 375, "page width {widths}");
        let token_box = &browser.find_all("#token")[0];
        browser.type_into(token_box, &token);
        (browser, selector)
    })
    .await
    .unwrap();
    refuse.store(false, Ordering::SeqCst);
    let (browser, selector) = (browser.0, browser.1);
    tokio::task::spawn_blocking(move || {
        let replay = &browser.find_all(&format!("{selector} button.replay"))[0];
        browser.click(replay);
        browser.wait_until(Duration::from_secs(15), "the dead letter gone", |b| {
            b.find_all(&selector).is_empty()
        });
        let message = browser.text(&browser.find_all("#message")[0]);
        assert!(message.contains("\"replayed\":1"), "{message}");
    })
    .await
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the replayed message handled",
        || async { handled.load(Ordering::SeqCst) == 1 },
    )
    .await;
    running.shutdown().await;
    cleanup(&conn, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_backlog_over_its_threshold_is_not_ready_and_is_measured() {
    use rabbitry::outbox::{Outbox, RelayOptions};
    assert!(rabbitry::admin::install_prometheus().is_some());
    let conn = connect().await;
    let outbox = Outbox::connect(&crate::support::sqlite_url())
        .await
        .unwrap();
    let addr = serve(
        Admin::new()
            .token("t")
            .connection(&conn)
            .outbox(&outbox)
            .outbox_threshold(3),
    )
    .await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.0, 200);
    // Three rows and no relay yet: the backlog reaches the threshold.
    let queue = unique("admin.outbox");
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let mut tx = outbox.begin::<sqlx::Sqlite>().await.unwrap();
    for i in 0..3 {
        tx.publish(Message::new(format!("m{i}")).routing_key(&queue))
            .unwrap();
    }
    tx.commit().await.unwrap();
    let (status, body) = http(addr, "GET", "/readyz", None).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("backlog of 3 rows"), "{body}");
    let (_, text) = http(addr, "GET", "/metrics", None).await;
    let database = outbox.url().to_owned();
    assert!(
        text.contains(&format!(
            "rabbitry_outbox_backlog{{database=\"{database}\"}} 3"
        )),
        "{text}"
    );
    let (_, status_json) = http(addr, "GET", "/api/status", None).await;
    assert!(status_json.contains("\"pending\":3"), "{status_json}");
    // The relay empties it: ready again.
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), "ready once relayed", || async {
        http(addr, "GET", "/readyz", None).await.0 == 200
    })
    .await;
    assert_eq!(
        conn.queue_status(&queue).await.unwrap().unwrap().messages,
        3
    );
    // A scheduled row counts from when it was due, not from its write (an
    // hour earlier here).
    let rabbitry::outbox::Database::Sqlite(pool) = outbox.database() else {
        unreachable!()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    sqlx::query(
        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, created_at, not_before) \
         VALUES ('due-now', '', ?1, '{}', X'00', ?2, ?3)",
    )
    .bind(&queue)
    .bind(now - 3_600_000)
    .bind(now)
    .execute(pool)
    .await
    .unwrap();
    outbox.wake();
    // Each row's time from its write to its confirmed publish (recorded
    // when the relay sees the confirm, a moment after the queue has it).
    let delays =
        format!("rabbitry_outbox_commit_to_publish_seconds_count{{database=\"{database}\"}} 4");
    eventually(Duration::from_secs(10), "four publish delays", || async {
        http(addr, "GET", "/metrics", None)
            .await
            .1
            .contains(&delays)
    })
    .await;
    let (_, text) = http(addr, "GET", "/metrics", None).await;
    let sum_line =
        format!("rabbitry_outbox_commit_to_publish_seconds_sum{{database=\"{database}\"}} ");
    let sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&sum_line))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        sum < 600.0,
        "the scheduled row was measured from its write: {sum} s"
    );
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}
