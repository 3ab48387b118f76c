//! The outbox on PostgreSQL: several relays share the rows through row
//! locks (`FOR UPDATE SKIP LOCKED`, held by the claim's transaction until
//! its batch is confirmed), and an insert notifies listening relays
//! (`pg_notify`, delivered when the writer's transaction commits).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use super::backend::{Backend, NEXT_DUE, SCHEDULE_INDEXES};
use super::relay::{claimed_from, BatchOutcome, Claimed, RelayOptions};
use super::{db_error, OutboxExecutor, OutboxRow, NOTIFY_CHANNEL};
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

fn claimed(r: &PgRow) -> sqlx::Result<Claimed> {
    claimed_from(
        r.try_get(0),
        r.try_get(1),
        r.try_get(2),
        r.try_get(3),
        r.try_get(4),
        r.try_get(5),
        r.try_get(6),
    )
}

impl Backend for PgPool {
    type Held = Transaction<'static, Postgres>;
    type Listener = PgListener;
    const NAME: &'static str = "postgres";

    async fn migrate(&self) -> sqlx::Result<()> {
        // One transaction, with an advisory lock: processes that start
        // together do not race to create the tables.
        let mut tx = self.begin().await?;
        sqlx::raw_sql(SCHEMA).execute(&mut *tx).await?;
        sqlx::raw_sql(SCHEDULE_INDEXES).execute(&mut *tx).await?;
        tx.commit().await
    }

    async fn claim(&self, options: &RelayOptions) -> sqlx::Result<(Vec<Claimed>, Self::Held)> {
        let mut tx = self.begin().await?;
        // Rows due now, whatever the number of future ones: the oldest
        // unscheduled rows and the earliest due scheduled rows, each found
        // through its own index and locked as found; the oldest of both go
        // out (the others' locks end with the claim's transaction).
        let ready = sqlx::query(
            "SELECT id, exchange, routing_key, properties, body, mandatory, created_at FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
        .bind(options.batch as i64)
        .fetch_all(&mut *tx)
        .await?;
        let due = sqlx::query(
            "SELECT id, exchange, routing_key, properties, body, mandatory, created_at FROM rabbitry_outbox \
             WHERE status = 'pending' AND not_before IS NOT NULL AND not_before <= $2 \
             ORDER BY not_before, id LIMIT $1 FOR UPDATE SKIP LOCKED",
        )
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
        Ok((rows, tx))
    }

    async fn next_due(&self) -> sqlx::Result<Option<i64>> {
        sqlx::query_scalar(NEXT_DUE).fetch_one(self).await
    }

    async fn finish(&self, mut tx: Self::Held, outcome: &BatchOutcome) -> sqlx::Result<()> {
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
