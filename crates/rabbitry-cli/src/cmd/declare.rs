//! `rabbitry declare`: declare the configured topology, or check it.

use std::process::ExitCode;

use anyhow::{bail, Result};

use super::Global;

/// Declare every exchange, queue and binding in the config file.
#[derive(clap::Args)]
pub struct Args {
    /// Compare with the broker instead of declaring; exit 1 on drift.
    #[arg(long)]
    check: bool,
}

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        bail!("declare needs a configuration file: rabbitry declare -c FILE");
    }
    let settings = global.settings()?;
    let mut drift = 0;
    for name in settings.connection_names() {
        let topology = settings.topology_for(&name);
        if topology.is_empty() {
            continue;
        }
        let conn = global.connect(&settings, &name).await?;
        if args.check {
            let found = conn.check(&topology).await?;
            for d in &found {
                println!("drift: {d}");
            }
            drift += found.len();
            println!(
                "connection '{name}': checked {} exchange(s), {} queue(s); {} binding(s) not comparable over AMQP",
                topology.exchanges.len(),
                topology.queues.len(),
                topology.bindings.len()
            );
        } else {
            conn.declare_once(&topology).await?;
            for e in &topology.exchanges {
                println!("exchange {} ({})", e.name, e.kind);
            }
            for q in &topology.queues {
                println!("queue {}", q.name);
            }
            for b in &topology.bindings {
                println!("binding {} -> {} [{}]", b.exchange, b.queue, b.routing_key);
            }
        }
        conn.close().await;
    }
    if args.check {
        if drift > 0 {
            println!("{drift} difference(s)");
            return Ok(ExitCode::FAILURE);
        }
        println!("no drift");
    }
    Ok(ExitCode::SUCCESS)
}
