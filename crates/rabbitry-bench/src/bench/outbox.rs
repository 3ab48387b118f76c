//! The outbox against direct confirmed publishing.

use std::time::{Duration, Instant};

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::Message;
use rabbitry::{Consumer, ConsumerSettings};
use rabbitry::{Error, ErrorKind, Result};

use super::*;

/// Outbox scenarios on the database at `url`: throughput of enqueueing in
/// transactions (100 messages each) plus relaying, against direct
/// confirmed publishing (1,000 in flight) in the same run; and the
/// commit-to-publish latency (commit to arrival at a consumer) of
/// single-message transactions.
pub(crate) async fn run_outbox(
    opts: &BenchOptions,
    progress: Progress<'_>,
    url: &str,
    label: &str,
) -> Result<(ScenarioResult, LatencyResult)> {
    use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = format!(
        "rabbitry.bench.outbox.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut topology = rabbitry::topology::Topology::default();
    topology.queue(rabbitry::topology::Queue::durable(&queue));
    gw.declare_once(&topology).await?;
    let outbox = Outbox::connect(url).await?;
    let n = opts.messages;
    let mut rounds = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        progress(&format!(
            "outbox {label}: direct confirmed publish, round {}",
            round + 1
        ));
        rounds
            .measure(false, n, publish_case(&raw, &gw, &queue, n, true, true))
            .await?;
        purge(&raw, &queue).await?;

        progress(&format!(
            "outbox {label}: enqueue + relay, round {}",
            round + 1
        ));
        vacuum(&outbox, label).await?;
        let relay = outbox.spawn_relay(&gw, RelayOptions::default()).await?;
        let start = Instant::now();
        let cpu = cpu_time();
        let row = || Message::new(vec![b'x'; BODY]).routing_key(&queue);
        for _ in 0..n.div_ceil(100) {
            match outbox.database() {
                Database::Sqlite(_) => enqueue_100::<sqlx::Sqlite>(&outbox, &row).await?,
                Database::Postgres(_) => enqueue_100::<sqlx::Postgres>(&outbox, &row).await?,
            }
        }
        wait_for_depth(&raw, &queue, n.div_ceil(100) * 100).await?;
        rounds.record(
            true,
            n.div_ceil(100) * 100,
            start.elapsed(),
            cpu_time().saturating_sub(cpu),
        );
        relay.stop().await?;
        purge(&raw, &queue).await?;
    }
    let throughput = rounds.result(format!("outbox_{label}_vs_direct_confirmed"));

    progress(&format!("outbox {label}: commit-to-publish latency"));
    vacuum(&outbox, label).await?;
    let relay = outbox.spawn_relay(&gw, RelayOptions::default()).await?;
    let mut cs = ConsumerSettings::new(&queue);
    cs.auto_declare = false;
    let mut consumer = Consumer::start(&gw, cs).await?;
    let samples_n = 200.min(n.max(20));
    let mut samples = Vec::with_capacity(samples_n);
    for i in 0..samples_n {
        let message = Message::new(i.to_string().into_bytes()).routing_key(&queue);
        let committed = match outbox.database() {
            Database::Sqlite(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(|e| outbox::db_error(label, "bench", e))?;
                outbox::publish(&mut *tx, message).await?;
                outbox.commit(tx).await?;
                Instant::now()
            }
            Database::Postgres(pool) => {
                let mut tx = pool
                    .begin()
                    .await
                    .map_err(|e| outbox::db_error(label, "bench", e))?;
                outbox::publish(&mut *tx, message).await?;
                outbox.commit(tx).await?;
                Instant::now()
            }
        };
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| Error::new(ErrorKind::Timeout, "outbox latency: no message within 10 s"))?
            .ok_or_else(|| Error::new(ErrorKind::Closed, "bench consumer stopped"))?;
        samples.push(committed.elapsed());
        d.ack().await?;
    }
    consumer.cancel().await;
    relay.stop().await?;
    let latency = LatencyResult {
        name: format!("outbox_{label}_commit_to_consume"),
        raw_p50_ms: None,
        raw_p99_ms: None,
        gateway_p50_ms: percentile(&mut samples, 50.0),
        gateway_p99_ms: percentile(&mut samples, 99.0),
    };
    let _ = gw.delete_queue(&queue).await;
    let _ = raw.close().await;
    gw.close().await;
    Ok((throughput, latency))
}

/// One transaction of 100 outbox rows, staged and written in one
/// statement at commit (which wakes the relay), on either database.
async fn enqueue_100<DB: rabbitry::outbox::OutboxDatabase>(
    outbox: &rabbitry::outbox::Outbox,
    row: &impl Fn() -> Message,
) -> Result<()>
where
    DB::Connection: rabbitry::outbox::OutboxExecutor,
{
    let mut tx = outbox.begin::<DB>().await?;
    for _ in 0..100 {
        tx.publish(row())?;
    }
    tx.commit().await
}

/// On PostgreSQL, clears the dead rows that earlier rounds left: every
/// relayed row is a dead tuple until a vacuum, and the claim's index scan
/// walks them. In production autovacuum does this in the background; on a
/// server where it is off, rounds would otherwise slow down one after the
/// other. Not timed.
async fn vacuum(outbox: &rabbitry::outbox::Outbox, label: &str) -> Result<()> {
    if let rabbitry::outbox::Database::Postgres(pool) = outbox.database() {
        sqlx::raw_sql("VACUUM rabbitry_outbox")
            .execute(pool)
            .await
            .map_err(|e| rabbitry::outbox::db_error(label, "vacuum", e))?;
    }
    Ok(())
}
