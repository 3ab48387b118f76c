//! The benchmark behind `rabbitry-bench`: the raw AMQP client and the
//! gateway, on the same scenarios, in the same process and run.
//!
//! Each scenario runs raw, gateway, raw, gateway... and reports each side's
//! median rate, the spread of its rounds (a ratio whose rounds disagree by
//! more than 15 % is flagged as unstable), and the process's CPU time per
//! 100,000 messages. Bodies are 256 bytes. The raw side uses `amqprs` directly with the least code that does
//! the same work; the gateway side uses [`Producer`] and [`Consumer`].

mod cluster;
mod http;
mod instructions;
mod memory;
mod observability;
mod order;
mod outbox;
mod peers;
mod publishing;
mod rpc;
mod worker;

pub(crate) use cluster::run_cluster;
pub(crate) use http::run_http;
pub(crate) use instructions::{run_instructions, workload};
pub(crate) use memory::run_memory;
pub(crate) use observability::run_observability;
pub(crate) use order::{run_foreign_relay, run_partitions, run_schedule_lateness};
pub(crate) use outbox::run_outbox;
pub(crate) use peers::run_peers;
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

/// One scenario's result: each side's median rate over the rounds, how
/// much the rounds disagree, and the client's CPU time per 100,000
/// messages.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ScenarioResult {
    /// Scenario name.
    pub name: String,
    /// Messages per second with the raw client (median of the rounds).
    pub raw_msgs_per_s: f64,
    /// Messages per second through the gateway (median of the rounds).
    pub gateway_msgs_per_s: f64,
    /// gateway / raw, of the medians.
    pub ratio: f64,
    /// (fastest − slowest) / median of the raw rounds.
    pub raw_spread: f64,
    /// (fastest − slowest) / median of the gateway rounds.
    pub gateway_spread: f64,
    /// CPU seconds (user + system, this process) per 100,000 messages,
    /// raw client (median).
    pub raw_cpu_s_per_100k: f64,
    /// The same through the gateway.
    pub gateway_cpu_s_per_100k: f64,
    /// Rounds per side.
    pub rounds: usize,
    /// Whether both sides' rounds agree within [`STABLE_SPREAD`]; an
    /// unstable ratio is flagged, not reported as a result.
    pub stable: bool,
}

/// The largest spread of a side's rounds for its ratio to count as a
/// result: 15 %.
pub(crate) const STABLE_SPREAD: f64 = 0.15;

/// The longest one round may take.
const ROUND_LIMIT: Duration = Duration::from_secs(600);

/// CPU time this process has used, every thread, user and system: fields
/// 14 and 15 of `/proc/self/stat`, in the kernel's fixed 100 ticks per
/// second. Zero where there is no `/proc`.
pub(crate) fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // `rest` starts at field 3, so utime (14) and stime (15) are 11 and 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// Each side's rounds of one scenario, raw and gateway interleaved.
#[derive(Debug, Default)]
pub(crate) struct Rounds {
    rates: [Vec<f64>; 2],
    cpu_per_100k: [Vec<f64>; 2],
}

impl Rounds {
    /// Runs `work`, which handles `messages` and returns how long that
    /// took, as one round of the raw side or the gateway's.
    pub(crate) async fn measure(
        &mut self,
        gateway: bool,
        messages: usize,
        work: impl std::future::Future<Output = Result<Duration>>,
    ) -> Result<()> {
        let cpu = cpu_time();
        // The raw client waits for ever for confirms of a connection that
        // died; a round that takes this long has lost its broker.
        let took = tokio::time::timeout(ROUND_LIMIT, work)
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("a round did not finish within {ROUND_LIMIT:?}: was the broker (or a node) lost?"),
                )
            })??;
        self.record(gateway, messages, took, cpu_time().saturating_sub(cpu));
        Ok(())
    }

    /// Records one round measured elsewhere.
    pub(crate) fn record(&mut self, gateway: bool, messages: usize, took: Duration, cpu: Duration) {
        let side = usize::from(gateway);
        self.rates[side].push(messages as f64 / took.as_secs_f64().max(1e-9));
        self.cpu_per_100k[side].push(cpu.as_secs_f64() * 100_000.0 / messages.max(1) as f64);
    }

    /// The scenario's result.
    pub(crate) fn result(&self, name: impl Into<String>) -> ScenarioResult {
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        let [raw, gateway] = [&self.rates[0], &self.rates[1]].map(|r| median_of(r));
        let [raw_spread, gateway_spread] = [&self.rates[0], &self.rates[1]].map(|r| spread(r));
        let [raw_cpu, gateway_cpu] =
            [&self.cpu_per_100k[0], &self.cpu_per_100k[1]].map(|c| median_of(c));
        ScenarioResult {
            name: name.into(),
            raw_msgs_per_s: raw.round(),
            gateway_msgs_per_s: gateway.round(),
            ratio: round2(gateway / raw.max(1e-9)),
            raw_spread: round2(raw_spread),
            gateway_spread: round2(gateway_spread),
            raw_cpu_s_per_100k: round2(raw_cpu),
            gateway_cpu_s_per_100k: round2(gateway_cpu),
            rounds: self.rates[0].len().min(self.rates[1].len()),
            stable: raw_spread <= STABLE_SPREAD && gateway_spread <= STABLE_SPREAD,
        }
    }
}

/// The median of `xs` (0 for none).
fn median_of(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// (largest − smallest) / median: how much the rounds disagree.
fn spread(xs: &[f64]) -> f64 {
    let m = median_of(xs);
    if xs.is_empty() || m == 0.0 {
        return 0.0;
    }
    let (lo, hi) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    (hi - lo) / m
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
    /// Failover times on the cluster, when that group ran.
    pub failovers: Vec<cluster::FailoverResult>,
    /// Instructions per message, with `--instructions`.
    pub instructions: Vec<instructions::InstructionCount>,
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
    /// Rounds per side (the median is reported).
    pub rounds: usize,
}

/// A named measurement, for progress output.
pub(crate) type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// Runs every scenario and returns the rates and ratios.
pub(crate) async fn run(opts: &BenchOptions, progress: Progress<'_>) -> Result<Report> {
    let scenarios = run_cases(opts, progress, &Cases::all()).await?;
    Ok(Report {
        scenarios,
        ..Report::default()
    })
}

/// Which publishing and end-to-end scenarios to run, on what queue.
pub(crate) struct Cases {
    /// Prefixed to each scenario's name.
    pub prefix: &'static str,
    /// The queue is a quorum queue (a classic one otherwise); end to end,
    /// publishes are then confirmed.
    pub quorum: bool,
    /// Publishing without confirms, and end to end on one connection.
    pub single_connection_cases: bool,
}

impl Cases {
    fn all() -> Cases {
        Cases {
            prefix: "",
            quorum: false,
            single_connection_cases: true,
        }
    }
}

/// Runs the publishing and end-to-end scenarios `cases` selects against
/// `opts.url`: raw and gateway interleaved, round by round.
pub(crate) async fn run_cases(
    opts: &BenchOptions,
    progress: Progress<'_>,
    cases: &Cases,
) -> Result<Vec<ScenarioResult>> {
    let sides = Sides::open(&opts.url, "core", cases.quorum).await?;
    let Sides {
        raw,
        raw_publisher,
        gw,
        gw_publisher,
        queue,
        ..
    } = &sides;
    if cases.quorum {
        // A new quorum queue may nack its first publishes while it elects
        // a leader: wait until it takes one (the gateway publishes a
        // nacked message again), so that no round starts before.
        let producer = rabbitry::Producer::new(
            gw,
            rabbitry::ProducerSettings::default().routing_key(queue.as_str()),
        )
        .await?;
        producer.publish(rabbitry::Message::new("warm-up")).await?;
        purge(raw, queue).await?;
    }

    let n = opts.messages;
    // Quorum queues are published to with confirms, end to end too.
    let confirmed = cases.quorum;
    let mut scenarios = Vec::new();
    type Run<'r> = Box<
        dyn Fn(bool) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Duration>> + 'r>>
            + 'r,
    >;
    let mut all: Vec<(&str, bool, Run<'_>)> = vec![
        (
            "publish_transient_no_confirms",
            true,
            Box::new(|gateway| Box::pin(publish_case(raw, gw, queue, n, gateway, false))),
        ),
        (
            "publish_persistent_confirms_1000_in_flight",
            false,
            Box::new(|gateway| Box::pin(publish_case(raw, gw, queue, n, gateway, true))),
        ),
        (
            "end_to_end_manual_ack_prefetch_500",
            true,
            Box::new(|gateway| {
                Box::pin(end_to_end_case(
                    raw, raw, gw, gw, queue, n, gateway, confirmed,
                ))
            }),
        ),
        (
            "end_to_end_two_connections",
            false,
            Box::new(|gateway| {
                Box::pin(end_to_end_case(
                    raw,
                    raw_publisher,
                    gw,
                    gw_publisher,
                    queue,
                    n,
                    gateway,
                    confirmed,
                ))
            }),
        ),
    ];
    all.retain(|(_, single, _)| cases.single_connection_cases || !single);
    for (name, _, case) in &all {
        let name = format!("{}{name}", cases.prefix);
        let mut rounds = Rounds::default();
        for round in 0..opts.rounds.max(1) {
            for gateway in [false, true] {
                progress(&format!(
                    "{name}: {} round {}",
                    if gateway { "gateway" } else { "raw" },
                    round + 1
                ));
                rounds.measure(gateway, n, case(gateway)).await?;
                purge(raw, queue).await?;
            }
        }
        scenarios.push(rounds.result(name));
    }
    drop(all);
    sides.close().await;
    Ok(scenarios)
}

/// Both sides' two connections (consuming, publishing) and a durable
/// queue of the scenario's own, for the end-to-end cases run outside
/// [`run_cases`].
pub(crate) struct Sides {
    pub raw: RawConnection,
    pub raw_publisher: RawConnection,
    pub gw: Connection,
    pub gw_publisher: Connection,
    pub queue: String,
    setup: amqprs::channel::Channel,
}

impl Sides {
    /// Opens the four connections, named after `what`, and declares
    /// `rabbitry.bench.<what>.<8 hex>` (a quorum queue when `quorum`).
    pub(crate) async fn open(url: &str, what: &str, quorum: bool) -> Result<Sides> {
        let ep = Endpoint::parse(url)?;
        let raw = open_raw(&ep).await?;
        let raw_publisher = open_raw(&ep).await?;
        let settings = ConnectionSettings::new(url).name(format!("rabbitry-bench-{what}"));
        let gw = Connection::open(settings.clone()).await?;
        let gw_publisher =
            Connection::open(settings.name(format!("rabbitry-bench-{what}-publisher"))).await?;
        let queue = format!(
            "rabbitry.bench.{what}.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let setup = raw.open_channel(None).await.map_err(raw_err)?;
        let mut declare = QueueDeclareArguments::new(&queue);
        declare.durable(true);
        if quorum {
            let mut arguments = amqprs::FieldTable::new();
            arguments.insert(
                "x-queue-type".try_into().expect("a short name"),
                amqprs::FieldValue::S("quorum".try_into().expect("a short value")),
            );
            declare.arguments(arguments);
        }
        setup
            .queue_declare(declare.finish())
            .await
            .map_err(raw_err)?;
        Ok(Sides {
            raw,
            raw_publisher,
            gw,
            gw_publisher,
            queue,
            setup,
        })
    }

    /// Empties the queue between rounds.
    pub(crate) async fn purge(&self) -> Result<()> {
        purge(&self.raw, &self.queue).await
    }

    /// One end-to-end round of one side.
    pub(crate) async fn end_to_end(&self, n: usize, gateway: bool) -> Result<Duration> {
        end_to_end_case(
            &self.raw,
            &self.raw_publisher,
            &self.gw,
            &self.gw_publisher,
            &self.queue,
            n,
            gateway,
            false,
        )
        .await
    }

    /// Deletes the queue and closes the connections.
    pub(crate) async fn close(self) {
        let _ = self
            .setup
            .queue_delete(QueueDeleteArguments::new(&self.queue))
            .await;
        let _ = self.raw_publisher.close().await;
        let _ = self.raw.close().await;
        self.gw_publisher.close().await;
        self.gw.close().await;
    }
}

/// A durable queue for one scenario: `rabbitry.bench.<what>.<8 hex>`.
async fn bench_queue(gw: &Connection, what: &str) -> Result<String> {
    let queue = format!(
        "rabbitry.bench.{what}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut topology = rabbitry::topology::Topology::default();
    topology.queue(rabbitry::topology::Queue::durable(&queue));
    gw.declare_once(&topology).await?;
    Ok(queue)
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

/// Raw consume with manual acks and a prefetch of 500, as every raw side
/// of the benchmark consumes: the channel, the consumer tag, the messages.
async fn raw_consume(
    raw: &RawConnection,
    queue: &str,
) -> Result<(
    amqprs::channel::Channel,
    String,
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
)> {
    let ch = raw.open_channel(None).await.map_err(raw_err)?;
    ch.basic_qos(amqprs::channel::BasicQosArguments::new(0, 500, false))
        .await
        .map_err(raw_err)?;
    let (tag, rx) = ch
        .basic_consume_rx(
            amqprs::channel::BasicConsumeArguments::new(queue, "")
                .manual_ack(true)
                .finish(),
        )
        .await
        .map_err(raw_err)?;
    Ok((ch, tag, rx))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_report_medians_spreads_and_stability() {
        let mut r = Rounds::default();
        let secs = Duration::from_secs;
        for (raw, gw) in [(10, 20), (11, 21), (9, 19)] {
            r.record(false, 1000, Duration::from_millis(raw * 10), secs(1));
            r.record(true, 1000, Duration::from_millis(gw * 10), secs(2));
        }
        let s = r.result("x");
        assert_eq!(s.raw_msgs_per_s, 10_000.0);
        assert_eq!(s.gateway_msgs_per_s, 5_000.0);
        assert_eq!(s.ratio, 0.5);
        assert_eq!(s.rounds, 3);
        assert_eq!(s.raw_cpu_s_per_100k, 100.0);
        assert_eq!(s.gateway_cpu_s_per_100k, 200.0);
        assert!(s.raw_spread > 0.15 && !s.stable, "{s:?}");

        let mut steady = Rounds::default();
        for _ in 0..3 {
            steady.record(false, 100, secs(1), secs(0));
            steady.record(true, 100, secs(1), secs(0));
        }
        let s = steady.result("y");
        assert!(s.stable && s.raw_spread == 0.0, "{s:?}");
    }

    #[test]
    fn cpu_time_grows_with_work() {
        let before = cpu_time();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(50) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert!(x != 1);
        assert!(cpu_time() > before, "the busy loop used CPU time");
    }
}
