//! `rabbitry demo`: the seed's whole system, every part its own process;
//! and `rabbitry demo-part`, how the demo starts each part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rabbitry::worker::shutdown_signal;
use rabbitry_demo::{Common, Part};

use super::Global;

/// Run two sites, their web processes and workers, and a PDF service.
#[derive(clap::Args)]
pub struct Args {
    /// The front door's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Use this PostgreSQL database (one schema per site) instead of SQLite.
    #[arg(long)]
    database: Option<String>,
    /// Where the sites' SQLite databases live.
    #[arg(long = "data-dir", default_value = ".data/demo")]
    data_dir: PathBuf,
    /// Prefix of the demo's queue names and routing keys.
    #[arg(long, default_value = "demo", hide = true)]
    instance: String,
}

/// One part of the demo (started by `rabbitry demo`).
#[derive(clap::Args)]
pub struct PartArgs {
    /// web, worker or service.
    part: String,
    #[arg(long)]
    site: Option<String>,
    #[arg(long)]
    database: Option<String>,
    #[arg(long = "data-dir")]
    data_dir: PathBuf,
    #[arg(long)]
    instance: String,
}

fn amqp_url(global: &Global) -> Result<String> {
    let settings = global.settings()?;
    Ok(settings
        .connection(rabbitry::config::DEFAULT_CONNECTION)?
        .urls[0]
        .clone())
}

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let common = Common {
        amqp_url: amqp_url(global)?,
        database: args.database,
        data_dir: std::path::absolute(&args.data_dir).unwrap_or(args.data_dir),
        instance: args.instance,
    };
    let exe = std::env::current_exe().context("finding the rabbitry executable")?;
    rabbitry_demo::run_demo(
        exe,
        common,
        args.listen,
        |addr| {
            println!("rabbitry demo is up (Ctrl-C stops every process):");
            for site in rabbitry_demo::SITES {
                println!("  site {site}: http://{addr}/sites/{site}/");
            }
            println!("  try:   curl -s -X POST http://{addr}/sites/a/documents -H 'content-type: application/json' -d '{{\"title\":\"Hello World!\"}}'");
            println!("  watch: rabbitry queues demo.site-a.results demo.site-a.jobs demo.site-b.feed demo.service.pdf");
        },
        shutdown_signal(),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

pub async fn run_part(global: &Global, args: PartArgs) -> Result<ExitCode> {
    let site = || {
        args.site
            .clone()
            .context("--site is required for this part")
    };
    let part = match args.part.as_str() {
        "web" => Part::Web { site: site()? },
        "worker" => Part::Worker { site: site()? },
        "service" => Part::Service,
        other => {
            anyhow::bail!("unknown demo part `{other}`, expected one of: web, worker, service")
        }
    };
    let common = Common {
        amqp_url: amqp_url(global)?,
        database: args.database,
        data_dir: args.data_dir,
        instance: args.instance,
    };
    rabbitry_demo::run_part(part, common, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
