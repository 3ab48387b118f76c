//! `rabbitry consume`: print messages as JSON lines.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use rabbitry::{Consumer, ConsumerSettings, Delivery};

use super::Global;

/// Print messages from a queue, one JSON object per line.
#[derive(clap::Args)]
pub struct Args {
    /// The queue (it must exist; it is not declared).
    queue: String,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<usize>,
    /// Stop after this many seconds without reaching --count.
    #[arg(long)]
    timeout: Option<f64>,
    /// Leave the messages on the queue instead of acking them.
    #[arg(long)]
    requeue: bool,
}

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let conn = global.connect_default(&settings).await?;
    let mut cs = ConsumerSettings::new(&args.queue);
    cs.name = "rabbitry-cli".into();
    cs.auto_declare = false;
    cs.prefetch_count = Some(args.count.map_or(100, |n| n.clamp(1, 1000) as u16));
    let mut consumer = Consumer::start(&conn, cs).await?;
    let deadline = args
        .timeout
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s));
    // With --requeue, deliveries are held unacked until the end; closing
    // the channel puts them back in order.
    let mut held: Vec<Delivery> = Vec::new();
    let mut printed = 0usize;
    let stdout = std::io::stdout();
    let timed_out = loop {
        if args.count.is_some_and(|n| printed >= n) {
            break false;
        }
        let next = consumer.next();
        let d = tokio::select! {
            d = next => d,
            _ = sleep_until(deadline) => break true,
            _ = tokio::signal::ctrl_c() => break false,
        };
        let Some(d) = d else { break false };
        let line = serde_json::to_string(&d.to_json())?;
        {
            let mut out = stdout.lock();
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        printed += 1;
        if args.requeue {
            held.push(d);
        } else {
            d.ack().await?;
        }
    };
    consumer.cancel().await;
    drop(held);
    conn.close().await;
    if timed_out {
        eprintln!(
            "timed out after {}s with {printed} message(s)",
            args.timeout.unwrap_or_default()
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
