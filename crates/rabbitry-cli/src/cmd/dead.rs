//! `rabbitry dead`: list, replay or purge a queue's dead letters.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;
use rabbitry::worker::dead;

use super::Global;

/// Dead letters of a queue (QUEUE or QUEUE.dead).
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Print each dead letter with its error headers, as JSON lines.
    List {
        queue: String,
        #[arg(long, default_value_t = 1000)]
        count: usize,
    },
    /// Publish dead letters back to their original exchange and routing key, attempts reset.
    Replay {
        queue: String,
        /// Replay at most this many (default: all).
        #[arg(long)]
        count: Option<usize>,
    },
    /// Delete every dead letter, or the oldest --count.
    Purge {
        queue: String,
        /// Delete at most this many, the oldest first (default: all).
        #[arg(long)]
        count: Option<usize>,
    },
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let conn = global.connect_default(&settings).await?;
    // Closed on every path, errors included: a command that ends with work
    // in flight on its socket races the runtime's shutdown.
    let result = act(&conn, args.action).await;
    conn.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

async fn act(conn: &rabbitry::Connection, action: Action) -> Result<()> {
    match action {
        Action::List { queue, count } => {
            let letters = dead::list(conn, &queue, count).await?;
            for l in &letters {
                outln!("{}", serde_json::to_string(l)?)?;
            }
            // What the queue holds, beside what was listed: a listing cut
            // short by --count says so.
            let dead = dead::dead_queue_of(&queue);
            let held = conn
                .queue_status(&dead)
                .await?
                .map_or(0, |q| q.messages as usize)
                .max(letters.len());
            eprintln!(
                "listed {} of {held} dead letter(s) in {dead}",
                letters.len()
            );
        }
        Action::Replay { queue, count } => {
            let n = dead::replay(conn, &queue, count.unwrap_or(usize::MAX)).await?;
            eprintln!(
                "replayed {n} message(s) from {}",
                dead::dead_queue_of(&queue)
            );
        }
        Action::Purge { queue, count } => {
            let n = match count {
                Some(count) => dead::purge_oldest(conn, &queue, count).await?,
                None => dead::purge(conn, &queue).await? as usize,
            };
            eprintln!("purged {n} message(s) from {}", dead::dead_queue_of(&queue));
        }
    }
    Ok(())
}
