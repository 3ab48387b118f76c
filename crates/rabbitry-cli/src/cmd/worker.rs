//! `rabbitry worker`: run every consumer of a config file, forwarding
//! deliveries to their HTTP handlers, until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::Result;

use crate::exit::usage;

use super::Global;

/// Run the consuming server for a config file.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Substituted for ${site} in queue names, routing keys and consumer names.
    #[arg(long)]
    site: Option<String>,
    /// Serve the admin routes at http://ADDR: /metrics (Prometheus), /livez,
    /// /readyz, /api/status, /api/dead/QUEUE and its replay and purge
    /// (which need RABBITRY_ADMIN_TOKEN). Use a loopback address unless
    /// the network is trusted.
    #[arg(long, value_name = "ADDR", alias = "metrics")]
    admin: Option<std::net::SocketAddr>,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        usage!("worker needs a configuration file: rabbitry worker -c FILE");
    }
    let settings = global.settings_for_site(args.site)?;
    if args.admin.is_some() {
        // Before any connection or consumer makes its metric handles.
        rabbitry::admin::install_prometheus();
    }
    let mut stop = super::listen_for_shutdown("worker")?;
    let starting = async { settings.forwarding_worker().await?.start().await };
    let Some(running) = super::unless_stopped(&mut stop, starting).await else {
        eprintln!("worker: stopped before it started");
        return Ok(ExitCode::SUCCESS);
    };
    let running = running?;
    let admin_server = match args.admin {
        Some(addr) => {
            let app = rabbitry::admin::Admin::new().worker(&running).router();
            let (server, bound) = super::serve_admin(addr, app).await?;
            eprintln!("worker: admin at http://{bound}/ (metrics, livez, readyz, api/status)");
            Some(server)
        }
        None => None,
    };
    eprintln!("worker: consuming; Ctrl-C or SIGTERM stops it cleanly");
    let _ = stop.wait_for(|s| *s).await;
    if let Some(server) = admin_server {
        server.abort();
    }
    running.shutdown().await;
    eprintln!("worker: stopped");
    Ok(ExitCode::SUCCESS)
}
