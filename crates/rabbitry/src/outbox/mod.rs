//! The durable outbox and the idempotent inbox, on SQLite and PostgreSQL.
//!
//! **Outbox.** [`publish`] writes a message as a row of `rabbitry_outbox`
//! inside the caller's own sqlx transaction, so the message exists if and
//! only if the transaction commits. A [`Relay`] publishes pending rows with
//! confirms, in commit (id) order, and deletes a row only after its
//! confirm; an unroutable or refused message is marked `failed` with the
//! error (shown by `rabbitry outbox status`) instead of being retried in a
//! tight loop. Several relays may run on one outbox: one is active at a
//! time (an advisory lock on PostgreSQL, a lease on SQLite), which keeps
//! the commit order, and the others stand by to take over. The relay wakes at once: in-process when
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
        inbox = $inbox:literal,
        cancel = $cancel:literal $(,)?
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
                            .push_bind(now)
                            .push_bind(row.not_before);
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
                    .bind(row.not_before)
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($name, "writing an outbox row", e))?;
                Ok(())
            }

            async fn cancel_scheduled(&mut self, message_id: &str) -> Result<bool> {
                let done = sqlx::query($cancel)
                    .bind(message_id)
                    .bind(now_millis())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($name, "cancelling a scheduled message", e))?;
                Ok(done.rows_affected() > 0)
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
mod claim;
mod options;
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

pub use options::{RelayOptions, MIN_LEASE};
pub use relay::Relay;
pub use transaction::{OutboxDatabase, Transaction};

/// Rows per multi-row `INSERT`: 8 parameters each stays well under
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
    /// Not published before this time (epoch milliseconds): a scheduled
    /// message. `None` publishes as soon as the transaction commits.
    pub not_before: Option<i64>,
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
            not_before: None,
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
    /// Deletes the scheduled row of `message_id` unless a relay is
    /// publishing it; `false` when there was none.
    fn cancel_scheduled(&mut self, message_id: &str) -> impl Future<Output = Result<bool>> + Send;
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

/// Writes `message` to be published no earlier than `when`, inside the
/// caller's transaction; returns its message id, by which
/// [`cancel`] can cancel it until it is published. Once due, it is
/// published like any other row: confirmed, in commit order among the rows
/// that are due. A time in the past is due at once (published as soon as
/// the transaction commits), never refused.
///
/// The row is the schedule: it can be seen (`rabbitry scheduled list`),
/// cancelled and backed up with the application's data, and needs no
/// broker plugin. The relay sleeps until the next due time.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(outbox: rabbitry::outbox::Outbox) -> rabbitry::Result<()> {
/// use std::time::{Duration, SystemTime};
/// use rabbitry::outbox::{self, Database};
/// use rabbitry::Message;
///
/// let Database::Sqlite(pool) = outbox.database() else { unreachable!() };
/// let mut tx = pool.begin().await.map_err(|e| outbox::db_error("shop.db", "begin", e))?;
/// let reminder = Message::new("pay order 7").routing_key("orders.remind");
/// let when = SystemTime::now() + Duration::from_secs(24 * 3600);
/// let id = outbox::publish_at(&mut *tx, reminder, when).await?;
/// outbox.commit(tx).await?;
/// // ... the order is paid in time:
/// outbox.cancel(&id).await?;
/// # Ok(()) }
/// ```
pub async fn publish_at<E: OutboxExecutor + ?Sized>(
    conn: &mut E,
    message: Message,
    when: std::time::SystemTime,
) -> Result<String> {
    let mut row = OutboxRow::from_message(message)?;
    row.not_before = Some(crate::clock::millis_of(when));
    conn.insert_outbox(&row).await?;
    Ok(row.message_id)
}

/// [`publish_at`] now plus `delay`.
pub async fn publish_after<E: OutboxExecutor + ?Sized>(
    conn: &mut E,
    message: Message,
    delay: std::time::Duration,
) -> Result<String> {
    publish_at(conn, message, std::time::SystemTime::now() + delay).await
}

/// Cancels the scheduled message `message_id` inside the caller's
/// transaction. `false` when there is nothing to cancel: it was published
/// already, a relay is publishing it right now, or it was never scheduled.
pub async fn cancel<E: OutboxExecutor + ?Sized>(conn: &mut E, message_id: &str) -> Result<bool> {
    conn.cancel_scheduled(message_id).await
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
    /// Rows due and waiting to be published (the backlog).
    pub pending: i64,
    /// How long the oldest of them has been due, in milliseconds.
    pub oldest_pending_ms: Option<i64>,
    /// Scheduled rows not due yet.
    pub scheduled: i64,
    /// Time until the next of them is due, in milliseconds.
    pub next_due_in_ms: Option<i64>,
    /// Rows that failed, with their errors.
    pub failed: Vec<FailedRow>,
}

/// A scheduled message, as `rabbitry scheduled list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScheduledRow {
    /// Row id (commit order).
    pub id: i64,
    /// The message id, by which it is cancelled.
    pub message_id: String,
    /// Its exchange.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// When it is due, RFC 3339.
    pub due: String,
    /// When it is due, epoch milliseconds.
    pub due_ms: i64,
    /// Publishing attempts so far.
    pub attempts: i64,
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

    /// The backlog, the oldest pending age, the scheduled rows and the
    /// failed rows.
    pub async fn status(&self) -> Result<OutboxStatus> {
        let now = now_millis();
        // The same SQL on every database (`now` is a number, inlined); each
        // query is answered from one of the partial indexes.
        let queries = [
            "SELECT COUNT(*), CAST(MIN(created_at) AS BIGINT) FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NULL"
                .to_owned(),
            format!(
                "SELECT COUNT(*), CAST(MIN(not_before) AS BIGINT) FROM rabbitry_outbox \
                 WHERE status = 'pending' AND not_before IS NOT NULL AND not_before <= {now}"
            ),
            format!(
                "SELECT COUNT(*), CAST(MIN(not_before) AS BIGINT) FROM rabbitry_outbox \
                 WHERE status = 'pending' AND not_before IS NOT NULL AND not_before > {now}"
            ),
        ];
        let (counts, failed) = with_pool!(&self.db, |pool| {
            let mut counts = Vec::new();
            for q in &queries {
                // `now` is an integer this function made: nothing from outside.
                let r = sqlx::query(sqlx::AssertSqlSafe(q.as_str()))
                    .fetch_one(pool)
                    .await;
                counts.push(
                    r.and_then(|r| Ok((r.try_get::<i64, _>(0)?, r.try_get::<Option<i64>, _>(1)?))),
                );
            }
            let failed = sqlx::query(
                "SELECT id, CAST(message_id AS TEXT), CAST(exchange AS TEXT), CAST(routing_key AS TEXT), \
                 last_error FROM rabbitry_outbox \
                 WHERE status = 'failed' ORDER BY id",
            )
            .fetch_all(pool)
            .await;
            counts
                .into_iter()
                .collect::<sqlx::Result<Vec<_>>>()
                .and_then(|c| Ok((c, failed?.iter().map(failed_row).collect::<Vec<_>>())))
        })
        .map_err(|e| db_error(&self.url, "reading the outbox", e))?;
        let [(ready, oldest_ready), (due, oldest_due), (scheduled, next)] =
            [counts[0], counts[1], counts[2]];
        let pending = ready + due;
        let oldest = oldest_ready.into_iter().chain(oldest_due).min();
        Ok(OutboxStatus {
            pending,
            oldest_pending_ms: oldest.map(|t| (now - t).max(0)),
            scheduled,
            next_due_in_ms: next.map(|t| t - now),
            failed,
        })
    }

    /// The scheduled messages not published yet (at most `limit`), the
    /// next due first.
    pub async fn scheduled(&self, limit: usize) -> Result<Vec<ScheduledRow>> {
        let sql = format!(
            "SELECT id, CAST(message_id AS TEXT), CAST(exchange AS TEXT), CAST(routing_key AS TEXT), \
             CAST(not_before AS BIGINT), attempts FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NOT NULL ORDER BY not_before, id LIMIT {}",
            limit.min(i64::MAX as usize)
        );
        with_pool!(&self.db, |pool| {
            // `limit` is an integer: nothing from outside.
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
                .fetch_all(pool)
                .await;
            rows.and_then(|rows| {
                rows.iter()
                    .map(|r| {
                        let due_ms: i64 = r.try_get(4)?;
                        Ok(ScheduledRow {
                            id: r.try_get(0)?,
                            message_id: r.try_get(1)?,
                            exchange: r.try_get(2)?,
                            routing_key: r.try_get(3)?,
                            due: crate::clock::rfc3339(crate::clock::time_of(due_ms)),
                            due_ms,
                            attempts: r
                                .try_get::<i64, _>(5)
                                .or_else(|_| r.try_get::<i32, _>(5).map(i64::from))?,
                        })
                    })
                    .collect::<sqlx::Result<Vec<_>>>()
            })
        })
        .map_err(|e| db_error(&self.url, "reading scheduled messages", e))
    }

    /// Makes failed rows pending again, once their cause is fixed (an
    /// exchange declared, a row corrected): all of them, or those of
    /// `ids`. Returns how many. They keep their id, so they go out before
    /// the rows written after them that are still pending; rows that were
    /// published meanwhile are not waited for. A row that is still wrong
    /// fails again with its reason.
    pub async fn retry_failed(&self, ids: Option<&[i64]>) -> Result<u64> {
        let ids_json = ids.map(|ids| serde_json::to_string(ids).unwrap_or_else(|_| "[]".into()));
        let reset = "UPDATE rabbitry_outbox SET status = 'pending', last_error = NULL, \
                     lease_owner = NULL, lease_until = NULL WHERE status = 'failed'";
        let done = with_pool!(&self.db, |pool| {
            let q = match &ids_json {
                // The ids as one JSON array parameter, on both databases.
                Some(list) => {
                    let sql = match self.db {
                        #[cfg(feature = "sqlite")]
                        Database::Sqlite(_) => {
                            format!("{reset} AND id IN (SELECT value FROM json_each(?1))")
                        }
                        #[cfg(feature = "postgres")]
                        Database::Postgres(_) => format!(
                            "{reset} AND id IN (SELECT jsonb_array_elements_text($1::jsonb)::bigint)"
                        ),
                    };
                    // The SQL is this function's constants.
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(list.as_str())
                        .execute(pool)
                        .await
                }
                None => sqlx::query(reset).execute(pool).await,
            };
            q.map(|r| r.rows_affected())
        })
        .map_err(|e| db_error(&self.url, "retrying failed rows", e))?;
        self.wake();
        Ok(done)
    }

    /// Cancels the scheduled message `message_id`. An error of kind
    /// `NotFound` when there is nothing to cancel: published already, being
    /// published right now, or never scheduled.
    pub async fn cancel(&self, message_id: &str) -> Result<()> {
        let cancelled = with_pool!(&self.db, |pool| {
            let mut conn = pool
                .acquire()
                .await
                .map_err(|e| db_error(&self.url, "cancelling a scheduled message", e))?;
            cancel(&mut *conn, message_id).await?
        });
        if cancelled {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "no scheduled message '{message_id}' in {}: it was published already, is being published, or was never scheduled",
                    self.url
                ),
            ))
        }
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
