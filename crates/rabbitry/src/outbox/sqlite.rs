//! The outbox on SQLite, the embedded default: the file is opened in WAL
//! mode; one relay at a time is active, holding the lease in
//! `rabbitry_outbox_relay` (others stand by and take over when it is not
//! renewed); claimed rows carry a lease of their own (`lease_owner`,
//! `lease_until`) taken and returned by one `UPDATE ... RETURNING`; other
//! processes' commits are found by polling.

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Row, SqliteConnection, SqlitePool};

use super::backend::{Backend, NEXT_DUE, SCHEDULE_INDEXES};
use super::claim::{claimed_from, BatchOutcome, Claimed, Columns};
use super::options::RelayOptions;
use super::{db_error, OutboxExecutor, OutboxRow};
use crate::clock::now_millis;
use crate::connection::redact;
use crate::error::{Error, ErrorKind, Result};

/// Tables made before scheduling get the column (SQLite has no `ADD
/// COLUMN IF NOT EXISTS`: `migrate` asks first).
const ADD_NOT_BEFORE: &str = "ALTER TABLE rabbitry_outbox ADD COLUMN not_before INTEGER";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rabbitry_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BLOB NOT NULL,
    mandatory INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_owner TEXT,
    lease_until INTEGER,
    not_before INTEGER
);
CREATE INDEX IF NOT EXISTS rabbitry_outbox_pending ON rabbitry_outbox (status, id);
CREATE TABLE IF NOT EXISTS rabbitry_outbox_relay (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    owner TEXT NOT NULL,
    lease_until INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rabbitry_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
";

fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Opens `url`; with `create` false, a file that does not exist is an
/// error rather than a new empty database.
pub(super) async fn connect(url: &str, create: bool) -> Result<SqlitePool> {
    let named = |e: sqlx::Error| db_error(url, "cannot connect", e);
    let opts = SqliteConnectOptions::from_str(url).map_err(named)?;
    if !create && !is_memory(url) && !opts.get_filename().exists() {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "database {} does not exist ({}); create it with `rabbitry outbox migrate --database URL`",
                redact(url),
                opts.get_filename().display()
            ),
        ));
    }
    let opts = opts
        .create_if_missing(create)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10))
        .pragma("mmap_size", "268435456");
    SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(opts)
        .await
        .map_err(named)
}

/// The columns a claim returns: each value, then its SQLite type
/// (`typeof`), since another program may have stored any type in any
/// column.
const CLAIMED_COLUMNS: &str =
    "id, exchange, routing_key, properties, body, mandatory, created_at, \
     message_id, typeof(exchange), typeof(routing_key), typeof(properties), typeof(body), \
     typeof(mandatory), typeof(created_at), typeof(message_id), \
     CAST(MAX(COALESCE(not_before, 0), created_at) AS INTEGER), \
     typeof(exchange) = 'text' AND typeof(routing_key) = 'text' AND typeof(properties) = 'text' \
     AND typeof(body) = 'blob' AND typeof(mandatory) = 'integer' AND mandatory IN (0, 1) \
     AND typeof(created_at) = 'integer' AND typeof(message_id) IN ('text', 'null')";

/// Where [`CLAIMED_COLUMNS`] says whether every column holds its
/// documented type (rabbitry's own rows, and most foreign ones).
const PLAIN: usize = 16;

/// Why a column cannot be read: its name, what it holds, what it should.
fn wrong_column(name: &str, found: &str, expected: &str) -> String {
    format!("column {name} holds {found}; expected {expected}")
}

/// Column `i` of a claimed row (with its type at `i + 7`), read by `read`
/// for the SQLite type it holds; the error names the column.
fn column<T>(
    r: &SqliteRow,
    i: usize,
    name: &str,
    expected: &str,
    read: impl FnOnce(&str) -> Option<sqlx::Result<T>>,
) -> std::result::Result<T, String> {
    let kind: String = r.try_get(i + 7).unwrap_or_default();
    match read(&kind) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(format!("column {name}: {e}")),
        None => {
            let found = match kind.as_str() {
                "text" => match r.try_get::<String, _>(i) {
                    Ok(t) => format!("the text '{}'", crate::limits::shorten(&t, 40)),
                    Err(_) => "text".into(),
                },
                "integer" => format!("the integer {}", r.try_get::<i64, _>(i).unwrap_or(0)),
                "real" => format!("the real {}", r.try_get::<f64, _>(i).unwrap_or(0.0)),
                "blob" => "a blob".into(),
                _ => "NULL".into(),
            };
            Err(wrong_column(name, &found, expected))
        }
    }
}

fn claimed(r: &SqliteRow) -> sqlx::Result<Claimed> {
    if r.try_get::<bool, _>(PLAIN).unwrap_or(false) {
        // Every column of its type: read straight, no type names.
        return Ok(claimed_from(r.try_get(0)?, Columns::typed(r, 15)));
    }
    let text = |i, name| {
        column(r, i, name, "text", |k| {
            (k == "text").then(|| r.try_get::<String, _>(i))
        })
    };
    let columns = Columns {
        exchange: text(1, "exchange"),
        routing_key: text(2, "routing_key"),
        properties: text(3, "properties"),
        // A body written as text is its UTF-8 bytes.
        body: column(r, 4, "body", "a blob", |k| match k {
            "blob" => Some(r.try_get::<Vec<u8>, _>(4)),
            "text" => Some(r.try_get::<String, _>(4).map(String::into_bytes)),
            _ => None,
        }),
        mandatory: column(r, 5, "mandatory", "0 or 1", |k| match k {
            "integer" => match r.try_get::<i64, _>(5) {
                Ok(0) => Some(Ok(false)),
                Ok(1) => Some(Ok(true)),
                _ => None,
            },
            _ => None,
        }),
        // Milliseconds as a real (Python's `time.time() * 1000`) are
        // milliseconds all the same.
        created_at: column(r, 6, "created_at", "epoch milliseconds", |k| match k {
            "integer" => Some(r.try_get::<i64, _>(6)),
            "real" => Some(r.try_get::<f64, _>(6).map(|f| f.round() as i64)),
            _ => None,
        }),
        message_id: column(r, 7, "message_id", "text", |k| match k {
            "text" => Some(r.try_get::<String, _>(7).map(Some)),
            "integer" => Some(r.try_get::<i64, _>(7).map(|n| Some(n.to_string()))),
            "null" => Some(Ok(None)),
            _ => None,
        }),
        due_at: r.try_get(15).ok(),
    };
    Ok(claimed_from(r.try_get(0)?, columns))
}

/// The ids as a JSON array, for `json_each`: one statement for a batch.
fn id_list(ids: &[i64]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".into())
}

impl Backend for SqlitePool {
    type Held = ();
    type Listener = ();
    type Lead = tokio::time::Instant;
    const NAME: &'static str = "sqlite";

    async fn migrate(&self) -> sqlx::Result<()> {
        sqlx::raw_sql(SCHEMA).execute(self).await?;
        let has: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pragma_table_info('rabbitry_outbox') WHERE name = 'not_before'",
        )
        .fetch_one(self)
        .await?;
        if has == 0 {
            sqlx::raw_sql(ADD_NOT_BEFORE).execute(self).await?;
        }
        sqlx::raw_sql(SCHEDULE_INDEXES)
            .execute(self)
            .await
            .map(drop)
    }

    async fn next_due(&self) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar(NEXT_DUE).fetch_one(self).await
    }

    async fn claim(&self, options: &RelayOptions) -> sqlx::Result<(Vec<Claimed>, ())> {
        // A `not_before` another program stored as text or a blob is never
        // due: such a row fails with the reason instead of waiting for
        // ever. Numbers sort before text and blobs, so the scheduling
        // index finds these at its end.
        // Looked for first (a read, through the scheduling index, which
        // the planner would not pick by itself): the update, which takes
        // the write lock, runs only when there is such a row.
        let text_due: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM rabbitry_outbox INDEXED BY rabbitry_outbox_due \
             WHERE status = 'pending' AND not_before IS NOT NULL AND not_before >= '' LIMIT 1",
        )
        .fetch_optional(self)
        .await?;
        if text_due.is_some() {
            sqlx::query(
                "UPDATE rabbitry_outbox SET status = 'failed', attempts = attempts + 1, \
                 last_error = 'column not_before holds the ' || typeof(not_before) || ' ''' || \
                 substr(CAST(not_before AS TEXT), 1, 40) || '''; expected epoch milliseconds' \
                 WHERE status = 'pending' AND not_before IS NOT NULL AND not_before >= '' \
                 AND id IN (SELECT id FROM rabbitry_outbox INDEXED BY rabbitry_outbox_due \
                   WHERE status = 'pending' AND not_before IS NOT NULL AND not_before >= '')",
            )
            .execute(self)
            .await?;
        }
        let now = now_millis();
        let until = now + options.lease.as_millis() as i64;
        // The lease names the relay and this claim.
        let token = format!("{}:{}", options.owner, uuid::Uuid::new_v4().simple());
        // One statement claims and returns exactly the leased rows.
        // Rows due now, whatever the number of future ones: the oldest
        // unscheduled rows and the earliest due scheduled rows, each found
        // through its own index, then the oldest of both.
        let sql = format!(
            "UPDATE rabbitry_outbox SET lease_owner = ?1, lease_until = ?2 WHERE id IN ( \
               SELECT id FROM (SELECT id FROM rabbitry_outbox \
                 WHERE status = 'pending' AND not_before IS NULL \
                 AND (lease_until IS NULL OR lease_until < ?3) ORDER BY id LIMIT ?4) \
               UNION ALL \
               SELECT id FROM (SELECT id FROM rabbitry_outbox \
                 WHERE status = 'pending' AND not_before IS NOT NULL AND not_before <= ?3 \
                 AND (lease_until IS NULL OR lease_until < ?3) ORDER BY not_before, id LIMIT ?4) \
               ORDER BY id LIMIT ?4) \
             RETURNING {CLAIMED_COLUMNS}"
        );
        // The SQL is this file's constants: nothing from outside.
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&token)
            .bind(until)
            .bind(now)
            .bind(options.batch as i64)
            .fetch_all(self)
            .await?;
        let mut rows = rows.iter().map(claimed).collect::<sqlx::Result<Vec<_>>>()?;
        // RETURNING does not promise an order; commit order is id order.
        rows.sort_by_key(|c| c.id);
        Ok((rows, ()))
    }

    async fn finish(&self, (): (), outcome: &BatchOutcome) -> sqlx::Result<()> {
        let delete = "DELETE FROM rabbitry_outbox WHERE id IN (SELECT value FROM json_each(?1))";
        if outcome.failed.is_empty() && outcome.transient.is_none() {
            // The common case, all confirmed: one statement, no transaction.
            sqlx::query(delete)
                .bind(id_list(&outcome.sent))
                .execute(self)
                .await?;
            return Ok(());
        }
        let mut tx = self.begin().await?;
        sqlx::query(delete)
            .bind(id_list(&outcome.sent))
            .execute(&mut *tx)
            .await?;
        for (id, e) in &outcome.failed {
            sqlx::query(
                "UPDATE rabbitry_outbox SET status = 'failed', last_error = ?2, attempts = attempts + 1, \
                 lease_owner = NULL, lease_until = NULL WHERE id = ?1",
            )
            .bind(id)
            .bind(e)
            .execute(&mut *tx)
            .await?;
        }
        if outcome.transient.is_some() {
            // Not confirmed (broker away): give the rows back so the next
            // round takes them again, first.
            sqlx::query(
                "UPDATE rabbitry_outbox SET lease_owner = NULL, lease_until = NULL \
                 WHERE id IN (SELECT value FROM json_each(?1))",
            )
            .bind(id_list(&outcome.unconfirmed))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }

    async fn lead(
        &self,
        options: &RelayOptions,
        lead: &mut Option<tokio::time::Instant>,
    ) -> sqlx::Result<bool> {
        // Renewed when a quarter of the lease has passed: one write every
        // few seconds, whatever the relay's pace.
        if lead.is_some_and(|renewed| renewed.elapsed() < options.lease / 4) {
            return Ok(true);
        }
        let now = now_millis();
        let taken = sqlx::query(
            "INSERT INTO rabbitry_outbox_relay (id, owner, lease_until) VALUES (1, ?1, ?2) \
             ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until \
             WHERE rabbitry_outbox_relay.owner = excluded.owner OR rabbitry_outbox_relay.lease_until < ?3",
        )
        .bind(&options.owner)
        .bind(now + options.lease.as_millis() as i64)
        .bind(now)
        .execute(self)
        .await?
        .rows_affected()
            == 1;
        if taken && lead.is_none() {
            // Rows the previous active relay had claimed are free at once,
            // so that they go out first, in order.
            sqlx::query(
                "UPDATE rabbitry_outbox SET lease_owner = NULL, lease_until = NULL \
                 WHERE lease_owner IS NOT NULL AND substr(lease_owner, 1, length(?1) + 1) <> ?1 || ':'",
            )
            .bind(&options.owner)
            .execute(self)
            .await?;
        }
        *lead = taken.then(tokio::time::Instant::now);
        Ok(taken)
    }

    async fn resign(&self, options: &RelayOptions, lead: Option<tokio::time::Instant>) {
        if lead.is_none() {
            return;
        }
        if let Err(e) = sqlx::query("DELETE FROM rabbitry_outbox_relay WHERE owner = ?1")
            .bind(&options.owner)
            .execute(self)
            .await
        {
            tracing::warn!(error = %e, "giving up the relay's lease failed; it ends by itself");
        }
    }

    async fn listen(&self) -> Option<()> {
        None
    }

    async fn notified((): &mut ()) {
        std::future::pending().await
    }
}

outbox_executor!(
    SqliteConnection,
    sqlx::Sqlite,
    "sqlite",
    insert = "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) \
              VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    insert_rows = (
        "INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) ",
        ""
    ),
    inbox = "INSERT INTO rabbitry_inbox (consumer, message_id, processed_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (consumer, message_id) DO NOTHING",
    // Not while a relay's lease says it is being published.
    cancel = "DELETE FROM rabbitry_outbox WHERE message_id = ?1 AND not_before IS NOT NULL \
              AND status = 'pending' AND (lease_until IS NULL OR lease_until < ?2)",
);
