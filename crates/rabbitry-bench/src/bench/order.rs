//! Time and order: how late scheduled messages are published, how fast
//! the relay publishes rows another program wrote, and what per-key
//! ordering over partitions costs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use amqprs::channel::BasicPublishArguments;
use amqprs::{BasicProperties, FieldTable, FieldValue};
use tokio::sync::Notify;

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::outbox::{Database, Outbox, RelayOptions};
use rabbitry::worker::{PartitionKey, Retry, State, Worker};
use rabbitry::{ConsumerSettings, Error, ErrorKind, ExchangeKind, Message, Result};

use super::*;

/// Scheduled messages due at 1,000 per second for `seconds`: how late
/// each reached a consumer after its due time (p50, p99), on the outbox
/// at `url`.
pub(crate) async fn run_schedule_lateness(
    opts: &BenchOptions,
    progress: Progress<'_>,
    url: &str,
    label: &str,
) -> Result<LatencyResult> {
    const RATE: u64 = 1000;
    let seconds = (opts.messages as u64 / RATE).clamp(1, 5);
    let n = (RATE * seconds) as usize;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = bench_queue(&gw, "scheduled").await?;
    let outbox = Outbox::connect(url).await?;
    progress(&format!(
        "scheduled {label}: writing {n} rows due at {RATE}/s"
    ));
    // Due from two seconds from now on, one every millisecond; the due
    // time travels in the body.
    let start = rabbitry::clock::millis_of(SystemTime::now()) + 2000;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        match outbox.database() {
            Database::Sqlite(_) => stage::<sqlx::Sqlite>(&outbox, &queue, start, chunk).await?,
            Database::Postgres(_) => stage::<sqlx::Postgres>(&outbox, &queue, start, chunk).await?,
        }
    }
    let relay = outbox.spawn_relay(&gw, RelayOptions::default()).await?;
    let mut cs = ConsumerSettings::new(&queue);
    cs.auto_declare = false;
    cs.prefetch_count = Some(500);
    let mut consumer = rabbitry::Consumer::start(&gw, cs).await?;
    progress(&format!("scheduled {label}: receiving for {seconds} s"));
    let mut samples = Vec::with_capacity(n);
    while samples.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "scheduled: nothing for 30 s"))?
            .ok_or_else(|| Error::new(ErrorKind::Closed, "bench consumer stopped"))?;
        let now = rabbitry::clock::now_millis();
        let due: i64 = std::str::from_utf8(&d.body)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(now);
        samples.push(Duration::from_millis((now - due).max(0) as u64));
        d.ack().await?;
    }
    consumer.cancel().await;
    relay.stop().await?;
    let _ = gw.delete_queue(&queue).await;
    gw.close().await;
    Ok(LatencyResult {
        name: format!("scheduled_{label}_lateness_at_1000_per_s"),
        raw_p50_ms: None,
        raw_p99_ms: None,
        gateway_p50_ms: percentile(&mut samples, 50.0),
        gateway_p99_ms: percentile(&mut samples, 99.0),
    })
}

/// Stages one transaction of scheduled rows `chunk` (offsets in ms).
async fn stage<DB: rabbitry::outbox::OutboxDatabase>(
    outbox: &Outbox,
    queue: &str,
    start: i64,
    chunk: &[usize],
) -> Result<()>
where
    DB::Connection: rabbitry::outbox::OutboxExecutor,
{
    let mut tx = outbox.begin::<DB>().await?;
    for i in chunk {
        let due = start + *i as i64;
        let message = Message::new(due.to_string()).routing_key(queue);
        tx.publish_at(message, rabbitry::clock::time_of(due))?;
    }
    tx.commit().await
}

/// The relay alone, on rows already committed: written by another program
/// with the README's plain SQL (the "gateway" side), against rows written
/// by rabbitry's own `Outbox::begin` (the "raw" side): the ratio is
/// foreign / in-process.
pub(crate) async fn run_foreign_relay(
    opts: &BenchOptions,
    progress: Progress<'_>,
    url: &str,
    label: &str,
) -> Result<ScenarioResult> {
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = bench_queue(&gw, "foreign").await?;
    let outbox = Outbox::connect(url).await?;
    let n = opts.messages;
    let mut rounds = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        for foreign in [false, true] {
            let side = if foreign { "foreign SQL" } else { "in-process" };
            progress(&format!(
                "relay {label}: rows by {side}, round {}",
                round + 1
            ));
            write_rows(&outbox, &queue, n, foreign).await?;
            let start = Instant::now();
            let cpu = cpu_time();
            let relay = outbox.spawn_relay(&gw, RelayOptions::default()).await?;
            wait_for_depth(&raw, &queue, n).await?;
            rounds.record(foreign, n, start.elapsed(), cpu_time().saturating_sub(cpu));
            relay.stop().await?;
            purge(&raw, &queue).await?;
        }
    }
    let _ = gw.delete_queue(&queue).await;
    let _ = raw.close().await;
    gw.close().await;
    Ok(rounds.result(format!("relay_{label}_foreign_rows_vs_in_process")))
}

/// Commits `n` rows for `queue`: with the README's `INSERT` and plain JSON
/// properties when `foreign`, with `Outbox::begin` otherwise.
async fn write_rows(outbox: &Outbox, queue: &str, n: usize, foreign: bool) -> Result<()> {
    let props = r#"{"content_type": "application/octet-stream", "headers": {"from": "bench"}}"#;
    let body = vec![b'x'; BODY];
    let named = |e| rabbitry::outbox::db_error("bench", "foreign rows", e);
    // The README's INSERT, per database, with its parameters bound.
    macro_rules! foreign_rows {
        ($pool:expr, $sql:literal) => {{
            let mut tx = $pool.begin().await.map_err(named)?;
            for _ in 0..n {
                sqlx::query($sql)
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind("")
                    .bind(queue)
                    .bind(props)
                    .bind(&body)
                    .bind(false)
                    .bind(None::<i64>)
                    .execute(&mut *tx)
                    .await
                    .map_err(named)?;
            }
            tx.commit().await.map_err(named)
        }};
    }
    match outbox.database() {
        Database::Sqlite(pool) if foreign => foreign_rows!(
            pool,
            "INSERT INTO rabbitry_outbox \
             (message_id, exchange, routing_key, properties, body, mandatory, not_before, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER))"
        ),
        Database::Postgres(pool) if foreign => foreign_rows!(
            pool,
            "INSERT INTO rabbitry_outbox \
             (message_id, exchange, routing_key, properties, body, mandatory, not_before, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, (extract(epoch FROM clock_timestamp()) * 1000)::bigint)"
        ),
        Database::Sqlite(_) => in_process::<sqlx::Sqlite>(outbox, queue, n).await,
        Database::Postgres(_) => in_process::<sqlx::Postgres>(outbox, queue, n).await,
    }
}

async fn in_process<DB: rabbitry::outbox::OutboxDatabase>(
    outbox: &Outbox,
    queue: &str,
    n: usize,
) -> Result<()>
where
    DB::Connection: rabbitry::outbox::OutboxExecutor,
{
    let mut tx = outbox.begin::<DB>().await?;
    for _ in 0..n {
        let mut m = Message::new(vec![b'x'; BODY])
            .routing_key(queue)
            .content_type("application/octet-stream");
        m.properties.headers.insert("from".into(), "bench".into());
        tx.publish(m)?;
    }
    tx.commit().await
}

/// Per-key ordered handling (4 partitions by an `order_id` header, 3
/// workers) as the "gateway" side, against one unordered queue read by 3
/// workers as the "raw" side: the ratio is ordered / unordered.
pub(crate) async fn run_partitions(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<ScenarioResult> {
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (plain, ordered, exchange) = (
        format!("rabbitry.bench.unordered.{id}"),
        format!("rabbitry.bench.ordered.{id}"),
        format!("rabbitry.bench.ordered-x.{id}"),
    );
    let n = opts.messages;
    let mut rounds = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        for partitioned in [false, true] {
            let side = if partitioned {
                "4 partitions"
            } else {
                "one queue"
            };
            progress(&format!(
                "per-key order: {side}, 3 workers, round {}",
                round + 1
            ));
            let case = three_workers(&opts.url, &raw, &plain, &ordered, &exchange, n, partitioned);
            rounds.measure(partitioned, n, case).await?;
        }
    }
    for q in [plain.clone(), format!("{plain}.dead")] {
        let _ = gw.delete_queue(&q).await;
    }
    for i in 0..4 {
        let p = format!("{ordered}.p{i}");
        for q in [p.clone(), format!("{p}.dead")] {
            let _ = gw.delete_queue(&q).await;
        }
    }
    let _ = gw.delete_exchange(&exchange).await;
    let _ = raw.close().await;
    gw.close().await;
    Ok(rounds.result("per_key_ordered_4_partitions_vs_unordered_3_workers"))
}

/// One round: 3 workers (each on its own connection, native handlers that
/// count), `n` messages over 100 keys published raw, timed until all are
/// handled.
async fn three_workers(
    url: &str,
    raw: &amqprs::connection::Connection,
    plain: &str,
    ordered: &str,
    exchange: &str,
    n: usize,
    partitioned: bool,
) -> Result<Duration> {
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let mut running = Vec::new();
    let mut conns = Vec::new();
    for w in 0..3 {
        let conn =
            Connection::open(ConnectionSettings::new(url).name(format!("bench.order.{w}"))).await?;
        let settings = if partitioned {
            ConsumerSettings::new(ordered).name("ordered").bind(
                exchange,
                ExchangeKind::ConsistentHash,
                &[],
            )
        } else {
            ConsumerSettings::new(plain).name("unordered")
        };
        let worker = Worker::new(&conn, (handled.clone(), done.clone(), n as u64))
            .consumer(
                settings,
                |State((handled, done, n)): State<(Arc<AtomicU64>, Arc<Notify>, u64)>| async move {
                    if handled.fetch_add(1, Ordering::Relaxed) + 1 == n {
                        done.notify_one();
                    }
                },
            )
            .retry(Retry::never());
        let worker = if partitioned {
            worker.partitions(4, PartitionKey::Header("order_id".into()))
        } else {
            worker
        };
        running.push(worker.start().await?);
        conns.push(conn);
    }
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let start = Instant::now();
    for i in 0..n {
        let mut headers = FieldTable::new();
        let key = format!("k{}", i % 100);
        headers.insert(
            "order_id"
                .try_into()
                .map_err(|_| Error::new(ErrorKind::Invalid, "header name"))?,
            FieldValue::S(
                key.try_into()
                    .map_err(|_| Error::new(ErrorKind::Invalid, "header value"))?,
            ),
        );
        let props = BasicProperties::default()
            .with_delivery_mode(1)
            .with_headers(headers)
            .finish();
        let args = if partitioned {
            BasicPublishArguments::new(exchange, "")
        } else {
            BasicPublishArguments::new("", plain)
        };
        ch.basic_publish(props, vec![b'x'; BODY], args)
            .await
            .map_err(raw_err)?;
    }
    done.notified().await;
    let took = start.elapsed();
    let _ = ch.close().await;
    for r in running {
        r.shutdown().await;
    }
    for c in conns {
        c.close().await;
    }
    Ok(took)
}
