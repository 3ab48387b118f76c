//! The durable outbox and the idempotent inbox, on SQLite and PostgreSQL.
//!
//! **Outbox.** [`publish`] writes a message as a row of `rabbitry_outbox`
//! inside the caller's own sqlx transaction, so the message exists if and
//! only if the transaction commits. A [`Relay`] publishes pending rows with
//! confirms, in commit (id) order, and deletes a row only after its
//! confirm; an unroutable or refused message is marked `failed` with the
//! error (shown by `rabbitry outbox status`) instead of being retried in a
//! tight loop. Several relays are safe: `FOR UPDATE SKIP LOCKED` on
//! PostgreSQL, a lease on SQLite. The relay wakes at once: in-process when
//! the commit goes through [`Outbox::commit`], by `LISTEN/NOTIFY` on
//! PostgreSQL, and by polling otherwise.
//!
//! **Inbox.** [`inbox_claim`] records a delivery's message id in the same
//! transaction as the handler's writes; a redelivered duplicate finds its
//! id there and is acked without running the handler again. With the
//! outbox's stable message ids this gives exactly-once effects on top of
//! at-least-once delivery.

/// Implements [`OutboxExecutor`] for one database's connection type; each
/// database's file gives only its SQL.
macro_rules! outbox_executor {
    (
        $conn:ty,
        $db:ty,
        $name:literal,
        insert = $insert:literal,
        insert_rows = ($rows_head:literal, $rows_tail:literal),
        inbox = $inbox:literal $(,)?
    ) => {
        impl OutboxExecutor for $conn {
            async fn insert_outbox_rows(&mut self, rows: &[OutboxRow]) -> Result<()> {
                let now = now_millis();
                for chunk in rows.chunks(super::ROWS_PER_INSERT) {
                    let mut q = sqlx::QueryBuilder::<$db>::new($rows_head);
                    q.push_values(chunk, |mut b, row| {
                        b.push_bind(&row.message_id)
                            .push_bind(&row.exchange)
                            .push_bind(&row.routing_key)
                            .push_bind(&row.properties)
                            .push_bind(&row.body)
                            .push_bind(row.mandatory)
                            .push_bind(now);
                    });
                    q.push($rows_tail);
                    q.build()
                        .execute(&mut *self)
                        .await
                        .map_err(|e| db_error($name, "writing outbox rows", e))?;
                }
                Ok(())
            }

            async fn insert_outbox(&mut self, row: &OutboxRow) -> Result<()> {
                sqlx::query($insert)
                    .bind(&row.message_id)
                    .bind(&row.exchange)
                    .bind(&row.routing_key)
                    .bind(&row.properties)
                    .bind(&row.body)
                    .bind(row.mandatory)
                    .bind(now_millis())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($name, "writing an outbox row", e))?;
                Ok(())
            }

            async fn insert_inbox(&mut self, consumer: &str, message_id: &str) -> Result<bool> {
                let done = sqlx::query($inbox)
                    .bind(consumer)
                    .bind(message_id)
                    .bind(now_millis())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($name, "writing an inbox row", e))?;
                Ok(done.rows_affected() == 1)
            }
        }
    };
}

mod backend;
#[cfg(feature = "postgres")]
mod postgres;
mod relay;
#[cfg(feature = "sqlite")]
mod sqlite;
mod store;
mod transaction;

use std::future::Future;
use std::sync::Arc;

use sqlx::Row;
use tokio::sync::Notify;

pub use relay::{Relay, RelayOptions};
pub use transaction::{OutboxDatabase, Transaction};

/// Rows per multi-row `INSERT`: 7 parameters each stays well under
/// SQLite's 32,766 and PostgreSQL's 65,535.
const ROWS_PER_INSERT: usize = 500;

use crate::clock::now_millis;
use crate::connection::redact;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use backend::Backend;

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds; each
/// database's behaviour lives in its own file, behind [`Backend`].
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            #[cfg(feature = "sqlite")]
            Database::Sqlite($pool) => $body,
            #[cfg(feature = "postgres")]
            Database::Postgres($pool) => $body,
        }
    };
}
pub(crate) use with_pool;

/// The channel relays listen on for new rows (PostgreSQL).
pub const NOTIFY_CHANNEL: &str = "rabbitry_outbox";

/// A database pool: SQLite (the embedded default, feature `sqlite`) or
/// PostgreSQL (feature `postgres`).
#[derive(Clone, Debug)]
pub enum Database {
    /// `sqlite://path`
    #[cfg(feature = "sqlite")]
    Sqlite(sqlx::SqlitePool),
    /// `postgres://...`
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

impl Database {
    /// Connects to `url` (`sqlite://path`, created if missing, in WAL mode;
    /// or `postgres://user@host/db`). An unreachable database is an error
    /// that names it.
    pub async fn connect(url: &str) -> Result<Database> {
        Database::open(url, true).await
    }

    /// Connects to an existing database: a SQLite file that does not exist
    /// is an error, not a new empty database (for commands that inspect).
    pub async fn connect_existing(url: &str) -> Result<Database> {
        Database::open(url, false).await
    }

    async fn open(url: &str, create: bool) -> Result<Database> {
        let _ = create;
        #[cfg(feature = "sqlite")]
        if url.starts_with("sqlite:") {
            return Ok(Database::Sqlite(sqlite::connect(url, create).await?));
        }
        #[cfg(feature = "postgres")]
        if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            return Ok(Database::Postgres(postgres::connect(url).await?));
        }
        let built: Vec<&str> = [
            cfg!(feature = "sqlite").then_some("sqlite://PATH"),
            cfg!(feature = "postgres").then_some("postgres://..."),
        ]
        .into_iter()
        .flatten()
        .collect();
        Err(Error::config(format!(
            "database URL `{}`: expected {} (this build has the features: {})",
            redact(url),
            built.join(" or "),
            built.join(", ")
        )))
    }

    /// Creates the outbox and inbox tables if they do not exist.
    pub async fn migrate(&self) -> Result<()> {
        with_pool!(self, |pool| migrate(pool).await)
    }
}

async fn migrate<B: Backend>(pool: &B) -> Result<()> {
    pool.migrate()
        .await
        .map_err(|e| db_error(B::NAME, "creating the outbox tables", e))
}

/// An error naming the database and what was being done.
pub fn db_error(what: &str, doing: &str, e: sqlx::Error) -> Error {
    Error::new(
        ErrorKind::Database,
        format!("database {}: {doing}", redact(what)),
    )
    .with_source(e)
}

/// A message ready to be written as an outbox row.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// Stable across every resend.
    pub message_id: String,
    /// Where it goes.
    pub exchange: String,
    /// With which routing key.
    pub routing_key: String,
    /// Properties, stored losslessly.
    pub properties: String,
    /// The body.
    pub body: Vec<u8>,
    /// Unroutable is a failure.
    pub mandatory: bool,
}

impl OutboxRow {
    /// The row for `message`. It must name its routing key; a missing
    /// exchange means the default exchange; a missing message id gets a
    /// UUID, which then never changes. With the `otel` feature, the current
    /// trace context is stored in its `traceparent` header.
    pub fn from_message(mut message: Message) -> Result<OutboxRow> {
        let routing_key = message.routing_key.take().ok_or_else(|| {
            Error::new(ErrorKind::Invalid, "an outbox message needs a routing key")
        })?;
        let message_id = message
            .properties
            .message_id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        if message.properties.delivery_mode.is_none() {
            message.properties.delivery_mode = Some(crate::message::PERSISTENT);
        }
        // The row keeps the writer's trace context: the relay's publish,
        // whenever it happens, continues that trace.
        crate::telemetry::capture(&mut message.properties);
        Ok(OutboxRow {
            message_id,
            exchange: message.exchange.unwrap_or_default(),
            routing_key,
            properties: store::encode(&message.properties),
            body: message.body,
            mandatory: message.mandatory,
        })
    }
}

/// A connection that can write outbox and inbox rows: a
/// `&mut SqliteConnection` or `&mut PgConnection`, which is what
/// `&mut *tx` gives for an sqlx transaction.
pub trait OutboxExecutor: Send {
    /// Inserts an outbox row.
    fn insert_outbox(&mut self, row: &OutboxRow) -> impl Future<Output = Result<()>> + Send;
    /// Inserts outbox rows in order, several per statement.
    fn insert_outbox_rows(&mut self, rows: &[OutboxRow])
        -> impl Future<Output = Result<()>> + Send;
    /// Inserts an inbox row; `false` when it was already there.
    fn insert_inbox(
        &mut self,
        consumer: &str,
        message_id: &str,
    ) -> impl Future<Output = Result<bool>> + Send;
}

/// Writes `message` to the outbox inside the caller's transaction
/// (`&mut *tx`). Returns its message id. It is published after the
/// transaction commits, by a relay.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(conn: rabbitry::Connection) -> rabbitry::Result<()> {
/// use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
/// use rabbitry::Message;
///
/// let outbox = Outbox::connect("sqlite://shop.db").await?; // creates the tables
/// let relay = outbox.spawn_relay(&conn, RelayOptions::default()).await?;
/// let Database::Sqlite(pool) = outbox.database() else { unreachable!() };
/// let mut tx = pool.begin().await.map_err(|e| outbox::db_error("shop.db", "begin", e))?;
/// // ... the application's own writes in `tx` ...
/// outbox::publish(&mut *tx, Message::new("order 7 paid").routing_key("orders.paid")).await?;
/// outbox.commit(tx).await?; // the message exists if and only if the commit does
/// # relay.stop().await }
/// ```
pub async fn publish<E: OutboxExecutor + ?Sized>(conn: &mut E, message: Message) -> Result<String> {
    let row = OutboxRow::from_message(message)?;
    conn.insert_outbox(&row).await?;
    Ok(row.message_id)
}

/// Records that `consumer` processed `message_id`, inside the caller's
/// transaction. `true`: first time, do the work. `false`: a duplicate,
/// skip it (and ack).
pub async fn inbox_claim<E: OutboxExecutor + ?Sized>(
    conn: &mut E,
    consumer: &str,
    message_id: &str,
) -> Result<bool> {
    conn.insert_inbox(consumer, message_id).await
}

/// An outbox: its database, and the in-process wake-up for relays.
#[derive(Clone, Debug)]
pub struct Outbox {
    db: Database,
    url: String,
    wake: Arc<Notify>,
}

/// A failed outbox row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailedRow {
    /// Row id (commit order).
    pub id: i64,
    /// The message id.
    pub message_id: String,
    /// Its exchange.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// What `rabbitry outbox status` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutboxStatus {
    /// Rows waiting to be published.
    pub pending: i64,
    /// Age of the oldest pending row, in milliseconds.
    pub oldest_pending_ms: Option<i64>,
    /// Rows that failed, with their errors.
    pub failed: Vec<FailedRow>,
}

impl Outbox {
    /// Connects to the database at `url` and creates the tables if needed.
    pub async fn connect(url: &str) -> Result<Outbox> {
        let db = Database::connect(url).await?;
        db.migrate().await?;
        Ok(Outbox::with_database(db, url))
    }

    /// An outbox on an existing pool (tables must exist: see
    /// [`Database::migrate`]).
    pub fn with_database(db: Database, url: &str) -> Outbox {
        Outbox {
            db,
            url: redact(url),
            wake: Arc::new(Notify::new()),
        }
    }

    /// The database.
    pub fn database(&self) -> &Database {
        &self.db
    }

    /// The database's URL, with any password replaced by `***`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Commits `tx` and wakes this process's relays at once.
    pub async fn commit<'c, DB: sqlx::Database>(
        &self,
        tx: sqlx::Transaction<'c, DB>,
    ) -> Result<()> {
        tx.commit()
            .await
            .map_err(|e| db_error(&self.url, "commit", e))?;
        self.wake();
        Ok(())
    }

    /// Wakes this process's relays (after a commit made elsewhere).
    pub fn wake(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// The backlog, the oldest pending age and the failed rows.
    pub async fn status(&self) -> Result<OutboxStatus> {
        // The same SQL on every database.
        let (pending, oldest, failed) = with_pool!(&self.db, |pool| {
            let r = sqlx::query(
                "SELECT COUNT(*), MIN(created_at) FROM rabbitry_outbox WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await;
            let failed = sqlx::query(
                "SELECT id, message_id, exchange, routing_key, last_error FROM rabbitry_outbox \
                 WHERE status = 'failed' ORDER BY id",
            )
            .fetch_all(pool)
            .await;
            r.and_then(|r| {
                Ok((
                    r.try_get::<i64, _>(0)?,
                    r.try_get::<Option<i64>, _>(1)?,
                    failed?.iter().map(failed_row).collect::<Vec<_>>(),
                ))
            })
        })
        .map_err(|e| db_error(&self.url, "reading the outbox", e))?;
        Ok(OutboxStatus {
            pending,
            oldest_pending_ms: oldest.map(|t| now_millis() - t),
            failed,
        })
    }
}

fn failed_row<R: Row>(r: &R) -> FailedRow
where
    usize: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    FailedRow {
        id: r.try_get(0).unwrap_or_default(),
        message_id: r.try_get(1).unwrap_or_default(),
        exchange: r.try_get(2).unwrap_or_default(),
        routing_key: r.try_get(3).unwrap_or_default(),
        error: r.try_get(4).unwrap_or_default(),
    }
}
