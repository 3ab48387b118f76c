//! `rabbitry demo`: the seed's whole system, every part its own process;
//! and `rabbitry demo-part`, how the demo starts each part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rabbitry::worker::shutdown_signal;
use rabbitry_demo::{names, Common, Part};

use super::Global;
use crate::exit::usage;

/// Run two sites, their web processes and workers, and a PDF service.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The front door's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Use this PostgreSQL database (one schema per site) instead of SQLite.
    #[arg(long)]
    database: Option<String>,
    /// Where the sites' SQLite databases live.
    #[arg(long = "data-dir", default_value = ".data/demo")]
    data_dir: PathBuf,
    /// Prefix of the demo's queue names and routing keys (default: derived
    /// from the data folder, so two demos on one broker never share queues).
    #[arg(long)]
    instance: Option<String>,
}

/// One part of the demo (started by `rabbitry demo`).
#[derive(clap::Args)]
pub(crate) struct PartArgs {
    /// web, worker or service.
    part: String,
    #[arg(long)]
    site: Option<String>,
    /// PostgreSQL URL; passed in the environment, not on the command line.
    #[arg(long, env = rabbitry_demo::run::DATABASE_ENV, hide_env_values = true)]
    database: Option<String>,
    #[arg(long = "data-dir")]
    data_dir: PathBuf,
    #[arg(long)]
    instance: String,
    /// Stop when stdin closes (the parent demo process went away).
    #[arg(long = "watch-stdin")]
    watch_stdin: bool,
}

fn amqp_url(global: &Global) -> Result<String> {
    let settings = global.settings()?;
    Ok(settings.connection(rabbitry::defaults::CONNECTION)?.urls[0].clone())
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if let Some(db) = &args.database {
        if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
            usage!(
                "--database `{}`: expected a postgres:// URL (without it, the demo uses SQLite files in --data-dir)",
                rabbitry::connection::redact(db)
            );
        }
    }
    let data_dir = std::path::absolute(&args.data_dir).unwrap_or(args.data_dir);
    let instance = match args.instance {
        Some(instance) => instance,
        None => names::default_instance(&data_dir)
            .with_context(|| format!("the demo's instance file in {}", data_dir.display()))?,
    };
    let common = Common {
        amqp_url: amqp_url(global)?,
        database: args.database,
        data_dir,
        instance: instance.clone(),
    };
    let exe = std::env::current_exe().context("finding the rabbitry executable")?;
    let n = names::Names::new(&instance);
    rabbitry_demo::run_demo(
        exe,
        common,
        args.listen,
        |addr| {
            // The demo's own output going nowhere is no reason to stop it.
            let _ = print_welcome(addr, &instance, &n);
        },
        super::shutdown_requested("demo"),
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

fn print_welcome(addr: SocketAddr, instance: &str, n: &names::Names) -> std::io::Result<()> {
    outln!("rabbitry demo is up (Ctrl-C stops every process):")?;
    for site in rabbitry_demo::SITES {
        outln!("  site {site}: http://{addr}/sites/{site}/")?;
    }
    outln!("  instance: {instance} (its queues start with `{instance}.`)")?;
    outln!("  try:   curl -s -X POST http://{addr}/sites/a/documents -H 'content-type: application/json' -d '{{\"title\":\"Hello World!\"}}'")?;
    outln!(
        "  watch: rabbitry queues {} {} {} {}",
        n.results_queue("a"),
        n.jobs_queue("a"),
        n.feed_queue("b"),
        n.service_queue()
    )
}

pub(crate) async fn run_part(global: &Global, args: PartArgs) -> Result<ExitCode> {
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
    let watch_stdin = args.watch_stdin;
    let shutdown = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = parent_gone(watch_stdin) => {
                eprintln!("the demo process went away; stopping");
            }
        }
    };
    rabbitry_demo::run_part(part, common, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves when stdin reaches its end (with `watch`): the parent holds the
/// other end of the pipe, and the kernel closes it when the parent dies.
async fn parent_gone(watch: bool) {
    if !watch {
        return std::future::pending().await;
    }
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        match tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
