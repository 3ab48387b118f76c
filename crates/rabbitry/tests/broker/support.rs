//! Shared helpers for tests against the real broker: unique names, a TCP
//! proxy whose connections can be cut, and the broker's own tools.

use std::future::Future;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rabbitry::{Connection, ConnectionSettings};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The broker under test.
pub(crate) fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A name no other test uses.
pub(crate) fn unique(prefix: &str) -> String {
    format!(
        "test.{prefix}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Settings for `url` with a quick backoff, named `name`.
pub(crate) fn settings(url: &str, name: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new(url).name(name);
    s.backoff_initial = Duration::from_millis(100);
    s.backoff_max = Duration::from_secs(1);
    s
}

/// A connection to the broker under test.
pub(crate) async fn connect() -> Connection {
    Connection::open(settings(&url(), &unique("conn")))
        .await
        .expect("connect to the broker")
}

/// Waits for `f` to be true, polling every 20 ms, for at most `limit`.
pub(crate) async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy to the broker. [`Proxy::cut`] drops every connection through
/// it, as a network failure would.
pub(crate) struct Proxy {
    pub port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub(crate) async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let task = tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect("127.0.0.1:5672").await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Proxy {
            port,
            conns,
            accept,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Cuts every connection open through the proxy.
    pub(crate) fn cut(&self) -> usize {
        let tasks: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        let n = tasks.len();
        for t in tasks {
            t.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Closes the broker-side connection whose client-given name is `name`,
/// with `rabbitmqctl close_connection`. Returns how many were closed.
pub(crate) fn close_connection(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("\"{name}\"");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split('\t').next().unwrap_or_default().trim();
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a rabbitry test"])
            .status()
            .expect("run rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// A PostgreSQL URL whose `search_path` is a fresh schema, so tests that
/// share the database do not share outbox tables.
pub(crate) async fn pg_url() -> String {
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pool = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL on 127.0.0.1:5432");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    format!("{base}?options=-c%20search_path%3D{schema}")
}

/// A SQLite URL for a fresh file.
pub(crate) fn sqlite_url() -> String {
    let dir = std::env::temp_dir().join(unique("db"));
    std::fs::create_dir_all(&dir).unwrap();
    format!("sqlite://{}/outbox.db", dir.display())
}
