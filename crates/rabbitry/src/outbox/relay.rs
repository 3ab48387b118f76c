//! The relay: pending outbox rows to the broker, in order, with confirms.

use std::time::Duration;

use sqlx::Row;
use std::collections::VecDeque;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{db_error, store, Database, Outbox};
use crate::connection::{stopped, Connection};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::publish::{Confirmation, Producer, ProducerSettings};
use crate::worker::retry::now_millis;

/// How a relay works.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows claimed and published per round.
    pub batch: usize,
    /// Polling interval when nothing wakes the relay (other processes'
    /// commits on SQLite).
    pub poll: Duration,
    /// How long a SQLite lease on claimed rows lasts.
    pub lease: Duration,
    /// This relay's name in leases.
    pub owner: String,
    /// Test hook: stop after publishing a batch, before marking it, as a
    /// relay killed at that moment would.
    #[doc(hidden)]
    pub crash_after_publish: bool,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch: 500,
            poll: Duration::from_millis(500),
            lease: Duration::from_secs(10),
            owner: format!("relay-{}", uuid::Uuid::new_v4().simple()),
            crash_after_publish: false,
        }
    }
}

/// A running relay task.
pub struct Relay {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<()>>,
}

impl Relay {
    /// Stops after the current round; returns how the task ended.
    pub async fn stop(self) -> Result<()> {
        self.stop.send_replace(true);
        self.task
            .await
            .map_err(|e| Error::new(ErrorKind::Closed, "relay task").with_source(e))?
    }

    /// Waits for the task to end by itself (only the test hook ends it).
    pub async fn join(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::new(ErrorKind::Closed, "relay task").with_source(e))?
    }
}

struct Claimed {
    id: i64,
    message: Message,
}

impl Outbox {
    /// Starts a relay that publishes this outbox's rows on `conn`.
    pub async fn spawn_relay(&self, conn: &Connection, options: RelayOptions) -> Result<Relay> {
        let producer = Producer::new(
            conn,
            ProducerSettings {
                name: "outbox-relay".into(),
                auto_declare: false,
                message_ids: false,
                max_in_flight: options.batch.max(1),
                ..ProducerSettings::default()
            },
        )
        .await?;
        let (stop, stop_rx) = watch::channel(false);
        let outbox = self.clone();
        let task = tokio::spawn(async move { outbox.relay_loop(producer, options, stop_rx).await });
        Ok(Relay { stop, task })
    }

    async fn relay_loop(
        self,
        producer: Producer,
        options: RelayOptions,
        mut stop: watch::Receiver<bool>,
    ) -> Result<()> {
        let mut listener = match &self.db {
            Database::Postgres(pool) => listen(pool).await,
            Database::Sqlite(_) => None,
        };
        let mut failures = 0u32;
        // Batches published and waiting for their confirms, oldest first.
        // The next batch is claimed and published while the previous one
        // is being confirmed, so the broker always has work.
        let mut in_flight: VecDeque<JoinHandle<Result<usize>>> = VecDeque::new();
        loop {
            if *stop.borrow() {
                drain(&mut in_flight).await?;
                return Ok(());
            }
            // Register for a wake-up before looking, so that a commit made
            // while we look is not missed.
            let wake = self.wake.clone();
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claimed = match self.claim(&options).await {
                Ok(c) => c,
                Err(e) => {
                    failures += 1;
                    let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                    tracing::warn!(error = %e, ?delay, "claiming outbox rows failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = stopped(&mut stop) => return drain(&mut in_flight).await,
                    }
                }
            };
            let got = !claimed.rows.is_empty();
            if got {
                let submitted = submit_all(&producer, claimed.rows).await;
                let outbox = self.clone();
                let opts = options.clone();
                in_flight.push_back(tokio::spawn(async move {
                    outbox.finish(claimed.tx, submitted, &opts).await
                }));
            }
            // Keep at most two batches in flight; with nothing new, finish
            // what is in flight before sleeping.
            let must_wait = in_flight.len() >= 2 || (!got && !in_flight.is_empty());
            if must_wait {
                let oldest = in_flight.pop_front().map(join);
                let result = match oldest {
                    Some(f) => f.await,
                    None => Ok(0),
                };
                match result {
                    Ok(_) => failures = 0,
                    Err(e) if options.crash_after_publish => {
                        drain(&mut in_flight).await.ok();
                        return Err(e);
                    }
                    Err(e) => {
                        // Finish everything in flight, then start again
                        // from the oldest pending row, after a pause.
                        drain(&mut in_flight).await.ok();
                        failures += 1;
                        let delay = Duration::from_millis(200 * u64::from(failures.min(25)));
                        tracing::warn!(error = %e, ?delay, "relay round failed; rows stay pending");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = stopped(&mut stop) => return Ok(()),
                        }
                    }
                }
                continue;
            }
            if got {
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = wait_notification(&mut listener) => {}
                _ = tokio::time::sleep(options.poll) => {}
                _ = stopped(&mut stop) => return Ok(()),
            }
        }
    }

    /// Claims the oldest pending rows not claimed by another relay: row
    /// locks (`FOR UPDATE SKIP LOCKED`, held by the returned transaction)
    /// on PostgreSQL, a lease on SQLite.
    async fn claim(&self, options: &RelayOptions) -> Result<Claim> {
        let err = |e| db_error(&self.url, "claiming outbox rows", e);
        match &self.db {
            Database::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(err)?;
                let rows = sqlx::query(
                    "SELECT id, exchange, routing_key, properties, body, mandatory FROM rabbitry_outbox \
                     WHERE status = 'pending' ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
                )
                .bind(options.batch as i64)
                .fetch_all(&mut *tx)
                .await
                .map_err(err)?;
                let rows = rows
                    .iter()
                    .map(claimed_pg)
                    .collect::<sqlx::Result<Vec<_>>>()
                    .map_err(err)?;
                Ok(Claim { rows, tx: Some(tx) })
            }
            Database::Sqlite(pool) => {
                let now = now_millis();
                let until = now + options.lease.as_millis() as i64;
                // The lease names the relay and this claim.
                let token = format!("{}:{}", options.owner, uuid::Uuid::new_v4().simple());
                // One statement claims and returns exactly the leased rows.
                let rows = sqlx::query(
                    "UPDATE rabbitry_outbox SET lease_owner = ?1, lease_until = ?2 WHERE id IN \
                     (SELECT id FROM rabbitry_outbox WHERE status = 'pending' \
                      AND (lease_until IS NULL OR lease_until < ?3) ORDER BY id LIMIT ?4) \
                     RETURNING id, exchange, routing_key, properties, body, mandatory",
                )
                .bind(&token)
                .bind(until)
                .bind(now)
                .bind(options.batch as i64)
                .fetch_all(pool)
                .await
                .map_err(err)?;
                let mut rows = rows
                    .iter()
                    .map(claimed_sqlite)
                    .collect::<sqlx::Result<Vec<_>>>()
                    .map_err(err)?;
                // RETURNING does not promise an order; commit order is id order.
                rows.sort_by_key(|c| c.id);
                Ok(Claim { rows, tx: None })
            }
        }
    }

    /// Waits for a batch's confirms, then deletes what was confirmed and
    /// marks what the broker refused, in one transaction. Rows that got
    /// neither (broker away) stay pending and lose their lease.
    async fn finish(
        &self,
        tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
        submitted: Submitted,
        options: &RelayOptions,
    ) -> Result<usize> {
        let outcome = submitted.confirmed().await;
        if options.crash_after_publish {
            return Err(crash());
        }
        let err = |e| db_error(&self.url, "marking relayed rows", e);
        match (&self.db, tx) {
            (Database::Postgres(_), Some(mut tx)) => {
                sqlx::query("DELETE FROM rabbitry_outbox WHERE id = ANY($1)")
                    .bind(&outcome.sent)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                for (id, e) in &outcome.failed {
                    sqlx::query(
                        "UPDATE rabbitry_outbox SET status = 'failed', last_error = $2, attempts = attempts + 1 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(e)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                }
                tx.commit().await.map_err(err)?;
            }
            (Database::Sqlite(pool), _)
                if outcome.failed.is_empty() && outcome.transient.is_none() =>
            {
                // The common case, all confirmed: one statement, no transaction.
                let sent = serde_json::to_string(&outcome.sent).unwrap_or_default();
                sqlx::query(
                    "DELETE FROM rabbitry_outbox WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .bind(sent)
                .execute(pool)
                .await
                .map_err(err)?;
            }
            (Database::Sqlite(pool), _) => {
                let mut tx = pool.begin().await.map_err(err)?;
                let sent = serde_json::to_string(&outcome.sent).unwrap_or_default();
                sqlx::query(
                    "DELETE FROM rabbitry_outbox WHERE id IN (SELECT value FROM json_each(?1))",
                )
                .bind(sent)
                .execute(&mut *tx)
                .await
                .map_err(err)?;
                for (id, e) in &outcome.failed {
                    sqlx::query(
                        "UPDATE rabbitry_outbox SET status = 'failed', last_error = ?2, attempts = attempts + 1, \
                         lease_owner = NULL, lease_until = NULL WHERE id = ?1",
                    )
                    .bind(id)
                    .bind(e)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                }
                if outcome.transient.is_some() {
                    // Not confirmed (broker away): give the rows back so the
                    // next round takes them again, first.
                    let unconfirmed =
                        serde_json::to_string(&outcome.unconfirmed).unwrap_or_default();
                    sqlx::query(
                        "UPDATE rabbitry_outbox SET lease_owner = NULL, lease_until = NULL \
                         WHERE id IN (SELECT value FROM json_each(?1))",
                    )
                    .bind(unconfirmed)
                    .execute(&mut *tx)
                    .await
                    .map_err(err)?;
                }
                tx.commit().await.map_err(err)?;
            }
            (Database::Postgres(_), None) => {
                return Err(Error::new(
                    ErrorKind::Database,
                    "relay: claimed rows without their transaction",
                ));
            }
        }
        outcome.finish()
    }
}

async fn listen(pool: &sqlx::PgPool) -> Option<sqlx::postgres::PgListener> {
    let mut l = match sqlx::postgres::PgListener::connect_with(pool).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; the relay will poll");
            return None;
        }
    };
    match l.listen(super::NOTIFY_CHANNEL).await {
        Ok(()) => Some(l),
        Err(e) => {
            tracing::warn!(error = %e, "LISTEN failed; the relay will poll");
            None
        }
    }
}

async fn join(task: JoinHandle<Result<usize>>) -> Result<usize> {
    task.await
        .map_err(|e| Error::new(ErrorKind::Closed, "relay batch task").with_source(e))?
}

/// Waits for every batch in flight; returns the first error.
async fn drain(in_flight: &mut VecDeque<JoinHandle<Result<usize>>>) -> Result<()> {
    let mut first = Ok(());
    while let Some(t) = in_flight.pop_front() {
        if let Err(e) = join(t).await {
            if first.is_ok() {
                first = Err(e);
            }
        }
    }
    first
}

/// Rows claimed by one round, with the transaction that holds their locks
/// (PostgreSQL).
#[derive(Default)]
struct Claim {
    rows: Vec<Claimed>,
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
}

fn crash() -> Error {
    Error::new(
        ErrorKind::Closed,
        "relay stopped after publishing (test hook)",
    )
}

async fn wait_notification(listener: &mut Option<sqlx::postgres::PgListener>) {
    match listener {
        Some(l) => {
            if l.recv().await.is_err() {
                // The listener reconnects by itself on the next recv; do
                // not spin meanwhile.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        None => std::future::pending().await,
    }
}

fn claimed_pg(r: &sqlx::postgres::PgRow) -> sqlx::Result<Claimed> {
    claimed_from(
        r.try_get(0),
        r.try_get(1),
        r.try_get(2),
        r.try_get(3),
        r.try_get(4),
        r.try_get(5),
    )
}

fn claimed_sqlite(r: &sqlx::sqlite::SqliteRow) -> sqlx::Result<Claimed> {
    claimed_from(
        r.try_get(0),
        r.try_get(1),
        r.try_get(2),
        r.try_get(3),
        r.try_get(4),
        r.try_get(5),
    )
}

fn claimed_from(
    id: sqlx::Result<i64>,
    exchange: sqlx::Result<String>,
    routing_key: sqlx::Result<String>,
    properties: sqlx::Result<String>,
    body: sqlx::Result<Vec<u8>>,
    mandatory: sqlx::Result<bool>,
) -> sqlx::Result<Claimed> {
    let properties = store::decode(&properties?).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
    Ok(Claimed {
        id: id?,
        message: Message {
            body: body?,
            properties,
            routing_key: Some(routing_key?),
            exchange: Some(exchange?),
            mandatory: mandatory?,
        },
    })
}

#[derive(Default)]
struct BatchOutcome {
    sent: Vec<i64>,
    failed: Vec<(i64, String)>,
    unconfirmed: Vec<i64>,
    transient: Option<Error>,
}

impl BatchOutcome {
    fn finish(self) -> Result<usize> {
        match self.transient {
            Some(e) => Err(e),
            None => Ok(self.sent.len() + self.failed.len()),
        }
    }
}

/// A batch handed to the publisher, in order, whose confirms are pending.
struct Submitted {
    waits: Vec<(i64, Confirmation)>,
    not_sent: Vec<i64>,
    error: Option<Error>,
}

/// Submits every message in order; the confirms are awaited later.
async fn submit_all(producer: &Producer, claimed: Vec<Claimed>) -> Submitted {
    let mut out = Submitted {
        waits: Vec::with_capacity(claimed.len()),
        not_sent: Vec::new(),
        error: None,
    };
    for c in claimed {
        if out.error.is_some() {
            out.not_sent.push(c.id);
            continue;
        }
        match producer.submit(c.message).await {
            Ok(w) => out.waits.push((c.id, w)),
            Err(e) => {
                out.not_sent.push(c.id);
                out.error = Some(e);
            }
        }
    }
    out
}

impl Submitted {
    async fn confirmed(self) -> BatchOutcome {
        let mut out = BatchOutcome {
            unconfirmed: self.not_sent,
            transient: self.error,
            ..BatchOutcome::default()
        };
        for (id, w) in self.waits {
            match w.wait().await {
                Ok(()) => out.sent.push(id),
                Err(e) if matches!(e.kind(), ErrorKind::Unroutable | ErrorKind::Channel) => {
                    tracing::error!(id, error = %e, "outbox message refused; marked failed");
                    out.failed.push((id, e.to_string()));
                }
                Err(e) => {
                    out.unconfirmed.push(id);
                    out.transient.get_or_insert(e);
                }
            }
        }
        out
    }
}
