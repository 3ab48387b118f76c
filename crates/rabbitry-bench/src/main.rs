//! `rabbitry-bench`: the gateway against the raw client, in one run.
//!
//! A workspace binary of its own, so that the installed `rabbitry` command
//! carries neither the benchmark nor raw amqprs. `scripts/bench` builds it
//! in release mode and runs it; its tests run it as a process.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

mod bench;

use bench::{BenchOptions, Report};

/// Writes a line to stdout; a closed stdout is an error the caller sees.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, $($arg)*).and_then(|()| out.flush())
    }};
}

/// The benchmark's groups, for `--only`.
const GROUPS: [&str; 10] = [
    "core",
    "worker",
    "observability",
    "http",
    "outbox",
    "order",
    "rpc",
    "cluster",
    "peers",
    "memory",
];

/// Benchmark the gateway against raw amqprs on the same scenarios.
#[derive(Parser)]
#[command(name = "rabbitry-bench", version)]
struct Args {
    /// The broker (`AMQP_URL` when set).
    #[arg(long, env = "AMQP_URL", default_value = rabbitry::defaults::URL, hide_env_values = true)]
    url: String,
    /// Print {"scenarios":[...],"latencies":[...]} as JSON.
    #[arg(long)]
    json: bool,
    /// Messages per scenario run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    messages: u32,
    /// Rounds per side, raw and gateway interleaved; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Groups to run: core, worker, observability (the worker with metrics
    /// and tracing on against off), http, outbox, order (scheduled
    /// lateness, foreign rows, per-key ordering), rpc, and cluster, which
    /// needs the local three-node cluster of scripts/cluster (it is started
    /// and stopped again when down), and peers (end to end with rabbitry,
    /// raw amqprs and, when Node is installed, amqplib, interleaved), and
    /// memory (the in-memory broker through rabbitry against its own
    /// channel API; no RabbitMQ needed); the last three are not in the
    /// default set (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "core,worker,observability,http,outbox,order,rpc",
        value_parser = clap::builder::PossibleValuesParser::new(GROUPS)
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
    /// Count instructions per message instead of timing (valgrind's
    /// callgrind; `--messages` is then the smaller of two runs, 2000 unless
    /// given): publishing with confirms and end to end, raw and gateway.
    #[arg(long)]
    instructions: bool,
    /// Run one workload and exit (what `--instructions` runs under
    /// callgrind): raw:NAME or gateway:NAME.
    #[arg(long, hide = true)]
    workload: Option<String>,
}

/// Exit code of a usage error, as clap gives for bad flags.
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let wants = |g: &str| args.only.iter().any(|o| o == g);
    if args.metrics && wants("observability") {
        eprintln!("error: --metrics records everything; the observability group compares with and without: leave one out (--only)");
        return ExitCode::from(USAGE);
    }
    let directives = std::env::var("RABBITRY_LOG").unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&directives)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Each cause once: rabbitry's errors include their source.
            let mut text = String::new();
            for cause in e.chain().map(ToString::to_string) {
                if !text.contains(&cause) {
                    text.push_str(if text.is_empty() { "" } else { ": " });
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    let wants = |g: &str| !args.instructions && args.only.iter().any(|o| o == g);
    if args.metrics {
        // Before any connection or consumer makes its handles.
        rabbitry::admin::install_prometheus();
    }
    let url = args.url.clone();
    if let Some(which) = &args.workload {
        bench::workload(&url, which, args.messages as usize).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let opts = BenchOptions {
        url,
        messages: args.messages as usize,
        rounds: args.rounds as usize,
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
    if args.instructions {
        let messages = if std::env::args().any(|a| a == "--messages") {
            args.messages as usize
        } else {
            2000
        };
        let url = args.url.clone();
        report.instructions = tokio::task::spawn_blocking(move || {
            bench::run_instructions(&url, messages, &|step: &str| eprintln!("{step}"))
        })
        .await??;
    } else if wants("core") {
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
    if wants("peers") {
        report
            .scenarios
            .extend(bench::run_peers(&opts, &progress).await?);
    }
    if wants("memory") {
        report
            .scenarios
            .push(bench::run_memory(&opts, &progress).await?);
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
        if !report.scenarios.is_empty() {
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
        if !report.instructions.is_empty() {
            outln!(
                "{:<44} {:>14} {:>14} {:>7}",
                "instructions per message (callgrind)",
                "raw",
                "gateway",
                "ratio"
            )?;
            for c in &report.instructions {
                outln!(
                    "{:<44} {:>14} {:>14} {:>7.2}",
                    c.name,
                    c.raw_per_message,
                    c.gateway_per_message,
                    c.ratio
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
