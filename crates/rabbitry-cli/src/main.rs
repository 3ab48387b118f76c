//! The `rabbitry` command: publish, consume, declare, inspect queues, run
//! workers and relays. Flags are parsed here; the work is done by the library.

/// Writes one line to stdout and returns the `io::Result`, so that a
/// reader that went away (`rabbitry ... | head`) ends the command quietly
/// through [`exit::code_for`] instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, $($arg)*).and_then(|()| out.flush())
    }};
}

mod cmd;
mod exit;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// A messaging gateway for RabbitMQ.
#[derive(Parser)]
#[command(name = "rabbitry", version, about, after_help = exit::HELP)]
struct Cli {
    /// Broker URL (default: $AMQP_URL, then amqp://guest:guest@localhost:5672/%2f).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Configuration file (TOML).
    #[arg(short = 'c', long = "config", global = true)]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long = "log-format", global = true, value_enum, default_value_t = cmd::LogFormat::Text)]
    log_format: cmd::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish messages, with confirms.
    Publish(cmd::publish::Args),
    /// Print messages from a queue as JSON lines (they stay on the queue unless --ack).
    Consume(cmd::consume::Args),
    /// Declare the configured topology, or check it for drift.
    Declare(cmd::declare::Args),
    /// Show ready messages and consumers per queue.
    Queues(cmd::queues::Args),
    /// Send a request and wait for its reply.
    Rpc(cmd::rpc::Args),
    /// Run the consumers of a config file, dispatching to their handlers.
    Worker(cmd::worker::Args),
    /// List, replay or purge dead letters.
    Dead(cmd::dead::Args),
    /// Serve the status page and admin routes for a config file's queues, without consuming.
    Status(cmd::status::Args),
    /// The durable outbox: migrate, status, retry-failed.
    Outbox(cmd::outbox::Args),
    /// Publish the rows of outbox databases (any language's), confirmed and in order.
    Relay(cmd::relay::Args),
    /// Write a message to the outbox, published at a time (--at) or after a delay (--in).
    Schedule(cmd::schedule::ScheduleArgs),
    /// List or cancel scheduled messages.
    Scheduled(cmd::schedule::ScheduledArgs),
    /// Run the seed's whole system: two sites, workers, a PDF service.
    #[cfg(feature = "demo")]
    Demo(cmd::demo::Args),
    /// One part of the demo (started by `rabbitry demo`).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoPart(cmd::demo::PartArgs),
    /// Print a shell completion script: rabbitry completions bash > /etc/bash_completion.d/rabbitry
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cmd::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
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
            Command::Rpc(args) => cmd::rpc::run(&global, args).await,
            Command::Worker(args) => cmd::worker::run(&global, args).await,
            Command::Dead(args) => cmd::dead::run(&global, args).await,
            Command::Status(args) => cmd::status::run(&global, args).await,
            Command::Outbox(args) => cmd::outbox::run(&global, args).await,
            Command::Relay(args) => cmd::relay::run(&global, args).await,
            Command::Schedule(args) => cmd::schedule::schedule(&global, args).await,
            Command::Scheduled(args) => cmd::schedule::scheduled(&global, args).await,
            #[cfg(feature = "demo")]
            Command::Demo(args) => cmd::demo::run(&global, args).await,
            #[cfg(feature = "demo")]
            Command::DemoPart(args) => cmd::demo::run_part(&global, args).await,
            Command::Completions { shell } => completions(shell),
        }
    });
    // Background tasks (connections, readers of a closed pipe) must not
    // keep the process alive once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(err) => exit::report(&err),
    }
}

fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "rabbitry", &mut script);
    let text = String::from_utf8_lossy(&script);
    outln!("{}", text.trim_end())?;
    Ok(ExitCode::SUCCESS)
}
