//! One module per subcommand, and what they share: loading settings
//! (TOML, then environment, then flags) and opening connections.

pub(crate) mod consume;
pub(crate) mod dead;
pub(crate) mod declare;
#[cfg(feature = "demo")]
pub(crate) mod demo;
pub(crate) mod outbox;
pub(crate) mod publish;
pub(crate) mod queues;
pub(crate) mod relay;
pub(crate) mod rpc;
pub(crate) mod schedule;
pub(crate) mod status;
pub(crate) mod worker;

use std::path::PathBuf;

use anyhow::Result;
use rabbitry::defaults::CONNECTION as DEFAULT_CONNECTION;
use rabbitry::{Connection, Settings};

use crate::exit::usage;

/// Flags every command takes.
pub(crate) struct Global {
    pub url: Option<String>,
    pub config: Option<PathBuf>,
}

impl Global {
    /// Settings from `-c FILE` (or empty), then `AMQP_URL`, then `--url`.
    pub(crate) fn settings(&self) -> Result<Settings> {
        let mut settings = match &self.config {
            Some(path) => {
                let text = match std::fs::read(path) {
                    Ok(bytes) => match String::from_utf8(bytes) {
                        Ok(text) => text,
                        Err(_) => usage!("{}: not a TOML file (not UTF-8 text)", path.display()),
                    },
                    Err(e) => usage!("cannot read the configuration {}: {e}", path.display()),
                };
                Settings::from_toml(&text, &path.display().to_string())?
            }
            None => Settings::default(),
        };
        settings.apply_env(|k| std::env::var(k).ok());
        if let Some(url) = &self.url {
            settings.replace_url(url.clone(), "--url");
        }
        Ok(settings)
    }

    /// [`Global::settings`] for a site: `${site}` replaced by `site` (or
    /// the config's `[worker] site`), and an error when a `${site}` is left
    /// with no site to put there.
    pub(crate) fn settings_for_site(&self, site: Option<String>) -> Result<Settings> {
        let mut settings = self.settings()?;
        if let Some(site) = site.or_else(|| settings.worker.site.clone()) {
            settings = settings.for_site(&site);
        }
        settings.check_substituted()?;
        Ok(settings)
    }

    /// Opens the named connection from `settings`.
    pub(crate) async fn connect(&self, settings: &Settings, name: &str) -> Result<Connection> {
        let mut cs = settings.connection(name)?;
        cs.name = format!("rabbitry-cli.{name}");
        Ok(Connection::open(cs).await?)
    }

    /// Opens the default connection.
    pub(crate) async fn connect_default(&self, settings: &Settings) -> Result<Connection> {
        self.connect(settings, DEFAULT_CONNECTION).await
    }
}

/// Serves `router` (the admin routes) at `addr` until the returned task
/// is aborted; returns the task and the address bound (port 0 picks one).
pub(crate) async fn serve_admin(
    addr: std::net::SocketAddr,
    router: axum::Router,
) -> Result<(tokio::task::JoinHandle<()>, std::net::SocketAddr)> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin address {addr}"))?;
    let bound = listener.local_addr()?;
    if !bound.ip().is_loopback() {
        tracing::warn!(
            address = %bound,
            "the admin listener is reachable from other machines: /metrics, /status and the \
             dead letters' headers are readable without the token; changes and bodies need it"
        );
    }
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((task, bound))
}

/// How log lines are written on stderr.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs to stderr, filtered by `RABBITRY_LOG` (else `RUST_LOG`), which take
/// `tracing` directives: `info`, `rabbitry=debug,amqprs=warn`... The
/// default is `warn`. Colours only when stderr is a terminal.
pub(crate) fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let directives = std::env::var("RABBITRY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_default();
    let filter = match EnvFilter::builder()
        .with_default_directive(tracing::Level::WARN.into())
        .parse(&directives)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("warning: RABBITRY_LOG/RUST_LOG `{directives}` is not a valid filter ({e}); logging warnings");
            EnvFilter::new("warn")
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Ctrl-C and SIGTERM, listened for from the moment this returns: a
/// command that is still starting (connecting, migrating) stops cleanly
/// too, instead of being ended by the signal's default action. The
/// receiver turns true at the first signal; a second one ends the process
/// at once with exit code 130.
pub(crate) fn listen_for_shutdown(
    what: &'static str,
) -> Result<tokio::sync::watch::Receiver<bool>> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // Created here, so the handlers are in place before any await.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("{what}: stopping cleanly; press Ctrl-C again to stop at once");
            tx.send_replace(true);
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("interrupted");
            std::process::exit(i32::from(crate::exit::INTERRUPTED));
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        shutdown_requested(what).await;
        tx.send_replace(true);
    });
    Ok(rx)
}

/// Runs `starting` unless a shutdown is asked for first; `None` then.
pub(crate) async fn unless_stopped<T>(
    stop: &mut tokio::sync::watch::Receiver<bool>,
    starting: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = starting => Some(done),
        _ = stop.wait_for(|s| *s) => None,
    }
}

/// Waits for Ctrl-C or SIGTERM. After it, a second Ctrl-C or SIGTERM ends
/// the process at once with exit code 130, whatever is still running.
pub(crate) async fn shutdown_requested(what: &str) {
    rabbitry::worker::shutdown_signal().await;
    eprintln!("{what}: stopping cleanly; press Ctrl-C again to stop at once");
    tokio::spawn(async {
        rabbitry::worker::shutdown_signal().await;
        eprintln!("interrupted");
        std::process::exit(i32::from(crate::exit::INTERRUPTED));
    });
}
