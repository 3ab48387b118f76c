//! `bench --only cluster`, on the local three-node cluster of
//! `scripts/cluster`: confirmed publishing and end to end through a quorum
//! queue, raw against gateway; then failover, round by round: the node a
//! gateway connection is on is SIGKILLed, and the time until the first
//! confirmed publish and the first delivery on another node is measured,
//! with the default heartbeat and backoff settings.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use rabbitry::connection::{Connection, ConnectionSettings};
use rabbitry::{
    Consumer, ConsumerSettings, Error, ErrorKind, Message, Producer, ProducerSettings, QueueType,
    Result,
};

use super::{run_cases, BenchOptions, Cases, Progress, ScenarioResult};

/// The nodes of `scripts/cluster`.
pub(crate) fn urls() -> Vec<String> {
    (1..=3)
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n))
        .collect()
}

/// How long one failover may take before the round is given up.
const FAILOVER_LIMIT: Duration = Duration::from_secs(60);

/// One failover measurement over the rounds, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FailoverResult {
    /// What was measured.
    pub name: String,
    /// Rounds.
    pub rounds: usize,
    /// Median of the rounds.
    pub median_ms: f64,
    /// The slowest round.
    pub worst_ms: f64,
}

/// `scripts/cluster`, run from the bench.
struct Script(PathBuf);

impl Script {
    async fn run(&self, args: &[&str]) -> Result<String> {
        let path = self.0.clone();
        let owned: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let what = format!("{} {}", path.display(), owned.join(" "));
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&path).args(&owned).output()
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Closed, "the cluster script's task").with_source(e))?
        .map_err(|e| Error::new(ErrorKind::Invalid, format!("cannot run {what}")).with_source(e))?;
        if !out.status.success() {
            return Err(Error::new(
                ErrorKind::Connect,
                format!(
                    "{what} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// Runs the cluster group: throughput on a quorum queue of node 1, then
/// `failover_rounds` rounds of killing a connection's node. Starts the
/// cluster with `script` when it is down, and stops it again afterwards.
pub(crate) async fn run_cluster(
    opts: &BenchOptions,
    progress: Progress<'_>,
    script: &Path,
    failover_rounds: usize,
) -> Result<(Vec<ScenarioResult>, Vec<FailoverResult>)> {
    let script = Script(script.to_path_buf());
    let was_down = script.run(&["status"]).await?.contains("down");
    if was_down {
        progress("cluster: starting it with the script");
        script.run(&["start"]).await?;
    }
    let result = measure(opts, progress, &script, failover_rounds).await;
    if was_down {
        let _ = script.run(&["stop"]).await;
    }
    result
}

async fn measure(
    opts: &BenchOptions,
    progress: Progress<'_>,
    script: &Script,
    failover_rounds: usize,
) -> Result<(Vec<ScenarioResult>, Vec<FailoverResult>)> {
    let on_node_one = BenchOptions {
        url: urls()[0].clone(),
        ..opts.clone()
    };
    let cases = Cases {
        prefix: "cluster_quorum_",
        quorum: true,
        single_connection_cases: false,
    };
    let scenarios = run_cases(&on_node_one, progress, &cases).await?;
    let (mut confirms, mut deliveries) = (Vec::new(), Vec::new());
    for round in 1..=failover_rounds {
        progress(&format!("cluster failover: round {round}"));
        let (confirm, delivery) = failover_round(script).await?;
        confirms.push(confirm);
        deliveries.push(delivery);
    }
    let summary = |name: &str, mut xs: Vec<Duration>| {
        xs.sort();
        let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        let median = match xs.len() {
            0 => Duration::ZERO,
            n if n % 2 == 1 => xs[n / 2],
            n => (xs[n / 2 - 1] + xs[n / 2]) / 2,
        };
        FailoverResult {
            name: name.to_owned(),
            rounds: xs.len(),
            median_ms: ms(median),
            worst_ms: ms(xs.last().copied().unwrap_or_default()),
        }
    };
    Ok((
        scenarios,
        vec![
            summary("failover_kill_to_first_confirm", confirms),
            summary("failover_kill_to_first_delivery", deliveries),
        ],
    ))
}

/// When something first happened on a connection after a kill.
#[derive(Default)]
struct Firsts {
    confirm: Option<Instant>,
    delivery: Option<Instant>,
    confirms_before: usize,
    deliveries_before: usize,
}

/// One round: a connection over the three nodes (default settings, one
/// connection for publishing and consuming) publishes one message at a
/// time to a quorum queue and consumes it; the node it is on is killed;
/// returns the time from the kill to the first confirm and to the first
/// delivery on the new connection. The node is revived before returning.
async fn failover_round(script: &Script) -> Result<(Duration, Duration)> {
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let name = format!("rabbitry-bench-failover-{id}");
    let queue = format!("rabbitry.bench.failover.{id}");
    let mut settings = ConnectionSettings::new(urls()[0].clone()).name(&name);
    settings.urls = urls();
    settings.separate_publishing = false;
    let conn = Connection::open(settings).await?;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue)).await?;
    let mut consumer = Consumer::start(
        &conn,
        ConsumerSettings::new(&queue).queue_type(QueueType::Quorum),
    )
    .await?;
    // Which socket generation was killed; `None` until the kill.
    let killed: Arc<Mutex<Option<u64>>> = Arc::default();
    let firsts: Arc<Mutex<Firsts>> = Arc::default();
    let after_kill = |killed: &Mutex<Option<u64>>, conn: &Connection| {
        killed
            .lock()
            .expect("not poisoned")
            .is_some_and(|g| conn.generation() > g)
    };
    let publishing = tokio::spawn({
        let (conn, killed, firsts) = (conn.clone(), killed.clone(), firsts.clone());
        async move {
            loop {
                if producer.publish(Message::new("x")).await.is_ok() {
                    let mut f = firsts.lock().expect("not poisoned");
                    if after_kill(&killed, &conn) {
                        f.confirm.get_or_insert_with(Instant::now);
                    } else {
                        f.confirms_before += 1;
                    }
                }
            }
        }
    });
    let consuming = tokio::spawn({
        let (conn, killed, firsts) = (conn.clone(), killed.clone(), firsts.clone());
        async move {
            while let Some(d) = consumer.next().await {
                let _ = d.ack().await;
                let mut f = firsts.lock().expect("not poisoned");
                if after_kill(&killed, &conn) {
                    f.delivery.get_or_insert_with(Instant::now);
                } else {
                    f.deliveries_before += 1;
                }
            }
        }
    });
    let flowing = || {
        let f = firsts.lock().expect("not poisoned");
        f.confirms_before >= 100 && f.deliveries_before >= 100
    };
    wait_until(Duration::from_secs(30), flowing).await?;
    let node = script.run(&["connection", &name]).await?;
    *killed.lock().expect("not poisoned") = Some(conn.generation());
    let killed_at = Instant::now();
    script.run(&["kill", &node]).await?;
    let done = || {
        let f = firsts.lock().expect("not poisoned");
        f.confirm.is_some() && f.delivery.is_some()
    };
    let waited = wait_until(FAILOVER_LIMIT, done).await;
    publishing.abort();
    consuming.abort();
    script.run(&["revive", &node]).await?;
    let _ = conn.delete_queue(&queue).await;
    conn.close().await;
    waited.map_err(|_| {
        Error::new(
            ErrorKind::Timeout,
            format!("no confirm and delivery on another node within {FAILOVER_LIMIT:?} of killing node {node}"),
        )
    })?;
    let f = firsts.lock().expect("not poisoned");
    let since = |t: Option<Instant>| t.map(|t| t - killed_at).unwrap_or(FAILOVER_LIMIT);
    Ok((since(f.confirm), since(f.delivery)))
}

/// Polls `cond` every 10 ms for at most `limit`.
async fn wait_until(limit: Duration, cond: impl Fn() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(Error::new(
                ErrorKind::Timeout,
                "cluster bench: waited too long",
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
