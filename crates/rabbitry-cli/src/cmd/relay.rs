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
    /// On SQLite, how long the active relay's lease lasts: a standby takes
    /// over this long after the active relay died (default 10s). On
    /// PostgreSQL a standby takes over as soon as the active relay's
    /// session ends.
    #[arg(long, value_name = "DURATION")]
    lease: Option<String>,
}

/// How long a relay may take to finish its round when asked to stop.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if args.databases.is_empty() {
        usage!("relay needs at least one --database URL (sqlite://PATH or postgres://...)");
    }
    if args.admin.is_some() {
        // Before the connection makes its metric handles.
        rabbitry::admin::install_prometheus();
    }
    let mut options = RelayOptions::default();
    if let Some(lease) = &args.lease {
        options = options.lease(rabbitry::config::parse_duration(lease)?);
    }
    // The options' own rules, said before anything starts.
    if let Err(e) = options.validate() {
        let field = e.setting().unwrap_or_default();
        usage!("--{field}: {}", e.context());
    }
    let settings = global.settings()?;
    let mut stop = super::listen_for_shutdown("relay")?;
    let starting = async {
        // The databases first: a wrong URL is said before anything else runs.
        let mut outboxes = Vec::new();
        for url in &args.databases {
            outboxes.push(Outbox::connect(url).await?);
        }
        let conn = global.connect_default(&settings).await?;
        let mut relays = Vec::new();
        for outbox in &outboxes {
            relays.push(outbox.spawn_relay(&conn, options.clone()).await?);
            eprintln!("relay: publishing the outbox of {}", outbox.url());
        }
        anyhow::Ok((outboxes, conn, relays))
    };
    let Some(started) = super::unless_stopped(&mut stop, starting).await else {
        eprintln!("relay: stopped before it started");
        return Ok(ExitCode::SUCCESS);
    };
    let (outboxes, conn, relays) = started?;
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
    let _ = stop.wait_for(|s| *s).await;
    if let Some(server) = admin {
        server.abort();
    }
    let mut failed = false;
    for relay in relays {
        // Bounded, whatever the relay is doing: what was in flight stays
        // pending and goes out again from the next relay.
        match tokio::time::timeout(STOP_TIMEOUT, relay.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("relay: {e}");
                failed = true;
            }
            Err(_) => {
                eprintln!(
                    "relay: did not stop within {STOP_TIMEOUT:?}; its unconfirmed rows stay pending"
                );
                failed = true;
            }
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
