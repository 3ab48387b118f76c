//! One bad input stays alone: a message past a protocol limit, one the
//! broker refuses without naming it, and outbox rows that a foreign writer
//! got wrong each fail with their reason, while the messages and rows
//! around them are delivered, in order, on a connection that never drops.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rabbitry::outbox::{Database, Outbox, RelayOptions};
use rabbitry::worker::{dead, HandlerError, Retry, State};
use rabbitry::{
    Connection, Consumer, ConsumerSettings, ErrorKind, HeaderValue, Message, Producer,
    ProducerSettings, Worker,
};

use crate::support::{eventually, pg_url, settings, sqlite_url, unique, url};

/// A connection that publishes on itself, so that its generation shows
/// any reconnect the publisher went through.
async fn single_connection() -> Connection {
    let mut s = settings(&url(), &unique("blast"));
    s.separate_publishing = false;
    Connection::open(s).await.unwrap()
}

async fn queue(conn: &Connection) -> String {
    let queue = unique("blast");
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    queue
}

/// A connection, a queue, a producer to it, and the connection's
/// generation before anything was published.
async fn publishing() -> (Connection, String, Producer, u64) {
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    let generation = conn.generation();
    (conn, queue, producer, generation)
}

/// Reads deliveries until `n` distinct message ids have arrived; returns
/// the bodies of first arrivals, in arrival order (a resend after a channel
/// error may deliver a message twice, never out of order).
async fn first_arrivals(conn: &Connection, queue: &str, n: usize) -> Vec<String> {
    let mut consumer = Consumer::start(conn, ConsumerSettings::new(queue))
        .await
        .unwrap();
    let (mut seen, mut out) = (HashSet::new(), Vec::new());
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} arrived: {out:?}", out.len()))
            .unwrap();
        let id = d.properties.message_id.clone().expect("a message id");
        if seen.insert(id) {
            out.push(String::from_utf8(d.body.to_vec()).unwrap());
        }
        d.ack().await.unwrap();
    }
    out
}

/// Messages that cannot go, each for its own reason.
fn past_a_limit() -> Vec<(&'static str, Message)> {
    let mut big_headers = Message::new("big headers");
    big_headers
        .properties
        .headers
        .insert("pad".into(), HeaderValue::String("x".repeat(140_000)));
    let mut long_header_name = Message::new("long header name");
    long_header_name
        .properties
        .headers
        .insert("h".repeat(300), HeaderValue::Int(1));
    let mut long_nested_name = Message::new("long nested name");
    long_nested_name.properties.headers.insert(
        "t".into(),
        HeaderValue::Table([("n".repeat(256), HeaderValue::Void)].into()),
    );
    vec![
        (
            "routing key",
            Message::new("long key").routing_key("k".repeat(300)),
        ),
        ("frame_max", big_headers),
        ("header name", long_header_name),
        ("header 't' name", long_nested_name),
        ("expiration", {
            let mut m = Message::new("bad ttl");
            m.properties.expiration = Some("soon".into());
            m
        }),
        (
            "correlation_id",
            Message::new("long id").correlation_id("c".repeat(256)),
        ),
        (
            "exchange",
            Message::new("long exchange").exchange("e".repeat(256)),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_past_a_protocol_limit_fails_alone_and_the_connection_stays() {
    let (conn, queue, producer, generation) = publishing().await;
    // Submitted back to back, good ones between bad ones.
    let mut waits = Vec::new();
    let mut expected = Vec::new();
    for (i, (limit, bad)) in past_a_limit().into_iter().enumerate() {
        let good = format!("good {i}");
        waits.push((None, producer.submit(Message::new(good.clone())).await));
        expected.push(good);
        waits.push((Some(limit), producer.submit(bad).await));
    }
    for (limit, submitted) in waits {
        match limit {
            None => submitted.unwrap().wait().await.unwrap(),
            Some(limit) => {
                let e = match submitted {
                    Err(e) => e,
                    Ok(w) => w.wait().await.unwrap_err(),
                };
                assert_eq!(e.kind(), ErrorKind::Invalid, "{limit}: {e}");
                assert!(e.to_string().contains(limit), "{limit}: {e}");
            }
        }
    }
    assert_eq!(
        first_arrivals(&conn, &queue, expected.len()).await,
        expected
    );
    assert_eq!(
        conn.generation(),
        generation,
        "the connection never dropped"
    );
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_without_naming_it_fails_alone() {
    // RabbitMQ closes the channel over a `user_id` that is not the
    // connection's user, quoting neither the exchange nor the message: the
    // publisher finds it by sending the messages in flight one at a time.
    let (conn, queue, producer, generation) = publishing().await;
    let mut waits = Vec::new();
    for i in 0..60 {
        let mut m = Message::new(format!("m{i}"));
        if i == 25 {
            m.properties.user_id = Some("mallory".into());
        }
        waits.push(producer.submit(m).await.unwrap());
    }
    let mut expected = Vec::new();
    for (i, w) in waits.into_iter().enumerate() {
        let result = w.wait().await;
        if i == 25 {
            let e = result.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Channel, "{e}");
            assert!(e.to_string().contains("mallory"), "{e}");
        } else {
            result.unwrap_or_else(|e| panic!("m{i} failed with the refused one: {e}"));
            expected.push(format!("m{i}"));
        }
    }
    assert_eq!(first_arrivals(&conn, &queue, 59).await, expected);
    // And the publisher goes on as before.
    producer.publish(Message::new("after")).await.unwrap();
    assert_eq!(first_arrivals(&conn, &queue, 1).await, ["after"]);
    assert_eq!(conn.generation(), generation, "only the channel was closed");
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

/// A row another program wrote: its columns as SQL literals.
struct Foreign {
    /// What the test expects: `None` for a good row, or a word the
    /// failure's reason must contain.
    fails_with: Option<&'static str>,
    message_id: String,
    exchange: String,
    routing_key: String,
    properties: String,
    body: String,
    mandatory: String,
    created_at: String,
    not_before: String,
}

impl Foreign {
    fn good(queue: &str, n: usize) -> Foreign {
        Foreign {
            fails_with: None,
            message_id: format!("'id-{n}'"),
            exchange: "''".into(),
            routing_key: format!("'{queue}'"),
            properties: "'{\"content_type\": \"text/plain\"}'".into(),
            body: format!("'good {n}'"),
            mandatory: "FALSE".into(),
            created_at: "1764950400000".into(),
            not_before: "NULL".into(),
        }
    }

    fn bad(
        queue: &str,
        n: usize,
        fails_with: &'static str,
        change: impl FnOnce(&mut Foreign),
    ) -> Foreign {
        let mut row = Foreign::good(queue, n);
        row.fails_with = Some(fails_with);
        row.body = format!("'bad {n}'");
        change(&mut row);
        row
    }

    fn insert(&self) -> String {
        format!(
            "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) \
             VALUES ({}, {}, {}, {}, {}, {}, {}, {})",
            self.message_id,
            self.exchange,
            self.routing_key,
            self.properties,
            self.body,
            self.mandatory,
            self.created_at,
            self.not_before
        )
    }
}

/// Bad rows any database accepts: values past a limit, or that the broker
/// refuses.
fn bad_values(queue: &str, n: &mut usize) -> Vec<Foreign> {
    let mut next = || {
        *n += 1;
        *n
    };
    let long_key = "k".repeat(300);
    let pad = "x".repeat(140_000);
    vec![
        Foreign::bad(queue, next(), "routing key", |r| {
            r.routing_key = format!("'{long_key}'")
        }),
        Foreign::bad(queue, next(), "frame_max", |r| {
            r.properties = format!("'{{\"headers\": {{\"pad\": \"{pad}\"}}}}'")
        }),
        Foreign::bad(queue, next(), "expiration", |r| {
            r.properties = "'{\"expiration\": \"tomorrow\"}'".into()
        }),
        Foreign::bad(queue, next(), "mallory", |r| {
            r.properties = "'{\"user_id\": \"mallory\"}'".into()
        }),
        Foreign::bad(queue, next(), "properties", |r| {
            r.properties = "'{not json'".into()
        }),
        Foreign::bad(queue, next(), "no exchange", |r| {
            r.exchange = format!("'{}'", unique("missing"))
        }),
    ]
}

/// SQLite takes any type in any column: the mistakes a foreign writer
/// makes there.
fn bad_types(queue: &str, n: &mut usize) -> Vec<Foreign> {
    let mut next = || {
        *n += 1;
        *n
    };
    vec![
        Foreign::bad(queue, next(), "created_at", |r| {
            r.created_at = "'yesterday'".into()
        }),
        Foreign::bad(queue, next(), "mandatory", |r| r.mandatory = "'yes'".into()),
        Foreign::bad(queue, next(), "properties", |r| {
            r.properties = "X'7B7D'".into()
        }),
        Foreign::bad(queue, next(), "not_before", |r| {
            r.not_before = "'2026-12-05T10:00:00Z'".into()
        }),
        Foreign::bad(queue, next(), "exchange", |r| r.exchange = "X'00'".into()),
    ]
}

async fn execute(db: &Database, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    match db {
        Database::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Database::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    }
    .unwrap();
}

/// Good rows around bad ones: every good row is published in order with
/// its `message_id` column as its message id, every bad one fails with a
/// reason naming the column or the limit, the status can be read all
/// along, and a failed row fixed by hand goes out after `retry_failed`.
async fn foreign_rows_fail_alone(url: String, sqlite: bool) {
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let mut n = 0;
    let mut rows = Vec::new();
    let mut bad = bad_values(&queue, &mut n);
    if sqlite {
        bad.extend(bad_types(&queue, &mut n));
        // Python's `time.time() * 1000` is milliseconds all the same.
        n += 1;
        let mut real = Foreign::good(&queue, n);
        real.created_at = "1764950400000.25".into();
        rows.push(real);
    }
    for b in bad {
        n += 1;
        rows.push(Foreign::good(&queue, n));
        rows.push(b);
    }
    n += 1;
    rows.push(Foreign::good(&queue, n));
    for row in &rows {
        execute(outbox.database(), &row.insert()).await;
    }
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let expected: Vec<String> = rows
        .iter()
        .filter(|r| r.fails_with.is_none())
        .map(|r| r.body.trim_matches('\'').to_owned())
        .collect();
    // The message id is the column's.
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let (mut seen, mut got) = (HashSet::new(), Vec::new());
    while got.len() < expected.len() {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {got:?} arrived of {expected:?}"))
            .unwrap();
        let body = String::from_utf8(d.body.to_vec()).unwrap();
        let id = d.properties.message_id.clone().unwrap_or_default();
        assert_eq!(id, format!("id-{}", &body[5..]), "{body}");
        if seen.insert(id) {
            got.push(body);
        }
        d.ack().await.unwrap();
    }
    assert_eq!(got, expected);
    let bad_count = rows.iter().filter(|r| r.fails_with.is_some()).count();
    eventually(
        Duration::from_secs(20),
        "every bad row marked failed",
        || {
            let outbox = outbox.clone();
            async move {
                let status = outbox.status().await.unwrap();
                status.failed.len() == bad_count && status.pending == 0
            }
        },
    )
    .await;
    let status = outbox.status().await.unwrap();
    for (row, failed) in rows
        .iter()
        .filter(|r| r.fails_with.is_some())
        .zip(&status.failed)
    {
        let why = failed.error.clone().unwrap_or_default();
        let word = row.fails_with.unwrap();
        assert!(
            why.contains(word),
            "row {}: '{why}' should name {word}",
            failed.id
        );
    }
    // The cause fixed (here: the bad TTL), the row goes out on demand.
    let ttl = status
        .failed
        .iter()
        .find(|f| f.error.as_deref().unwrap_or("").contains("expiration"))
        .unwrap()
        .id;
    execute(
        outbox.database(),
        &format!("UPDATE rabbitry_outbox SET properties = '{{}}' WHERE id = {ttl}"),
    )
    .await;
    assert_eq!(outbox.retry_failed(Some(&[ttl])).await.unwrap(), 1);
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("the retried row")
        .unwrap();
    assert!(String::from_utf8_lossy(&d.body).starts_with("bad "));
    d.ack().await.unwrap();
    relay.stop().await.unwrap();
    assert_eq!(
        outbox.status().await.unwrap().failed.len(),
        bad_count - 1,
        "the others stay failed"
    );
    drop(consumer);
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_on_sqlite_fail_alone_with_the_column_or_limit_named() {
    foreign_rows_fail_alone(sqlite_url(), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_rows_on_postgres_fail_alone_with_the_column_or_limit_named() {
    foreign_rows_fail_alone(pg_url().await, false).await;
}

/// A session of its own on the test's schema.
async fn pg_session(url: &str) -> sqlx::PgConnection {
    use sqlx::Connection as _;
    sqlx::PgConnection::connect(url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_current_schema_takes_no_lock_and_an_idle_relay_holds_no_transaction() {
    use sqlx::Connection as _;
    let url = pg_url().await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let conn = single_connection().await;
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    // An idle relay has no transaction open: a session can take the
    // table's strongest lock without waiting (before, the relay's claim
    // stayed open, `idle in transaction`, for up to 30 s).
    let mut admin = pg_session(&url).await;
    let free = async {
        loop {
            let mut tx = admin.begin().await.unwrap();
            let locked =
                sqlx::raw_sql("LOCK TABLE rabbitry_outbox IN ACCESS EXCLUSIVE MODE NOWAIT")
                    .execute(&mut *tx)
                    .await
                    .is_ok();
            tx.rollback().await.unwrap();
            if locked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), free)
        .await
        .expect("the relay kept a transaction open on the table");
    // Starting again on a current schema takes no lock at all: it goes
    // through while another session holds the table exclusively.
    let mut holder = pg_session(&url).await;
    let mut tx = holder.begin().await.unwrap();
    sqlx::raw_sql("LOCK TABLE rabbitry_outbox IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(30), Outbox::connect(&url))
        .await
        .expect("migrate waited for the table's lock")
        .unwrap();
    println!(
        "migrate on a current schema beside an exclusive lock: {:?}",
        started.elapsed()
    );
    tx.rollback().await.unwrap();
    relay.stop().await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_inserts_go_on_while_relays_and_migrations_come_and_go() {
    // A rolling restart: an application inserts into the outbox at a
    // steady rate while relays start, migrate and stop. Each insert has a
    // statement timeout of 5 s (a stall behind a migration's lock would
    // reach it); the worst latency is printed, not asserted.
    let url = pg_url().await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (url, queue, stop) = (url.clone(), queue.clone(), stop.clone());
        tokio::spawn(async move {
            let mut session = pg_session(&url).await;
            sqlx::raw_sql("SET statement_timeout = '5s'")
                .execute(&mut session)
                .await
                .unwrap();
            let (mut worst, mut n) = (Duration::ZERO, 0u32);
            while !stop.is_cancelled() {
                let started = std::time::Instant::now();
                rabbitry::outbox::publish(
                    &mut session,
                    Message::new(format!("m{n}")).routing_key(&queue),
                )
                .await
                .expect("an insert stalled behind a lock");
                worst = worst.max(started.elapsed());
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (n, worst)
        })
    };
    for _ in 0..5 {
        let again = Outbox::connect(&url).await.unwrap();
        let relay = again
            .spawn_relay(&conn, RelayOptions::default())
            .await
            .unwrap();
        let moved = conn.queue_status(&queue).await.unwrap().unwrap().messages;
        eventually(Duration::from_secs(20), "the relay publishing", || {
            let conn = conn.clone();
            let queue = queue.clone();
            async move { conn.queue_status(&queue).await.unwrap().unwrap().messages > moved }
        })
        .await;
        relay.stop().await.unwrap();
    }
    stop.cancel();
    let (n, worst) = writer.await.unwrap();
    println!("{n} inserts beside 5 relay restarts; worst insert latency {worst:?}");
    drop(outbox);
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

/// Deletes a worker's queues: the queue, its dead-letter queue and the
/// delay queues named.
async fn delete_queues(conn: &Connection, queue: &str, delays: &[&str]) {
    conn.delete_queue(queue).await.unwrap();
    conn.delete_queue(&format!("{queue}.dead")).await.unwrap();
    for d in delays {
        conn.delete_queue(&format!("{queue}.retry.{d}"))
            .await
            .unwrap();
    }
}

/// Waits for `n` dead letters in `queue`'s dead-letter queue.
async fn dead_letters(conn: &Connection, queue: &str, n: usize) -> Vec<dead::DeadLetter> {
    eventually(Duration::from_secs(20), "the dead letters", || {
        let (conn, queue) = (conn.clone(), queue.to_owned());
        async move { dead::list(&conn, &queue, n + 1).await.unwrap().len() >= n }
    })
    .await;
    dead::list(conn, queue, n + 1).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_is_retried_after_the_shortest_delay_and_dead_lettered_after_the_budget() {
    // Before, a conflict (HTTP 409) was requeued at once, for ever.
    let conn = single_connection().await;
    let queue = unique("conflict");
    let calls = Arc::new(AtomicUsize::new(0));
    let running = Worker::new(&conn, calls.clone())
        .shutdown_timeout(Duration::from_secs(5))
        .consumer(
            ConsumerSettings::new(&queue).name("busy"),
            |State(calls): State<Arc<AtomicUsize>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(HandlerError::conflict("the row is locked"))
            },
        )
        // A second retry after 10 s would time the test out: a conflict
        // always waits the shortest delay.
        .retry(Retry::attempts(3).delays([Duration::from_millis(100), Duration::from_secs(10)]))
        .start()
        .await
        .unwrap();
    Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap()
        .publish(Message::new("update row 7"))
        .await
        .unwrap();
    let letters = dead_letters(&conn, &queue, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, Some(3));
    assert!(letters[0].error.as_deref().unwrap_or("").contains("locked"));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "three attempts, no requeue loop"
    );
    running.shutdown().await;
    delete_queues(&conn, &queue, &["100ms", "10s"]).await;
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_no_longer_fits_is_trimmed_and_the_other_consumers_go_on() {
    let conn = single_connection().await;
    let (poisoned, busy) = (unique("poisoned"), unique("busy"));
    let running = Worker::new(&conn, ())
        .shutdown_timeout(Duration::from_secs(5))
        .consumer(
            ConsumerSettings::new(&poisoned).name("poisoned"),
            || async { Err::<(), _>(HandlerError::invalid("refused")) },
        )
        .retry(Retry::never())
        .consumer(ConsumerSettings::new(&busy).name("busy"), || async {
            Err::<(), _>(HandlerError::invalid("refused too"))
        })
        .retry(Retry::never())
        .start()
        .await
        .unwrap();
    let metrics = running.metrics();
    // A message whose headers fill its frame but for 40 bytes, from a
    // client that is not rabbitry: rabbitry's dead-letter headers would
    // take it past the frame.
    let raw = amqprs::connection::Connection::open(
        &amqprs::connection::OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"),
    )
    .await
    .unwrap();
    let fill = raw.frame_max() as usize - 8 - 27 - 40;
    let ch = raw.open_channel(None).await.unwrap();
    let mut headers = amqprs::FieldTable::new();
    headers.insert(
        "pad".try_into().unwrap(),
        amqprs::FieldValue::S("p".repeat(fill).try_into().unwrap()),
    );
    let mut props = amqprs::BasicProperties::default();
    props.with_headers(headers);
    ch.basic_publish(
        props.finish(),
        b"the body stays".to_vec(),
        amqprs::channel::BasicPublishArguments::new("", &poisoned),
    )
    .await
    .unwrap();
    // Meanwhile the other consumer of the process dead-letters its own.
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&busy))
        .await
        .unwrap();
    for i in 0..100 {
        producer
            .publish(Message::new(format!("b{i}")))
            .await
            .unwrap();
    }
    let letters = dead_letters(&conn, &poisoned, 1).await;
    let trimmed = letters[0]
        .properties
        .headers
        .get(rabbitry::headers::TRIMMED)
        .and_then(HeaderValue::as_str)
        .expect("a note on what was dropped")
        .to_owned();
    assert!(trimmed.contains("pad"), "{trimmed}");
    assert_eq!(letters[0].body, "the body stays");
    let why = letters[0].error.clone().unwrap_or_default();
    assert!(why.contains("refused") && why.contains("frame"), "{why}");
    eventually(Duration::from_secs(20), "the other consumer's 100", || {
        let m = metrics.clone();
        async move { m.outcomes("busy", rabbitry::worker::Counted::DeadLetter) == 100 }
    })
    .await;
    assert_eq!(dead_letters(&conn, &busy, 100).await.len(), 100);
    raw.close().await.unwrap();
    running.shutdown().await;
    delete_queues(&conn, &poisoned, &[]).await;
    delete_queues(&conn, &busy, &[]).await;
    conn.close().await;
}

/// Two relays on one outbox while 3,000 rows are committed in 30
/// transactions: every row arrives, and first arrivals are in commit order
/// (before, two relays interleaved their batches: hundreds of inversions).
async fn two_relays_keep_the_commit_order(url: String) {
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let outbox = Outbox::connect(&url).await.unwrap();
    let relays = [
        outbox
            .spawn_relay(&conn, RelayOptions::default())
            .await
            .unwrap(),
        outbox
            .spawn_relay(&conn, RelayOptions::default())
            .await
            .unwrap(),
    ];
    let writer = {
        let (outbox, queue) = (outbox.clone(), queue.clone());
        tokio::spawn(async move {
            for t in 0..30 {
                let messages = (0..100).map(|i| {
                    Message::new(format!("{}", t * 100 + i))
                        .routing_key(&queue)
                        .message_id(format!("m{}", t * 100 + i))
                });
                match outbox.database() {
                    Database::Sqlite(_) => {
                        let mut tx = outbox.begin::<sqlx::Sqlite>().await.unwrap();
                        messages.for_each(|m| drop(tx.publish(m).unwrap()));
                        tx.commit().await.unwrap();
                    }
                    Database::Postgres(_) => {
                        let mut tx = outbox.begin::<sqlx::Postgres>().await.unwrap();
                        messages.for_each(|m| drop(tx.publish(m).unwrap()));
                        tx.commit().await.unwrap();
                    }
                }
            }
        })
    };
    let got = first_arrivals(&conn, &queue, 3_000).await;
    writer.await.unwrap();
    let numbers: Vec<usize> = got.iter().map(|b| b.parse().unwrap()).collect();
    let inversions = numbers.windows(2).filter(|w| w[0] > w[1]).count();
    assert_eq!(inversions, 0, "first arrivals out of commit order");
    assert_eq!(numbers, (0..3_000).collect::<Vec<_>>());
    for r in relays {
        r.stop().await.unwrap();
    }
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_sqlite_keep_the_commit_order() {
    two_relays_keep_the_commit_order(sqlite_url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_postgres_keep_the_commit_order() {
    two_relays_keep_the_commit_order(pg_url().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_standby_relay_takes_over_when_the_active_ones_lease_runs_out() {
    // The active relay died without giving its lease up: its row says so
    // until the lease runs out.
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let outbox = Outbox::connect(&sqlite_url()).await.unwrap();
    let until = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 600_000;
    execute(
        outbox.database(),
        &format!(
            "INSERT INTO rabbitry_outbox_relay (id, owner, lease_until) VALUES (1, 'dead-relay', {until})"
        ),
    )
    .await;
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    let mut tx = outbox.begin::<sqlx::Sqlite>().await.unwrap();
    tx.publish(Message::new("waits").routing_key(&queue).message_id("w"))
        .unwrap();
    tx.commit().await.unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), consumer.next())
            .await
            .is_err(),
        "published while another relay held the lease"
    );
    // The lease runs out (here: at once).
    execute(
        outbox.database(),
        "UPDATE rabbitry_outbox_relay SET lease_until = 0",
    )
    .await;
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
        .await
        .expect("the standby took over")
        .unwrap();
    assert_eq!(&d.body[..], b"waits");
    d.ack().await.unwrap();
    relay.stop().await.unwrap();
    drop(consumer);
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_response_past_max_response_fails_that_request_alone() {
    // An app that answers with as many bytes as the message asks for,
    // streamed, in a process and behind a URL.
    let app = || {
        axum::Router::new().fallback(|body: axum::body::Bytes| async move {
            let n: usize = String::from_utf8_lossy(&body).parse().unwrap_or(0);
            let chunks = (0..n.div_ceil(64 * 1024)).map(move |i| {
                let len = (n - i * 64 * 1024).min(64 * 1024);
                Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(vec![b'x'; len]))
            });
            axum::body::Body::from_stream(futures_util::stream::iter(chunks))
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app()).await });
    let conn = single_connection().await;
    let (native, remote) = (unique("in-process"), unique("remote"));
    let running = Worker::new(&conn, ())
        .shutdown_timeout(Duration::from_secs(5))
        .service(ConsumerSettings::new(&native).name("in-process"), app())
        .max_response(1 << 20)
        .retry(Retry::never())
        .forward(
            ConsumerSettings::new(&remote).name("remote"),
            format!("http://{addr}/amqp"),
        )
        .max_response(1 << 20)
        .retry(Retry::never())
        .start()
        .await
        .unwrap();
    let metrics = running.metrics();
    for queue in [&native, &remote] {
        let producer = Producer::new(&conn, ProducerSettings::default().routing_key(queue))
            .await
            .unwrap();
        // 200 MB would have been read whole (and kept) before.
        for size in ["1000", "200000000", "2000"] {
            producer.publish(Message::new(size)).await.unwrap();
        }
    }
    for (name, queue) in [("in-process", &native), ("remote", &remote)] {
        let letters = dead_letters(&conn, queue, 1).await;
        assert_eq!(letters.len(), 1, "{name}");
        assert_eq!(letters[0].body, "200000000");
        let why = letters[0].error.clone().unwrap_or_default();
        assert!(
            why.contains("max_response (1048576 bytes)"),
            "{name}: {why}"
        );
        eventually(Duration::from_secs(20), "the small ones acked", || {
            let m = metrics.clone();
            async move { m.outcomes(name, rabbitry::worker::Counted::Ack) == 2 }
        })
        .await;
    }
    running.shutdown().await;
    server.abort();
    delete_queues(&conn, &native, &[]).await;
    delete_queues(&conn, &remote, &[]).await;
    conn.close().await;
}

/// What a generated message asks its handler to do.
#[derive(Debug, Clone, Copy)]
enum Ask {
    Ack,
    Reply(usize),
    Invalid,
    Retry,
}

impl Ask {
    fn header(self) -> String {
        match self {
            Ask::Ack => "ack".into(),
            Ask::Reply(n) => format!("reply {n}"),
            Ask::Invalid => "invalid".into(),
            Ask::Retry => "retry".into(),
        }
    }

    fn of(text: &str) -> Ask {
        match text.split_once(' ') {
            Some(("reply", n)) => Ask::Reply(n.parse().unwrap_or(0)),
            _ => match text {
                "invalid" => Ask::Invalid,
                "retry" => Ask::Retry,
                _ => Ask::Ack,
            },
        }
    }
}

/// A generated message: what it asks, its header padding (near and over
/// what a frame leaves for rabbitry's headers), the length of the original
/// routing key it claims (up to 400 bytes), and which handler kind gets it.
#[derive(Debug, Clone)]
struct Generated {
    ask: Ask,
    pad: usize,
    original_key: Option<usize>,
    handler: usize,
}

fn generated(frame_room: usize) -> impl proptest::strategy::Strategy<Value = Generated> {
    use proptest::prelude::*;
    let ask = prop_oneof![
        Just(Ask::Ack),
        (0usize..200_000).prop_map(Ask::Reply),
        Just(Ask::Invalid),
        Just(Ask::Retry),
    ];
    let pad = prop_oneof![0usize..2_000, (frame_room - 600)..frame_room];
    (ask, pad, proptest::option::of(0usize..400), 0usize..3).prop_map(
        |(ask, pad, original_key, handler)| Generated {
            ask,
            pad,
            original_key,
            handler,
        },
    )
}

/// The app behind the tower and HTTP consumers: the message's
/// `x-test-ask` header says what to answer.
fn asking_app() -> axum::Router {
    axum::Router::new().fallback(|headers: axum::http::HeaderMap| async move {
        let ask = headers
            .get("amqp-header-x-test-ask")
            .and_then(|v| v.to_str().ok())
            .map_or(Ask::Ack, Ask::of);
        match ask {
            Ask::Ack => (axum::http::StatusCode::NO_CONTENT, Vec::new()),
            Ask::Reply(n) => (axum::http::StatusCode::OK, vec![b'r'; n]),
            Ask::Invalid => (axum::http::StatusCode::UNPROCESSABLE_ENTITY, Vec::new()),
            Ask::Retry => (axum::http::StatusCode::SERVICE_UNAVAILABLE, Vec::new()),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_messages_end_alone_through_every_handler_kind_while_another_consumer_goes_on() {
    use rabbitry::worker::Counted;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, asking_app()).await });
    let conn = single_connection().await;
    let generation = conn.generation();
    let queues: Vec<String> = ["native", "tower", "http", "canary"]
        .iter()
        .map(|k| unique(k))
        .collect();
    let names = ["native", "tower", "http", "canary"];
    let quick = || Retry::attempts(2).delays([Duration::from_millis(50)]);
    let running = Worker::new(&conn, ())
        .shutdown_timeout(Duration::from_secs(5))
        .consumer(
            ConsumerSettings::new(&queues[0]).name(names[0]),
            |meta: rabbitry::worker::Meta| async move {
                let ask = meta
                    .properties
                    .headers
                    .get("x-test-ask")
                    .and_then(HeaderValue::as_str)
                    .map_or(Ask::Ack, Ask::of);
                match ask {
                    Ask::Ack => Ok(rabbitry::worker::Reply::default()),
                    Ask::Reply(n) => Ok(rabbitry::worker::Reply::new(vec![b'r'; n], "text/plain")),
                    Ask::Invalid => Err(HandlerError::invalid("asked to fail")),
                    Ask::Retry => Err(HandlerError::retry("asked to retry")),
                }
            },
        )
        .retry(quick())
        .service(
            ConsumerSettings::new(&queues[1]).name(names[1]),
            asking_app(),
        )
        .retry(quick())
        .forward(
            ConsumerSettings::new(&queues[2]).name(names[2]),
            format!("http://{addr}/amqp"),
        )
        .retry(quick())
        .consumer(ConsumerSettings::new(&queues[3]).name(names[3]), || async {
        })
        .start()
        .await
        .unwrap();
    let metrics = running.metrics();
    // The replies go to a queue of their own, named long.
    let replies = format!("{}.{}", unique("replies"), "r".repeat(200));
    let mut t = rabbitry::Topology::default();
    t.queue(rabbitry::Queue::durable(&replies));
    conn.declare(&t).await.unwrap();

    // A foreign client publishes; the canary's stream goes on meanwhile.
    let raw = amqprs::connection::Connection::open(
        &amqprs::connection::OpenConnectionArguments::new("127.0.0.1", 5672, "guest", "guest"),
    )
    .await
    .unwrap();
    let ch = raw.open_channel(None).await.unwrap();
    // Room for the padding in the frame: less the frame's own bytes, the
    // content header's fixed part, the message id, reply_to, the table's
    // length, the test's header and the longest original routing key.
    let frame_room =
        raw.frame_max() as usize - 8 - 14 - 5 - (1 + replies.len()) - 4 - 28 - 9 - 437 - 10;
    let canary_sent = Arc::new(AtomicUsize::new(0));
    let canary_stop = tokio_util::sync::CancellationToken::new();
    let canary = {
        let (conn, queue, sent, stop) = (
            conn.clone(),
            queues[3].clone(),
            canary_sent.clone(),
            canary_stop.clone(),
        );
        tokio::spawn(async move {
            let p = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
                .await
                .unwrap();
            while !stop.is_cancelled() {
                p.publish(Message::new("tweet")).await.unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 1,
        failure_persistence: None,
        ..Default::default()
    });
    let batch = proptest::collection::vec(generated(frame_room), 40..60);
    let tree = proptest::strategy::Strategy::new_tree(&batch, &mut runner).unwrap();
    let messages = proptest::strategy::ValueTree::current(&tree);
    let mut sent = [0u64; 3];
    let mut replied = 0usize;
    for (i, m) in messages.iter().enumerate() {
        let mut headers = amqprs::FieldTable::new();
        headers.insert(
            "x-test-ask".try_into().unwrap(),
            amqprs::FieldValue::S(m.ask.header().try_into().unwrap()),
        );
        headers.insert(
            "pad".try_into().unwrap(),
            amqprs::FieldValue::S("p".repeat(m.pad).try_into().unwrap()),
        );
        if let Some(len) = m.original_key {
            headers.insert(
                "x-rabbitry-original-routing-key".try_into().unwrap(),
                amqprs::FieldValue::S("o".repeat(len).try_into().unwrap()),
            );
        }
        let mut props = amqprs::BasicProperties::default();
        props
            .with_headers(headers)
            .with_message_id(&format!("g{i}"))
            .with_reply_to(&replies);
        ch.basic_publish(
            props.finish(),
            format!("g{i}").into_bytes(),
            amqprs::channel::BasicPublishArguments::new("", &queues[m.handler]),
        )
        .await
        .unwrap();
        sent[m.handler] += 1;
        if matches!(m.ask, Ask::Reply(n) if n > 0) {
            replied += 1;
        }
    }
    // Each message ends alone: acked (with its reply) or dead-lettered.
    for (k, name) in names[..3].iter().enumerate() {
        let want = sent[k];
        eventually(Duration::from_secs(60), "every message settled", || {
            let m = metrics.clone();
            async move { m.outcomes(name, Counted::Ack) + m.outcomes(name, Counted::DeadLetter) == want }
        })
        .await;
        assert_eq!(
            metrics.outcomes(name, Counted::Requeue),
            0,
            "{name}: no requeue loop"
        );
        let dead = metrics.outcomes(name, Counted::DeadLetter) as usize;
        assert_eq!(
            dead_letters(&conn, &queues[k], dead).await.len(),
            dead,
            "{name}"
        );
    }
    let acked_replies = conn.queue_status(&replies).await.unwrap().unwrap().messages as usize;
    assert!(
        acked_replies <= replied,
        "{acked_replies} replies for {replied} asked"
    );
    canary_stop.cancel();
    canary.await.unwrap();
    let tweets = canary_sent.load(Ordering::SeqCst) as u64;
    eventually(
        Duration::from_secs(20),
        "the canary's every message",
        || {
            let m = metrics.clone();
            async move { m.outcomes("canary", Counted::Ack) == tweets }
        },
    )
    .await;
    assert_eq!(
        conn.generation(),
        generation,
        "no connection was closed over a message"
    );
    let classes = messages
        .iter()
        .fold(BTreeMapCounter::default(), |mut c, m| {
            c.add(match m.ask {
                Ask::Ack => "ack",
                Ask::Reply(n) if n > 0 => "reply",
                Ask::Reply(_) => "empty reply",
                Ask::Invalid => "invalid",
                Ask::Retry => "retry",
            });
            c.add(if m.pad + 600 > frame_room {
                "headers near the frame"
            } else {
                "small headers"
            });
            if m.original_key.is_some_and(|l| l > 255) {
                c.add("original key > 255");
            }
            c
        });
    println!(
        "{} messages ({:?} per handler), {tweets} canary messages, {acked_replies} replies; {:?}",
        messages.len(),
        sent,
        classes.0
    );
    raw.close().await.unwrap();
    running.shutdown().await;
    server.abort();
    for q in &queues[..3] {
        delete_queues(&conn, q, &["50ms"]).await;
    }
    delete_queues(&conn, &queues[3], &["1s", "5s"]).await;
    conn.delete_queue(&replies).await.unwrap();
    conn.close().await;
}

/// Counts by name, for the printed summary.
#[derive(Default)]
struct BTreeMapCounter(std::collections::BTreeMap<&'static str, usize>);

impl BTreeMapCounter {
    fn add(&mut self, k: &'static str) {
        *self.0.entry(k).or_insert(0) += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_body_is_over_the_brokers_maximum_fails_alone() {
    // 128 MiB and one byte, between two good rows (SQLite makes the blob
    // without the test holding it).
    let conn = single_connection().await;
    let queue = queue(&conn).await;
    let url = sqlite_url();
    let outbox = Outbox::connect(&url).await.unwrap();
    for (id, body) in [
        ("before", "CAST('before' AS BLOB)"),
        ("huge", "zeroblob(134217729)"),
        ("after", "CAST('after' AS BLOB)"),
    ] {
        execute(
            outbox.database(),
            &format!(
                "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, created_at) \
                 VALUES ('{id}', '', '{queue}', '{{}}', {body}, 0)"
            ),
        )
        .await;
    }
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();
    assert_eq!(first_arrivals(&conn, &queue, 2).await, ["before", "after"]);
    eventually(Duration::from_secs(20), "the huge row failed", || {
        let outbox = outbox.clone();
        async move { outbox.status().await.unwrap().failed.len() == 1 }
    })
    .await;
    let why = outbox.status().await.unwrap().failed[0]
        .error
        .clone()
        .unwrap_or_default();
    assert!(why.contains("max_message_size"), "{why}");
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
    // The file holds the 128 MiB row: not left behind.
    let path = std::path::Path::new(url.trim_start_matches("sqlite://"));
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_app_that_drops_the_connection_is_not_called_unreachable() {
    // One app closes each connection as soon as it has the request; the
    // other address listens nowhere.
    let dropping = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dropping_addr = dropping.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut s, _)) = dropping.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let conn = single_connection().await;
    let (dropped, refused) = (unique("dropped"), unique("refused"));
    let running = Worker::new(&conn, ())
        .shutdown_timeout(Duration::from_secs(5))
        .forward(
            ConsumerSettings::new(&dropped).name("dropped"),
            format!("http://{dropping_addr}/"),
        )
        .retry(Retry::never())
        .forward(
            ConsumerSettings::new(&refused).name("refused"),
            format!("http://{nowhere}/"),
        )
        .retry(Retry::never())
        .start()
        .await
        .unwrap();
    for queue in [&dropped, &refused] {
        Producer::new(&conn, ProducerSettings::default().routing_key(queue))
            .await
            .unwrap()
            .publish(Message::new("x"))
            .await
            .unwrap();
    }
    let why = |letters: Vec<dead::DeadLetter>| letters[0].error.clone().unwrap_or_default();
    let d = why(dead_letters(&conn, &dropped, 1).await);
    assert!(
        d.contains("the connection failed before a response") && !d.contains("unreachable"),
        "{d}"
    );
    let r = why(dead_letters(&conn, &refused, 1).await);
    assert!(r.contains("unreachable"), "{r}");
    running.shutdown().await;
    server.abort();
    delete_queues(&conn, &dropped, &[]).await;
    delete_queues(&conn, &refused, &[]).await;
    conn.close().await;
}
