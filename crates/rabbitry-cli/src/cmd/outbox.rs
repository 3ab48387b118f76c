//! `rabbitry outbox`: create the tables, show the backlog and failures, or
//! send failed rows again.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;
use rabbitry::outbox::{Database, Outbox};

use super::Global;

/// The durable outbox.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Create the outbox, inbox and request tables if they do not exist.
    Migrate {
        /// sqlite://PATH or postgres://...
        #[arg(long)]
        database: String,
    },
    /// Print the backlog, the oldest pending age and the failed rows.
    Status {
        /// sqlite://PATH or postgres://...
        #[arg(long)]
        database: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make failed rows pending again, once their cause is fixed: all of
    /// them, or those given with --id (repeatable).
    RetryFailed {
        /// sqlite://PATH or postgres://...
        #[arg(long)]
        database: String,
        /// Only this row (the # that `outbox status` shows).
        #[arg(long = "id")]
        ids: Vec<i64>,
    },
}

pub(crate) async fn run(_global: &Global, args: Args) -> Result<ExitCode> {
    match args.action {
        Action::Migrate { database } => {
            let db = Database::connect(&database).await?;
            rabbitry::rpc::durable::migrate(&db).await?;
            outln!(
                "outbox tables ready in {}",
                rabbitry::connection::redact(&database)
            )?;
        }
        Action::Status { database, json } => {
            // Inspecting never creates: a missing database is an error.
            let db = Database::connect_existing(&database).await?;
            let status = Outbox::with_database(db, &database)
                .status()
                .await
                .context(
                    "is it an outbox database? `rabbitry outbox migrate` creates the tables",
                )?;
            if json {
                outln!("{}", serde_json::to_string(&status)?)?;
            } else {
                outln!("pending: {}", status.pending)?;
                match status.oldest_pending_ms {
                    Some(ms) => outln!("oldest pending: {:.1}s", ms as f64 / 1000.0)?,
                    None => outln!("oldest pending: -")?,
                }
                match status.next_due_in_ms {
                    Some(ms) => outln!(
                        "scheduled: {} (next due in {:.1}s)",
                        status.scheduled,
                        ms as f64 / 1000.0
                    )?,
                    None => outln!("scheduled: {}", status.scheduled)?,
                }
                outln!("failed: {}", status.failed.len())?;
                for f in &status.failed {
                    outln!(
                        "  #{} {} -> exchange '{}' key '{}': {}",
                        f.id,
                        f.message_id,
                        f.exchange,
                        f.routing_key,
                        f.error.as_deref().unwrap_or("?")
                    )?;
                }
            }
        }
        Action::RetryFailed { database, ids } => {
            let db = Database::connect_existing(&database).await?;
            let outbox = Outbox::with_database(db, &database);
            let n = outbox
                .retry_failed((!ids.is_empty()).then_some(ids.as_slice()))
                .await?;
            outln!("{n} failed row(s) pending again; a running relay sends them")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
