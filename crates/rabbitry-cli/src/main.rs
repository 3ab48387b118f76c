//! The `rabbitry` command: publish, consume, declare, inspect queues and
//! benchmark. Flags are parsed here; the work is done by the library.

mod cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A messaging gateway for RabbitMQ.
#[derive(Parser)]
#[command(name = "rabbitry", version, about)]
struct Cli {
    /// Broker URL (default: $AMQP_URL, then amqp://guest:guest@localhost:5672/%2f).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Configuration file (TOML).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish messages, with confirms.
    Publish(cmd::publish::Args),
    /// Print messages from a queue as JSON lines.
    Consume(cmd::consume::Args),
    /// Declare the configured topology, or check it for drift.
    Declare(cmd::declare::Args),
    /// Show ready messages and consumers per queue.
    Queues(cmd::queues::Args),
    /// Compare the gateway with the raw client, same run.
    Bench(cmd::bench::Args),
    /// Send a request and wait for its reply.
    Rpc(cmd::rpc::Args),
    /// Run the consumers of a config file, dispatching to their handlers.
    Worker(cmd::worker::Args),
    /// List, replay or purge dead letters.
    Dead(cmd::dead::Args),
    /// The durable outbox: migrate, status.
    Outbox(cmd::outbox::Args),
    /// Run the seed's whole system: two sites, workers, a PDF service.
    Demo(cmd::demo::Args),
    /// One part of the demo (started by `rabbitry demo`).
    #[command(hide = true)]
    DemoPart(cmd::demo::PartArgs),
}

fn main() -> ExitCode {
    cmd::init_logging();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let global = cmd::Global {
        url: cli.url,
        config: cli.config,
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Publish(args) => cmd::publish::run(&global, args).await,
            Command::Consume(args) => cmd::consume::run(&global, args).await,
            Command::Declare(args) => cmd::declare::run(&global, args).await,
            Command::Queues(args) => cmd::queues::run(&global, args).await,
            Command::Bench(args) => cmd::bench::run(&global, args).await,
            Command::Rpc(args) => cmd::rpc::run(&global, args).await,
            Command::Worker(args) => cmd::worker::run(&global, args).await,
            Command::Dead(args) => cmd::dead::run(&global, args).await,
            Command::Outbox(args) => cmd::outbox::run(&global, args).await,
            Command::Demo(args) => cmd::demo::run(&global, args).await,
            Command::DemoPart(args) => cmd::demo::run_part(&global, args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", report(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each cause shown once: rabbitry's errors
/// already include their source in their message.
fn report(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}
