//! An in-memory broker with RabbitMQ's semantics (feature `testing`), for
//! tests that run without a broker, in milliseconds, and under tokio's
//! paused clock.
//!
//! [`MemoryBroker`] holds exchanges, queues and bindings in the process.
//! A [`MemoryConnection`] opens [`MemoryChannel`]s, which offer the
//! operations of an AMQP channel: declarations, `basic.publish` with the
//! confirm outcome, consumers with prefetch, acks, nacks and rejects,
//! `basic.get`. What rabbitry relies on behaves as RabbitMQ 3.x does:
//!
//! - exchanges: the default exchange, direct, topic, fanout, headers and
//!   the consistent-hash exchange, exchange-to-exchange bindings;
//!   `mandatory` returns; `x-max-length` with `x-overflow` (`drop-head`,
//!   `reject-publish` nacks, `reject-publish-dlx`);
//! - queues: durable or not, exclusive to a connection, auto-delete,
//!   `x-expires`, server-named (`amq.gen-...`), classic and quorum (with
//!   `x-delivery-limit` and `x-delivery-count`), single active consumer,
//!   passive declarations and RabbitMQ's reply codes and texts for
//!   inequivalent arguments, missing entities and locked queues;
//! - consumers: prefetch per consumer, ack, nack and reject with and
//!   without requeue, the `redelivered` flag, cancellation when the queue
//!   is deleted, direct reply-to (`amq.rabbitmq.reply-to`);
//! - per-message and per-queue TTL, dead-letter exchanges and routing keys,
//!   and the `x-death` history (and `x-first-death-*`) of RabbitMQ 3.x.
//!
//! Time is tokio's: a test that pauses the clock (`start_paused = true`)
//! sees a five-minute TTL expire as soon as nothing else is runnable.
//!
//! rabbitry reaches it through its usual [`Connection`](crate::Connection)
//! with a `memory://NAME` URL: every connection to `NAME` in the process
//! shares one broker ([`MemoryBroker::named`]), and
//! [`MemoryBroker::cut_connections`] cuts them all, as a network cut
//! would, so that recovery can be tested. [`crate::testing`] wraps it for
//! tests.
//!
//! What it does not do: expire messages behind the head of a queue (nor
//! does RabbitMQ), priorities, streams, `x-max-length-bytes`, policies,
//! transactions (`tx.*`), flow control, cycles of dead-lettering detected,
//! vhosts, users and permissions (every name is in vhost `/`, every
//! operation allowed), heartbeats, and errors that close a whole
//! connection (its refusals close the channel). Where it differs in
//! timing: a publisher's confirm and a mandatory message's return arrive
//! before `basic.publish` returns, and deliveries are handed out in the
//! same step as the publish or ack that made them possible. Scheduled
//! outbox rows and RPC deadlines are epoch times of the system clock, not
//! tokio's, so a paused test clock does not move them.

mod death;
mod flow;
mod routing;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;

pub use flow::Settle;
pub use state::Published;

use crate::message::{Headers, Properties};
use crate::topology::ExchangeKind;
use routing::Destination;
use state::{ChannelId, ConnId, State};

/// A refusal in RabbitMQ's words: its reply code (404 `NOT_FOUND`, 406
/// `PRECONDITION_FAILED`...), its text, and whether it closes the whole
/// connection or only the channel (which is closed by it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The AMQP reply code.
    pub code: u16,
    /// The reply text, as RabbitMQ words it.
    pub text: String,
    /// Whether the connection is closed (otherwise the channel is).
    pub connection: bool,
}

impl Refusal {
    fn channel(code: u16, text: String) -> Refusal {
        Refusal {
            code,
            text,
            connection: false,
        }
    }

    /// `504 CHANNEL_ERROR`: what an operation on a closed channel gets.
    pub(crate) fn channel_closed() -> Refusal {
        Refusal::channel(504, "CHANNEL_ERROR - the channel is closed".into())
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.text)
    }
}

impl std::error::Error for Refusal {}

/// A message handed to a consumer (or by `basic.get`).
#[derive(Debug, Clone)]
pub struct MemoryDelivery {
    /// Its tag on the channel, for settling it (0 for direct reply-to).
    pub delivery_tag: u64,
    /// The consumer it went to (empty for `basic.get`).
    pub consumer_tag: Arc<str>,
    /// The exchange it was published to.
    pub exchange: Arc<str>,
    /// Its routing key.
    pub routing_key: Arc<str>,
    /// Whether it was delivered before.
    pub redelivered: bool,
    /// Its properties (shared with the broker's copy).
    pub properties: Arc<Properties>,
    /// Its body.
    pub body: Bytes,
}

/// What a consumer receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// A delivery.
    Delivery(Box<MemoryDelivery>),
    /// The broker cancelled the consumer: its queue was deleted.
    Cancelled,
}

struct Inner {
    state: Mutex<State>,
    /// Wakes the clock task when something may expire sooner, and when the
    /// broker goes (the task then ends).
    changed: Arc<Notify>,
    clock: OnceLock<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.changed.notify_one();
    }
}

/// An in-memory broker: cheap to clone; clones are the same broker.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("MemoryBroker")
            .field("exchanges", &state.exchanges.len())
            .field("queues", &state.queues.len())
            .finish()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        MemoryBroker::new()
    }
}

fn registry() -> &'static Mutex<HashMap<String, Weak<Inner>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Weak<Inner>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, State> {
    inner.state.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryBroker {
    /// A new, empty broker of its own.
    pub fn new() -> MemoryBroker {
        MemoryBroker {
            inner: Arc::new(Inner {
                state: Mutex::new(State::new()),
                changed: Arc::new(Notify::new()),
                clock: OnceLock::new(),
            }),
        }
    }

    /// The broker called `name` in this process (what `memory://NAME`
    /// reaches), made when first asked for and kept while anything holds
    /// it.
    pub fn named(name: &str) -> MemoryBroker {
        let mut registry = registry().lock().unwrap_or_else(|p| p.into_inner());
        if let Some(inner) = registry.get(name).and_then(Weak::upgrade) {
            return MemoryBroker { inner };
        }
        let broker = MemoryBroker::new();
        registry.insert(name.to_owned(), Arc::downgrade(&broker.inner));
        broker
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.inner)
    }

    /// Runs `f` on the state at tokio's now, then wakes the clock task.
    fn with<T>(&self, f: impl FnOnce(&mut State, Instant) -> T) -> T {
        let now = Instant::now();
        let mut state = self.lock();
        let out = f(&mut state, now);
        state.flush(now);
        let wake = std::mem::take(&mut state.wake);
        drop(state);
        if wake {
            self.inner.changed.notify_one();
        }
        out
    }

    /// Opens a connection (and, on the first, starts the task that expires
    /// messages and queues on tokio's clock).
    pub fn connect(&self) -> MemoryConnection {
        self.start_clock();
        let (id, life) = self.with(|s, _| s.open_connection());
        MemoryConnection {
            broker: self.clone(),
            id,
            life,
        }
    }

    /// Closes every connection, as a broker restart or a network cut
    /// would (what is declared and queued stays): recovery tests cut with
    /// it. Returns how many were open.
    pub fn cut_connections(&self) -> usize {
        self.with(|s, now| {
            let open: Vec<ConnId> = s.connections.keys().copied().collect();
            for id in &open {
                s.close_connection(*id, now);
            }
            open.len()
        })
    }

    /// How many connections are open.
    pub fn connections(&self) -> usize {
        self.lock().connections.len()
    }

    fn start_clock(&self) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        self.inner.clock.get_or_init(|| {
            let weak = Arc::downgrade(&self.inner);
            let changed = self.inner.changed.clone();
            tokio::spawn(async move {
                loop {
                    let notified = changed.notified();
                    tokio::pin!(notified);
                    // Registered before the deadline is read: no change is
                    // missed between the two.
                    notified.as_mut().enable();
                    let deadline = match weak.upgrade() {
                        Some(inner) => lock(&inner).next_deadline(),
                        None => return,
                    };
                    match deadline {
                        Some(at) => {
                            tokio::select! {
                                _ = tokio::time::sleep_until(at) => {}
                                _ = &mut notified => {}
                            }
                        }
                        None => notified.await,
                    }
                    let Some(inner) = weak.upgrade() else { return };
                    let now = Instant::now();
                    // Expires what is due, then hands out what is ready.
                    lock(&inner).dispatch(now);
                }
            });
        });
    }

    /// A queue's ready messages and consumers, if the queue exists.
    pub fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        self.lock().queue_counts(queue)
    }
}

/// A connection to a [`MemoryBroker`]. Closing it (or dropping it) closes
/// its channels and deletes its exclusive queues.
#[derive(Debug)]
pub struct MemoryConnection {
    broker: MemoryBroker,
    id: ConnId,
    life: Arc<state::Life>,
}

impl MemoryConnection {
    /// Opens a channel.
    pub fn open_channel(&self) -> MemoryChannel {
        let (id, open) = self.broker.with(|s, _| s.open_channel(self.id));
        MemoryChannel {
            broker: self.broker.clone(),
            conn: self.id,
            id,
            open,
        }
    }

    /// Whether the connection is open (neither closed nor cut).
    pub fn is_open(&self) -> bool {
        self.life.is_open()
    }

    /// Resolves once the connection is closed or cut.
    pub async fn closed(&self) {
        self.life.closed().await
    }

    /// The broker it is connected to.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// Closes the connection, as a lost socket would: its channels'
    /// unacknowledged messages go back to their queues.
    pub fn close(&self) {
        self.broker.with(|s, now| s.close_connection(self.id, now));
    }
}

impl Drop for MemoryConnection {
    fn drop(&mut self) {
        self.close();
    }
}

/// A channel of a [`MemoryConnection`]: the operations of an AMQP channel.
/// A refusal closes it, as the broker closes a channel; the operations
/// after it fail with `504 CHANNEL_ERROR`.
#[derive(Debug)]
pub struct MemoryChannel {
    broker: MemoryBroker,
    conn: ConnId,
    id: ChannelId,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl MemoryChannel {
    /// Runs an operation; a refusal closes the channel.
    fn run<T>(
        &self,
        f: impl FnOnce(&mut State, ChannelId, Instant) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        self.broker.with(|s, now| {
            let out = f(s, self.id, now);
            if out.is_err() {
                s.close_channel(self.id, now);
            }
            out
        })
    }

    /// `exchange.declare`.
    pub fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<(), Refusal> {
        self.run(|s, _, _| s.declare_exchange(name, kind, durable, auto_delete, arguments, passive))
    }

    /// `exchange.delete`.
    pub fn delete_exchange(&self, name: &str) -> Result<(), Refusal> {
        self.run(|s, _, _| s.delete_exchange(name))
    }

    /// `queue.declare`: the queue's name (made up when `name` is empty),
    /// its ready messages and its consumers.
    #[allow(clippy::too_many_arguments)]
    pub fn declare_queue(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<(String, u32, u32), Refusal> {
        let conn = self.conn;
        self.run(|s, _, now| {
            s.declare_queue(
                conn,
                name,
                durable,
                exclusive,
                auto_delete,
                arguments,
                passive,
                now,
            )
        })
    }

    /// `queue.bind`.
    pub fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refusal> {
        self.run(|s, _, _| {
            s.bind(
                Destination::Queue(queue.to_owned()),
                exchange,
                key,
                arguments,
            )
        })
    }

    /// `queue.unbind`.
    pub fn unbind_queue(&self, queue: &str, exchange: &str, key: &str) -> Result<(), Refusal> {
        self.run(|s, _, _| s.unbind(&Destination::Queue(queue.to_owned()), exchange, key))
    }

    /// `exchange.bind`: `source`'s messages also go through `destination`.
    pub fn bind_exchange(
        &self,
        destination: &str,
        source: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refusal> {
        self.run(|s, _, _| {
            s.bind(
                Destination::Exchange(destination.to_owned()),
                source,
                key,
                arguments,
            )
        })
    }

    /// `queue.delete`: how many messages it held.
    pub fn delete_queue(&self, name: &str) -> Result<u32, Refusal> {
        self.run(|s, _, _| s.delete_queue(name))
    }

    /// `queue.purge`: how many messages it removed.
    pub fn purge_queue(&self, name: &str) -> Result<u32, Refusal> {
        self.run(|s, _, _| s.purge_queue(name))
    }

    /// `basic.qos`: unacknowledged deliveries per consumer (0: no limit).
    pub fn qos(&self, prefetch: u16) -> Result<(), Refusal> {
        self.run(|s, id, _| s.qos(id, prefetch))
    }

    /// `basic.publish`, with what a publisher in confirm mode learns.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: Properties,
        body: impl Into<Bytes>,
    ) -> Result<Published, Refusal> {
        let body = body.into();
        self.run(|s, id, now| {
            s.publish(id, exchange, routing_key, mandatory, properties, body, now)
        })
    }

    /// `basic.consume`: the consumer's deliveries, and its cancellation.
    pub fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        no_ack: bool,
        exclusive: bool,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refusal> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.run(|s, id, now| s.consume(id, queue, consumer_tag, no_ack, exclusive, tx, now))?;
        Ok(rx)
    }

    /// `basic.cancel`.
    pub fn cancel(&self, consumer_tag: &str) -> Result<(), Refusal> {
        self.run(|s, id, now| s.cancel(id, consumer_tag, now))
    }

    /// `basic.ack`, `basic.nack` or `basic.reject`.
    pub fn settle(
        &self,
        delivery_tag: u64,
        multiple: bool,
        outcome: Settle,
    ) -> Result<(), Refusal> {
        self.run(|s, id, now| s.settle(id, delivery_tag, multiple, outcome, now))
    }

    /// `basic.get`: the next message and how many are left, if any.
    pub fn get(&self, queue: &str, no_ack: bool) -> Result<Option<(MemoryDelivery, u32)>, Refusal> {
        self.run(|s, id, now| s.get(id, queue, no_ack, now))
    }

    /// Whether the channel is open: neither closed by a refusal, by
    /// [`close`](Self::close), nor with its connection.
    pub fn is_open(&self) -> bool {
        self.open.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Closes the channel: its unacknowledged messages go back.
    pub fn close(&self) {
        self.broker.with(|s, now| s.close_channel(self.id, now));
    }
}

#[cfg(test)]
mod tests;
