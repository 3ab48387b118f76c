//! `rabbitry consume`: print messages as JSON lines.

use std::process::ExitCode;

use anyhow::Result;
use rabbitry::{Consumer, ConsumerSettings, Delivery};

use super::Global;

/// Print messages from a queue, one JSON object per line.
///
/// By default this is a peek: every message printed stays on the queue
/// (it is held unacked and goes back, in order and marked redelivered, when
/// the command ends), so `rabbitry consume Q | head` removes nothing. With
/// --ack each message is removed once its line has been written: lines a
/// reader never reads (still in a pipe when `head` exits) are gone too.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The queue (it must exist; it is not declared).
    queue: String,
    /// Stop after this many messages; the broker hands over no more than this.
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this long without reaching --count: 500ms, 5s, 2m (a bare number is seconds).
    #[arg(long)]
    timeout: Option<String>,
    /// Remove each message from the queue once its line is written.
    #[arg(long, conflicts_with = "requeue")]
    ack: bool,
    /// Leave the messages on the queue (the default; kept for scripts).
    #[arg(long, hide = true)]
    requeue: bool,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let timeout = args
        .timeout
        .as_deref()
        .map(rabbitry::config::parse_duration)
        .transpose()?;
    let settings = global.settings()?;
    let conn = global.connect_default(&settings).await?;
    let mut cs = ConsumerSettings::new(&args.queue);
    cs.name = "rabbitry-cli".into();
    cs.auto_declare = false;
    // The broker never hands over more than --count. A peek holds what it
    // printed, so without --count it takes what the broker sends (0:
    // unlimited); with --ack, 100 at a time, and what was not printed goes
    // back when the channel closes.
    cs.prefetch_count = Some(match (args.count, args.ack) {
        (Some(n), _) => n.clamp(1, usize::from(u16::MAX)) as u16,
        (None, true) => 100,
        (None, false) => 0,
    });
    let mut consumer = Consumer::start(&conn, cs).await?;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    // Held unacked until the end; closing the channel puts them back.
    let mut held: Vec<Delivery> = Vec::new();
    let mut printed = 0usize;
    let result: Result<bool> = async {
        loop {
            if args.count.is_some_and(|n| printed >= n) {
                return Ok(false);
            }
            let d = tokio::select! {
                d = consumer.next() => d,
                _ = sleep_until(deadline) => return Ok(true),
                _ = tokio::signal::ctrl_c() => return Ok(false),
            };
            let Some(d) = d else { return Ok(false) };
            let line = serde_json::to_string(&d.to_json())?;
            // A write that fails (the reader went away) leaves this message
            // unacked: it goes back to the queue.
            outln!("{line}")?;
            printed += 1;
            if args.ack {
                d.ack().await?;
            } else {
                held.push(d);
            }
        }
    }
    .await;
    consumer.cancel().await;
    drop(held);
    conn.close().await;
    if result? {
        eprintln!(
            "timed out after {:?} with {printed} message(s)",
            timeout.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
