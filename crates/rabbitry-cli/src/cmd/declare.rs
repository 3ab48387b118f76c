//! `rabbitry declare`: declare the configured topology, or check it.

use std::process::ExitCode;

use anyhow::Result;

use crate::exit::usage;

use super::Global;

/// Declare every exchange, queue and binding in the config file.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Compare with the broker instead of declaring; exit 5 on drift.
    #[arg(long)]
    check: bool,
    /// Substituted for ${site} in queue names and routing keys.
    #[arg(long)]
    site: Option<String>,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    if global.config.is_none() {
        usage!("declare needs a configuration file: rabbitry declare -c FILE");
    }
    let settings = global.settings_for_site(args.site)?;
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
                outln!("drift: {d}")?;
            }
            drift += found.len();
            outln!(
                "connection '{name}': checked {} exchange(s), {} queue(s); {} binding(s) not comparable over AMQP",
                topology.exchanges.len(),
                topology.queues.len(),
                topology.bindings.len()
            )?;
        } else {
            conn.declare_once(&topology).await?;
            for e in &topology.exchanges {
                outln!("exchange {} ({})", e.name, e.kind)?;
            }
            for q in &topology.queues {
                outln!("queue {}", q.name)?;
            }
            for b in &topology.bindings {
                outln!("binding {} -> {} [{}]", b.exchange, b.queue, b.routing_key)?;
            }
        }
        conn.close().await;
    }
    if args.check {
        if drift > 0 {
            outln!("{drift} difference(s)")?;
            return Ok(ExitCode::from(crate::exit::DRIFT));
        }
        outln!("no drift")?;
    }
    Ok(ExitCode::SUCCESS)
}
