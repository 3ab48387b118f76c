//! `rabbitry status`: the admin routes and the status page for a config
//! file's queues, without running its consumers: an operator's view of a
//! deployment from a laptop.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::exit::usage;

use super::Global;

/// Serve the status page for a config file's queues.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Substituted for ${site} in queue names.
    #[arg(long)]
    site: Option<String>,
    /// Where to serve the page and the admin routes.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090")]
    listen: std::net::SocketAddr,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        usage!("status needs a configuration file: rabbitry status -c FILE");
    }
    let settings = global.settings_for_site(args.site)?;
    rabbitry::admin::install_prometheus();
    let connections = settings.open_connections().await?;
    let mut admin = rabbitry::admin::Admin::new();
    for (name, c) in &settings.consumers {
        let conn = connections
            .get(&c.connection)
            .with_context(|| format!("consumer {name}: no connection {}", c.connection))?;
        admin = admin.queue(name, &c.consumer.queue, conn);
    }
    if let Some(o) = &settings.outbox {
        match rabbitry::outbox::Outbox::connect(&o.database).await {
            Ok(outbox) => admin = admin.outbox(&outbox),
            Err(e) => eprintln!("status: the outbox is left out: {e}"),
        }
    }
    let (server, bound) = super::serve_admin(args.listen, admin.router()).await?;
    eprintln!("status: http://{bound}/status (Ctrl-C stops it)");
    super::shutdown_requested("status").await;
    server.abort();
    for conn in connections.values() {
        conn.close().await;
    }
    Ok(ExitCode::SUCCESS)
}
