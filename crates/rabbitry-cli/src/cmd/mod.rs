//! One module per subcommand, and what they share: loading settings
//! (TOML, then environment, then flags) and opening connections.

pub mod bench;
pub mod consume;
pub mod dead;
pub mod declare;
pub mod demo;
pub mod outbox;
pub mod publish;
pub mod queues;
pub mod rpc;
pub mod worker;

use std::path::PathBuf;

use anyhow::{Context, Result};
use rabbitry::config::DEFAULT_CONNECTION;
use rabbitry::{Connection, Settings};

/// Flags every command takes.
pub struct Global {
    pub url: Option<String>,
    pub config: Option<PathBuf>,
}

impl Global {
    /// Settings from `-c FILE` (or empty), then `AMQP_URL`, then `--url`.
    pub fn settings(&self) -> Result<Settings> {
        let mut settings = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Settings::from_toml(&text, &path.display().to_string())?
            }
            None => Settings::default(),
        };
        settings.apply_env(|k| std::env::var(k).ok());
        if let Some(url) = &self.url {
            settings.apply_env(|k| (k == "AMQP_URL").then(|| url.clone()));
        }
        Ok(settings)
    }

    /// Opens the named connection from `settings`.
    pub async fn connect(&self, settings: &Settings, name: &str) -> Result<Connection> {
        let mut cs = settings.connection(name)?;
        cs.name = format!("rabbitry-cli.{name}");
        Ok(Connection::open(cs).await?)
    }

    /// Opens the default connection.
    pub async fn connect_default(&self, settings: &Settings) -> Result<Connection> {
        self.connect(settings, DEFAULT_CONNECTION).await
    }
}

/// Logs to stderr at the level named by `RABBITRY_LOG` or `RUST_LOG`
/// (`error`, `warn` (default), `info`, `debug`, `trace`).
pub fn init_logging() {
    let level = std::env::var("RABBITRY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|v| v.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::WARN);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .try_init();
}
