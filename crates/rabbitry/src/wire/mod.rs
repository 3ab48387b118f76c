//! The wire: the one seam between rabbitry and a broker.
//!
//! Everything above this module reaches a broker through a
//! [`WireConnection`] and its [`WireChannel`]s, which speak in rabbitry's
//! own values (a [`Queue`], an [`Exchange`], [`Properties`]) and say what
//! the broker answered. Behind them is either the AMQP client (amqprs) on
//! a socket, for `amqp://` and `amqps://` URLs, or, with the `testing`
//! feature, the in-memory broker of [`crate::memory`] for `memory://NAME`.
//! A broker's refusal reaches the channel's [`Events`] the same way from
//! both: the reason is kept for the caller's error and the publisher is
//! told, so the code above never asks which broker it is on.

#[cfg(feature = "testing")]
mod memory;

use std::time::Duration;

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments,
    BasicNackArguments, BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel,
    ConfirmSelectArguments, ConsumerMessage, ExchangeDeclareArguments, ExchangeDeleteArguments,
    QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::BasicProperties;
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::amqp::{from_basic, to_table};
use crate::channel::{ChannelWatch, ConfirmSink, Events};
use crate::error::{ErrorKind, Result};
use crate::message::Properties;
use crate::topology::{check_for_server, check_names, Exchange, Queue, Topology};

/// How often a socket's state is polled besides the client's failure
/// notification, in case that was sent before anyone listened.
const POLL: Duration = Duration::from_millis(500);

/// What a broker refused or where the wire broke: the client's error, or
/// the in-memory broker's refusal.
#[derive(Debug)]
pub(crate) enum WireError {
    Amqp(amqprs::error::Error),
    #[cfg(feature = "testing")]
    Memory(crate::memory::Refusal),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Amqp(e) => e.fmt(f),
            #[cfg(feature = "testing")]
            WireError::Memory(r) => r.fmt(f),
        }
    }
}

impl std::error::Error for WireError {}

impl From<amqprs::error::Error> for WireError {
    fn from(e: amqprs::error::Error) -> Self {
        WireError::Amqp(e)
    }
}

type WireResult<T> = std::result::Result<T, WireError>;

/// One connection to a broker.
#[derive(Clone)]
pub(crate) enum WireConnection {
    Amqp(amqprs::connection::Connection),
    #[cfg(feature = "testing")]
    Memory(std::sync::Arc<crate::memory::MemoryConnection>),
}

impl WireConnection {
    /// A connection to the in-memory broker `name`.
    #[cfg(feature = "testing")]
    pub(crate) fn in_memory(name: &str) -> WireConnection {
        WireConnection::Memory(std::sync::Arc::new(
            crate::memory::MemoryBroker::named(name).connect(),
        ))
    }

    pub(crate) fn is_open(&self) -> bool {
        match self {
            WireConnection::Amqp(c) => c.is_open(),
            #[cfg(feature = "testing")]
            WireConnection::Memory(c) => c.is_open(),
        }
    }

    /// The broker's product and version, as it announced them.
    pub(crate) fn server(&self) -> (&str, &str) {
        match self {
            WireConnection::Amqp(c) => {
                let p = c.server_properties();
                (p.product(), p.version())
            }
            #[cfg(feature = "testing")]
            WireConnection::Memory(_) => (memory::PRODUCT, memory::VERSION),
        }
    }

    /// The largest frame the connection negotiated (0: no limit).
    pub(crate) fn frame_max(&self) -> u32 {
        match self {
            WireConnection::Amqp(c) => c.frame_max(),
            #[cfg(feature = "testing")]
            WireConnection::Memory(_) => memory::FRAME_MAX,
        }
    }

    /// Opens a channel whose broker events (closes, confirms, returns)
    /// go to a new [`ChannelWatch`] and to `confirms`.
    pub(crate) async fn open_channel(
        &self,
        confirms: Option<std::sync::Arc<dyn ConfirmSink>>,
    ) -> WireResult<(WireChannel, ChannelWatch)> {
        let watch = ChannelWatch::on(self.server().1, self.frame_max());
        let events = Events {
            watch: watch.clone(),
            confirms,
        };
        let channel = match self {
            WireConnection::Amqp(c) => {
                let channel = c.open_channel(None).await?;
                channel.register_callback(events).await?;
                WireChannel::Amqp(channel)
            }
            #[cfg(feature = "testing")]
            WireConnection::Memory(c) => WireChannel::Memory(memory::MemoryChan::open(c, events)),
        };
        Ok((channel, watch))
    }

    /// Closes the connection.
    pub(crate) async fn close(self) -> WireResult<()> {
        match self {
            WireConnection::Amqp(c) => Ok(c.close().await?),
            #[cfg(feature = "testing")]
            WireConnection::Memory(c) => {
                c.close();
                Ok(())
            }
        }
    }

    /// Resolves when the connection is no longer usable.
    pub(crate) async fn lost(&self) {
        match self {
            WireConnection::Amqp(conn) => {
                let listen = conn.listen_network_io_failure();
                tokio::pin!(listen);
                let mut tick = tokio::time::interval(POLL);
                loop {
                    tokio::select! {
                        _ = &mut listen => return,
                        _ = tick.tick() => if !conn.is_open() { return },
                    }
                }
            }
            #[cfg(feature = "testing")]
            WireConnection::Memory(c) => c.closed().await,
        }
    }
}

/// A message as a consumer or `basic.get` receives it.
pub(crate) struct Incoming {
    pub(crate) delivery_tag: u64,
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) redelivered: bool,
    pub(crate) properties: Properties,
    pub(crate) body: Bytes,
}

/// A consumer's deliveries. They end when the channel closes or the broker
/// cancels the consumer (its queue deleted); the channel is still open in
/// the second case.
pub(crate) enum Deliveries {
    Amqp(mpsc::UnboundedReceiver<ConsumerMessage>),
    #[cfg(feature = "testing")]
    Memory(mpsc::UnboundedReceiver<crate::memory::Event>),
}

impl Deliveries {
    pub(crate) async fn recv(&mut self) -> Option<Incoming> {
        match self {
            Deliveries::Amqp(rx) => loop {
                let m = rx.recv().await?;
                let Some(deliver) = m.deliver else { continue };
                return Some(Incoming {
                    delivery_tag: deliver.delivery_tag(),
                    exchange: deliver.exchange().clone(),
                    routing_key: deliver.routing_key().clone(),
                    redelivered: deliver.redelivered(),
                    properties: m
                        .basic_properties
                        .as_ref()
                        .map(from_basic)
                        .unwrap_or_default(),
                    body: Bytes::from(m.content.unwrap_or_default()),
                });
            },
            #[cfg(feature = "testing")]
            Deliveries::Memory(rx) => memory::next(rx).await,
        }
    }
}

/// One channel. Cheap to clone; clones are the same channel.
#[derive(Clone)]
pub(crate) enum WireChannel {
    Amqp(Channel),
    #[cfg(feature = "testing")]
    Memory(std::sync::Arc<memory::MemoryChan>),
}

impl WireChannel {
    pub(crate) fn is_open(&self) -> bool {
        match self {
            WireChannel::Amqp(c) => c.is_open(),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.is_open(),
        }
    }

    /// `exchange.declare`; `passive` only checks that it exists.
    pub(crate) async fn declare_exchange(&self, e: &Exchange, passive: bool) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => {
                let mut args = ExchangeDeclareArguments::new(&e.name, e.kind.as_str());
                args.durable = e.durable;
                args.auto_delete = e.auto_delete;
                args.passive = passive;
                args.arguments = to_table(&e.arguments);
                Ok(c.exchange_declare(args).await?)
            }
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.declare_exchange(e, passive),
        }
    }

    /// `queue.declare`: the queue's name (the broker's choice for an empty
    /// one), its ready messages and its consumers.
    pub(crate) async fn declare_queue(
        &self,
        q: &Queue,
        passive: bool,
    ) -> WireResult<(String, u32, u32)> {
        match self {
            WireChannel::Amqp(c) => {
                let args = QueueDeclareArguments::new(&q.name)
                    .durable(q.durable)
                    .exclusive(q.exclusive)
                    .auto_delete(q.auto_delete)
                    .passive(passive)
                    .arguments(to_table(&q.arguments))
                    .finish();
                let found = c.queue_declare(args).await?;
                Ok(found.unwrap_or_else(|| (q.name.clone(), 0, 0)))
            }
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.declare_queue(q, passive),
        }
    }

    /// `queue.bind`.
    pub(crate) async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .queue_bind(QueueBindArguments::new(queue, exchange, key))
                .await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.run(|m| m.bind_queue(queue, exchange, key, &Default::default()))
            }
        }
    }

    /// `queue.delete`: how many messages it held.
    pub(crate) async fn delete_queue(&self, queue: &str) -> WireResult<u32> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .queue_delete(QueueDeleteArguments::new(queue))
                .await?
                .unwrap_or(0)),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.run(|m| m.delete_queue(queue)),
        }
    }

    /// `queue.purge`: how many messages it removed.
    pub(crate) async fn purge_queue(&self, queue: &str) -> WireResult<u32> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .queue_purge(QueuePurgeArguments::new(queue))
                .await?
                .unwrap_or(0)),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.run(|m| m.purge_queue(queue)),
        }
    }

    /// `exchange.delete`.
    pub(crate) async fn delete_exchange(&self, exchange: &str) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .exchange_delete(ExchangeDeleteArguments::new(exchange))
                .await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.run(|m| m.delete_exchange(exchange)),
        }
    }

    /// `basic.qos`: unacknowledged deliveries per consumer (0: no limit).
    pub(crate) async fn qos(&self, prefetch: u16) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .basic_qos(BasicQosArguments::new(0, prefetch, false))
                .await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.run(|m| m.qos(prefetch)),
        }
    }

    /// `confirm.select`: the broker acks or nacks each publish from now on.
    pub(crate) async fn confirm_select(&self) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c.confirm_select(ConfirmSelectArguments::default()).await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.confirm_select();
                Ok(())
            }
        }
    }

    /// `basic.publish`. Its confirm and return go to the channel's events.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: BasicProperties,
        body: Vec<u8>,
    ) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => {
                let mut args = BasicPublishArguments::new(exchange, routing_key);
                args.mandatory = mandatory;
                Ok(c.basic_publish(properties, body, args).await?)
            }
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.publish(exchange, routing_key, mandatory, &properties, body)
            }
        }
    }

    /// `basic.consume` under `tag` (the broker names it when empty), with
    /// manual acks unless `no_ack`. Returns the tag and the deliveries.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
        no_ack: bool,
    ) -> WireResult<(String, Deliveries)> {
        match self {
            WireChannel::Amqp(c) => {
                let mut args = BasicConsumeArguments::new(queue, tag);
                args.no_ack = no_ack;
                let (tag, rx) = c.basic_consume_rx(args).await?;
                Ok((tag, Deliveries::Amqp(rx)))
            }
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.consume(queue, tag, no_ack),
        }
    }

    /// `basic.cancel`.
    pub(crate) async fn cancel(&self, tag: &str) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => c
                .basic_cancel(BasicCancelArguments::new(tag))
                .await
                .map(drop)
                .map_err(Into::into),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.run(|m| m.cancel(tag)),
        }
    }

    /// `basic.ack`.
    pub(crate) async fn ack(&self, tag: u64, multiple: bool) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c.basic_ack(BasicAckArguments::new(tag, multiple)).await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.run(|m| m.settle(tag, multiple, crate::memory::Settle::Ack))
            }
        }
    }

    /// `basic.nack` with requeue: the delivery goes back to its queue.
    pub(crate) async fn requeue(&self, tag: u64) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .basic_nack(BasicNackArguments::new(tag, false, true))
                .await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.run(|m| m.settle(tag, false, crate::memory::Settle::Requeue))
            }
        }
    }

    /// `basic.reject` without requeue: the broker dead-letters or drops it.
    pub(crate) async fn reject(&self, tag: u64) -> WireResult<()> {
        match self {
            WireChannel::Amqp(c) => Ok(c
                .basic_reject(BasicRejectArguments::new(tag, false))
                .await?),
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => {
                c.run(|m| m.settle(tag, false, crate::memory::Settle::Discard))
            }
        }
    }

    /// `basic.get` with manual ack: the next message of `queue`, if any.
    pub(crate) async fn get(&self, queue: &str) -> WireResult<Option<Incoming>> {
        match self {
            WireChannel::Amqp(c) => {
                let got = c.basic_get(BasicGetArguments::new(queue)).await?;
                Ok(got.map(|(ok, props, body)| Incoming {
                    delivery_tag: ok.delivery_tag(),
                    exchange: ok.exchange().clone(),
                    routing_key: ok.routing_key().clone(),
                    redelivered: ok.redelivered(),
                    properties: from_basic(&props),
                    body: Bytes::from(body),
                }))
            }
            #[cfg(feature = "testing")]
            WireChannel::Memory(c) => c.get(queue),
        }
    }
}

/// Closes `channel` if it is open, waiting a bounded time for the broker.
pub(crate) async fn close_quietly(channel: WireChannel) {
    if !channel.is_open() {
        return;
    }
    match channel {
        WireChannel::Amqp(c) => {
            // Bounded: a close the broker does not answer must not hang.
            let _ = tokio::time::timeout(Duration::from_secs(5), c.close()).await;
        }
        #[cfg(feature = "testing")]
        WireChannel::Memory(c) => c.close(),
    }
}

/// Declares `topology` on `channel`. Returns the names the queues got (the
/// broker picks names for queues declared with an empty one). A refusal
/// names the object and carries the broker's reason, such as
/// `PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q'`.
///
/// Every name, key and argument name in `topology` fits in an AMQP short
/// string: one past 255 bytes is an error naming it, before the client
/// (which panics on it) sees it.
pub(crate) async fn declare(
    channel: &WireChannel,
    watch: &ChannelWatch,
    topology: &Topology,
) -> Result<Vec<String>> {
    check_names(topology)?;
    for e in &topology.exchanges {
        channel.declare_exchange(e, false).await.map_err(|err| {
            watch.refusal(ErrorKind::Declare, format!("exchange '{}'", e.name), err)
        })?;
    }
    let mut names = Vec::with_capacity(topology.queues.len());
    for q in &topology.queues {
        check_for_server(q, &watch.server_version)?;
        let (name, _, _) = channel
            .declare_queue(q, false)
            .await
            .map_err(|err| watch.refusal(ErrorKind::Declare, format!("queue '{}'", q.name), err))?;
        names.push(name);
    }
    for b in &topology.bindings {
        // A binding to a server-named queue uses the name it just got.
        let queue = if b.queue.is_empty() {
            names.first().cloned().unwrap_or_default()
        } else {
            b.queue.clone()
        };
        channel
            .bind_queue(&queue, &b.exchange, &b.routing_key)
            .await
            .map_err(|err| {
                watch.refusal(
                    ErrorKind::Declare,
                    format!(
                        "binding of queue '{}' to exchange '{}' with key '{}'",
                        queue, b.exchange, b.routing_key
                    ),
                    err,
                )
            })?;
    }
    Ok(names)
}
