//! What a worker has done: per consumer, deliveries by outcome, handler
//! duration, handlers in flight and unroutable replies.
//!
//! Each count goes two ways: to the [`metrics`] facade, so that whatever
//! recorder the application installed (the Prometheus one of
//! `rabbitry::admin`, or its own) exports it, and to an atomic the worker
//! reads back ([`WorkerMetrics::outcomes`]). The handles are resolved once
//! per consumer when the worker starts: a delivery costs atomic increments,
//! no lock and no allocation. A recorder must be installed before the
//! worker starts for the facade's side to be recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How a delivery ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Counted {
    /// Handled and acked.
    Ack,
    /// Requeued at once (a conflict).
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
}

impl ConsumerMeter {
    fn new(consumer: &str) -> ConsumerMeter {
        let consumer = consumer.to_owned();
        ConsumerMeter {
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
            .or_insert_with(|| Arc::new(ConsumerMeter::new(name)))
            .clone()
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
    }
}
