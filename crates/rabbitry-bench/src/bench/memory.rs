//! The in-memory broker's speed (`--only memory`): end to end, confirmed
//! publishing and consuming with acks, on `memory://` through rabbitry's
//! `Connection`, `Producer` and `Consumer` ("gateway"), and with the
//! memory broker's own channel API and nothing of rabbitry around it
//! ("raw"). It needs no RabbitMQ: a user's test suite can count on the
//! gateway's rate.

use std::time::Duration;

use tokio::time::Instant;

use rabbitry::connection::{Connection, ConnectionSettings};
use rabbitry::memory::{Event, MemoryBroker, Settle};
use rabbitry::{Error, ErrorKind, Properties, Queue, Result, Topology};

use super::publishing::{gateway_end_to_end, lost, IDLE_LIMIT};
use super::{BenchOptions, Progress, Rounds, ScenarioResult, BODY};

pub(crate) async fn run_memory(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<ScenarioResult> {
    let name = format!("rabbitry-bench-{}", uuid::Uuid::new_v4().simple());
    let url = format!("memory://{name}");
    let broker = MemoryBroker::named(&name);
    let settings = ConnectionSettings::new(&url)
        .name("rabbitry-bench-memory")
        .separate_publishing(false);
    let gw = Connection::open(settings.clone()).await?;
    let gw_publisher = Connection::open(settings.name("rabbitry-bench-memory-publisher")).await?;
    let queue = "bench".to_owned();
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    gw.declare_once(&t).await?;
    let n = opts.messages;
    let mut rounds = Rounds::default();
    for round in 0..opts.rounds.max(1) {
        for gateway in [false, true] {
            let side = if gateway {
                "rabbitry"
            } else {
                "memory channel"
            };
            progress(&format!(
                "in memory, end to end: {side}, round {}",
                round + 1
            ));
            if gateway {
                let round = gateway_end_to_end(&gw, &gw_publisher, &queue, n, true);
                rounds.measure(true, n, round).await?;
            } else {
                rounds
                    .measure(false, n, raw_round(&broker, &queue, n))
                    .await?;
            }
        }
    }
    gw_publisher.close().await;
    gw.close().await;
    Ok(rounds.result("in_memory_end_to_end_confirms_acks_256B"))
}

/// The broker's own side: the same work on two memory channels.
async fn raw_round(broker: &MemoryBroker, queue: &str, n: usize) -> Result<Duration> {
    let refused = |r: rabbitry::memory::Refusal| Error::new(ErrorKind::Channel, r.to_string());
    let consuming = broker.connect();
    let cch = consuming.open_channel();
    cch.qos(500).map_err(refused)?;
    let mut rx = cch.consume(queue, "bench", false, false).map_err(refused)?;
    let publishing = broker.connect();
    let queue_owned = queue.to_owned();
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        let pch = publishing.open_channel();
        for i in 0..n {
            pch.publish(
                "",
                &queue_owned,
                false,
                Properties::default(),
                vec![b'x'; BODY],
            )
            .map_err(|r| Error::new(ErrorKind::Channel, r.to_string()))?;
            if i % 500 == 0 {
                tokio::task::yield_now().await;
            }
        }
        Ok::<_, Error>(())
    });
    for got in 0..n {
        match tokio::time::timeout(IDLE_LIMIT, rx.recv()).await {
            Ok(Some(Event::Delivery(d))) => cch
                .settle(d.delivery_tag, false, Settle::Ack)
                .map_err(refused)?,
            Ok(_) => return Err(Error::new(ErrorKind::Closed, "memory consumer stopped")),
            Err(_) => return Err(lost(got, n)),
        }
    }
    let took = start.elapsed();
    publisher
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
    cch.close();
    Ok(took)
}
