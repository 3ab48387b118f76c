//! The benchmark behind `rabbitry bench`: the raw AMQP client and the
//! gateway, on the same scenarios, in the same process and run.
//!
//! Each scenario runs raw, gateway, raw, gateway, and keeps each side's best
//! rate, so one noisy moment does not decide the ratio. Bodies are 256
//! bytes. The raw side uses `amqprs` directly with the least code that does
//! the same work; the gateway side uses [`Producer`] and [`Consumer`].

mod outbox;
mod publishing;
mod rpc;
mod worker;

pub(crate) use outbox::run_outbox;
use publishing::{end_to_end_case, publish_case};
pub(crate) use rpc::run_rpc;
pub(crate) use worker::run_worker;

use std::time::Duration;

use amqprs::channel::{QueueDeclareArguments, QueueDeleteArguments};
use amqprs::connection::{Connection as RawConnection, OpenConnectionArguments};
use serde::Serialize;

use rabbitry::connection::{Connection, ConnectionSettings, Endpoint};
use rabbitry::{Error, ErrorKind, Result};

const BODY: usize = 256;

/// One scenario's result.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioResult {
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
pub(crate) struct LatencyResult {
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
pub(crate) struct Report {
    /// Every throughput scenario, in order.
    pub scenarios: Vec<ScenarioResult>,
    /// Every latency measurement, in order.
    pub latencies: Vec<LatencyResult>,
}

/// The p-th percentile (0..=100) of `samples` in milliseconds.
pub(crate) fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    (samples[rank.min(samples.len() - 1)].as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0
}

/// What to run.
#[derive(Debug, Clone)]
pub(crate) struct BenchOptions {
    /// Broker URL.
    pub url: String,
    /// Messages per scenario run.
    pub messages: usize,
    /// Rounds per side (best is kept).
    pub rounds: usize,
}

/// A named measurement, for progress output.
pub(crate) type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs every scenario and returns the rates and ratios.
pub(crate) async fn run(opts: &BenchOptions, progress: Progress<'_>) -> Result<Report> {
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

fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    s.get(s.len() / 2).copied().unwrap_or_default()
}
