//! The outbox on PostgreSQL: one relay at a time is active, holding a
//! session-level advisory lock (others stand by and take it when its
//! session ends); claimed rows are locked (`FOR UPDATE SKIP LOCKED`, held
//! by the claim's transaction until its batch is confirmed, which is what
//! cancelling a scheduled row waits for); an insert notifies listening
//! relays (`pg_notify`, delivered when the writer's transaction commits).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use super::backend::{Backend, NEXT_DUE, SCHEDULE_INDEXES};
use super::claim::{claimed_from, BatchOutcome, Claimed, Columns};
use super::options::RelayOptions;
use super::{db_error, OutboxExecutor, OutboxRow};

/// The channel relays listen on for new rows.
const NOTIFY_CHANNEL: &str = "rabbitry_outbox";
use crate::clock::now_millis;
use crate::error::Result;

const SCHEMA: &str = "
SELECT pg_advisory_xact_lock(7263551);
CREATE TABLE IF NOT EXISTS rabbitry_outbox (
    id BIGSERIAL PRIMARY KEY,
    message_id TEXT NOT NULL,
    exchange TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    properties TEXT NOT NULL,
    body BYTEA NOT NULL,
    mandatory BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    lease_owner TEXT,
    lease_until BIGINT,
    not_before BIGINT
);
-- Tables made before scheduling.
ALTER TABLE rabbitry_outbox ADD COLUMN IF NOT EXISTS not_before BIGINT;
-- Earlier versions made message ids UNIQUE: an index that every insert and
-- delete paid for, and that nothing reads.
ALTER TABLE rabbitry_outbox DROP CONSTRAINT IF EXISTS rabbitry_outbox_message_id_key;
CREATE INDEX IF NOT EXISTS rabbitry_outbox_pending ON rabbitry_outbox (status, id);
CREATE TABLE IF NOT EXISTS rabbitry_inbox (
    consumer TEXT NOT NULL,
    message_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, message_id)
);
";

/// Whether the tables, the `not_before` column and every index exist, and
/// the old unique constraint is gone: read from the catalogs, no lock.
const CURRENT: &str = "SELECT to_regclass('rabbitry_outbox') IS NOT NULL \
    AND to_regclass('rabbitry_inbox') IS NOT NULL \
    AND to_regclass('rabbitry_outbox_pending') IS NOT NULL \
    AND to_regclass('rabbitry_outbox_ready') IS NOT NULL \
    AND to_regclass('rabbitry_outbox_due') IS NOT NULL \
    AND to_regclass('rabbitry_outbox_scheduled_id') IS NOT NULL \
    AND EXISTS (SELECT 1 FROM pg_attribute \
        WHERE attrelid = to_regclass('rabbitry_outbox') AND attname = 'not_before' AND NOT attisdropped) \
    AND NOT EXISTS (SELECT 1 FROM pg_constraint \
        WHERE conrelid = to_regclass('rabbitry_outbox') AND conname = 'rabbitry_outbox_message_id_key')";

/// The active relay's lock: a session-level advisory lock per schema (the
/// table's), in the two-key space, apart from the migration's.
const LEAD_LOCK: &str = "SELECT pg_try_advisory_lock(7263552, hashtext(current_schema()))";

/// How often the active relay checks that its lock's session is alive.
const LEAD_CHECK: Duration = Duration::from_secs(2);

/// PostgreSQL's `lock_not_available`: `lock_timeout` passed.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// One attempt at the schema, in one transaction, with an advisory lock
/// (processes that start together do not race to create the tables) and
/// a short `lock_timeout`.
async fn migrate_once(pool: &PgPool) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::raw_sql("SET LOCAL lock_timeout = '1s'")
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
    sqlx::raw_sql(SCHEDULE_INDEXES).execute(&mut *tx).await?;
    tx.commit().await
}

/// Opens `url`, trying one direct connection first: its error says what
/// is wrong (refused, unknown database, authentication) where a pool would
/// only time out.
pub(super) async fn connect(url: &str) -> Result<PgPool> {
    let named = |e: sqlx::Error| db_error(url, "cannot connect", e);
    let opts = PgConnectOptions::from_str(url).map_err(named)?;
    let probe = <PgConnection as sqlx::Connection>::connect_with(&opts)
        .await
        .map_err(named)?;
    let _ = sqlx::Connection::close(probe).await;
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(named)
}

/// The columns a claim reads, in the order [`claimed`] expects.
const CLAIMED_COLUMNS: &str =
    "id, exchange, routing_key, properties, body, mandatory, created_at, message_id, \
     GREATEST(COALESCE(not_before, 0), created_at)";

fn claimed(r: &PgRow) -> sqlx::Result<Claimed> {
    // The schema types every column; a table made by hand with other
    // types still fails row by row, naming the column.
    Ok(claimed_from(r.try_get(0)?, Columns::typed(r, 8)))
}

impl Backend for PgPool {
    /// The claim's transaction, while it holds rows: a claim that found
    /// nothing ends at once, so an idle relay never sits `idle in
    /// transaction` in front of a migration's lock.
    type Held = Option<Transaction<'static, Postgres>>;
    type Listener = PgListener;
    /// The session that holds the advisory lock, and when it was last
    /// seen alive.
    type Lead = (PgConnection, tokio::time::Instant);
    const NAME: &'static str = "postgres";

    async fn migrate(&self) -> sqlx::Result<()> {
        // A schema that is already current takes no lock at all: every
        // DDL statement, `IF NOT EXISTS` included, locks the table and
        // would queue the application's inserts behind it.
        if sqlx::query_scalar::<_, bool>(CURRENT)
            .fetch_one(self)
            .await?
        {
            return Ok(());
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match migrate_once(self).await {
                Err(sqlx::Error::Database(e))
                    if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) && attempt < 120 =>
                {
                    // Someone holds the table (a long transaction): do not
                    // wait in the lock queue, where every insert would
                    // wait behind us; try again shortly.
                    tracing::warn!(
                        attempt,
                        "creating or upgrading the outbox tables waits for a lock on \
                         rabbitry_outbox held by another session; trying again"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => return other,
            }
        }
    }

    async fn claim(&self, options: &RelayOptions) -> sqlx::Result<(Vec<Claimed>, Self::Held)> {
        let mut tx = self.begin().await?;
        // Rows due now, whatever the number of future ones: the oldest
        // unscheduled rows and the earliest due scheduled rows, each found
        // through its own index and locked as found; the oldest of both go
        // out (the others' locks end with the claim's transaction).
        let ready = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLAIMED_COLUMNS} FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
        )))
        .bind(options.batch as i64)
        .fetch_all(&mut *tx)
        .await?;
        let due = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CLAIMED_COLUMNS} FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NOT NULL AND not_before <= $2 \
             ORDER BY not_before, id LIMIT $1 FOR UPDATE SKIP LOCKED"
        )))
        .bind(options.batch as i64)
        .bind(now_millis())
        .fetch_all(&mut *tx)
        .await?;
        let mut rows = ready
            .iter()
            .chain(due.iter())
            .map(claimed)
            .collect::<sqlx::Result<Vec<_>>>()?;
        rows.sort_by_key(|c| c.id);
        rows.truncate(options.batch);
        if rows.is_empty() {
            tx.commit().await?;
            return Ok((rows, None));
        }
        Ok((rows, Some(tx)))
    }

    async fn next_due(&self) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar(NEXT_DUE).fetch_one(self).await
    }

    async fn finish(&self, tx: Self::Held, outcome: &BatchOutcome) -> sqlx::Result<()> {
        let Some(mut tx) = tx else { return Ok(()) };
        sqlx::query("DELETE FROM rabbitry_outbox WHERE id = ANY($1)")
            .bind(&outcome.sent)
            .execute(&mut *tx)
            .await?;
        for (id, e) in &outcome.failed {
            sqlx::query(
                "UPDATE rabbitry_outbox SET status = 'failed', last_error = $2, attempts = attempts + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(e)
            .execute(&mut *tx)
            .await?;
        }
        // Rows that got neither stay pending: committing releases their
        // locks, and the next round takes them again.
        tx.commit().await
    }

    async fn lead(
        &self,
        _options: &RelayOptions,
        lead: &mut Option<Self::Lead>,
    ) -> sqlx::Result<bool> {
        if let Some((session, seen)) = lead {
            if seen.elapsed() < LEAD_CHECK {
                return Ok(true);
            }
            match sqlx::query("SELECT 1").execute(&mut *session).await {
                Ok(_) => {
                    *seen = tokio::time::Instant::now();
                    return Ok(true);
                }
                Err(e) => {
                    // The session, and with it the lock, is gone: another
                    // relay may be active already.
                    tracing::warn!(error = %e, "the relay lost its lock's session; standing by");
                    *lead = None;
                }
            }
        }
        // A session of its own, outside the pool: the lock ends with it,
        // whether the relay stops, its process dies or the network drops.
        let mut session = self.acquire().await?.detach();
        let got: bool = sqlx::query_scalar(LEAD_LOCK)
            .fetch_one(&mut session)
            .await?;
        if got {
            *lead = Some((session, tokio::time::Instant::now()));
        } else {
            let _ = sqlx::Connection::close(session).await;
        }
        Ok(got)
    }

    async fn resign(&self, _options: &RelayOptions, lead: Option<Self::Lead>) {
        if let Some((session, _)) = lead {
            // Closing the session releases the lock.
            let _ = sqlx::Connection::close(session).await;
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut l = match PgListener::connect_with(self).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN failed; the relay will poll");
                return None;
            }
        };
        match l.listen(NOTIFY_CHANNEL).await {
            Ok(()) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN failed; the relay will poll");
                None
            }
        }
    }

    async fn notified(listener: &mut PgListener) {
        if listener.recv().await.is_err() {
            // The listener reconnects by itself on the next recv; do not
            // spin meanwhile.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

// On PostgreSQL the insert also notifies listening relays, in the same
// round trip; the notification is delivered when (and only if) the
// transaction commits.
outbox_executor!(
    PgConnection,
    sqlx::Postgres,
    "postgres",
    insert = "WITH ins AS (INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) \
              VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id) \
              SELECT pg_notify('rabbitry_outbox', '') FROM ins",
    // Several rows, one notification.
    insert_rows = (
        "WITH ins AS (INSERT INTO rabbitry_outbox (message_id, exchange, routing_key, properties, body, mandatory, created_at, not_before) ",
        "RETURNING id) SELECT pg_notify('rabbitry_outbox', '') FROM (SELECT 1 FROM ins LIMIT 1) AS one"
    ),
    inbox = "INSERT INTO rabbitry_inbox (consumer, message_id, processed_at) VALUES ($1, $2, $3) \
             ON CONFLICT (consumer, message_id) DO NOTHING",
    // A relay publishing the row holds its lock: this waits for it, and
    // then finds the row gone. The second parameter is unused here.
    cancel = "DELETE FROM rabbitry_outbox WHERE message_id = $1 AND not_before IS NOT NULL \
              AND status = 'pending' AND $2::BIGINT IS NOT NULL",
);
