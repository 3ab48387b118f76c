//! `rabbitry worker`: run every consumer of a config file, forwarding
//! deliveries to their HTTP handlers, until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::{bail, Result};
use rabbitry::worker::{shutdown_signal, Worker};

use super::Global;

/// Run the consuming server for a config file.
#[derive(clap::Args)]
pub struct Args {
    /// Substituted for ${site} in queue names, routing keys and consumer names.
    #[arg(long)]
    site: Option<String>,
}

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        bail!("worker needs a configuration file: rabbitry worker -c FILE");
    }
    let mut settings = global.settings()?;
    if let Some(site) = args.site.or_else(|| settings.worker.site.clone()) {
        settings = settings.for_site(&site);
    }
    if settings.consumers.is_empty() {
        bail!("the configuration defines no [consumers.*]");
    }
    let outbox = match &settings.outbox {
        Some(o) => Some(rabbitry::outbox::Outbox::connect(&o.database).await?),
        None => None,
    };
    let mut worker = Worker::new(settings, ());
    if let Some(outbox) = outbox {
        worker = worker.with_outbox(outbox);
    }
    let running = worker.start().await?;
    eprintln!("worker: consuming; Ctrl-C or SIGTERM stops it cleanly");
    shutdown_signal().await;
    eprintln!("worker: stopping (finishing the handlers in flight)...");
    running.shutdown().await;
    eprintln!("worker: stopped");
    Ok(ExitCode::SUCCESS)
}
