//! `rabbitry queues`: ready messages and consumers per queue.

use std::process::ExitCode;

use anyhow::Result;

use crate::exit::usage;

use super::Global;

/// Show ready messages and consumers for queues (never creates one).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Queue names; with -c and none given, every configured consumer's queue.
    queues: Vec<String>,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let mut queues = args.queues;
    if queues.is_empty() {
        queues = settings
            .consumers
            .values()
            .map(|c| c.consumer.queue.clone())
            .filter(|q| !q.is_empty())
            .collect();
    }
    if queues.is_empty() {
        usage!("name queues, or give -c FILE with consumers");
    }
    let conn = global.connect_default(&settings).await?;
    // Closed on every path, errors included (see `dead`).
    let result: Result<usize> = async {
        let width = queues.iter().map(String::len).max().unwrap_or(5).max(5);
        outln!("{:<width$}  {:>9}  {:>9}", "queue", "ready", "consumers")?;
        let mut missing = 0;
        for q in &queues {
            match conn.queue_status(q).await? {
                Some(s) => outln!("{q:<width$}  {:>9}  {:>9}", s.messages, s.consumers)?,
                None => {
                    missing += 1;
                    outln!("{q:<width$}  {:>9}  {:>9}", "missing", "-")?;
                }
            }
        }
        Ok(missing)
    }
    .await;
    conn.close().await;
    let missing = result?;
    Ok(if missing > 0 {
        ExitCode::from(crate::exit::NOT_FOUND)
    } else {
        ExitCode::SUCCESS
    })
}
