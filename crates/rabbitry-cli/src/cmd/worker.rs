//! `rabbitry worker`: run every consumer of a config file, forwarding
//! deliveries to their HTTP handlers, until SIGINT or SIGTERM.

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::exit::usage;

use super::Global;

/// Run the consuming server for a config file.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Substituted for ${site} in queue names, routing keys and consumer names.
    #[arg(long)]
    site: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        usage!("worker needs a configuration file: rabbitry worker -c FILE");
    }
    let settings = global.settings_for_site(args.site)?;
    let worker = settings.forwarding_worker().await?;
    let running = worker.start().await?;
    let metrics_server = match args.metrics {
        Some(addr) => {
            let metrics = running.metrics();
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move {
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                "text/plain; version=0.0.4",
                            )],
                            metrics.render(),
                        )
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics address {addr}"))?;
            eprintln!(
                "worker: metrics at http://{}/metrics",
                listener.local_addr()?
            );
            Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }))
        }
        None => None,
    };
    eprintln!("worker: consuming; Ctrl-C or SIGTERM stops it cleanly");
    super::shutdown_requested("worker").await;
    if let Some(server) = metrics_server {
        server.abort();
    }
    running.shutdown().await;
    eprintln!("worker: stopped");
    Ok(ExitCode::SUCCESS)
}
