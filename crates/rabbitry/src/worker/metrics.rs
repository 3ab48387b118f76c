//! What a worker has done, as counters in the Prometheus text format.
//!
//! Per consumer: deliveries by outcome, handler time (a sum and a count),
//! and the handlers running now. `rabbitry worker --metrics ADDR` serves
//! [`WorkerMetrics::render`] at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::connection::lock;

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
    fn label(self) -> &'static str {
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

#[derive(Default)]
struct ConsumerMetrics {
    outcomes: BTreeMap<Counted, u64>,
    handler_seconds: f64,
    handled: u64,
    replies_unroutable: u64,
}

/// A worker's counters. Shared by its consumers; cheap to read.
#[derive(Default)]
pub struct WorkerMetrics {
    consumers: Mutex<BTreeMap<String, ConsumerMetrics>>,
    in_flight: Mutex<BTreeMap<String, std::sync::Arc<AtomicI64>>>,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

/// Decrements a consumer's in-flight gauge when dropped.
pub(crate) struct InFlight(std::sync::Arc<AtomicI64>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerMetrics {
    pub(crate) fn start(&self, consumer: &str) -> InFlight {
        let gauge = lock(&self.in_flight)
            .entry(consumer.to_owned())
            .or_default()
            .clone();
        gauge.fetch_add(1, Ordering::Relaxed);
        InFlight(gauge)
    }

    pub(crate) fn handled(&self, consumer: &str, took: Duration) {
        let mut c = lock(&self.consumers);
        let m = c.entry(consumer.to_owned()).or_default();
        m.handler_seconds += took.as_secs_f64();
        m.handled += 1;
    }

    pub(crate) fn count(&self, consumer: &str, outcome: Counted) {
        *lock(&self.consumers)
            .entry(consumer.to_owned())
            .or_default()
            .outcomes
            .entry(outcome)
            .or_default() += 1;
    }

    pub(crate) fn reply_unroutable(&self, consumer: &str) {
        lock(&self.consumers)
            .entry(consumer.to_owned())
            .or_default()
            .replies_unroutable += 1;
    }

    /// How many replies of `consumer`'s handlers no queue took (their
    /// `reply_to` queue did not exist).
    pub fn replies_unroutable(&self, consumer: &str) -> u64 {
        lock(&self.consumers)
            .get(consumer)
            .map_or(0, |m| m.replies_unroutable)
    }

    /// How many deliveries of `consumer` ended with `outcome`.
    pub fn outcomes(&self, consumer: &str, outcome: Counted) -> u64 {
        lock(&self.consumers)
            .get(consumer)
            .and_then(|m| m.outcomes.get(&outcome).copied())
            .unwrap_or(0)
    }

    /// Everything, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let consumers = lock(&self.consumers);
        let _ = writeln!(
            out,
            "# HELP rabbitry_deliveries_total Deliveries handled, by consumer and outcome."
        );
        let _ = writeln!(out, "# TYPE rabbitry_deliveries_total counter");
        for (name, m) in consumers.iter() {
            for (outcome, n) in &m.outcomes {
                let _ = writeln!(
                    out,
                    "rabbitry_deliveries_total{{consumer=\"{}\",outcome=\"{}\"}} {n}",
                    escape(name),
                    outcome.label()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP rabbitry_handler_seconds Time spent in handlers."
        );
        let _ = writeln!(out, "# TYPE rabbitry_handler_seconds summary");
        for (name, m) in consumers.iter() {
            let _ = writeln!(
                out,
                "rabbitry_handler_seconds_sum{{consumer=\"{}\"}} {}",
                escape(name),
                m.handler_seconds
            );
            let _ = writeln!(
                out,
                "rabbitry_handler_seconds_count{{consumer=\"{}\"}} {}",
                escape(name),
                m.handled
            );
        }
        let _ = writeln!(
            out,
            "# HELP rabbitry_replies_unroutable_total Replies no queue took (reply_to did not exist)."
        );
        let _ = writeln!(out, "# TYPE rabbitry_replies_unroutable_total counter");
        for (name, m) in consumers.iter() {
            let _ = writeln!(
                out,
                "rabbitry_replies_unroutable_total{{consumer=\"{}\"}} {}",
                escape(name),
                m.replies_unroutable
            );
        }
        drop(consumers);
        let _ = writeln!(
            out,
            "# HELP rabbitry_handlers_in_flight Handlers running now."
        );
        let _ = writeln!(out, "# TYPE rabbitry_handlers_in_flight gauge");
        for (name, g) in lock(&self.in_flight).iter() {
            let _ = writeln!(
                out,
                "rabbitry_handlers_in_flight{{consumer=\"{}\"}} {}",
                escape(name),
                g.load(Ordering::Relaxed)
            );
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_summaries() {
        let m = WorkerMetrics::default();
        {
            let _running = m.start("orders");
            assert!(m
                .render()
                .contains("rabbitry_handlers_in_flight{consumer=\"orders\"} 1"));
            m.handled("orders", Duration::from_millis(250));
            m.count("orders", Counted::Ack);
            m.count("orders", Counted::Ack);
            m.count("orders", Counted::DeadLetter);
        }
        let text = m.render();
        assert!(
            text.contains("rabbitry_deliveries_total{consumer=\"orders\",outcome=\"ack\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "rabbitry_deliveries_total{consumer=\"orders\",outcome=\"dead_letter\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("rabbitry_handler_seconds_sum{consumer=\"orders\"} 0.25"),
            "{text}"
        );
        assert!(
            text.contains("rabbitry_handlers_in_flight{consumer=\"orders\"} 0"),
            "{text}"
        );
        assert_eq!(m.outcomes("orders", Counted::Ack), 2);
    }
}
