//! An incoming message and the decision that settles it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::codec::{base64_value, decode_value, Decoded, Serializer};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Properties;
use crate::wire::WireChannel;

/// What to do with a delivery once it has been handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove it from the queue.
    Ack,
    /// Put it back on the queue at once (a conflict: try again now).
    Requeue,
    /// Refuse it (`basic.reject`, no requeue): the broker dead-letters it
    /// if the queue has a dead-letter exchange, and drops it otherwise.
    Reject,
}

/// Settles one delivery with the broker, once. Cheap to clone; every
/// clone shares the same "settled" flag, so whoever settles first wins and
/// any later attempt gets [`ErrorKind::AlreadySettled`] without anything
/// reaching the broker (a second ack of one delivery tag would make the
/// broker close the channel and redeliver every other message on it).
#[derive(Clone)]
pub struct Acker {
    channel: WireChannel,
    tag: u64,
    queue: Arc<str>,
    settled: Arc<AtomicBool>,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker")
            .field("queue", &self.queue)
            .field("tag", &self.tag)
            .field("settled", &self.is_settled())
            .finish()
    }
}

impl Acker {
    /// Whether the delivery has been settled (or a settle was attempted).
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }

    /// Whether the channel it came on is still open, so that settling it
    /// reaches the broker.
    pub fn is_settleable(&self) -> bool {
        self.channel.is_open()
    }

    /// Settles the delivery with `outcome`, the first time only.
    pub async fn settle(&self, outcome: Outcome) -> Result<()> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!(
                    "{outcome:?} of a delivery from queue '{}': it was settled before; nothing was sent",
                    self.queue
                ),
            ));
        }
        let res = match outcome {
            Outcome::Ack => self.channel.ack(self.tag, false).await,
            Outcome::Requeue => self.channel.requeue(self.tag).await,
            Outcome::Reject => self.channel.reject(self.tag).await,
        };
        res.map_err(|e| {
            Error::new(
                ErrorKind::Disconnected,
                format!(
                    "{outcome:?} of a delivery from queue '{}': its channel is gone, the broker will redeliver it",
                    self.queue
                ),
            )
            .with_source(e)
        })
    }
}

/// A message received from a queue, with the [`Acker`] that settles it.
pub struct Delivery {
    /// The body as it came from the socket (cloning it does not copy).
    pub body: Bytes,
    /// The message's properties.
    pub properties: Properties,
    /// The exchange it was published to (empty: the default exchange).
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Whether the broker delivered it before (to this or another consumer).
    pub redelivered: bool,
    /// The queue it came from.
    pub queue: String,
    acker: Acker,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("queue", &self.queue)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("message_id", &self.properties.message_id)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Delivery {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        body: Bytes,
        properties: Properties,
        exchange: String,
        routing_key: String,
        redelivered: bool,
        queue: String,
        tag: u64,
        channel: WireChannel,
    ) -> Self {
        let acker = Acker {
            channel,
            tag,
            queue: Arc::from(queue.as_str()),
            settled: Arc::new(AtomicBool::new(false)),
        };
        Delivery {
            body,
            properties,
            exchange,
            routing_key,
            redelivered,
            queue,
            acker,
        }
    }

    /// The broker's delivery tag: unique on its channel, in delivery order.
    pub fn delivery_tag(&self) -> u64 {
        self.acker.tag
    }

    /// This delivery as its process span describes it.
    pub(crate) fn received(&self) -> crate::telemetry::Received<'_> {
        crate::telemetry::Received {
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            properties: &self.properties,
            body_len: self.body.len(),
            queue: &self.queue,
            delivery_tag: self.delivery_tag(),
        }
    }

    /// The handle that settles this delivery; clones share its "settled"
    /// flag.
    pub fn acker(&self) -> Acker {
        self.acker.clone()
    }

    /// Whether the channel it came on is still open, so that settling it
    /// reaches the broker.
    pub fn is_settleable(&self) -> bool {
        self.acker.is_settleable()
    }

    /// The serializer its content type names, if any.
    pub fn serializer(&self) -> Option<Serializer> {
        self.properties
            .content_type
            .as_deref()
            .and_then(Serializer::for_content_type)
    }

    /// Decodes the body into `T` by its content type. A missing or unknown
    /// content type is an error here (use [`Delivery::decode_value`] to get
    /// raw bytes instead).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        let ser = self.serializer().ok_or_else(|| {
            Error::codec(format!(
                "cannot decode content type {:?} into a typed value",
                self.properties.content_type.as_deref().unwrap_or("(none)")
            ))
        })?;
        ser.decode(&self.body)
    }

    /// Decodes the body by content type into a JSON value, or gives the raw
    /// bytes for an unknown content type.
    pub fn decode_value(&self) -> Result<Decoded> {
        decode_value(self.properties.content_type.as_deref(), &self.body)
    }

    /// The delivery as one JSON object: exchange, routing key, redelivered,
    /// properties and the body decoded by content type (msgpack and json as
    /// values, text as a string, anything else as `{"base64": ...}`). A body
    /// that fails to decode is given raw, with `decode_error` saying why.
    pub fn to_json(&self) -> serde_json::Value {
        let mut out = serde_json::json!({
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "redelivered": self.redelivered,
            "properties": self.properties,
        });
        let (body, error) = match self.decode_value() {
            Ok(Decoded::Value(v)) => (v, None),
            Ok(Decoded::Raw(raw)) => (base64_value(&raw), None),
            Err(e) => (base64_value(&self.body), Some(e.to_string())),
        };
        out["body"] = body;
        if let Some(e) = error {
            out["decode_error"] = e.into();
        }
        out
    }

    /// Acknowledges the delivery.
    pub async fn ack(&self) -> Result<()> {
        self.settle(Outcome::Ack).await
    }

    /// Settles the delivery with `outcome`. Only the first settle of a
    /// delivery reaches the broker; a later one returns
    /// [`ErrorKind::AlreadySettled`].
    pub async fn settle(&self, outcome: Outcome) -> Result<()> {
        self.acker.settle(outcome).await
    }
}
