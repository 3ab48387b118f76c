//! Per-key ordering with parallel workers: a consumer split into N
//! partition queues, filled by the broker's consistent-hash exchange and
//! each read by a single active consumer.
//!
//! Messages with the same key (the routing key, or a header such as
//! `order_id`) always land in the same partition, and each partition is
//! handled by one consumer at a time, one message at a time: the same key
//! is handled in order, different keys in parallel. A producer in any
//! language needs only the key: it publishes to the exchange as usual, and
//! the broker hashes (the `x-consistent-hash` exchange, a plugin shipped
//! with RabbitMQ).
//!
//! Every worker process consumes every partition queue; the queues are
//! declared with `x-single-active-consumer`, so the broker delivers each
//! partition to one of them and, when that process dies or disconnects,
//! to the next. The process that is active on a partition is the one that
//! subscribed first: the first process started takes every partition, the
//! others stand by. Limits, documented in the README: changing the number
//! of partitions moves keys between queues (drain first); a message that
//! fails and is retried through a delay queue is handled after the
//! messages of its key that were behind it.

use std::fmt;
use std::str::FromStr;

use crate::consume::ConsumerSettings;
use crate::error::{Error, Result};
use crate::message::HeaderValue;
use crate::topology::{Exchange, ExchangeKind, QueueType, Topology};

/// The queue argument that makes the broker deliver to one consumer at a
/// time and fail over to the next.
pub(crate) const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// What a message's partition is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionKey {
    /// The routing key.
    RoutingKey,
    /// A header's value (`header:order_id`).
    Header(String),
}

impl FromStr for PartitionKey {
    type Err = Error;

    /// `routing_key` or `header:NAME`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "routing_key" => Ok(PartitionKey::RoutingKey),
            other => match other.strip_prefix("header:") {
                Some(name) if !name.trim().is_empty() => {
                    Ok(PartitionKey::Header(name.trim().to_owned()))
                }
                _ => Err(Error::config(format!(
                    "partition key `{s}`: expected `routing_key` or `header:NAME`"
                ))),
            },
        }
    }
}

impl fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PartitionKey::RoutingKey => f.write_str("routing_key"),
            PartitionKey::Header(h) => write!(f, "header:{h}"),
        }
    }
}

/// How a consumer is split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partitions {
    /// How many partition queues.
    pub count: u16,
    /// What the hash is computed from.
    pub key: PartitionKey,
}

impl Partitions {
    /// `count` partitions by `key`.
    pub fn new(count: u16, key: PartitionKey) -> Partitions {
        Partitions { count, key }
    }

    /// Checks the split against the consumer it applies to.
    pub(crate) fn check(&self, settings: &ConsumerSettings, concurrency: usize) -> Result<()> {
        if self.count == 0 {
            return Err(Error::invalid_setting("partitions", "must be at least 1"));
        }
        if settings.exchange.is_empty() {
            return Err(Error::invalid_setting(
                "partitions",
                "need an exchange: producers publish to it, and it spreads their messages over the partitions",
            ));
        }
        if concurrency != 1 {
            return Err(Error::invalid_setting("concurrency", format!(
                "a partitioned consumer handles one message at a time per partition (concurrency {concurrency} would reorder them); parallelism comes from the partitions"
            )));
        }
        if QueueType::of(&settings.arguments) == Some(QueueType::Stream) {
            return Err(Error::invalid_setting(
                "partitions",
                "cannot be stream queues",
            ));
        }
        Ok(())
    }

    /// The name of partition `i` of `queue`: `queue.p0`, `queue.p1`...
    pub fn queue(queue: &str, i: u16) -> String {
        format!("{queue}.p{i}")
    }

    /// The consistent-hash exchange and its bindings to every partition
    /// (weight 1 each); the partition queues are declared as their
    /// consumers' own.
    pub(crate) fn routing(&self, settings: &ConsumerSettings) -> Topology {
        let mut t = Topology::default();
        let mut exchange = Exchange::new(&settings.exchange, ExchangeKind::ConsistentHash);
        exchange.durable = settings.durable;
        exchange.auto_delete = settings.auto_delete.unwrap_or(!settings.durable);
        if let PartitionKey::Header(h) = &self.key {
            exchange
                .arguments
                .insert("hash-header".into(), HeaderValue::String(h.clone()));
        }
        t.exchange(exchange);
        for i in 0..self.count {
            t.bind(
                Partitions::queue(&settings.queue, i),
                &settings.exchange,
                "1",
            );
        }
        t
    }

    /// The settings of partition `i`: its own queue and name, single
    /// active consumer, bound by [`Partitions::topology`] (not by itself:
    /// its exchange carries arguments the consumer does not know).
    pub(crate) fn partition_settings(
        &self,
        settings: &ConsumerSettings,
        i: u16,
    ) -> ConsumerSettings {
        let mut s = settings.clone();
        s.queue = Partitions::queue(&settings.queue, i);
        s.name = format!("{}.p{i}", settings.name);
        s.exchange = String::new();
        s.routing_keys.clear();
        s.arguments
            .insert(SINGLE_ACTIVE_CONSUMER.into(), HeaderValue::Bool(true));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_bad_ones_say_what_is_expected() {
        assert_eq!(
            "routing_key".parse::<PartitionKey>().unwrap(),
            PartitionKey::RoutingKey
        );
        assert_eq!(
            "header:order_id".parse::<PartitionKey>().unwrap(),
            PartitionKey::Header("order_id".into())
        );
        for bad in ["", "header:", "order_id", "body"] {
            let e = bad.parse::<PartitionKey>().unwrap_err();
            assert!(e.to_string().contains("header:NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn partitions_are_single_active_queues_bound_to_a_hashing_exchange() {
        let settings = ConsumerSettings::new("orders").bind("shop", ExchangeKind::Topic, &["#"]);
        let p = Partitions::new(3, PartitionKey::Header("order_id".into()));
        p.check(&settings, 1).unwrap();
        let t = p.routing(&settings);
        assert_eq!(t.exchanges[0].kind, ExchangeKind::ConsistentHash);
        assert_eq!(
            t.exchanges[0].arguments["hash-header"],
            HeaderValue::String("order_id".into())
        );
        let bound: Vec<_> = t
            .bindings
            .iter()
            .map(|b| (b.queue.as_str(), b.routing_key.as_str()))
            .collect();
        assert_eq!(
            bound,
            [("orders.p0", "1"), ("orders.p1", "1"), ("orders.p2", "1")]
        );
        let one = p.partition_settings(&settings, 1);
        assert_eq!(
            one.arguments[SINGLE_ACTIVE_CONSUMER],
            HeaderValue::Bool(true)
        );
        assert_eq!(
            (one.queue.as_str(), one.name.as_str()),
            ("orders.p1", "orders.p1")
        );
        assert!(one.exchange.is_empty() && one.routing_keys.is_empty());

        assert!(Partitions::new(0, PartitionKey::RoutingKey)
            .check(&settings, 1)
            .is_err());
        assert!(p
            .check(&settings, 4)
            .unwrap_err()
            .to_string()
            .contains("one message at a time"));
        assert!(p
            .check(&ConsumerSettings::new("q"), 1)
            .unwrap_err()
            .to_string()
            .contains("need an exchange"));
    }
}
