//! The wire to the in-memory broker: a [`MemoryChannel`] with the events
//! an AMQP channel's callback would get. A refusal closes the channel and
//! reaches [`Events`] before the failed call returns; a publish's confirm
//! (and return) reaches the publisher before `publish` returns, since the
//! broker settles it in the same step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use amqprs::BasicProperties;
use tokio::sync::mpsc;

use super::{Deliveries, Incoming, WireError, WireResult};
use crate::amqp::from_basic;
use crate::channel::{CloseReason, Events, Returned};
use crate::memory::{Event, MemoryChannel, MemoryConnection, MemoryDelivery, Published, Refusal};
use crate::topology::{Exchange, Queue};

/// What the in-memory broker announces as its product.
pub(super) const PRODUCT: &str = "rabbitry in-memory broker";
/// The RabbitMQ version whose semantics it follows.
pub(super) const VERSION: &str = "3.13.7";
/// RabbitMQ's default frame size, which the limits checks use.
pub(super) const FRAME_MAX: u32 = 131_072;

/// A channel of the in-memory broker and its events.
pub(crate) struct MemoryChan {
    channel: MemoryChannel,
    events: Events,
    /// The last publish's delivery tag once in confirm mode; 0 before.
    confirmed: AtomicU64,
    confirming: std::sync::atomic::AtomicBool,
}

impl MemoryChan {
    pub(super) fn open(conn: &MemoryConnection, events: Events) -> Arc<MemoryChan> {
        Arc::new(MemoryChan {
            channel: conn.open_channel(),
            events,
            confirmed: AtomicU64::new(0),
            confirming: Default::default(),
        })
    }

    pub(super) fn is_open(&self) -> bool {
        self.channel.is_open()
    }

    pub(super) fn close(&self) {
        self.channel.close();
    }

    /// Runs one operation; a refusal (which closed the channel) goes to
    /// the events first, as the broker's `channel.close` would. On a
    /// channel already closed (by an earlier refusal, or with its
    /// connection) the call fails without an event, as a call on a closed
    /// AMQP channel does.
    pub(super) fn run<T>(
        &self,
        op: impl FnOnce(&MemoryChannel) -> Result<T, Refusal>,
    ) -> WireResult<T> {
        if !self.channel.is_open() {
            return Err(WireError::Memory(Refusal::channel_closed()));
        }
        op(&self.channel).map_err(|r| {
            self.events.broker_closed(CloseReason {
                code: r.code,
                text: r.text.clone(),
            });
            WireError::Memory(r)
        })
    }

    pub(super) fn declare_exchange(&self, e: &Exchange, passive: bool) -> WireResult<()> {
        self.run(|m| {
            m.declare_exchange(
                &e.name,
                e.kind,
                e.durable,
                e.auto_delete,
                &e.arguments,
                passive,
            )
        })
    }

    pub(super) fn declare_queue(&self, q: &Queue, passive: bool) -> WireResult<(String, u32, u32)> {
        self.run(|m| {
            m.declare_queue(
                &q.name,
                q.durable,
                q.exclusive,
                q.auto_delete,
                &q.arguments,
                passive,
            )
        })
    }

    pub(super) fn confirm_select(&self) {
        self.confirming.store(true, Ordering::Release);
    }

    pub(super) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &BasicProperties,
        body: Vec<u8>,
    ) -> WireResult<()> {
        let tag = self
            .confirming
            .load(Ordering::Acquire)
            .then(|| self.confirmed.fetch_add(1, Ordering::AcqRel) + 1);
        let outcome = self.run(|m| {
            m.publish(
                exchange,
                routing_key,
                mandatory,
                from_basic(properties),
                body,
            )
        })?;
        let Some(sink) = &self.events.confirms else {
            return Ok(());
        };
        match outcome {
            Published::Ack => {}
            Published::Returned => sink.returned(Returned {
                message_id: properties.message_id().cloned(),
                correlation_id: properties.correlation_id().cloned(),
                text: format!("312 NO_ROUTE (exchange '{exchange}', routing key '{routing_key}')"),
            }),
            Published::Nack => {
                if let Some(tag) = tag {
                    sink.nack(tag, false);
                }
                return Ok(());
            }
        }
        if let Some(tag) = tag {
            sink.ack(tag, false);
        }
        Ok(())
    }

    pub(super) fn consume(
        &self,
        queue: &str,
        tag: &str,
        no_ack: bool,
    ) -> WireResult<(String, Deliveries)> {
        let tag = if tag.is_empty() {
            format!("amq.ctag-{}", uuid::Uuid::new_v4().simple())
        } else {
            tag.to_owned()
        };
        let rx = self.run(|m| m.consume(queue, &tag, no_ack, false))?;
        Ok((tag, Deliveries::Memory(rx)))
    }

    pub(super) fn get(&self, queue: &str) -> WireResult<Option<Incoming>> {
        let got = self.run(|m| m.get(queue, false))?;
        Ok(got.map(|(d, _)| incoming(d)))
    }
}

/// The next delivery; `None` once the channel closed or the broker
/// cancelled the consumer.
pub(super) async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> Option<Incoming> {
    match rx.recv().await? {
        Event::Delivery(d) => Some(incoming(*d)),
        Event::Cancelled => {
            tracing::warn!("broker cancelled a consumer");
            None
        }
    }
}

fn incoming(d: MemoryDelivery) -> Incoming {
    Incoming {
        delivery_tag: d.delivery_tag,
        exchange: d.exchange.as_ref().to_owned(),
        routing_key: d.routing_key.as_ref().to_owned(),
        redelivered: d.redelivered,
        properties: Arc::try_unwrap(d.properties).unwrap_or_else(|p| (*p).clone()),
        body: d.body,
    }
}
