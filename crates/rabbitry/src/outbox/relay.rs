//! The relay: pending outbox rows to the broker, in order, with confirms.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::backend::Backend;
use super::claim::{BatchOutcome, Claimed};
use super::options::RelayOptions;
use super::{db_error, with_pool, Database, Outbox};
use crate::connection::{redact, Backoff, Connection};
use crate::error::{Error, ErrorKind, Result};
use crate::message::HeaderValue;
use crate::publish::{Confirmation, Producer, ProducerSettings};
use crate::task::{Background, CancellationToken};

/// A running relay. Dropping it stops the relay after its current round
/// (see [`Relay::stop`] to wait for that).
#[derive(Debug)]
pub struct Relay {
    task: Background<Result<()>>,
}

impl Relay {
    /// Stops after the current round; returns how the task ended.
    pub async fn stop(self) -> Result<()> {
        self.task
            .stop()
            .await
            .unwrap_or_else(|| Err(Error::new(ErrorKind::Closed, "the relay task panicked")))
    }
}

/// How often a relay that hears of commits looks anyway.
const LISTENING_POLL: Duration = Duration::from_secs(30);

/// How often a standby relay asks for the lead, at most.
const STANDBY_POLL: Duration = Duration::from_millis(500);

impl Outbox {
    /// Starts a relay that publishes this outbox's rows on `conn`.
    pub async fn spawn_relay(&self, conn: &Connection, options: RelayOptions) -> Result<Relay> {
        options.validate()?;
        let producer = Producer::new(
            conn,
            ProducerSettings::default()
                .name("outbox-relay")
                .auto_declare(false)
                .message_ids(false)
                .max_in_flight(2 * options.batch),
        )
        .await?;
        let task = with_pool!(&self.db, |pool| {
            let looping = RelayLoop {
                pool: pool.clone(),
                url: Arc::from(self.url.as_str()),
                wake: self.wake.clone(),
                options,
                delay: metrics::histogram!(
                    "rabbitry_outbox_commit_to_publish_seconds",
                    "database" => redact(&self.url)
                ),
            };
            Background::spawn(move |stop| looping.run(producer, stop))
        });
        Ok(Relay { task })
    }
}

/// One relay's work on one database.
struct RelayLoop<B> {
    pool: B,
    url: Arc<str>,
    wake: Arc<Notify>,
    options: RelayOptions,
    /// Time from a row's write to its confirmed publish.
    delay: metrics::Histogram,
}

impl<B: Backend> Clone for RelayLoop<B> {
    fn clone(&self) -> Self {
        RelayLoop {
            pool: self.pool.clone(),
            url: self.url.clone(),
            wake: self.wake.clone(),
            options: self.options.clone(),
            delay: self.delay.clone(),
        }
    }
}

impl<B: Backend> RelayLoop<B> {
    /// Publishes while this relay is the outbox's active one, stands by
    /// while another is, and gives the lead up when it stops.
    async fn run(self, producer: Producer, stop: CancellationToken) -> Result<()> {
        let mut lead = None;
        let result = self.serve(&producer, &stop, &mut lead).await;
        self.pool.resign(&self.options, lead).await;
        result
    }

    async fn serve(
        &self,
        producer: &Producer,
        stop: &CancellationToken,
        lead: &mut Option<B::Lead>,
    ) -> Result<()> {
        let options = self.options.clone();
        let mut standing_by = false;
        let mut listener = self.pool.listen().await;
        // With commits announced (PostgreSQL), polling is only a safety
        // net; otherwise it is how other processes' commits are found.
        let poll = if listener.is_some() {
            options.poll.max(LISTENING_POLL)
        } else {
            options.poll
        };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        // Batches published and waiting for their confirms, oldest first.
        // The next batch is claimed and published while the previous one
        // is being confirmed, so the broker always has work.
        let mut in_flight: VecDeque<JoinHandle<Result<usize>>> = VecDeque::new();
        loop {
            if stop.is_cancelled() {
                drain(&mut in_flight).await?;
                return Ok(());
            }
            // One active relay per outbox keeps the commit order; the
            // others wait to take over.
            match self.pool.lead(&options, lead).await {
                Ok(true) if standing_by => {
                    standing_by = false;
                    tracing::info!(outbox = %self.url, owner = %options.owner, "now the outbox's active relay");
                }
                Ok(true) => {}
                Ok(false) => {
                    drain(&mut in_flight).await.ok();
                    if !standing_by {
                        standing_by = true;
                        tracing::info!(outbox = %self.url, owner = %options.owner, "another relay is active on this outbox; standing by");
                    }
                    if stopped_during(stop, options.poll.min(STANDBY_POLL)).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "taking the relay's lead failed");
                    if stopped_during(stop, delay).await {
                        return drain(&mut in_flight).await;
                    }
                    continue;
                }
            }
            // Register for a wake-up before looking, so that a commit made
            // while we look is not missed.
            let wake = self.wake.clone();
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claimed = match self.claim().await {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "claiming outbox rows failed");
                    if stopped_during(stop, delay).await {
                        return drain(&mut in_flight).await;
                    }
                    continue;
                }
            };
            let (rows, held) = claimed;
            let got = !rows.is_empty();
            if got {
                let submitted = submit_all(producer, rows).await;
                let relay = self.clone();
                in_flight.push_back(tokio::spawn(
                    async move { relay.finish(held, submitted).await },
                ));
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
                    Ok(_) => backoff.reset(),
                    Err(e) => {
                        // Finish everything in flight, then start again
                        // from the oldest pending row, after a pause.
                        drain(&mut in_flight).await.ok();
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %e, ?delay, "relay round failed; rows stay pending");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = stop.cancelled() => return Ok(()),
                        }
                    }
                }
                continue;
            }
            if got {
                continue;
            }
            // Nothing due: sleep until a commit wakes us, the next
            // scheduled row is due, or the poll interval (for commits
            // nothing announces) has passed.
            let due = self.until_next_due().await;
            tokio::select! {
                _ = &mut notified => {}
                _ = wait_notification::<B>(&mut listener) => {}
                _ = tokio::time::sleep(poll) => {}
                _ = sleep_until_due(due) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }

    /// Claims the oldest pending rows not claimed by another relay: row
    /// locks on PostgreSQL, a lease on SQLite.
    async fn claim(&self) -> Result<(Vec<Claimed>, B::Held)> {
        self.pool
            .claim(&self.options)
            .await
            .map_err(|e| db_error(&self.url, "claiming outbox rows", e))
    }

    /// How long until the next scheduled row is due; `None` when none is
    /// (or it is due already but another relay holds it: the poll
    /// interval then decides).
    async fn until_next_due(&self) -> Option<Duration> {
        match self.pool.next_due().await {
            Ok(Some(at)) => {
                let wait = at - crate::clock::now_millis();
                (wait > 0).then(|| Duration::from_millis(wait as u64))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the next due time failed");
                None
            }
        }
    }

    /// Waits for a batch's confirms, then deletes what was confirmed and
    /// marks what the broker refused. Rows that got neither (broker away)
    /// stay pending, first in line.
    async fn finish(&self, held: B::Held, submitted: Submitted) -> Result<usize> {
        let outcome = submitted.confirmed(&self.delay).await;
        self.pool
            .finish(held, &outcome)
            .await
            .map_err(|e| db_error(&self.url, "marking relayed rows", e))?;
        outcome.finish()
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

/// Waits `pause`; `true` when the relay was asked to stop meanwhile.
async fn stopped_during(stop: &CancellationToken, pause: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => false,
        _ = stop.cancelled() => true,
    }
}

async fn sleep_until_due(due: Option<Duration>) {
    match due {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

async fn wait_notification<B: Backend>(listener: &mut Option<B::Listener>) {
    match listener {
        Some(l) => B::notified(l).await,
        None => std::future::pending().await,
    }
}

/// A batch handed to the publisher, in order, whose confirms are pending.
struct Submitted {
    /// Row id, due time and the confirm to wait for.
    waits: Vec<(i64, i64, Confirmation)>,
    /// Rows that are not messages, and why.
    malformed: Vec<(i64, String)>,
    not_sent: Vec<i64>,
    error: Option<Error>,
}

/// Submits every message in order; the confirms are awaited later.
async fn submit_all(producer: &Producer, claimed: Vec<Claimed>) -> Submitted {
    let mut out = Submitted {
        waits: Vec::with_capacity(claimed.len()),
        malformed: Vec::new(),
        not_sent: Vec::new(),
        error: None,
    };
    for c in claimed {
        if out.error.is_some() {
            out.not_sent.push(c.id);
            continue;
        }
        let message = match c.message {
            Ok(mut m) => {
                // When the row was written and when it went out: what the
                // outbox added to the message's trip.
                let h = &mut m.properties.headers;
                h.insert(
                    crate::headers::WRITTEN_AT.into(),
                    HeaderValue::Int(c.created_at),
                );
                h.insert(
                    crate::headers::PUBLISHED_AT.into(),
                    HeaderValue::Int(crate::clock::now_millis()),
                );
                m
            }
            Err(why) => {
                tracing::error!(id = c.id, error = %why, "outbox row is not a message; marked failed");
                out.malformed.push((c.id, why));
                continue;
            }
        };
        match producer.submit(message).await {
            Ok(w) => out.waits.push((c.id, c.due_at, w)),
            Err(e) if e.kind() == ErrorKind::Invalid => {
                // Past a protocol limit: this row alone cannot go.
                tracing::error!(id = c.id, error = %e, "outbox row cannot be published; marked failed");
                out.malformed.push((c.id, e.to_string()));
            }
            Err(e) => {
                out.not_sent.push(c.id);
                out.error = Some(e);
            }
        }
    }
    out
}

impl Submitted {
    async fn confirmed(self, delay: &metrics::Histogram) -> BatchOutcome {
        let mut out = BatchOutcome {
            unconfirmed: self.not_sent,
            transient: self.error,
            failed: self.malformed,
            ..BatchOutcome::default()
        };
        for (id, due_at, w) in self.waits {
            match w.wait().await {
                Ok(()) => {
                    let waited = (crate::clock::now_millis() - due_at).max(0);
                    delay.record(waited as f64 / 1000.0);
                    out.sent.push(id);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Unroutable | ErrorKind::Channel | ErrorKind::Invalid
                    ) =>
                {
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
