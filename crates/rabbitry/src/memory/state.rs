//! The in-memory broker's state: exchanges, queues and bindings,
//! connections and channels, and the declarations that make and remove
//! them, refused in RabbitMQ's words. Messages move in `flow.rs`; time and
//! dead-lettering are `death.rs`. Everything is synchronous, under the
//! broker's one lock, and reads time from tokio's clock, so that a paused
//! test clock drives it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::routing::{Binding, Destination};
use super::{Event, Refusal};
use crate::message::{HeaderValue, Headers, Properties};
use crate::topology::{ExchangeKind, QueueType};

/// RabbitMQ's direct reply-to pseudo-queue.
pub(super) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

pub(super) type ConnId = u64;
pub(super) type ChannelId = u64;

/// A message as a queue holds it.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) exchange: Arc<str>,
    pub(super) routing_key: Arc<str>,
    /// Shared with its deliveries: copied only when dead-lettering
    /// or a quorum delivery count changes it.
    pub(super) properties: Arc<Properties>,
    pub(super) body: Bytes,
    pub(super) expires_at: Option<Instant>,
    pub(super) redelivered: bool,
    /// Times it went back to its queue unsettled (the quorum delivery count).
    pub(super) returns: u32,
}

#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) kind: ExchangeKind,
    pub(super) durable: bool,
    pub(super) auto_delete: bool,
    pub(super) arguments: Headers,
    pub(super) bindings: Vec<Binding>,
}

#[derive(Debug)]
pub(super) struct Queue {
    /// Its name, shared with its messages in flight.
    pub(super) name: Arc<str>,
    pub(super) durable: bool,
    pub(super) exclusive: Option<ConnId>,
    pub(super) auto_delete: bool,
    pub(super) arguments: Headers,
    pub(super) messages: VecDeque<Stored>,
    /// Its consumers, in the order they came: (channel, tag).
    pub(super) consumers: Vec<(ChannelId, String)>,
    pub(super) next_consumer: usize,
    pub(super) had_consumer: bool,
    pub(super) last_used: Instant,
}

impl Queue {
    pub(super) fn kind(&self) -> Option<QueueType> {
        QueueType::of(&self.arguments)
    }

    pub(super) fn int_arg(&self, name: &str) -> Option<i64> {
        self.arguments.get(name).and_then(HeaderValue::as_i64)
    }

    pub(super) fn str_arg(&self, name: &str) -> Option<&str> {
        self.arguments.get(name).and_then(HeaderValue::as_str)
    }

    pub(super) fn single_active(&self) -> bool {
        matches!(
            self.arguments.get("x-single-active-consumer"),
            Some(HeaderValue::Bool(true))
        )
    }
}

#[derive(Debug)]
pub(super) struct Consumer {
    /// Its tag, shared with its deliveries.
    pub(super) tag: Arc<str>,
    pub(super) queue: String,
    pub(super) no_ack: bool,
    pub(super) events: mpsc::UnboundedSender<Event>,
    /// Its deliveries not yet settled, against the channel's prefetch.
    pub(super) in_flight: usize,
}

#[derive(Debug)]
pub(super) struct Unacked {
    pub(super) queue: Arc<str>,
    pub(super) consumer: Option<Arc<str>>,
    pub(super) message: Stored,
}

#[derive(Debug)]
pub(super) struct Channel {
    pub(super) conn: ConnId,
    /// Cleared when the channel closes; its handle reads it without the
    /// broker's lock.
    pub(super) open: Arc<std::sync::atomic::AtomicBool>,
    pub(super) prefetch: u16,
    pub(super) consumers: BTreeMap<String, Consumer>,
    pub(super) unacked: BTreeMap<u64, Unacked>,
    pub(super) next_tag: u64,
    /// This channel's direct reply-to consumer, if it has one.
    pub(super) reply_to: Option<String>,
}

/// What became of one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Routed and taken (also: routed nowhere and not mandatory).
    Ack,
    /// Routed nowhere, mandatory: returned (`312 NO_ROUTE`), then acked.
    Returned,
    /// A queue refused it (`x-overflow = reject-publish` at its limit).
    Nack,
}

/// The whole broker.
#[derive(Debug, Default)]
pub(super) struct State {
    /// Queues that may have messages for their consumers now.
    pub(super) dirty: std::collections::BTreeSet<Arc<str>>,
    /// Whether something may now expire sooner than the clock task
    /// thinks: it is woken to look again.
    pub(super) wake: bool,
    pub(super) exchanges: BTreeMap<String, Exchange>,
    pub(super) queues: BTreeMap<String, Queue>,
    pub(super) channels: HashMap<ChannelId, Channel>,
    /// The open connections, each with the signal its holders watch.
    pub(super) connections: HashMap<ConnId, Arc<Life>>,
    pub(super) next_id: u64,
}

/// Whether a connection is open, and a way to wait for its end.
#[derive(Debug, Default)]
pub(crate) struct Life {
    closed: std::sync::atomic::AtomicBool,
    ended: tokio::sync::Notify,
}

impl Life {
    pub(crate) fn is_open(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn end(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.ended.notify_waiters();
    }

    /// Resolves once the connection is closed.
    pub(crate) async fn closed(&self) {
        loop {
            let ended = self.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if !self.is_open() {
                return;
            }
            ended.await;
        }
    }
}

pub(super) fn not_found(what: &str, name: &str) -> Refusal {
    Refusal::channel(404, format!("NOT_FOUND - no {what} '{name}' in vhost '/'"))
}

fn inequivalent(arg: &str, what: &str, name: &str, received: &str, current: &str) -> Refusal {
    Refusal::channel(
        406,
        format!(
            "PRECONDITION_FAILED - inequivalent arg '{arg}' for {what} '{name}' in vhost '/': received '{received}' but current is '{current}'"
        ),
    )
}

/// The queue arguments RabbitMQ compares on a redeclaration.
const COMPARED_ARGUMENTS: [&str; 10] = [
    "x-queue-type",
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-single-active-consumer",
];

fn show(v: Option<&HeaderValue>) -> String {
    match v {
        None => "none".into(),
        Some(HeaderValue::String(s)) => s.clone(),
        Some(HeaderValue::Int(n)) => n.to_string(),
        Some(HeaderValue::Bool(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
    }
}

impl State {
    pub(super) fn new() -> State {
        let mut s = State::default();
        // The default exchange and the amq.* exchanges every broker has.
        for (name, kind) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            s.exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    durable: true,
                    auto_delete: false,
                    arguments: Headers::new(),
                    bindings: Vec::new(),
                },
            );
        }
        s
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(super) fn open_connection(&mut self) -> (ConnId, Arc<Life>) {
        let id = self.id();
        let life = Arc::new(Life::default());
        self.connections.insert(id, life.clone());
        (id, life)
    }

    pub(super) fn open_channel(
        &mut self,
        conn: ConnId,
    ) -> (ChannelId, Arc<std::sync::atomic::AtomicBool>) {
        let id = self.id();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        self.channels.insert(
            id,
            Channel {
                conn,
                open: open.clone(),
                prefetch: 0,
                consumers: BTreeMap::new(),
                unacked: BTreeMap::new(),
                next_tag: 0,
                reply_to: None,
            },
        );
        (id, open)
    }

    pub(super) fn channel(&mut self, id: ChannelId) -> Result<&mut Channel, Refusal> {
        self.channels
            .get_mut(&id)
            .ok_or_else(Refusal::channel_closed)
    }

    /// Closes a channel: its consumers are cancelled (without telling them:
    /// the channel is gone) and its unacknowledged messages go back to
    /// their queues, redelivered.
    pub(super) fn close_channel(&mut self, id: ChannelId, now: Instant) {
        let Some(ch) = self.channels.remove(&id) else {
            return;
        };
        ch.open.store(false, std::sync::atomic::Ordering::Release);
        for (tag, consumer) in &ch.consumers {
            self.detach(&consumer.queue, id, tag, now);
        }
        for (_, u) in ch.unacked.into_iter().rev() {
            self.requeue(u, now);
        }
    }

    /// Closes a connection: its channels, then its exclusive queues.
    pub(super) fn close_connection(&mut self, conn: ConnId, now: Instant) {
        if let Some(life) = self.connections.remove(&conn) {
            life.end();
        }
        let channels: Vec<ChannelId> = self
            .channels
            .iter()
            .filter(|(_, c)| c.conn == conn)
            .map(|(id, _)| *id)
            .collect();
        for id in channels {
            self.close_channel(id, now);
        }
        let exclusive: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| q.exclusive == Some(conn))
            .map(|(n, _)| n.clone())
            .collect();
        for q in exclusive {
            self.remove_queue(&q);
        }
    }

    pub(super) fn qos(&mut self, channel: ChannelId, prefetch: u16) -> Result<(), Refusal> {
        self.channel(channel)?.prefetch = prefetch;
        Ok(())
    }

    pub(super) fn declare_exchange(
        &mut self,
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        arguments: &Headers,
        passive: bool,
    ) -> Result<(), Refusal> {
        if let Some(e) = self.exchanges.get(name) {
            if passive {
                return Ok(());
            }
            if e.kind != kind {
                return Err(inequivalent(
                    "type",
                    "exchange",
                    name,
                    kind.as_str(),
                    e.kind.as_str(),
                ));
            }
            if e.durable != durable {
                return Err(inequivalent(
                    "durable",
                    "exchange",
                    name,
                    &durable.to_string(),
                    &e.durable.to_string(),
                ));
            }
            if e.auto_delete != auto_delete {
                return Err(inequivalent(
                    "auto_delete",
                    "exchange",
                    name,
                    &auto_delete.to_string(),
                    &e.auto_delete.to_string(),
                ));
            }
            return Ok(());
        }
        if passive {
            return Err(not_found("exchange", name));
        }
        if name.starts_with("amq.") {
            return Err(Refusal::channel(
                403,
                format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        self.exchanges.insert(
            name.to_owned(),
            Exchange {
                kind,
                durable,
                auto_delete,
                arguments: arguments.clone(),
                bindings: Vec::new(),
            },
        );
        Ok(())
    }

    pub(super) fn delete_exchange(&mut self, name: &str) -> Result<(), Refusal> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(Refusal::channel(
                403,
                format!("ACCESS_REFUSED - operation not permitted on the default exchange or 'amq.*' ('{name}')"),
            ));
        }
        self.exchanges.remove(name);
        // Bindings to it from other exchanges go with it.
        let gone = Destination::Exchange(name.to_owned());
        for e in self.exchanges.values_mut() {
            e.bindings.retain(|b| b.destination != gone);
        }
        Ok(())
    }

    /// Declares a queue; returns its name (made up when `name` is empty),
    /// its ready messages and its consumers.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn declare_queue(
        &mut self,
        conn: ConnId,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: &Headers,
        passive: bool,
        now: Instant,
    ) -> Result<(String, u32, u32), Refusal> {
        let named = !name.is_empty();
        let name = if !named && !passive {
            format!("amq.gen-{}", uuid::Uuid::new_v4().simple())
        } else {
            name.to_owned()
        };
        if let Some(q) = self.queues.get_mut(&name) {
            if q.exclusive.is_some_and(|owner| owner != conn) {
                return Err(Refusal::channel(
                    405,
                    format!("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."),
                ));
            }
            if !passive {
                if q.durable != durable {
                    return Err(inequivalent(
                        "durable",
                        "queue",
                        &name,
                        &durable.to_string(),
                        &q.durable.to_string(),
                    ));
                }
                if q.auto_delete != auto_delete {
                    return Err(inequivalent(
                        "auto_delete",
                        "queue",
                        &name,
                        &auto_delete.to_string(),
                        &q.auto_delete.to_string(),
                    ));
                }
                for arg in COMPARED_ARGUMENTS {
                    let (new, old) = (arguments.get(arg), q.arguments.get(arg));
                    // A classic queue may be redeclared naming its type.
                    let same_type =
                        arg == "x-queue-type" && show(new) == "classic" && old.is_none();
                    if new != old && !same_type {
                        return Err(inequivalent(arg, "queue", &name, &show(new), &show(old)));
                    }
                }
            }
            q.last_used = now;
            return Ok((name, q.messages.len() as u32, q.consumers.len() as u32));
        }
        if passive {
            return Err(not_found("queue", &name));
        }
        if named && name.starts_with("amq.") {
            return Err(Refusal::channel(
                403,
                format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        let kind = QueueType::of(arguments);
        if matches!(kind, Some(QueueType::Quorum | QueueType::Stream)) {
            let what = if kind == Some(QueueType::Quorum) {
                "quorum"
            } else {
                "stream"
            };
            if !durable || exclusive || auto_delete {
                let prop = if !durable {
                    "non-durable"
                } else if exclusive {
                    "exclusive"
                } else {
                    "auto-delete"
                };
                return Err(Refusal::channel(
                    406,
                    format!("PRECONDITION_FAILED - invalid property '{prop}' for queue '{name}' in vhost '/' ({what} queues)"),
                ));
            }
        }
        self.queues.insert(
            name.clone(),
            Queue {
                name: name.as_str().into(),
                durable,
                exclusive: exclusive.then_some(conn),
                auto_delete,
                arguments: arguments.clone(),
                messages: VecDeque::new(),
                consumers: Vec::new(),
                next_consumer: 0,
                had_consumer: false,
                last_used: now,
            },
        );
        self.wake |= arguments.contains_key("x-expires");
        // Every queue is bound to the default exchange by its name.
        Ok((name, 0, 0))
    }

    pub(super) fn bind(
        &mut self,
        destination: Destination,
        exchange: &str,
        key: &str,
        arguments: &Headers,
    ) -> Result<(), Refusal> {
        if exchange.is_empty() {
            return Err(Refusal::channel(
                403,
                "ACCESS_REFUSED - operation not permitted on the default exchange".into(),
            ));
        }
        match &destination {
            Destination::Queue(q) if !self.queues.contains_key(q) => {
                return Err(not_found("queue", q))
            }
            Destination::Exchange(e) if !self.exchanges.contains_key(e) => {
                return Err(not_found("exchange", e))
            }
            _ => {}
        }
        let e = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| not_found("exchange", exchange))?;
        let binding = Binding {
            destination,
            key: key.to_owned(),
            arguments: arguments.clone(),
        };
        if !e.bindings.contains(&binding) {
            e.bindings.push(binding);
        }
        Ok(())
    }

    pub(super) fn unbind(
        &mut self,
        destination: &Destination,
        exchange: &str,
        key: &str,
    ) -> Result<(), Refusal> {
        let e = self
            .exchanges
            .get_mut(exchange)
            .ok_or_else(|| not_found("exchange", exchange))?;
        e.bindings
            .retain(|b| !(&b.destination == destination && b.key == key));
        if e.auto_delete && e.bindings.is_empty() {
            self.exchanges.remove(exchange);
        }
        Ok(())
    }

    /// Deletes a queue; returns how many messages it held. Its consumers
    /// are told (`basic.cancel`), as RabbitMQ tells consumers that asked
    /// for it.
    pub(super) fn delete_queue(&mut self, name: &str) -> Result<u32, Refusal> {
        match self.remove_queue(name) {
            Some(n) => Ok(n),
            // RabbitMQ answers delete-ok for a queue that is not there.
            None => Ok(0),
        }
    }

    pub(super) fn remove_queue(&mut self, name: &str) -> Option<u32> {
        let q = self.queues.remove(name)?;
        for (channel, tag) in &q.consumers {
            if let Some(ch) = self.channels.get_mut(channel) {
                if let Some(c) = ch.consumers.remove(tag) {
                    let _ = c.events.send(Event::Cancelled);
                }
            }
        }
        let gone = Destination::Queue(name.to_owned());
        let mut emptied = Vec::new();
        for (ename, e) in self.exchanges.iter_mut() {
            let before = e.bindings.len();
            e.bindings.retain(|b| b.destination != gone);
            if e.auto_delete && before > 0 && e.bindings.is_empty() {
                emptied.push(ename.clone());
            }
        }
        for e in emptied {
            self.exchanges.remove(&e);
        }
        Some(q.messages.len() as u32)
    }

    pub(super) fn purge_queue(&mut self, name: &str) -> Result<u32, Refusal> {
        let q = self
            .queues
            .get_mut(name)
            .ok_or_else(|| not_found("queue", name))?;
        let n = q.messages.len() as u32;
        q.messages.clear();
        Ok(n)
    }

    /// A queue's ready messages and consumers, if it exists.
    pub(super) fn queue_counts(&self, name: &str) -> Option<(u32, u32)> {
        self.queues
            .get(name)
            .map(|q| (q.messages.len() as u32, q.consumers.len() as u32))
    }
}
