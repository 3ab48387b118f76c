//! `rabbitry relay`: the outbox relay on its own, for one or more outbox
//! databases, written by applications in any language; until SIGINT or
//! SIGTERM.

use std::process::ExitCode;

use anyhow::Result;
use rabbitry::outbox::{Outbox, RelayOptions};

use super::Global;
use crate::exit::usage;

/// Publish the rows of outbox databases, confirmed and in order.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// An outbox database: sqlite://PATH or postgres://... (repeatable; the
    /// tables are created if missing).
    #[arg(long = "database", value_name = "URL")]
    databases: Vec<String>,
    /// Serve the admin routes at http://ADDR: /metrics (the backlog, oldest
    /// age and failed rows of each database), /livez, /readyz, /status.
    #[arg(long, value_name = "ADDR")]
    admin: Option<std::net::SocketAddr>,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if args.databases.is_empty() {
        usage!("relay needs at least one --database URL (sqlite://PATH or postgres://...)");
    }
    if args.admin.is_some() {
        // Before the connection makes its metric handles.
        rabbitry::admin::install_prometheus();
    }
    let settings = global.settings()?;
    // The databases first: a wrong URL is said before anything else runs.
    let mut outboxes = Vec::new();
    for url in &args.databases {
        outboxes.push(Outbox::connect(url).await?);
    }
    let conn = global.connect_default(&settings).await?;
    let mut relays = Vec::new();
    for outbox in &outboxes {
        relays.push(outbox.spawn_relay(&conn, RelayOptions::default()).await?);
        eprintln!("relay: publishing the outbox of {}", outbox.url());
    }
    let admin = match args.admin {
        Some(addr) => {
            let mut admin = rabbitry::admin::Admin::new().connection(&conn);
            for outbox in &outboxes {
                admin = admin.outbox(outbox);
            }
            let (server, bound) = super::serve_admin(addr, admin.router()).await?;
            eprintln!("relay: admin at http://{bound}/ (metrics, livez, readyz, status)");
            Some(server)
        }
        None => None,
    };
    eprintln!("relay: running; Ctrl-C or SIGTERM stops it cleanly");
    super::shutdown_requested("relay").await;
    if let Some(server) = admin {
        server.abort();
    }
    let mut failed = false;
    for relay in relays {
        if let Err(e) = relay.stop().await {
            eprintln!("relay: {e}");
            failed = true;
        }
    }
    conn.close().await;
    eprintln!("relay: stopped");
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
