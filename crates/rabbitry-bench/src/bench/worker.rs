//! The worker against raw consume with manual acks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::channel::BasicPublishArguments;
use amqprs::connection::Connection as RawConnection;
use amqprs::BasicProperties;
use tokio::sync::Notify;

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::ConsumerSettings;
use rabbitry::Result;

use super::*;

/// Worker scenarios: the end-to-end rate through the worker with a native
/// handler and with `service` (an axum `Router` in `rabbitry-bench`),
/// against raw consume with manual acks, same prefetch (500), same run.
pub(crate) async fn run_worker<Svc, RB>(
    opts: &BenchOptions,
    progress: Progress<'_>,
    service: Svc,
) -> Result<Vec<ScenarioResult>>
where
    Svc: rabbitry::worker::http::RequestService<RB>,
    RB: rabbitry::worker::http::ResponseBody,
{
    let bench = WorkerBench::open(opts, "worker").await?;
    let WorkerBench {
        raw,
        raw_publisher,
        gw,
        queue,
    } = &bench;
    let n = opts.messages;
    let mut out = Vec::new();
    for (name, native) in [
        ("worker_native_handler", true),
        ("worker_axum_router", false),
    ] {
        let mut rounds = Rounds::default();
        for round in 0..opts.rounds.max(1) {
            progress(&format!("{name}: raw round {}", round + 1));
            rounds
                .measure(
                    false,
                    n,
                    end_to_end_case(raw, raw_publisher, gw, gw, queue, n, false, false),
                )
                .await?;
            purge(raw, queue).await?;
            progress(&format!("{name}: gateway round {}", round + 1));
            rounds
                .measure(
                    true,
                    n,
                    worker_case(&opts.url, raw_publisher, queue, n, native, service.clone()),
                )
                .await?;
            purge(raw, queue).await?;
        }
        out.push(rounds.result(name));
    }
    bench.close().await;
    Ok(out)
}

/// What the worker scenarios share: a raw connection that purges, a raw
/// publisher (both sides publish with it, so only consuming differs), the
/// gateway's connection and the scenario's queue.
pub(crate) struct WorkerBench {
    pub(crate) raw: RawConnection,
    pub(crate) raw_publisher: RawConnection,
    pub(crate) gw: Connection,
    pub(crate) queue: String,
}

impl WorkerBench {
    /// Connects and declares `rabbitry.bench.<what>.<8 hex>`.
    pub(crate) async fn open(opts: &BenchOptions, what: &str) -> Result<WorkerBench> {
        let ep = Endpoint::parse(&opts.url)?;
        let raw = open_raw(&ep).await?;
        let raw_publisher = open_raw(&ep).await?;
        let gw =
            Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
        let queue = bench_queue(&gw, what).await?;
        Ok(WorkerBench {
            raw,
            raw_publisher,
            gw,
            queue,
        })
    }

    /// Deletes the queue (and its dead-letter queue) and disconnects.
    pub(crate) async fn close(self) {
        let queue = &self.queue;
        for q in [queue.clone(), format!("{queue}.dead")] {
            let _ = self.gw.delete_queue(&q).await;
        }
        let _ = self.raw_publisher.close().await;
        let _ = self.raw.close().await;
        self.gw.close().await;
    }
}

/// One round through a worker on its own connection: `n` messages
/// published raw, handled by a native handler or by `service`.
pub(crate) async fn worker_case<Svc, RB>(
    url: &str,
    raw: &RawConnection,
    queue: &str,
    n: usize,
    native: bool,
    service: Svc,
) -> Result<Duration>
where
    Svc: rabbitry::worker::http::RequestService<RB>,
    RB: rabbitry::worker::http::ResponseBody,
{
    use rabbitry::worker::{Body, Retry, State, Worker};
    let gw = Connection::open(ConnectionSettings::new(url).name("bench.worker")).await?;
    let mut consumer = ConsumerSettings::new(queue).name("bench");
    consumer.prefetch_count = Some(500);
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let worker = Worker::new(&gw, (handled.clone(), done.clone(), n as u64));
    let worker = if native {
        worker.consumer(
            consumer,
            |Body(_b): Body,
             State((handled, done, n)): State<(Arc<AtomicU64>, Arc<Notify>, u64)>| async move {
                if handled.fetch_add(1, Ordering::Relaxed) + 1 == n {
                    done.notify_one();
                }
            },
        )
    } else {
        let counted = tower::ServiceBuilder::new()
            .map_response({
                let (handled, done) = (handled.clone(), done.clone());
                move |r| {
                    if handled.fetch_add(1, Ordering::Relaxed) + 1 == n as u64 {
                        done.notify_one();
                    }
                    r
                }
            })
            .service(service);
        worker.service(consumer, counted)
    }
    .retry(Retry::never());
    let running = worker.start().await?;
    // The same raw publisher as the raw side: only consuming differs.
    let pch = raw.open_channel(None).await.map_err(raw_err)?;
    let mut props = BasicProperties::default();
    props.with_delivery_mode(1);
    let props = props.finish();
    let start = Instant::now();
    for _ in 0..n {
        pch.basic_publish(
            props.clone(),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
    }
    done.notified().await;
    let _ = pch.close().await;
    let took = start.elapsed();
    running.shutdown().await;
    gw.close().await;
    Ok(took)
}
