//! Producers: named publishing endpoints with collective.zamqp's defaults.
//!
//! A [`Producer`] knows its exchange, routing key, serializer and
//! durability. It declares its exchange (unless told not to, or the name is
//! the broker's), fills in what a message leaves out, and publishes with
//! confirms: [`Producer::publish`] returns once the broker has the message.

mod confirms;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::amqp::to_basic;
use crate::codec::Serializer;
use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::limits::{check_publish, shorten};
use crate::message::{Message, PERSISTENT, TRANSIENT};
use crate::setters::setters;
use crate::telemetry::{self, Parent};
use crate::topology::{is_reserved, Exchange, ExchangeKind, Topology};

pub use confirms::Confirmation;

pub(crate) use confirms::{Outgoing, Publisher};

/// How a producer publishes. Defaults follow collective.zamqp: the default
/// exchange, type `direct`, durable, declared automatically, msgpack.
/// Built from [`ProducerSettings::new`] (or `default()`) and a setter per
/// field; the struct is `#[non_exhaustive]`, so a new field is not a
/// breaking change.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::{ExchangeKind, ProducerSettings, Serializer};
///
/// let events = ProducerSettings::new("events", ExchangeKind::Topic)
///     .name("events")
///     .serializer(Serializer::Json)
///     .confirm_timeout(Duration::from_secs(5));
/// assert!(events.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProducerSettings {
    /// The producer's name.
    pub name: String,
    /// The exchange; empty is the default exchange.
    pub exchange: String,
    /// The exchange's type.
    pub exchange_type: ExchangeKind,
    /// Durable exchange and persistent messages (`delivery_mode` 2).
    pub durable: bool,
    /// Auto-delete exchange; `None` means `!durable`.
    pub auto_delete: Option<bool>,
    /// Declare the exchange when the producer starts and after recovery.
    pub auto_declare: bool,
    /// The routing key when the call gives none.
    pub routing_key: Option<String>,
    /// A queue name, used as the routing key when no other is given.
    pub queue: Option<String>,
    /// How [`Producer::send`] encodes values.
    pub serializer: Serializer,
    /// `reply_to` for messages that do not set one.
    pub reply_to: Option<String>,
    /// Make every message mandatory (unroutable is an error).
    pub mandatory: bool,
    /// Wait for publisher confirms (the default). Without them, `publish`
    /// returns once the message is handed to the socket.
    pub confirms: bool,
    /// At most this many messages wait for a confirm at once.
    pub max_in_flight: usize,
    /// A message whose confirm has not come after this long is published
    /// again, with the same message id (a duplicate, never a loss); after
    /// the connection's recovery timeout it fails. 10 s unless set; at
    /// least 100 ms.
    pub confirm_timeout: Duration,
    /// Give each message a UUID `message_id` when it has none.
    pub message_ids: bool,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            name: "default".into(),
            exchange: String::new(),
            exchange_type: ExchangeKind::Direct,
            durable: true,
            auto_delete: None,
            auto_declare: true,
            routing_key: None,
            queue: None,
            serializer: Serializer::Msgpack,
            reply_to: None,
            mandatory: false,
            confirms: true,
            max_in_flight: crate::defaults::MAX_IN_FLIGHT,
            confirm_timeout: crate::defaults::CONFIRM_TIMEOUT,
            message_ids: true,
        }
    }
}

impl ProducerSettings {
    /// Settings for publishing to `exchange` of `kind`.
    pub fn new(exchange: impl Into<String>, kind: ExchangeKind) -> Self {
        ProducerSettings {
            exchange: exchange.into(),
            exchange_type: kind,
            ..ProducerSettings::default()
        }
    }

    setters! {
        /// Names the producer.
        name: into String;
        /// Sets the exchange (empty: the default exchange).
        exchange: into String;
        /// Sets the exchange's type.
        exchange_type: ExchangeKind;
        /// Durable exchange and persistent messages (the default) or not.
        durable: bool;
        /// Auto-delete exchange or not (unset: `!durable`).
        auto_delete: some bool;
        /// Declares the exchange (the default) or not.
        auto_declare: bool;
        /// Sets the default routing key.
        routing_key: some into String;
        /// Sets the queue name used as the routing key when none is given.
        queue: some into String;
        /// Sets how [`Producer::send`] encodes values.
        serializer: Serializer;
        /// Sets `reply_to` for messages that do not set one.
        reply_to: some into String;
        /// Makes every message mandatory or not (the default).
        mandatory: bool;
        /// Waits for publisher confirms (the default) or not.
        confirms: bool;
        /// Sets how many messages wait for a confirm at once.
        max_in_flight: usize;
        /// Sets how long a confirm may take before the message is sent again.
        confirm_timeout: Duration;
        /// Gives messages without one a UUID `message_id` (the default) or not.
        message_ids: bool;
    }

    /// Checks the rules of these settings, naming the field that breaks
    /// one ([`Error::setting`](crate::Error::setting)): names that fit in an AMQP short string,
    /// and at least one message in flight. [`Producer::new`] calls it.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("exchange", Some(&self.exchange)),
            ("routing_key", self.routing_key.as_ref()),
            ("queue", self.queue.as_ref()),
            ("reply_to", self.reply_to.as_ref()),
        ] {
            if let Some(v) = value {
                crate::limits::check_short(field, v)
                    .map_err(|e| Error::invalid_setting(field, e.context()))?;
            }
        }
        if self.max_in_flight == 0 {
            return Err(Error::invalid_setting(
                "max_in_flight",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// Fails when a name still holds `${site}`, naming the field (see
    /// [`ConsumerSettings::check_substituted`](crate::ConsumerSettings::check_substituted)).
    pub fn check_substituted(&self) -> Result<()> {
        crate::consume::unsubstituted([
            ("routing_key", self.routing_key.as_deref()),
            ("queue", self.queue.as_deref()),
            ("reply_to", self.reply_to.as_deref()),
        ])
    }

    /// These settings with `${site}` replaced by `site` in every field
    /// [`check_substituted`](Self::check_substituted) looks at.
    #[cfg(feature = "config")]
    pub(crate) fn for_site(mut self, site: &str) -> Self {
        for s in [&mut self.routing_key, &mut self.queue, &mut self.reply_to]
            .into_iter()
            .flatten()
        {
            *s = s.replace("${site}", site);
        }
        self
    }

    /// The exchange this producer declares, if any.
    pub fn topology(&self) -> Topology {
        let mut t = Topology::default();
        if self.auto_declare && !is_reserved(&self.exchange) {
            t.exchange(Exchange {
                name: self.exchange.clone(),
                kind: self.exchange_type,
                durable: self.durable,
                auto_delete: self.auto_delete.unwrap_or(!self.durable),
                arguments: Default::default(),
            });
        }
        t
    }

    /// The routing key for a call: the call's, the producer's, the queue
    /// name, or `*` for fanout, in that order.
    pub fn resolve_routing_key(&self, call: Option<&str>) -> Result<String> {
        call.or(self.routing_key.as_deref())
            .or(self.queue.as_deref())
            .map(str::to_owned)
            .or_else(|| (self.exchange_type == ExchangeKind::Fanout).then(|| "*".to_owned()))
            .ok_or_else(|| {
                Error::config(format!(
                    "producer '{}': no routing key (set `routing_key` or `queue`, or pass one)",
                    self.name
                ))
            })
    }
}

/// A named publisher. Cheap to clone.
#[derive(Clone)]
pub struct Producer {
    settings: Arc<ProducerSettings>,
    publisher: Arc<Publisher>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("name", &self.settings.name)
            .field("exchange", &self.settings.exchange)
            .finish()
    }
}

impl Producer {
    /// Declares what the producer needs (remembered for recovery) and opens
    /// its channel.
    pub async fn new(conn: &Connection, settings: ProducerSettings) -> Result<Producer> {
        settings
            .validate()
            .map_err(|e| e.config_of(format_args!("producer '{}'", settings.name)))?;
        let topology = settings.topology();
        if !topology.is_empty() {
            conn.declare(&topology).await?;
        }
        // Publishing has a connection of its own unless the settings say
        // otherwise; the exchange is declared (and remembered) above, on
        // the main one.
        let publishing = conn.publishing().await?;
        let publisher = Publisher::open(
            &publishing,
            settings.confirms,
            settings.max_in_flight,
            settings.confirm_timeout,
        )
        .await?;
        Ok(Producer {
            settings: Arc::new(settings),
            publisher,
        })
    }

    /// The producer's settings.
    pub fn settings(&self) -> &ProducerSettings {
        &self.settings
    }

    /// Encodes `value` with the producer's serializer and publishes it.
    pub async fn send<T: Serialize + ?Sized>(&self, value: &T) -> Result<()> {
        self.publish(Message::encode(self.settings.serializer, value)?)
            .await
    }

    /// Messages this producer has sent again so far: those unconfirmed
    /// when its connection was lost (sent again after the reconnect, with
    /// the same message id, so a consumer may see them twice), and those
    /// the broker nacked.
    pub fn republished(&self) -> u64 {
        self.publisher.republished()
    }

    /// Publishes a message, filling in what it leaves out from the
    /// settings. Returns once the broker confirmed it (with confirms on).
    ///
    /// Errors: [`ErrorKind::Unroutable`](crate::ErrorKind::Unroutable) for
    /// a mandatory message no queue took, `Disconnected` when the
    /// connection did not come back within its recovery timeout.
    ///
    /// ```no_run
    /// # async fn demo(conn: rabbitry::Connection) -> rabbitry::Result<()> {
    /// use rabbitry::{ExchangeKind, Message, Producer, ProducerSettings, Serializer};
    ///
    /// let tasks = Producer::new(&conn, ProducerSettings::new("service.tasks", ExchangeKind::Topic)).await?;
    /// let request = Message::encode(Serializer::Msgpack, &serde_json::json!({"title": "Hello"}))?
    ///     .routing_key("service.my_template")
    ///     .correlation_id("3f45de0d")
    ///     .reply_to("my_queue")
    ///     .mandatory(true); // no queue for it: an error, not a silent drop
    /// tasks.publish(request).await?; // the broker has it
    /// # Ok(()) }
    /// ```
    pub async fn publish(&self, message: Message) -> Result<()> {
        self.publish_with(message, &Parent::Inherit).await
    }

    /// Publishes with the given span parent (a retry links to the attempt
    /// that failed, in a new trace).
    pub(crate) async fn publish_with(&self, message: Message, parent: &Parent) -> Result<()> {
        self.submit_with(message, parent).await?.wait().await
    }

    /// Queues `message` for sending and returns the wait for its confirm.
    /// Messages submitted one after another go out in that order, while
    /// their confirms are awaited together: this is how a relay keeps order
    /// without waiting a round trip per message.
    pub async fn submit(&self, message: Message) -> Result<Confirmation> {
        self.submit_with(message, &Parent::Inherit).await
    }

    /// [`Producer::submit`] with the given span parent; the span ends with
    /// the confirm.
    async fn submit_with(&self, message: Message, parent: &Parent) -> Result<Confirmation> {
        let (outgoing, span) = self.prepare(message, parent)?;
        match self.publisher.submit(outgoing).await {
            Ok(confirmation) => Ok(confirmation.traced(span)),
            Err(e) => {
                let mut span = span;
                span.fail(e.kind().name());
                Err(e)
            }
        }
    }

    /// The message as it goes out, and its publish span (whose context is
    /// now in the message's headers).
    fn prepare(&self, message: Message, parent: &Parent) -> Result<(Outgoing, telemetry::Span)> {
        let s = &self.settings;
        let Message {
            body,
            mut properties,
            routing_key,
            exchange,
            mandatory,
        } = message;
        let routing_key = s.resolve_routing_key(routing_key.as_deref())?;
        let exchange = exchange.unwrap_or_else(|| s.exchange.clone());
        if properties.delivery_mode.is_none() {
            properties.delivery_mode = Some(if s.durable { PERSISTENT } else { TRANSIENT });
        }
        if properties.reply_to.is_none() {
            properties.reply_to.clone_from(&s.reply_to);
        }
        let mandatory = mandatory || s.mandatory;
        if properties.message_id.is_none() && (s.message_ids || mandatory) {
            properties.message_id = Some(uuid::Uuid::new_v4().to_string());
        }
        let mut span = telemetry::publish(
            &mut properties,
            body.len(),
            telemetry::Publish {
                exchange: &exchange,
                routing_key: &routing_key,
                conn: self.publisher.connection(),
            },
            parent,
            false,
        );
        // What cannot go fails here, alone, before the client (which
        // panics on a long name) or the broker (which closes the channel or
        // the connection) sees it.
        let limits = self.publisher.limits();
        if let Err(e) = check_publish(&exchange, &routing_key, &properties, body.len(), &limits) {
            let e = Error::new(
                e.kind(),
                format!(
                    "message to exchange '{}' with routing key '{}': {}",
                    shorten(&exchange, 40),
                    shorten(&routing_key, 40),
                    e.context()
                ),
            );
            span.fail(e.kind().name());
            return Err(e);
        }
        let outgoing = Outgoing {
            exchange,
            routing_key,
            mandatory,
            message_id: properties.message_id.clone(),
            properties: to_basic(&properties),
            body,
        };
        Ok((outgoing, span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_key_order() {
        let mut s = ProducerSettings::new("x", ExchangeKind::Direct);
        assert!(s.resolve_routing_key(None).is_err());
        s.queue = Some("q".into());
        assert_eq!(s.resolve_routing_key(None).unwrap(), "q");
        s.routing_key = Some("rk".into());
        assert_eq!(s.resolve_routing_key(None).unwrap(), "rk");
        assert_eq!(s.resolve_routing_key(Some("call")).unwrap(), "call");
        let f = ProducerSettings::new("f", ExchangeKind::Fanout);
        assert_eq!(f.resolve_routing_key(None).unwrap(), "*");
    }

    #[test]
    fn reserved_exchanges_are_not_declared_and_auto_delete_follows_durable() {
        assert!(ProducerSettings::new("amq.topic", ExchangeKind::Topic)
            .topology()
            .is_empty());
        let mut s = ProducerSettings::new("x", ExchangeKind::Topic);
        s.durable = false;
        let t = s.topology();
        assert!(t.exchanges[0].auto_delete && !t.exchanges[0].durable);
    }
}
