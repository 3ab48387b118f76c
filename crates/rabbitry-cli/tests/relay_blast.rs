//! `rabbitry relay` against generated outboxes that mix good rows with rows
//! a careless foreign writer makes: each column's type wrong, names of 0 to
//! 400 bytes, invalid properties, header tables past the frame size, what
//! the broker refuses. The relay runs as its own process and is SIGKILLed
//! at random; at the end it must stop cleanly on SIGTERM. Every good row is
//! delivered, in commit order within its key, exactly once after
//! de-duplication by message id; every bad row ends `failed` with a reason
//! naming its column or limit.

use std::collections::{BTreeMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rabbitry::outbox::{Database, Outbox};
use rabbitry::{Connection, Consumer, ConsumerSettings, ExchangeKind, Topology};
use rabbitry_test_support::db::{pg_url, sqlite_url};
use rabbitry_test_support::unique;

/// One generated row.
#[derive(Debug, Clone)]
enum Row {
    /// Published to key `k{key}.` padded to `len` bytes (up to 255).
    Good { key: u8, len: usize },
    /// A routing key of 256 to 400 bytes.
    LongRoutingKey(usize),
    /// An exchange name of 256 to 400 bytes.
    LongExchange(usize),
    /// A header name past 255 bytes.
    LongHeaderName(usize),
    /// A header table larger than a frame.
    HugeHeaders(usize),
    /// An `expiration` that is not milliseconds.
    BadExpiration(String),
    /// A property past 255 bytes.
    LongProperty(usize),
    /// A `user_id` that is not the connection's user.
    ForeignUser,
    /// Properties that are not JSON, or have an unknown key.
    BadJson(bool),
    /// An exchange that does not exist.
    MissingExchange,
    /// SQLite only: a column holding the wrong type.
    WrongType(usize),
}

/// The SQLite columns a foreign writer can get wrong, and the value.
const WRONG_TYPES: [(&str, &str); 6] = [
    ("created_at", "'yesterday'"),
    ("mandatory", "'yes'"),
    ("properties", "X'7B7D'"),
    ("not_before", "'tomorrow'"),
    ("exchange", "X'00'"),
    ("routing_key", "X'6B30'"),
];

impl Row {
    fn class(&self) -> &'static str {
        match self {
            Row::Good { .. } => "good",
            Row::LongRoutingKey(_) => "routing key > 255",
            Row::LongExchange(_) => "exchange > 255",
            Row::LongHeaderName(_) => "header name > 255",
            Row::HugeHeaders(_) => "headers > frame",
            Row::BadExpiration(_) => "bad expiration",
            Row::LongProperty(_) => "property > 255",
            Row::ForeignUser => "foreign user_id",
            Row::BadJson(_) => "bad properties JSON",
            Row::MissingExchange => "missing exchange",
            Row::WrongType(_) => "wrong column type",
        }
    }

    /// A word the failure's reason must contain.
    fn reason(&self) -> Option<&'static str> {
        Some(match self {
            Row::Good { .. } => return None,
            Row::LongRoutingKey(_) => "routing key",
            Row::LongExchange(_) => "exchange",
            Row::LongHeaderName(_) => "header name",
            Row::HugeHeaders(_) => "frame_max",
            Row::BadExpiration(_) => "expiration",
            Row::LongProperty(_) => "correlation_id",
            Row::ForeignUser => "user_id",
            Row::BadJson(_) => "properties",
            Row::MissingExchange => "no exchange",
            Row::WrongType(i) => WRONG_TYPES[*i].0,
        })
    }
}

fn row(sqlite: bool) -> impl Strategy<Value = Row> {
    let bad = prop_oneof![
        (256usize..400).prop_map(Row::LongRoutingKey),
        (256usize..400).prop_map(Row::LongExchange),
        (256usize..400).prop_map(Row::LongHeaderName),
        (140_000usize..200_000).prop_map(Row::HugeHeaders),
        "[a-z -]{1,12}|-[0-9]{1,4}|[1-9][0-9]{10,13}".prop_map(Row::BadExpiration),
        (256usize..400).prop_map(Row::LongProperty),
        Just(Row::ForeignUser),
        any::<bool>().prop_map(Row::BadJson),
        Just(Row::MissingExchange),
    ];
    let wrong_type = if sqlite { 0..WRONG_TYPES.len() } else { 0..0 };
    let good = (0u8..3, 3usize..=255).prop_map(|(key, len)| Row::Good { key, len });
    prop_oneof![
        6 => good,
        4 => bad,
        if sqlite { 1 } else { 0 } => wrong_type.prop_map(Row::WrongType),
    ]
}

/// What the generated run does: the rows, and after how many deliveries
/// the relay is SIGKILLed (and started again).
#[derive(Debug, Clone)]
struct Plan {
    rows: Vec<Row>,
    kills: Vec<usize>,
}

fn plan(sqlite: bool) -> impl Strategy<Value = Plan> {
    (
        proptest::collection::vec(row(sqlite), 15..45),
        proptest::collection::vec(0usize..12, 0..3),
    )
        .prop_map(|(rows, mut kills)| {
            kills.sort_unstable();
            Plan { rows, kills }
        })
}

/// SQL text literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The row as the foreign writer's INSERT.
fn insert(row: &Row, n: usize, exchange: &str, sqlite: bool) -> String {
    let (mut ex, mut key) = (lit(exchange), lit(&format!("k0.{n}")));
    let mut props = r#"{"content_type": "text/plain"}"#.to_owned();
    let (mut mandatory, mut created, mut not_before, mut properties) = (
        String::from("FALSE"),
        String::from("1764950400000"),
        String::from("NULL"),
        None,
    );
    match row {
        Row::Good { key: k, len } => {
            let head = format!("k{k}.");
            key = lit(&format!(
                "{head}{}",
                "p".repeat(len.saturating_sub(head.len()))
            ));
        }
        Row::LongRoutingKey(len) => key = lit(&"r".repeat(*len)),
        Row::LongExchange(len) => ex = lit(&"e".repeat(*len)),
        Row::LongHeaderName(len) => {
            props = format!(r#"{{"headers": {{"{}": 1}}}}"#, "h".repeat(*len))
        }
        Row::HugeHeaders(len) => {
            props = format!(r#"{{"headers": {{"pad": "{}"}}}}"#, "x".repeat(*len))
        }
        Row::BadExpiration(e) => props = format!(r#"{{"expiration": "{e}"}}"#),
        Row::LongProperty(len) => {
            props = format!(r#"{{"correlation_id": "{}"}}"#, "c".repeat(*len))
        }
        Row::ForeignUser => props = r#"{"user_id": "mallory"}"#.into(),
        Row::BadJson(true) => props = "{not json".into(),
        Row::BadJson(false) => props = r#"{"content-type": "text/plain"}"#.into(),
        Row::MissingExchange => ex = lit(&unique("missing")),
        Row::WrongType(i) => {
            let (column, value) = WRONG_TYPES[*i];
            let value = value.to_owned();
            match column {
                "created_at" => created = value,
                "mandatory" => mandatory = value,
                "properties" => properties = Some(value),
                "not_before" => not_before = value,
                "exchange" => ex = value,
                _ => key = value,
            }
        }
    }
    let properties = properties.unwrap_or_else(|| lit(&props));
    let body = if sqlite {
        format!("CAST({} AS BLOB)", lit(&format!("row {n}")))
    } else {
        format!("convert_to({}, 'UTF8')", lit(&format!("row {n}")))
    };
    format!(
        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) \
         VALUES ('id-{n}', {ex}, {key}, {properties}, {body}, {mandatory}, {created}, {not_before})"
    )
}

async fn execute(db: &Database, sql: String) {
    let sql = sqlx::AssertSqlSafe(sql);
    match db {
        Database::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        Database::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
    }
    .unwrap();
}

fn relay(url: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["relay", "--lease", "1s", "--database", url])
        .env("RABBITRY_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("rabbitry relay")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits for `child` off the runtime's threads, at most `limit`.
async fn exits_within(mut child: Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    tokio::task::spawn_blocking(move || loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay did not stop within {limit:?} of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    })
    .await
    .unwrap()
}

/// One generated outbox through SIGKILLed relays; returns the classes.
async fn run_plan(plan: Plan, url: String, sqlite: bool) -> BTreeMap<&'static str, usize> {
    let conn = Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let (exchange, queue) = (unique("blast-x"), unique("blast-q"));
    let mut t = Topology::default();
    t.exchange(rabbitry::Exchange {
        name: exchange.clone(),
        kind: ExchangeKind::Topic,
        durable: false,
        auto_delete: false,
        arguments: Default::default(),
    });
    t.queue(rabbitry::Queue::durable(&queue));
    t.bind(&queue, &exchange, "#");
    conn.declare(&t).await.unwrap();
    let outbox = Outbox::connect(&url).await.unwrap();
    for (n, row) in plan.rows.iter().enumerate() {
        execute(outbox.database(), insert(row, n, &exchange, sqlite)).await;
    }
    let good: Vec<(usize, u8)> = plan
        .rows
        .iter()
        .enumerate()
        .filter_map(|(n, r)| match r {
            Row::Good { key, .. } => Some((n, *key)),
            _ => None,
        })
        .collect();
    let mut child = relay(&url);
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let (mut seen, mut order) = (HashSet::new(), Vec::new());
    let mut deliveries = 0;
    let mut kills = plan.kills.iter().peekable();
    while order.len() < good.len() {
        while kills.peek().is_some_and(|k| **k <= deliveries) {
            kills.next();
            signal(&child, "-KILL");
            exits_within(child, Duration::from_secs(5)).await;
            child = relay(&url);
        }
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} good rows arrived: {order:?}",
                    order.len(),
                    good.len()
                )
            })
            .unwrap();
        deliveries += 1;
        let id = d
            .properties
            .message_id
            .clone()
            .expect("the message_id column");
        let n: usize = id.trim_start_matches("id-").parse().unwrap();
        assert_eq!(&d.body[..], format!("row {n}").as_bytes());
        if seen.insert(n) {
            order.push(n);
        }
        d.ack().await.unwrap();
    }
    // Every good row exactly once after de-duplication, in commit order
    // within its key (here, with one queue, in commit order overall).
    let mut by_key: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
    let key_of: BTreeMap<usize, u8> = good.iter().copied().collect();
    for n in &order {
        by_key.entry(key_of[n]).or_default().push(*n);
    }
    for (key, got) in &by_key {
        let want: Vec<usize> = good
            .iter()
            .filter(|(_, k)| k == key)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(got, &want, "key k{key}: first arrivals in commit order");
    }
    assert_eq!(order.len(), good.len());
    // Every bad row failed, with its reason.
    let bad: Vec<(usize, &Row)> = plan
        .rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.reason().is_some())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = outbox.status().await.unwrap();
        if (status.failed.len() == bad.len() && status.pending == 0)
            || std::time::Instant::now() > deadline
        {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status.pending, 0, "{status:?}");
    assert_eq!(status.failed.len(), bad.len(), "{status:?}");
    for ((n, row), failed) in bad.iter().zip(&status.failed) {
        let why = failed.error.clone().unwrap_or_default();
        let word = row.reason().unwrap();
        assert!(
            why.contains(word),
            "row {n} ({row:?}): '{why}' should name {word}"
        );
    }
    // And the relay stops cleanly on SIGTERM.
    signal(&child, "-TERM");
    let status = exits_within(child, Duration::from_secs(15)).await;
    assert!(
        status.success(),
        "the relay's exit after SIGTERM: {status:?}"
    );
    drop(consumer);
    conn.delete_queue(&queue).await.unwrap();
    conn.delete_exchange(&exchange).await.unwrap();
    conn.close().await;
    let mut classes = BTreeMap::new();
    for r in &plan.rows {
        *classes.entry(r.class()).or_insert(0) += 1;
    }
    classes
}

/// Runs the property on a fresh database per case, and prints the counts
/// of each class generated.
fn check(sqlite: bool) {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(8);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let totals = std::cell::RefCell::new(BTreeMap::<&'static str, usize>::new());
    let (kills, runs) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 8,
        ..Config::default()
    });
    runner
        .run(&plan(sqlite), |plan| {
            kills.set(kills.get() + plan.kills.len());
            runs.set(runs.get() + 1);
            let url = if sqlite {
                sqlite_url()
            } else {
                rt.block_on(pg_url())
            };
            let classes = rt.block_on(run_plan(plan, url, sqlite));
            for (class, n) in classes {
                *totals.borrow_mut().entry(class).or_insert(0) += n;
            }
            Ok(())
        })
        .unwrap();
    println!(
        "{} outboxes, {} relay SIGKILLs planned; rows by class: {:?}",
        runs.get(),
        kills.get(),
        totals.borrow()
    );
}

#[test]
fn generated_sqlite_outboxes_through_killed_relays_deliver_every_good_row_and_fail_each_bad_one() {
    check(true);
}

#[test]
fn generated_postgres_outboxes_through_killed_relays_deliver_every_good_row_and_fail_each_bad_one()
{
    check(false);
}

/// Two `rabbitry relay` processes on one outbox while an application
/// commits a row every 10 ms: the active one is SIGKILLed, the standby
/// takes over; every row arrives once in commit order. Prints the
/// takeover time: from the kill to the first row the standby published.
async fn takeover(url: String, lease: &str) {
    let conn = Connection::open(rabbitry::ConnectionSettings::default())
        .await
        .unwrap();
    let queue = unique("takeover");
    let mut t = Topology::default();
    t.queue(rabbitry::Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let outbox = Outbox::connect(&url).await.unwrap();
    let start = |url: &str| {
        Command::new(env!("CARGO_BIN_EXE_rabbitry"))
            .args(["relay", "--lease", lease, "--database", url])
            .env("RABBITRY_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("rabbitry relay")
    };
    let first = start(&url);
    let stop = flag::Flag::default();
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (db, queue, stop) = (outbox.database().clone(), queue.clone(), stop.clone());
        let written = written.clone();
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.is_set() {
                // As the README says a foreign writer does: on PostgreSQL,
                // a NOTIFY wakes the relay.
                let (body, notify) = match db {
                    Database::Sqlite(_) => (format!("CAST('{n}' AS BLOB)"), ""),
                    Database::Postgres(_) => (
                        format!("convert_to('{n}', 'UTF8')"),
                        "; NOTIFY rabbitry_outbox",
                    ),
                };
                execute(
                    &db,
                    format!(
                        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, created_at) \
                         VALUES ('id-{n}', '', '{queue}', '{{}}', {body}, 0){notify}"
                    ),
                )
                .await;
                n += 1;
                written.store(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        })
    };
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let (mut seen, mut order) = (HashSet::new(), Vec::<usize>::new());
    async fn one(consumer: &mut Consumer) -> usize {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("a row within 30 s")
            .unwrap();
        let n = String::from_utf8(d.body.to_vec()).unwrap().parse().unwrap();
        d.ack().await.unwrap();
        n
    }
    // The first relay is active once rows flow; then the standby starts.
    while order.len() < 50 {
        let n = one(&mut consumer).await;
        if seen.insert(n) {
            order.push(n);
        }
    }
    let standby = start(&url);
    while order.len() < 100 {
        let n = one(&mut consumer).await;
        if seen.insert(n) {
            order.push(n);
        }
    }
    signal(&first, "-KILL");
    let killed_at = std::time::Instant::now();
    // Rows written from now on can only come from the standby.
    let after_kill = written.load(Ordering::SeqCst);
    exits_within(first, Duration::from_secs(5)).await;
    let mut taken_over = None;
    while order.len() < 300 {
        let n = one(&mut consumer).await;
        if seen.insert(n) {
            order.push(n);
        }
        if taken_over.is_none() && n > after_kill {
            taken_over = Some(killed_at.elapsed());
        }
    }
    stop.set();
    let written = writer.await.unwrap();
    while order.len() < written {
        let n = one(&mut consumer).await;
        if seen.insert(n) {
            order.push(n);
        }
    }
    assert_eq!(
        order,
        (0..written).collect::<Vec<_>>(),
        "every row once, in commit order"
    );
    println!(
        "{}: takeover after SIGKILL of the active relay: {:?} ({written} rows, in order)",
        if url.starts_with("sqlite") {
            "sqlite, lease 1s"
        } else {
            "postgres"
        },
        taken_over.unwrap()
    );
    signal(&standby, "-TERM");
    assert!(exits_within(standby, Duration::from_secs(15))
        .await
        .success());
    drop(consumer);
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

/// A flag shared with the writer task.
mod flag {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    pub(crate) struct Flag(Arc<AtomicBool>);

    impl Flag {
        pub(crate) fn set(&self) {
            self.0.store(true, Ordering::SeqCst);
        }
        pub(crate) fn is_set(&self) -> bool {
            self.0.load(Ordering::SeqCst)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_standby_relay_takes_over_from_a_killed_one_in_order() {
    takeover(pg_url().await, "10s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_standby_relay_takes_over_from_a_killed_one_in_order() {
    takeover(sqlite_url(), "1s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_still_starting_stops_cleanly_on_sigterm() {
    // A "broker" that accepts and never answers: the relay is still
    // connecting when the signal comes; its database exists by then.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker = format!("amqp://{}/", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let url = sqlite_url();
    let path = std::path::PathBuf::from(url.trim_start_matches("sqlite://"));
    let child = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["--url", &broker, "relay", "--database", &url])
        .env("RABBITRY_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never opened its database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signal(&child, "-TERM");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {err}", out.status);
    assert!(err.contains("stopped before it started"), "{err}");
    held.abort();
}
