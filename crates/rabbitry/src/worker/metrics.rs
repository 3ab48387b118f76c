//! What a worker has done: per consumer, deliveries by outcome, handler
//! duration, handlers in flight and unroutable replies; and its last
//! failures, for the status page.
//!
//! Each count goes two ways: to the [`metrics`] facade, so that whatever
//! recorder the application installed (the Prometheus one of
//! `rabbitry::admin`, or its own) exports it, and to an atomic the worker
//! reads back ([`WorkerMetrics::outcomes`]). The handles are resolved once
//! per consumer when the worker starts: a delivery costs atomic increments,
//! no lock and no allocation. A recorder must be installed before the
//! worker starts for the facade's side to be recorded.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connection::lock;

/// How many failures a worker remembers.
pub(crate) const FAILURES_KEPT: usize = 50;

/// A delivery whose handler failed, as the status page lists it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    /// When, in RFC 3339.
    pub at: String,
    /// The consumer.
    pub consumer: String,
    /// Its queue.
    pub queue: String,
    /// The message's id, if it had one.
    pub message_id: Option<String>,
    /// What became of it: `retry`, `dead_letter`, `requeue` or
    /// `error_handler`.
    pub outcome: &'static str,
    /// The handler's error.
    pub error: String,
}

/// The last [`FAILURES_KEPT`] failures of a worker, newest last.
type FailureLog = Mutex<VecDeque<Failure>>;

/// How a delivery ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counted {
    /// Handled and acked.
    Ack,
    /// Requeued after a pause: moving the failed message to its retry or
    /// dead-letter queue failed (the broker away).
    Requeue,
    /// Sent to a delay queue for another attempt.
    Retry,
    /// Sent to the dead-letter queue.
    DeadLetter,
    /// Past its deadline: acked without handling.
    Expired,
    /// Given to the exchange's error handler, then acked.
    ErrorHandler,
}

impl Counted {
    const ALL: [Counted; 6] = [
        Counted::Ack,
        Counted::Requeue,
        Counted::Retry,
        Counted::DeadLetter,
        Counted::Expired,
        Counted::ErrorHandler,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Counted::Ack => "ack",
            Counted::Requeue => "requeue",
            Counted::Retry => "retry",
            Counted::DeadLetter => "dead_letter",
            Counted::Expired => "expired",
            Counted::ErrorHandler => "error_handler",
        }
    }
}

/// One consumer's meters: facade handles and the atomics read back.
pub(crate) struct ConsumerMeter {
    outcomes: [(metrics::Counter, AtomicU64); 6],
    handler: (metrics::Histogram, AtomicU64),
    in_flight: metrics::Gauge,
    unroutable: (metrics::Counter, AtomicU64),
    name: String,
    failures: Arc<FailureLog>,
    /// Woken on every count, for [`WorkerMetrics::until`].
    counted: Arc<tokio::sync::Notify>,
}

impl ConsumerMeter {
    fn new(
        consumer: &str,
        failures: Arc<FailureLog>,
        counted: Arc<tokio::sync::Notify>,
    ) -> ConsumerMeter {
        let name = consumer.to_owned();
        let consumer = consumer.to_owned();
        ConsumerMeter {
            name,
            failures,
            counted,
            outcomes: Counted::ALL.map(|c| {
                let counter = metrics::counter!(
                    "rabbitry_deliveries_total",
                    "consumer" => consumer.clone(),
                    "outcome" => c.label()
                );
                (counter, AtomicU64::new(0))
            }),
            handler: (
                metrics::histogram!(
                    "rabbitry_handler_duration_seconds",
                    "consumer" => consumer.clone()
                ),
                AtomicU64::new(0),
            ),
            in_flight: metrics::gauge!("rabbitry_handlers_in_flight", "consumer" => consumer.clone()),
            unroutable: (
                metrics::counter!("rabbitry_replies_unroutable_total", "consumer" => consumer),
                AtomicU64::new(0),
            ),
        }
    }

    /// A handler starts: in flight until the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.increment(1.0);
        InFlight(self.clone())
    }

    pub(crate) fn handled(&self, took: Duration) {
        self.handler.0.record(took.as_secs_f64());
        self.handler.1.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, outcome: Counted) {
        let (counter, n) = &self.outcomes[outcome as usize];
        counter.increment(1);
        n.fetch_add(1, Ordering::Relaxed);
        self.counted.notify_waiters();
    }

    /// Remembers a failure (not on the success path: a lock is fine).
    pub(crate) fn failed(
        &self,
        queue: &str,
        message_id: Option<&str>,
        outcome: Counted,
        error: String,
    ) {
        let failure = Failure {
            at: crate::clock::rfc3339(std::time::SystemTime::now()),
            consumer: self.name.clone(),
            queue: queue.to_owned(),
            message_id: message_id.map(str::to_owned),
            outcome: outcome.label(),
            error,
        };
        let mut log = lock(&self.failures);
        if log.len() == FAILURES_KEPT {
            log.pop_front();
        }
        log.push_back(failure);
    }

    pub(crate) fn reply_unroutable(&self) {
        self.unroutable.0.increment(1);
        self.unroutable.1.fetch_add(1, Ordering::Relaxed);
    }
}

/// Takes a handler off the in-flight gauge when dropped.
pub(crate) struct InFlight(Arc<ConsumerMeter>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.decrement(1.0);
    }
}

/// A worker's meters, by consumer name.
#[derive(Default)]
pub struct WorkerMetrics {
    consumers: BTreeMap<String, Arc<ConsumerMeter>>,
    failures: Arc<FailureLog>,
    counted: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics")
            .field("consumers", &self.consumers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl WorkerMetrics {
    /// The meter of consumer `name`, made on first use (at start).
    pub(crate) fn consumer(&mut self, name: &str) -> Arc<ConsumerMeter> {
        self.consumers
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(ConsumerMeter::new(
                    name,
                    self.failures.clone(),
                    self.counted.clone(),
                ))
            })
            .clone()
    }

    /// Waits until `condition` holds, checking it again each time a
    /// delivery's outcome is counted, for at most `timeout`: how a test
    /// waits for a worker to have acked, retried or dead-lettered what it
    /// published, without sleeping. The timeout's error lists the counts.
    ///
    /// ```no_run
    /// # async fn demo(running: rabbitry::worker::RunningWorker) -> rabbitry::Result<()> {
    /// use std::time::Duration;
    /// use rabbitry::worker::Counted;
    ///
    /// let metrics = running.metrics();
    /// metrics
    ///     .until(Duration::from_secs(5), |m| m.outcomes("orders", Counted::Ack) == 1)
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn until(
        &self,
        timeout: Duration,
        condition: impl Fn(&WorkerMetrics) -> bool,
    ) -> crate::Result<()> {
        let wait = async {
            loop {
                let counted = self.counted.notified();
                tokio::pin!(counted);
                // Registered before the check: no count is missed between.
                counted.as_mut().enable();
                if condition(self) {
                    return;
                }
                counted.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            crate::Error::new(
                crate::ErrorKind::Timeout,
                format!(
                    "the worker's counts did not reach the condition within {timeout:?}: {}",
                    self.summary()
                ),
            )
        })
    }

    /// Each consumer's counts by outcome, for messages.
    fn summary(&self) -> String {
        let consumers: Vec<String> = self
            .consumers
            .iter()
            .map(|(name, m)| {
                let counts: Vec<String> = Counted::ALL
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {}",
                            c.label(),
                            m.outcomes[*c as usize].1.load(Ordering::Relaxed)
                        )
                    })
                    .collect();
                format!("{name}: {}", counts.join(", "))
            })
            .collect();
        consumers.join("; ")
    }

    /// The last failures (at most 50), newest first.
    pub fn failures(&self) -> Vec<Failure> {
        lock(&self.failures).iter().rev().cloned().collect()
    }

    /// `consumer`'s last failure.
    pub fn last_failure(&self, consumer: &str) -> Option<Failure> {
        lock(&self.failures)
            .iter()
            .rev()
            .find(|f| f.consumer == consumer)
            .cloned()
    }

    /// Deliveries `consumer` has finished, whatever their outcome; `None`
    /// when this worker has no such consumer.
    pub fn finished(&self, consumer: &str) -> Option<u64> {
        self.consumers.get(consumer).map(|m| {
            m.outcomes
                .iter()
                .map(|(_, n)| n.load(Ordering::Relaxed))
                .sum()
        })
    }

    /// How many replies of `consumer`'s handlers no queue took (their
    /// `reply_to` queue did not exist).
    pub fn replies_unroutable(&self, consumer: &str) -> u64 {
        self.consumers
            .get(consumer)
            .map_or(0, |m| m.unroutable.1.load(Ordering::Relaxed))
    }

    /// How many times `consumer`'s handler ran (retries included).
    pub fn handler_runs(&self, consumer: &str) -> u64 {
        self.consumers
            .get(consumer)
            .map_or(0, |m| m.handler.1.load(Ordering::Relaxed))
    }

    /// How many deliveries of `consumer` ended with `outcome`.
    pub fn outcomes(&self, consumer: &str, outcome: Counted) -> u64 {
        self.consumers.get(consumer).map_or(0, |m| {
            m.outcomes[outcome as usize].1.load(Ordering::Relaxed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_go_to_the_atomics_and_the_facade() {
        // Without a recorder the facade's handles do nothing; the atomics
        // still count.
        let mut m = WorkerMetrics::default();
        let orders = m.consumer("orders");
        {
            let _running = orders.start();
            orders.handled(Duration::from_millis(250));
            orders.count(Counted::Ack);
            orders.count(Counted::Ack);
            orders.count(Counted::DeadLetter);
            orders.reply_unroutable();
        }
        assert_eq!(m.outcomes("orders", Counted::Ack), 2);
        assert_eq!(m.outcomes("orders", Counted::DeadLetter), 1);
        assert_eq!(m.outcomes("orders", Counted::Retry), 0);
        assert_eq!(m.replies_unroutable("orders"), 1);
        assert_eq!(m.handler_runs("orders"), 1);
        assert_eq!(m.outcomes("nobody", Counted::Ack), 0);
        assert_eq!(m.finished("orders"), Some(3));
        assert_eq!(m.finished("nobody"), None);
    }

    #[test]
    fn failures_keep_the_last_fifty_newest_first() {
        let mut m = WorkerMetrics::default();
        let orders = m.consumer("orders");
        let mails = m.consumer("mails");
        for i in 0..60 {
            orders.failed(
                "q.orders",
                Some(&format!("m{i}")),
                Counted::Retry,
                format!("e{i}"),
            );
        }
        mails.failed("q.mails", None, Counted::DeadLetter, "bad input".into());
        let failures = m.failures();
        assert_eq!(failures.len(), FAILURES_KEPT);
        assert_eq!(failures[0].consumer, "mails");
        assert_eq!(failures[0].outcome, "dead_letter");
        assert_eq!(failures[1].message_id.as_deref(), Some("m59"));
        assert_eq!(failures.last().unwrap().error, "e11");
        assert_eq!(m.last_failure("orders").unwrap().error, "e59");
        assert!(m.last_failure("nobody").is_none());
    }
}
