//! One conformance suite, two brokers: every case runs the same body
//! against the in-memory broker (`in_memory::*`, no network) and against
//! the real RabbitMQ on 127.0.0.1:5672 (`rabbitmq::*`, through the raw AMQP
//! client). The suite is what "faithful" means for
//! `rabbitry::memory::MemoryBroker`: a behaviour it gets differently is
//! fixed, or listed in its documentation with the case that shows it.
//!
//! Areas: routing, confirms, acks, TTL and dead-lettering, the quorum
//! delivery limit, reply-to, errors, and what a lost connection does.
//! Every name is unique per run and every case deletes what it declared.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rabbitry::memory::{Event, MemoryBroker, MemoryChannel, MemoryConnection, Published, Settle};
use rabbitry::{ExchangeKind, HeaderValue, Headers, Properties};
use tokio::sync::mpsc;

/// A refusal: the reply code and text the broker closed the channel with.
type Refused = (u16, String);

/// A delivery as the cases look at it.
#[derive(Debug, Clone)]
struct Got {
    tag: u64,
    body: String,
    redelivered: bool,
    properties: Properties,
}

impl Got {
    /// What the in-memory broker delivered.
    fn of(d: rabbitry::memory::MemoryDelivery) -> Got {
        Got {
            tag: d.delivery_tag,
            body: String::from_utf8_lossy(&d.body).into_owned(),
            redelivered: d.redelivered,
            properties: (*d.properties).clone(),
        }
    }

    /// The newest `x-death` entry: queue, reason, count.
    fn death(&self) -> (String, String, i64) {
        let Some(HeaderValue::Array(deaths)) = self.properties.headers.get("x-death") else {
            panic!("no x-death in {:?}", self.properties.headers)
        };
        let Some(HeaderValue::Table(t)) = deaths.first() else {
            panic!("x-death is empty")
        };
        let text = |k: &str| {
            t.get(k)
                .and_then(HeaderValue::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        (
            text("queue"),
            text("reason"),
            t.get("count").and_then(HeaderValue::as_i64).unwrap_or(0),
        )
    }

    fn header(&self, name: &str) -> Option<&HeaderValue> {
        self.properties.headers.get(name)
    }
}

/// What a case needs of a broker: one AMQP channel's operations.
#[async_trait]
trait Chan: Send + Sync {
    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        arguments: &Headers,
    ) -> Result<(), Refused>;
    async fn declare_queue(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<String, Refused>;
    async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refused>;
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), Refused>;
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        properties: Properties,
        body: &str,
    ) -> Result<Published, Refused>;
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        no_ack: bool,
    ) -> Result<mpsc::UnboundedReceiver<Got>, Refused>;
    async fn settle(&self, tag: u64, outcome: Settle) -> Result<(), Refused>;
    async fn get(&self, queue: &str) -> Result<Option<Got>, Refused>;
    async fn delete_queue(&self, queue: &str);
    async fn delete_exchange(&self, exchange: &str);
}

/// A broker the cases run on: connections and their channels.
#[async_trait]
trait Broker: Send + Sync {
    async fn connect(&self) -> Box<dyn Conn>;
}

#[async_trait]
trait Conn: Send + Sync {
    async fn channel(&self) -> Box<dyn Chan>;
    async fn close(&self);
}

// ---------------------------------------------------------------- memory

struct Memory(MemoryBroker);

struct MemConn(MemoryConnection);

struct MemChan(MemoryChannel);

fn refused(r: rabbitry::memory::Refusal) -> Refused {
    (r.code, r.text)
}

#[async_trait]
impl Broker for Memory {
    async fn connect(&self) -> Box<dyn Conn> {
        Box::new(MemConn(self.0.connect()))
    }
}

#[async_trait]
impl Conn for MemConn {
    async fn channel(&self) -> Box<dyn Chan> {
        Box::new(MemChan(self.0.open_channel()))
    }
    async fn close(&self) {
        self.0.close();
    }
}

#[async_trait]
impl Chan for MemChan {
    async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        arguments: &Headers,
    ) -> Result<(), Refused> {
        self.0
            .declare_exchange(name, kind, true, false, arguments, false)
            .map_err(refused)
    }
    async fn declare_queue(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<String, Refused> {
        self.0
            .declare_queue(name, durable, exclusive, false, arguments, passive)
            .map(|(n, _, _)| n)
            .map_err(refused)
    }
    async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refused> {
        self.0
            .bind_queue(queue, exchange, key, arguments)
            .map_err(refused)
    }
    async fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
    ) -> Result<(), Refused> {
        self.0
            .bind_exchange(destination, source, key, &Headers::new())
            .map_err(refused)
    }
    async fn publish(
        &self,
        exchange: &str,
        key: &str,
        mandatory: bool,
        properties: Properties,
        body: &str,
    ) -> Result<Published, Refused> {
        self.0
            .publish(exchange, key, mandatory, properties, body.to_owned())
            .map_err(refused)
    }
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        no_ack: bool,
    ) -> Result<mpsc::UnboundedReceiver<Got>, Refused> {
        self.0.qos(prefetch).map_err(refused)?;
        let mut events = self
            .0
            .consume(queue, &uuid::Uuid::new_v4().to_string(), no_ack, false)
            .map_err(refused)?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Event::Delivery(d)) = events.recv().await {
                if tx.send(Got::of(*d)).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
    async fn settle(&self, tag: u64, outcome: Settle) -> Result<(), Refused> {
        self.0.settle(tag, false, outcome).map_err(refused)
    }
    async fn get(&self, queue: &str) -> Result<Option<Got>, Refused> {
        Ok(self
            .0
            .get(queue, true)
            .map_err(refused)?
            .map(|(d, _)| Got::of(d)))
    }
    async fn delete_queue(&self, queue: &str) {
        let _ = self.0.delete_queue(queue);
    }
    async fn delete_exchange(&self, exchange: &str) {
        let _ = self.0.delete_exchange(exchange);
    }
}

// -------------------------------------------------------------- RabbitMQ

mod real;

// ----------------------------------------------------------------- cases

mod cases;

/// Runs each case on both brokers: `in_memory::NAME` and `rabbitmq::NAME`.
macro_rules! on_both_brokers {
    ($($area:ident :: $case:ident),* $(,)?) => {
        mod in_memory {
            $(
                #[tokio::test]
                async fn $case() {
                    let broker = crate::Memory(rabbitry::memory::MemoryBroker::new());
                    crate::cases::$area::$case(&broker).await;
                }
            )*
        }
        mod rabbitmq {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    crate::cases::$area::$case(&crate::real::Real).await;
                }
            )*
        }
    };
}

on_both_brokers!(
    routing::direct_topic_and_fanout_choose_their_queues,
    routing::headers_match_all_or_any,
    routing::exchange_to_exchange_bindings_forward,
    routing::consistent_hash_keeps_each_key_on_one_queue,
    confirms::a_mandatory_unroutable_message_is_returned,
    confirms::a_full_reject_publish_queue_nacks,
    acks::prefetch_holds_back_until_an_ack,
    acks::a_nack_with_requeue_redelivers_it_first,
    acks::a_closed_channel_gives_its_unacked_back,
    ttl::a_queue_ttl_dead_letters_with_x_death_expired,
    ttl::a_message_expiration_is_kept_as_original_expiration,
    ttl::a_reject_dead_letters_and_counts_each_death,
    ttl::drop_head_dead_letters_the_oldest_as_maxlen,
    quorum::the_delivery_limit_dead_letters_after_the_returns,
    reply_to::direct_reply_to_reaches_the_requester,
    errors::a_passive_declare_of_a_missing_queue_is_not_found,
    errors::an_inequivalent_redeclare_is_a_precondition_failure,
    errors::a_publish_to_a_missing_exchange_is_not_found,
    errors::an_unknown_delivery_tag_is_a_precondition_failure,
    errors::another_connection_cannot_use_an_exclusive_queue,
    recovery::a_lost_connection_requeues_and_takes_its_exclusive_queues,
);

/// Headers from pairs.
fn headers(pairs: &[(&str, HeaderValue)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn text(s: &str) -> HeaderValue {
    HeaderValue::String(s.to_owned())
}

/// A name unique to this run and case.
fn unique(what: &str) -> String {
    rabbitry_test_support::unique(&format!("conformance.{what}"))
}

/// The next delivery within 10 s.
async fn next(rx: &mut mpsc::UnboundedReceiver<Got>) -> Got {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a delivery within 10 s")
        .expect("the consumer is still there")
}

/// Polls `get` until it gives a message (dead-lettering and expiry take a
/// moment on the real broker), within 10 s.
async fn get_eventually(ch: &dyn Chan, queue: &str) -> Got {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(got) = ch.get(queue).await.expect("get") {
            return got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing on {queue} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Shared by the real broker's channels: the last close reason.
type Reason = Arc<Mutex<Option<Refused>>>;
