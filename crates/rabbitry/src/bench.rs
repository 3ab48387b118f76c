//! The benchmark behind `rabbitry bench`: the raw AMQP client and the
//! gateway, on the same scenarios, in the same process and run.
//!
//! Each scenario runs raw, gateway, raw, gateway, and keeps each side's best
//! rate, so one noisy moment does not decide the ratio. Bodies are 256
//! bytes. The raw side uses `amqprs` directly with the least code that does
//! the same work; the gateway side uses [`Producer`] and [`Consumer`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::ChannelCallback;
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
};
use amqprs::connection::{Connection as RawConnection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::connection::{Connection, ConnectionSettings, Endpoint};
use crate::consume::{Consumer, ConsumerSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::publish::{Producer, ProducerSettings};

const BODY: usize = 256;

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Messages per second with the raw client.
    pub raw_msgs_per_s: f64,
    /// Messages per second through the gateway.
    pub gateway_msgs_per_s: f64,
    /// gateway / raw.
    pub ratio: f64,
}

/// A latency measurement, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyResult {
    /// What was measured.
    pub name: String,
    /// Median, raw client (when there is a raw equivalent).
    pub raw_p50_ms: Option<f64>,
    /// 99th percentile, raw client.
    pub raw_p99_ms: Option<f64>,
    /// Median through the gateway.
    pub gateway_p50_ms: f64,
    /// 99th percentile through the gateway.
    pub gateway_p99_ms: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    /// Every throughput scenario, in order.
    pub scenarios: Vec<ScenarioResult>,
    /// Every latency measurement, in order.
    pub latencies: Vec<LatencyResult>,
}

/// The p-th percentile (0..=100) of `samples` in milliseconds.
pub fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    (samples[rank.min(samples.len() - 1)].as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Broker URL.
    pub url: String,
    /// Messages per scenario run.
    pub messages: usize,
    /// Rounds per side (best is kept).
    pub rounds: usize,
}

/// Worker scenarios: the end-to-end rate through the worker with a native
/// handler and with `service` (an axum `Router` in `rabbitry bench`),
/// against raw consume with manual acks, same prefetch (500), same run.
pub async fn run_worker<Svc, RB>(
    opts: &BenchOptions,
    progress: Progress<'_>,
    service: Svc,
) -> Result<Vec<ScenarioResult>>
where
    Svc: crate::worker::http::RequestService<RB>,
    RB: crate::worker::http::ResponseBody,
{
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    // Both sides publish with this raw connection and consume on another
    // one, so only the consuming side differs.
    let raw_publisher = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = format!(
        "rabbitry.bench.worker.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut topology = crate::topology::Topology::default();
    topology.queue(crate::topology::Queue::durable(&queue));
    gw.declare_once(&topology).await?;
    let n = opts.messages;
    let mut out = Vec::new();
    for (name, native) in [
        ("worker_native_handler", true),
        ("worker_axum_router", false),
    ] {
        let mut best = [0f64; 2];
        for round in 0..opts.rounds.max(1) {
            progress(&format!("{name}: raw round {}", round + 1));
            let took = end_to_end_case(&raw, &raw_publisher, &gw, &queue, n, false).await?;
            best[0] = best[0].max(n as f64 / took.as_secs_f64());
            purge(&raw, &queue).await?;
            progress(&format!("{name}: gateway round {}", round + 1));
            let took = worker_case(
                &opts.url,
                &raw_publisher,
                &queue,
                n,
                native,
                service.clone(),
            )
            .await?;
            best[1] = best[1].max(n as f64 / took.as_secs_f64());
            purge(&raw, &queue).await?;
        }
        out.push(ScenarioResult {
            name: name.to_owned(),
            raw_msgs_per_s: best[0].round(),
            gateway_msgs_per_s: best[1].round(),
            ratio: (best[1] / best[0] * 100.0).round() / 100.0,
        });
    }
    for q in [queue.clone(), format!("{queue}.dead")] {
        let _ = gw.delete_queue(&q).await;
    }
    let _ = raw_publisher.close().await;
    let _ = raw.close().await;
    gw.close().await;
    Ok(out)
}

async fn worker_case<Svc, RB>(
    url: &str,
    raw: &RawConnection,
    queue: &str,
    n: usize,
    native: bool,
    service: Svc,
) -> Result<Duration>
where
    Svc: crate::worker::http::RequestService<RB>,
    RB: crate::worker::http::ResponseBody,
{
    use crate::worker::{Body, State, Worker};
    let text = format!(
        "[connections.default]\nurl = \"{url}\"\n[consumers.bench]\nqueue = \"{queue}\"\nprefetch_count = 500\nretry = {{ attempts = 1 }}\n"
    );
    let settings = crate::config::Settings::from_toml(&text, "bench")?;
    let handled = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    let worker = Worker::new(settings, (handled.clone(), done.clone(), n as u64));
    let worker = if native {
        worker.handle(
            "bench",
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
        worker.service("bench", counted)
    };
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
    Ok(took)
}

/// Outbox scenarios on the database at `url`: throughput of enqueueing in
/// transactions (100 messages each) plus relaying, against direct
/// confirmed publishing (1,000 in flight) in the same run; and the
/// commit-to-publish latency (commit to arrival at a consumer) of
/// single-message transactions.
pub async fn run_outbox(
    opts: &BenchOptions,
    progress: Progress<'_>,
    url: &str,
    label: &str,
) -> Result<(ScenarioResult, LatencyResult)> {
    use crate::outbox::{self, Database, Outbox, RelayOptions};
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = format!(
        "rabbitry.bench.outbox.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut topology = crate::topology::Topology::default();
    topology.queue(crate::topology::Queue::durable(&queue));
    gw.declare_once(&topology).await?;
    let outbox = Outbox::connect(url).await?;
    let n = opts.messages;
    let mut best = [0f64; 2];
    for round in 0..opts.rounds.max(1) {
        progress(&format!(
            "outbox {label}: direct confirmed publish, round {}",
            round + 1
        ));
        let took = publish_case(&raw, &gw, &queue, n, true, true).await?;
        best[0] = best[0].max(n as f64 / took.as_secs_f64());
        purge(&raw, &queue).await?;

        progress(&format!(
            "outbox {label}: enqueue + relay, round {}",
            round + 1
        ));
        let relay = outbox.spawn_relay(&gw, RelayOptions::default()).await?;
        let start = Instant::now();
        let row = || Message::new(vec![b'x'; BODY]).routing_key(&queue);
        for _ in 0..n.div_ceil(100) {
            match outbox.database() {
                Database::Sqlite(pool) => {
                    let mut tx = pool
                        .begin()
                        .await
                        .map_err(|e| outbox::db_error(label, "bench", e))?;
                    for _ in 0..100 {
                        outbox::publish(&mut *tx, row()).await?;
                    }
                    outbox.commit(tx).await?;
                }
                Database::Postgres(pool) => {
                    let mut tx = pool
                        .begin()
                        .await
                        .map_err(|e| outbox::db_error(label, "bench", e))?;
                    for _ in 0..100 {
                        outbox::publish(&mut *tx, row()).await?;
                    }
                    outbox.commit(tx).await?;
                }
            }
        }
        wait_for_depth(&raw, &queue, n.div_ceil(100) * 100).await?;
        best[1] = best[1].max((n.div_ceil(100) * 100) as f64 / start.elapsed().as_secs_f64());
        relay.stop().await?;
        purge(&raw, &queue).await?;
    }
    let throughput = ScenarioResult {
        name: format!("outbox_{label}_vs_direct_confirmed"),
        raw_msgs_per_s: best[0].round(),
        gateway_msgs_per_s: best[1].round(),
        ratio: (best[1] / best[0] * 100.0).round() / 100.0,
    };

    progress(&format!("outbox {label}: commit-to-publish latency"));
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

/// RPC: sequential round trips (p50, p99) and throughput with 64 calls in
/// flight, through [`RpcClient`](crate::rpc::RpcClient) and through raw
/// amqprs doing the same (direct reply-to), against one raw responder.
pub async fn run_rpc(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<(Vec<ScenarioResult>, Vec<LatencyResult>)> {
    use crate::rpc::{RpcClient, RpcSettings};
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let gw = Connection::open(ConnectionSettings::new(&opts.url).name("rabbitry-bench")).await?;
    let queue = format!(
        "rabbitry.bench.rpc.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let responder = spawn_raw_responder(&raw, &queue).await?;
    let calls = (opts.messages / 10).clamp(200, 5_000);

    let client = RpcClient::new(&gw, RpcSettings::default()).await?;
    let body = vec![b'x'; BODY];
    let mut best_seq = [Vec::new(), Vec::new()];
    let mut best_rate = [0f64; 2];
    for round in 0..opts.rounds.max(1) {
        progress(&format!("rpc: raw sequential, round {}", round + 1));
        let samples = raw_rpc_sequential(&raw, &queue, calls).await?;
        if best_seq[0].is_empty() || median(&samples) < median(&best_seq[0]) {
            best_seq[0] = samples;
        }
        progress(&format!("rpc: gateway sequential, round {}", round + 1));
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let start = Instant::now();
            client
                .call(Message::new(body.clone()).routing_key(&queue), None)
                .await?;
            samples.push(start.elapsed());
        }
        if best_seq[1].is_empty() || median(&samples) < median(&best_seq[1]) {
            best_seq[1] = samples;
        }
        progress(&format!("rpc: raw 64 in flight, round {}", round + 1));
        let took = raw_rpc_window(&raw, &queue, calls * 4, 64).await?;
        best_rate[0] = best_rate[0].max((calls * 4) as f64 / took.as_secs_f64());
        progress(&format!("rpc: gateway 64 in flight, round {}", round + 1));
        let start = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..calls * 4 {
            if set.len() >= 64 {
                if let Some(r) = set.join_next().await {
                    r.map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
                }
            }
            let client = client.clone();
            let m = Message::new(body.clone()).routing_key(&queue);
            set.spawn(async move { client.call(m, None).await.map(|_| ()) });
        }
        while let Some(r) = set.join_next().await {
            r.map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
        }
        best_rate[1] = best_rate[1].max((calls * 4) as f64 / start.elapsed().as_secs_f64());
    }
    responder.abort();
    let _ = gw.delete_queue(&queue).await;
    let seq_rate = |s: &Vec<Duration>| s.len() as f64 / s.iter().sum::<Duration>().as_secs_f64();
    let scenarios = vec![
        ScenarioResult {
            name: "rpc_sequential".into(),
            raw_msgs_per_s: seq_rate(&best_seq[0]).round(),
            gateway_msgs_per_s: seq_rate(&best_seq[1]).round(),
            ratio: (seq_rate(&best_seq[1]) / seq_rate(&best_seq[0]) * 100.0).round() / 100.0,
        },
        ScenarioResult {
            name: "rpc_64_in_flight".into(),
            raw_msgs_per_s: best_rate[0].round(),
            gateway_msgs_per_s: best_rate[1].round(),
            ratio: (best_rate[1] / best_rate[0] * 100.0).round() / 100.0,
        },
    ];
    let [mut raw_s, mut gw_s] = best_seq;
    let latencies = vec![LatencyResult {
        name: "rpc_sequential_round_trip".into(),
        raw_p50_ms: Some(percentile(&mut raw_s, 50.0)),
        raw_p99_ms: Some(percentile(&mut raw_s, 99.0)),
        gateway_p50_ms: percentile(&mut gw_s, 50.0),
        gateway_p99_ms: percentile(&mut gw_s, 99.0),
    }];
    let _ = raw.close().await;
    gw.close().await;
    Ok((scenarios, latencies))
}

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}

/// A responder written with the raw client: echoes each request to its
/// `reply_to` with the same correlation id.
async fn spawn_raw_responder(
    raw: &RawConnection,
    queue: &str,
) -> Result<tokio::task::JoinHandle<()>> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    ch.queue_declare(QueueDeclareArguments::new(queue).auto_delete(true).finish())
        .await
        .map_err(raw_err)?;
    let (_, mut rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(queue, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    Ok(tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let Some(props) = m.basic_properties else {
                continue;
            };
            let (Some(reply_to), Some(cid)) = (props.reply_to(), props.correlation_id()) else {
                continue;
            };
            let mut reply = BasicProperties::default();
            reply
                .with_correlation_id(cid)
                .with_content_type("application/octet-stream");
            let _ = ch
                .basic_publish(
                    reply.finish(),
                    m.content.unwrap_or_default(),
                    BasicPublishArguments::new("", reply_to),
                )
                .await;
        }
    }))
}

async fn raw_rpc_channel(
    raw: &RawConnection,
) -> Result<(
    Channel,
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
)> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let (_, rx) = ch
        .basic_consume_rx(
            BasicConsumeArguments::new(crate::rpc::DIRECT_REPLY_TO, "")
                .auto_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    Ok((ch, rx))
}

fn raw_request(i: usize) -> BasicProperties {
    let mut p = BasicProperties::default();
    p.with_correlation_id(&i.to_string())
        .with_reply_to(crate::rpc::DIRECT_REPLY_TO);
    p.finish()
}

async fn raw_rpc_sequential(
    raw: &RawConnection,
    queue: &str,
    calls: usize,
) -> Result<Vec<Duration>> {
    let (ch, mut rx) = raw_rpc_channel(raw).await?;
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let start = Instant::now();
        ch.basic_publish(
            raw_request(i),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
        rx.recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw rpc channel closed"))?;
        samples.push(start.elapsed());
    }
    let _ = ch.close().await;
    Ok(samples)
}

async fn raw_rpc_window(
    raw: &RawConnection,
    queue: &str,
    calls: usize,
    window: usize,
) -> Result<Duration> {
    let (ch, mut rx) = raw_rpc_channel(raw).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < window.min(calls) {
        ch.basic_publish(
            raw_request(sent),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
        sent += 1;
    }
    for _ in 0..calls {
        rx.recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw rpc channel closed"))?;
        if sent < calls {
            ch.basic_publish(
                raw_request(sent),
                vec![b'x'; BODY],
                BasicPublishArguments::new("", queue),
            )
            .await
            .map_err(raw_err)?;
            sent += 1;
        }
    }
    let took = start.elapsed();
    let _ = ch.close().await;
    Ok(took)
}

/// A named measurement, for progress output.
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs every scenario and returns the rates and ratios.
pub async fn run(opts: &BenchOptions, progress: Progress<'_>) -> Result<Report> {
    let ep = Endpoint::parse(&opts.url)?;
    let raw = open_raw(&ep).await?;
    let mut settings = ConnectionSettings::new(&opts.url).name("rabbitry-bench");
    settings.heartbeat = 60;
    let gw = Connection::open(settings).await?;
    let queue = format!(
        "rabbitry.bench.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let setup = raw.open_channel(None).await.map_err(raw_err)?;
    setup
        .queue_declare(QueueDeclareArguments::new(&queue).durable(true).finish())
        .await
        .map_err(raw_err)?;

    let n = opts.messages;
    let mut scenarios = Vec::new();
    type Run<'r> = Box<
        dyn Fn(bool) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Duration>> + 'r>>
            + 'r,
    >;
    let cases: Vec<(&str, Run<'_>)> = vec![
        (
            "publish_transient_no_confirms",
            Box::new(|gateway| Box::pin(publish_case(&raw, &gw, &queue, n, gateway, false))),
        ),
        (
            "publish_persistent_confirms_1000_in_flight",
            Box::new(|gateway| Box::pin(publish_case(&raw, &gw, &queue, n, gateway, true))),
        ),
        (
            "end_to_end_manual_ack_prefetch_500",
            Box::new(|gateway| Box::pin(end_to_end_case(&raw, &raw, &gw, &queue, n, gateway))),
        ),
    ];
    for (name, case) in &cases {
        let mut best = [0f64; 2];
        for round in 0..opts.rounds.max(1) {
            for (side, gateway) in [(0, false), (1, true)] {
                progress(&format!(
                    "{name}: {} round {}",
                    if gateway { "gateway" } else { "raw" },
                    round + 1
                ));
                let took = case(gateway).await?;
                let rate = n as f64 / took.as_secs_f64();
                best[side] = best[side].max(rate);
                purge(&raw, &queue).await?;
            }
        }
        scenarios.push(ScenarioResult {
            name: (*name).to_owned(),
            raw_msgs_per_s: best[0].round(),
            gateway_msgs_per_s: best[1].round(),
            ratio: (best[1] / best[0] * 100.0).round() / 100.0,
        });
    }
    drop(cases);
    let _ = setup.queue_delete(QueueDeleteArguments::new(&queue)).await;
    let _ = raw.close().await;
    gw.close().await;
    Ok(Report {
        scenarios,
        latencies: Vec::new(),
    })
}

fn raw_err(e: amqprs::error::Error) -> Error {
    Error::new(ErrorKind::Channel, "raw client").with_source(e)
}

async fn open_raw(ep: &Endpoint) -> Result<RawConnection> {
    let args = OpenConnectionArguments::new(&ep.host, ep.port, &ep.user, &ep.password)
        .virtual_host(&ep.vhost)
        .connection_name("rabbitry-bench-raw")
        .finish();
    RawConnection::open(&args).await.map_err(|e| {
        Error::new(ErrorKind::Connect, format!("{}: raw client", ep.address())).with_source(e)
    })
}

async fn purge(raw: &RawConnection, queue: &str) -> Result<()> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    ch.queue_purge(amqprs::channel::QueuePurgeArguments::new(queue))
        .await
        .map_err(raw_err)?;
    let _ = ch.close().await;
    Ok(())
}

/// Without confirms, publishing "ends" when the broker has every message:
/// polls the queue's depth on a separate channel.
async fn wait_for_depth(raw: &RawConnection, queue: &str, n: usize) -> Result<()> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    loop {
        let depth = ch
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await
            .map_err(raw_err)?
            .map_or(0, |(_, m, _)| m as usize);
        if depth >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let _ = ch.close().await;
    Ok(())
}

/// Counts confirms for the raw publisher and frees a permit for each.
struct RawConfirms {
    acked: Arc<AtomicU64>,
    permits: Arc<Semaphore>,
    done: Arc<Notify>,
    target: u64,
}

#[async_trait::async_trait]
impl ChannelCallback for RawConfirms {
    async fn close(
        &mut self,
        _: &Channel,
        _: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(
        &mut self,
        _: &Channel,
        _: Cancel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(
        &mut self,
        _: &Channel,
        active: bool,
    ) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        let prev = self.acked.load(Ordering::Relaxed);
        let now = if ack.mutiple() {
            ack.delivery_tag()
        } else {
            prev + 1
        };
        self.acked.store(now, Ordering::Relaxed);
        self.permits.add_permits((now - prev) as usize);
        if now >= self.target {
            self.done.notify_one();
        }
    }
    async fn publish_nack(&mut self, _: &Channel, _: Nack) {}
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

async fn publish_case(
    raw: &RawConnection,
    gw: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
    confirms: bool,
) -> Result<Duration> {
    if gateway {
        let mut settings = ProducerSettings::default().routing_key(queue);
        settings.durable = confirms;
        settings.confirms = confirms;
        settings.max_in_flight = 1000;
        settings.message_ids = false;
        let producer = Producer::new(gw, settings).await?;
        let start = Instant::now();
        if confirms {
            let mut set = JoinSet::new();
            for _ in 0..n {
                if set.len() >= 1000 {
                    set.join_next()
                        .await
                        .transpose()
                        .ok()
                        .flatten()
                        .transpose()?;
                }
                let p = producer.clone();
                set.spawn(async move { p.publish(Message::new(vec![b'x'; BODY])).await });
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
            }
        } else {
            for _ in 0..n {
                producer.publish(Message::new(vec![b'x'; BODY])).await?;
            }
            wait_for_depth(raw, queue, n).await?;
        }
        return Ok(start.elapsed());
    }
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    let permits = Arc::new(Semaphore::new(1000));
    let done = Arc::new(Notify::new());
    if confirms {
        ch.register_callback(RawConfirms {
            acked: Arc::default(),
            permits: permits.clone(),
            done: done.clone(),
            target: n as u64,
        })
        .await
        .map_err(raw_err)?;
        ch.confirm_select(ConfirmSelectArguments::default())
            .await
            .map_err(raw_err)?;
    }
    let mut props = BasicProperties::default();
    props.with_delivery_mode(if confirms { 2 } else { 1 });
    let props = props.finish();
    let start = Instant::now();
    for _ in 0..n {
        if confirms {
            permits
                .acquire()
                .await
                .map_err(|e| Error::new(ErrorKind::Closed, "bench").with_source(e))?
                .forget();
        }
        ch.basic_publish(
            props.clone(),
            vec![b'x'; BODY],
            BasicPublishArguments::new("", queue),
        )
        .await
        .map_err(raw_err)?;
    }
    if confirms {
        done.notified().await;
    } else {
        wait_for_depth(raw, queue, n).await?;
    }
    let took = start.elapsed();
    let _ = ch.close().await;
    Ok(took)
}

async fn end_to_end_case(
    raw: &RawConnection,
    raw_publisher: &RawConnection,
    gw: &Connection,
    queue: &str,
    n: usize,
    gateway: bool,
) -> Result<Duration> {
    if gateway {
        let mut cs = ConsumerSettings::new(queue);
        cs.auto_declare = false;
        cs.prefetch_count = Some(500);
        let mut consumer = Consumer::start(gw, cs).await?;
        let mut ps = ProducerSettings::default().routing_key(queue);
        ps.durable = false;
        ps.confirms = false;
        ps.message_ids = false;
        let producer = Producer::new(gw, ps).await?;
        let start = Instant::now();
        let publisher = tokio::spawn(async move {
            for _ in 0..n {
                producer.publish(Message::new(vec![b'x'; BODY])).await?;
            }
            Ok::<_, Error>(())
        });
        for _ in 0..n {
            let d = consumer
                .next()
                .await
                .ok_or_else(|| Error::new(ErrorKind::Closed, "bench consumer stopped"))?;
            d.ack().await?;
        }
        let took = start.elapsed();
        publisher
            .await
            .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
        consumer.cancel().await;
        return Ok(took);
    }
    let cch = raw.open_channel(None).await.map_err(raw_err)?;
    cch.basic_qos(BasicQosArguments::new(0, 500, false))
        .await
        .map_err(raw_err)?;
    let (tag, mut rx) = cch
        .basic_consume_rx(
            BasicConsumeArguments::new(queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    let pch = raw_publisher.open_channel(None).await.map_err(raw_err)?;
    let queue_owned = queue.to_owned();
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        let mut props = BasicProperties::default();
        props.with_delivery_mode(1);
        let props = props.finish();
        for _ in 0..n {
            pch.basic_publish(
                props.clone(),
                vec![b'x'; BODY],
                BasicPublishArguments::new("", &queue_owned),
            )
            .await
            .map_err(raw_err)?;
        }
        Ok::<_, Error>(pch)
    });
    for _ in 0..n {
        let m = rx
            .recv()
            .await
            .ok_or_else(|| Error::new(ErrorKind::Closed, "raw consumer stopped"))?;
        let tag = m.deliver.map(|d| d.delivery_tag()).unwrap_or_default();
        cch.basic_ack(BasicAckArguments::new(tag, false))
            .await
            .map_err(raw_err)?;
    }
    let took = start.elapsed();
    let pch = publisher
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "bench task").with_source(e))??;
    let _ = cch
        .basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await;
    let _ = cch.close().await;
    let _ = pch.close().await;
    Ok(took)
}
