//! `rabbitry schedule` and `rabbitry scheduled`: messages written to the
//! outbox now, published by a relay at their time; listed and cancelled.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use clap::Subcommand;
use rabbitry::outbox::{self, Database, Outbox};

use super::publish::MessageArgs;
use super::Global;
use crate::exit::usage;

/// Schedule a message: a row in the outbox, published at its time.
#[derive(clap::Args)]
pub(crate) struct ScheduleArgs {
    /// The outbox database: sqlite://PATH or postgres://... (its tables are
    /// created if missing).
    #[arg(long)]
    database: String,
    /// Publish after this long: 500ms, 30s, 10m, 2h, 1d.
    #[arg(long = "in", value_name = "DURATION", conflicts_with = "at")]
    after: Option<String>,
    /// Publish at this time, RFC 3339 with an offset: 2026-12-01T09:00:00Z.
    /// A time in the past publishes at once.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
    /// Exchange ('' or none: the default exchange).
    #[arg(long)]
    exchange: Option<String>,
    /// Routing key.
    #[arg(long = "routing-key")]
    routing_key: String,
    /// The message: body encoding, properties, headers.
    #[command(flatten)]
    message: MessageArgs,
    /// The body: text, @file, or - for stdin.
    body: String,
}

/// List or cancel scheduled messages.
#[derive(clap::Args)]
pub(crate) struct ScheduledArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// The scheduled messages not published yet, the next due first.
    List {
        /// The outbox database: sqlite://PATH or postgres://...
        #[arg(long)]
        database: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a scheduled message by its id, before it is published.
    Cancel {
        /// The message id `rabbitry schedule` printed.
        id: String,
        /// The outbox database: sqlite://PATH or postgres://...
        #[arg(long)]
        database: String,
    },
}

/// When the message is due, from `--in` or `--at`.
fn due(args: &ScheduleArgs) -> Result<SystemTime> {
    match (&args.after, &args.at) {
        (Some(after), None) => {
            let d = rabbitry::config::parse_duration(after).context("--in")?;
            Ok(SystemTime::now() + d)
        }
        (None, Some(at)) => {
            let ms = rabbitry::clock::parse_rfc3339(at).context("--at")?;
            Ok(rabbitry::clock::time_of(ms))
        }
        _ => usage!("schedule needs --in DURATION or --at TIME (RFC 3339)"),
    }
}

pub(crate) async fn schedule(_global: &Global, args: ScheduleArgs) -> Result<ExitCode> {
    let when = due(&args)?;
    let mut message = args
        .message
        .build(&args.body, args.message.serializer)?
        .routing_key(&args.routing_key);
    if let Some(e) = &args.exchange {
        message = message.exchange(e);
    }
    let outbox = Outbox::connect(&args.database).await?;
    let id = match outbox.database() {
        Database::Sqlite(pool) => {
            let mut tx = pool.begin().await.context("begin")?;
            let id = outbox::publish_at(&mut *tx, message, when).await?;
            outbox.commit(tx).await?;
            id
        }
        Database::Postgres(pool) => {
            let mut tx = pool.begin().await.context("begin")?;
            let id = outbox::publish_at(&mut *tx, message, when).await?;
            outbox.commit(tx).await?;
            id
        }
    };
    let due = rabbitry::clock::rfc3339(when);
    let in_past = when < SystemTime::now() - Duration::from_secs(1);
    eprintln!(
        "scheduled for {due}{}; a relay publishes it (rabbitry relay --database ...)",
        if in_past {
            " (in the past: due at once)"
        } else {
            ""
        }
    );
    outln!("{id}")?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn scheduled(_global: &Global, args: ScheduledArgs) -> Result<ExitCode> {
    match args.action {
        Action::List {
            database,
            limit,
            json,
        } => {
            let db = Database::connect_existing(&database).await?;
            let rows = Outbox::with_database(db, &database)
                .scheduled(limit)
                .await
                .context(
                    "is it an outbox database? `rabbitry outbox migrate` creates the tables",
                )?;
            if json {
                outln!("{}", serde_json::to_string(&rows)?)?;
            } else if rows.is_empty() {
                outln!("no scheduled messages")?;
            } else {
                outln!("{:<25} {:<38} {:>8}  destination", "due", "id", "attempts")?;
                for r in &rows {
                    let exchange = if r.exchange.is_empty() {
                        "(default)"
                    } else {
                        &r.exchange
                    };
                    outln!(
                        "{:<25} {:<38} {:>8}  {exchange} / {}",
                        r.due,
                        r.message_id,
                        r.attempts,
                        r.routing_key
                    )?;
                }
            }
        }
        Action::Cancel { id, database } => {
            let db = Database::connect_existing(&database).await?;
            Outbox::with_database(db, &database).cancel(&id).await?;
            eprintln!("cancelled {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
