//! `rabbitry bench`: the gateway against the raw client, in one run.

use std::io::IsTerminal;
use std::process::ExitCode;

use crate::bench::{self, BenchOptions, Report};
use anyhow::Result;

use super::Global;
use crate::exit::usage;

/// Benchmark the gateway against raw amqprs on the same scenarios.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print {"scenarios":[...],"latencies":[...]} as JSON.
    #[arg(long)]
    json: bool,
    /// Messages per scenario run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Rounds per side, raw and gateway interleaved; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Groups to run: core, worker, observability (the worker with metrics
    /// and tracing on against off), http, outbox, order (scheduled
    /// lateness, foreign rows, per-key ordering), rpc, and cluster, which
    /// needs the local three-node cluster of scripts/cluster (it is started
    /// and stopped again when down) and is not in the default set
    /// (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "core,worker,observability,http,outbox,order,rpc"
    )]
    only: Vec<String>,
    /// Databases for the outbox and order groups (default: a temporary SQLite file and
    /// postgres://postgres@127.0.0.1:5432/test).
    #[arg(long = "database")]
    databases: Vec<String>,
    /// The cluster group's script: `start`, `stop`, `status`, `kill N`,
    /// `revive N`, `connection NAME`, as scripts/cluster does them.
    #[arg(long, default_value = "scripts/cluster")]
    cluster_script: std::path::PathBuf,
    /// Record metrics through the Prometheus recorder, as `worker --admin`
    /// does, to compare with a run without.
    #[arg(long)]
    metrics: bool,
    /// Failover rounds of the cluster group: the median and the worst are
    /// reported.
    #[arg(long, default_value_t = 5)]
    failover_rounds: usize,
}

/// The benchmark's groups, for `--only`.
const GROUPS: [&str; 8] = [
    "core",
    "worker",
    "observability",
    "http",
    "outbox",
    "order",
    "rpc",
    "cluster",
];

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if let Some(bad) = args.only.iter().find(|o| !GROUPS.contains(&o.as_str())) {
        usage!(
            "--only: unknown group `{bad}`, expected one of: {}",
            GROUPS.join(", ")
        );
    }
    if args.rounds == 0 || args.messages == 0 {
        usage!("--rounds and --messages must be at least 1");
    }
    let wants = |g: &str| args.only.iter().any(|o| o == g);
    if args.metrics && wants("observability") {
        usage!("--metrics records everything; the observability group compares with and without: leave one out (--only)");
    }
    if args.metrics {
        // Before any connection or consumer makes its handles.
        rabbitry::admin::install_prometheus();
    }
    let settings = global.settings()?;
    let url = settings.connection(rabbitry::defaults::CONNECTION)?.urls[0].clone();
    let opts = BenchOptions {
        url,
        messages: args.messages,
        rounds: args.rounds,
    };
    let tty = std::io::stderr().is_terminal();
    let progress = move |step: &str| {
        if tty {
            eprint!("\r\x1b[2K{step}");
        } else {
            eprintln!("{step}");
        }
    };
    let mut report = Report::default();
    if wants("core") {
        report = bench::run(&opts, &progress).await?;
    }
    if wants("worker") {
        let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
        report
            .scenarios
            .extend(bench::run_worker(&opts, &progress, router).await?);
    }
    if wants("observability") {
        let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
        report
            .scenarios
            .extend(bench::run_observability(&opts, &progress, router).await?);
    }
    let databases = {
        let mut databases = args.databases.clone();
        if databases.is_empty() && (wants("outbox") || wants("order")) {
            let dir = std::env::temp_dir().join(format!("rabbitry-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            databases.push(format!("sqlite://{}/outbox.db", dir.display()));
            databases.push("postgres://postgres@127.0.0.1:5432/test".into());
        }
        databases
    };
    let label = |db: &str| {
        if db.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        }
    };
    let skipped = |what: &str, db: &str, e: rabbitry::Error| {
        eprintln!(
            "\n{what} bench on {} skipped: {e}",
            rabbitry::connection::redact(db)
        );
    };
    if wants("outbox") {
        for db in &databases {
            match bench::run_outbox(&opts, &progress, db, label(db)).await {
                Ok((t, l)) => {
                    report.scenarios.push(t);
                    report.latencies.push(l);
                }
                Err(e) => skipped("outbox", db, e),
            }
        }
    }
    if wants("order") {
        for db in &databases {
            match bench::run_schedule_lateness(&opts, &progress, db, label(db)).await {
                Ok(l) => report.latencies.push(l),
                Err(e) => skipped("scheduled lateness", db, e),
            }
            match bench::run_foreign_relay(&opts, &progress, db, label(db)).await {
                Ok(t) => report.scenarios.push(t),
                Err(e) => skipped("foreign rows", db, e),
            }
        }
        report
            .scenarios
            .push(bench::run_partitions(&opts, &progress).await?);
    }
    if wants("http") {
        report
            .scenarios
            .push(bench::run_http(&opts, &progress).await?);
    }
    if wants("rpc") {
        let (scenarios, latencies) = bench::run_rpc(&opts, &progress).await?;
        report.scenarios.extend(scenarios);
        report.latencies.extend(latencies);
    }
    if wants("cluster") {
        let (scenarios, failovers) =
            bench::run_cluster(&opts, &progress, &args.cluster_script, args.failover_rounds)
                .await?;
        report.scenarios.extend(scenarios);
        report.failovers.extend(failovers);
    }
    if tty {
        eprint!("\r\x1b[2K");
    }
    if args.json {
        outln!("{}", serde_json::to_string(&report)?)?;
    } else {
        outln!(
            "{:<58} {:>10} {:>10} {:>9} {:>13} {:>15}",
            "scenario (median of rounds)",
            "raw msg/s",
            "gateway",
            "ratio",
            "spread raw/gw",
            "CPU-s/100k r/gw"
        )?;
        for s in &report.scenarios {
            // A ratio whose rounds disagree is not a result: say so.
            let ratio = if s.stable {
                format!("{:.2}", s.ratio)
            } else {
                format!("{:.2}?", s.ratio)
            };
            outln!(
                "{:<58} {:>10} {:>10} {:>9} {:>13} {:>15}",
                s.name,
                s.raw_msgs_per_s,
                s.gateway_msgs_per_s,
                ratio,
                format!(
                    "{:.0}%/{:.0}%",
                    s.raw_spread * 100.0,
                    s.gateway_spread * 100.0
                ),
                format!(
                    "{:.2}/{:.2}",
                    s.raw_cpu_s_per_100k, s.gateway_cpu_s_per_100k
                )
            )?;
        }
        if report
            .scenarios
            .iter()
            .any(|s| s.name.starts_with("observed_"))
        {
            outln!("observed_*: \"raw\" is the worker with metrics and tracing off, \"gateway\" with them on (Prometheus recorder, spans to a dropping exporter)")?;
        }
        if report.scenarios.iter().any(|s| !s.stable) {
            outln!(
                "? unstable: a side's rounds disagree by more than {:.0}%; rerun with more --rounds",
                bench::STABLE_SPREAD * 100.0
            )?;
        }
        if !report.latencies.is_empty() {
            outln!()?;
            outln!(
                "{:<44} {:>12} {:>12}",
                "latency (ms)",
                "raw p50/p99",
                "gateway"
            )?;
            for l in &report.latencies {
                let raw = match (l.raw_p50_ms, l.raw_p99_ms) {
                    (Some(a), Some(b)) => format!("{a:.3}/{b:.3}"),
                    _ => "-".into(),
                };
                outln!(
                    "{:<44} {:>12} {:>12}",
                    l.name,
                    raw,
                    format!("{:.3}/{:.3}", l.gateway_p50_ms, l.gateway_p99_ms)
                )?;
            }
        }
        if !report.failovers.is_empty() {
            outln!()?;
            outln!(
                "{:<44} {:>12} {:>12}",
                "failover, gateway (ms)",
                "median",
                "worst"
            )?;
            for f in &report.failovers {
                outln!(
                    "{:<44} {:>12.1} {:>12.1}",
                    format!("{} ({} rounds)", f.name, f.rounds),
                    f.median_ms,
                    f.worst_ms
                )?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
