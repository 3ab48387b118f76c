//! `rabbitry bench`: the gateway against the raw client, in one run.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Result;
use rabbitry::bench::{self, BenchOptions};

use super::Global;

/// Benchmark the gateway against raw amqprs on the same scenarios.
#[derive(clap::Args)]
pub struct Args {
    /// Print {"scenarios":[...]} as JSON.
    #[arg(long)]
    json: bool,
    /// Messages per scenario run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Rounds per side; the best of each is kept.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let url = settings
        .connection(rabbitry::config::DEFAULT_CONNECTION)?
        .urls[0]
        .clone();
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
    let mut report = bench::run(&opts, &progress).await?;
    let router = axum::Router::new().fallback(|| async { axum::http::StatusCode::OK });
    report
        .scenarios
        .extend(bench::run_worker(&opts, &progress, router).await?);
    if tty {
        eprint!("\r\x1b[2K");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{:<44} {:>12} {:>12} {:>7}",
            "scenario", "raw msg/s", "gateway", "ratio"
        );
        for s in &report.scenarios {
            println!(
                "{:<44} {:>12} {:>12} {:>7.2}",
                s.name, s.raw_msgs_per_s, s.gateway_msgs_per_s, s.ratio
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
