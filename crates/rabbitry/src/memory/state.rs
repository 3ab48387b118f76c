//! The in-memory broker's state and its rules: exchanges, queues and
//! bindings; publishing with confirms, returns and overflow; consumers
//! with prefetch, acks, nacks and rejects; TTLs, queue expiry, length
//! limits, dead-lettering with `x-death`, and the quorum delivery limit.
//! Everything here is synchronous, under the broker's one lock, and reads
//! time from tokio's clock, so that a paused test clock drives it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::routing::{matching, Binding, Destination};
use super::{Event, MemoryDelivery, Refusal};
use crate::message::{HeaderValue, Headers, Properties};
use crate::topology::{ExchangeKind, QueueType};

/// RabbitMQ's direct reply-to pseudo-queue.
pub(super) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

pub(super) type ConnId = u64;
pub(super) type ChannelId = u64;

/// A message as a queue holds it.
#[derive(Debug, Clone)]
pub(super) struct Stored {
    pub(super) exchange: String,
    pub(super) routing_key: String,
    pub(super) properties: Properties,
    pub(super) body: Bytes,
    expires_at: Option<Instant>,
    redelivered: bool,
    /// Times it went back to its queue unsettled (the quorum delivery count).
    returns: u32,
}

#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    arguments: Headers,
    bindings: Vec<Binding>,
}

#[derive(Debug)]
pub(super) struct Queue {
    durable: bool,
    exclusive: Option<ConnId>,
    auto_delete: bool,
    arguments: Headers,
    messages: VecDeque<Stored>,
    /// Its consumers, in the order they came: (channel, tag).
    consumers: Vec<(ChannelId, String)>,
    next_consumer: usize,
    had_consumer: bool,
    last_used: Instant,
}

impl Queue {
    fn kind(&self) -> Option<QueueType> {
        QueueType::of(&self.arguments)
    }

    fn int_arg(&self, name: &str) -> Option<i64> {
        self.arguments.get(name).and_then(HeaderValue::as_i64)
    }

    fn str_arg(&self, name: &str) -> Option<&str> {
        self.arguments.get(name).and_then(HeaderValue::as_str)
    }

    fn single_active(&self) -> bool {
        matches!(
            self.arguments.get("x-single-active-consumer"),
            Some(HeaderValue::Bool(true))
        )
    }
}

#[derive(Debug)]
struct Consumer {
    queue: String,
    no_ack: bool,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug)]
struct Unacked {
    queue: String,
    consumer: Option<String>,
    message: Stored,
}

#[derive(Debug)]
struct Channel {
    conn: ConnId,
    prefetch: u16,
    consumers: BTreeMap<String, Consumer>,
    unacked: BTreeMap<u64, Unacked>,
    next_tag: u64,
    /// This channel's direct reply-to consumer, if it has one.
    reply_to: Option<String>,
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
    pub(super) exchanges: BTreeMap<String, Exchange>,
    pub(super) queues: BTreeMap<String, Queue>,
    channels: HashMap<ChannelId, Channel>,
    next_id: u64,
}

fn not_found(what: &str, name: &str) -> Refusal {
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

    pub(super) fn open_connection(&mut self) -> ConnId {
        self.id()
    }

    pub(super) fn open_channel(&mut self, conn: ConnId) -> ChannelId {
        let id = self.id();
        self.channels.insert(
            id,
            Channel {
                conn,
                prefetch: 0,
                consumers: BTreeMap::new(),
                unacked: BTreeMap::new(),
                next_tag: 0,
                reply_to: None,
            },
        );
        id
    }

    fn channel(&mut self, id: ChannelId) -> Result<&mut Channel, Refusal> {
        self.channels
            .get_mut(&id)
            .ok_or_else(|| Refusal::channel(504, "CHANNEL_ERROR - the channel is closed".into()))
    }

    /// Closes a channel: its consumers are cancelled (without telling them:
    /// the channel is gone) and its unacknowledged messages go back to
    /// their queues, redelivered.
    pub(super) fn close_channel(&mut self, id: ChannelId, now: Instant) {
        let Some(ch) = self.channels.remove(&id) else {
            return;
        };
        for (tag, consumer) in &ch.consumers {
            self.detach(&consumer.queue, id, tag, now);
        }
        for (_, u) in ch.unacked.into_iter().rev() {
            self.requeue(u, now);
        }
    }

    /// Closes a connection: its channels, then its exclusive queues.
    pub(super) fn close_connection(&mut self, conn: ConnId, now: Instant) {
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

    fn remove_queue(&mut self, name: &str) -> Option<u32> {
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

    /// Publishes from `channel` (for direct reply-to's `reply_to`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish(
        &mut self,
        channel: ChannelId,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        mut properties: Properties,
        body: Bytes,
        now: Instant,
    ) -> Result<Published, Refusal> {
        let ch = self.channel(channel)?;
        if properties.reply_to.as_deref() == Some(REPLY_TO) {
            match &ch.reply_to {
                Some(token) => properties.reply_to = Some(format!("{REPLY_TO}.{token}")),
                None => {
                    return Err(Refusal::channel(
                        406,
                        "PRECONDITION_FAILED - fast reply consumer does not exist".into(),
                    ))
                }
            }
        }
        if let Some(exp) = &properties.expiration {
            if exp.parse::<u32>().is_err() {
                return Err(Refusal::channel(
                    406,
                    format!("PRECONDITION_FAILED - invalid expiration '{exp}': no_integer"),
                ));
            }
        }
        if !self.exchanges.contains_key(exchange) {
            return Err(not_found("exchange", exchange));
        }
        if exchange.is_empty() {
            if let Some(token) = routing_key.strip_prefix(&format!("{REPLY_TO}.")) {
                return Ok(self.reply(token, routing_key, properties, body, mandatory));
            }
        }
        let message = Stored {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            properties,
            body,
            expires_at: None,
            redelivered: false,
            returns: 0,
        };
        let queues = self.route(exchange, routing_key, &message.properties.headers);
        if queues.is_empty() {
            return Ok(if mandatory {
                Published::Returned
            } else {
                Published::Ack
            });
        }
        let mut refused = false;
        for q in queues {
            refused |= !self.enqueue(&q, message.clone(), now);
        }
        self.dispatch(now);
        Ok(if refused {
            Published::Nack
        } else {
            Published::Ack
        })
    }

    /// A reply to a direct reply-to consumer, delivered at once (no ack).
    fn reply(
        &mut self,
        token: &str,
        routing_key: &str,
        properties: Properties,
        body: Bytes,
        mandatory: bool,
    ) -> Published {
        let target = self
            .channels
            .iter_mut()
            .find(|(_, c)| c.reply_to.as_deref() == Some(token));
        let Some((_, ch)) = target else {
            return if mandatory {
                Published::Returned
            } else {
                Published::Ack
            };
        };
        if let Some(c) = ch.consumers.get(REPLY_TO) {
            let _ = c.events.send(Event::Delivery(Box::new(MemoryDelivery {
                delivery_tag: 0,
                consumer_tag: REPLY_TO.into(),
                exchange: String::new(),
                routing_key: routing_key.to_owned(),
                redelivered: false,
                properties,
                body,
            })));
        }
        Published::Ack
    }

    /// The queues a message reaches from `exchange`, following
    /// exchange-to-exchange bindings, each once.
    fn route(&self, exchange: &str, routing_key: &str, headers: &Headers) -> Vec<String> {
        let mut queues: Vec<String> = Vec::new();
        let mut seen = vec![exchange.to_owned()];
        let mut todo = vec![exchange.to_owned()];
        while let Some(name) = todo.pop() {
            let Some(e) = self.exchanges.get(&name) else {
                continue;
            };
            if name.is_empty() {
                if self.queues.contains_key(routing_key) && !queues.iter().any(|q| q == routing_key)
                {
                    queues.push(routing_key.to_owned());
                }
                continue;
            }
            for b in matching(e.kind, &e.arguments, &e.bindings, routing_key, headers) {
                match &b.destination {
                    Destination::Queue(q) => {
                        if !queues.contains(q) {
                            queues.push(q.clone());
                        }
                    }
                    Destination::Exchange(x) => {
                        if !seen.contains(x) {
                            seen.push(x.clone());
                            todo.push(x.clone());
                        }
                    }
                }
            }
        }
        queues
    }

    /// Puts `message` on queue `name`, applying its TTL and length limit;
    /// `false` when the queue refused it (`reject-publish`).
    fn enqueue(&mut self, name: &str, mut message: Stored, now: Instant) -> bool {
        let Some(q) = self.queues.get_mut(name) else {
            return true;
        };
        let per_message = message
            .properties
            .expiration
            .as_deref()
            .and_then(|e| e.parse::<u64>().ok());
        let per_queue = q
            .int_arg("x-message-ttl")
            .and_then(|t| u64::try_from(t).ok());
        message.expires_at = match (per_message, per_queue) {
            (None, None) => None,
            (a, b) => {
                Some(now + Duration::from_millis(a.unwrap_or(u64::MAX).min(b.unwrap_or(u64::MAX))))
            }
        };
        let full = q
            .int_arg("x-max-length")
            .is_some_and(|max| q.messages.len() as i64 >= max.max(0));
        let overflow = q.str_arg("x-overflow").map(str::to_owned);
        if full {
            match overflow.as_deref() {
                Some("reject-publish") => return false,
                Some("reject-publish-dlx") => {
                    self.dead_letter(name, message, "maxlen", now);
                    return false;
                }
                // drop-head: the oldest goes, dead-lettered.
                _ => {
                    let head = q.messages.pop_front();
                    q.messages.push_back(message);
                    if let Some(head) = head {
                        self.dead_letter(name, head, "maxlen", now);
                    }
                    return true;
                }
            }
        }
        q.messages.push_back(message);
        true
    }

    /// Dead-letters `message` from queue `from` for `reason` (`rejected`,
    /// `expired`, `maxlen`, `delivery_limit`) through the queue's
    /// dead-letter exchange, with the `x-death` history RabbitMQ keeps. A
    /// queue without one drops it.
    fn dead_letter(&mut self, from: &str, mut message: Stored, reason: &str, now: Instant) {
        let Some(q) = self.queues.get(from) else {
            return;
        };
        let Some(dlx) = q.str_arg("x-dead-letter-exchange").map(str::to_owned) else {
            return;
        };
        let key = q
            .str_arg("x-dead-letter-routing-key")
            .map(str::to_owned)
            .unwrap_or_else(|| message.routing_key.clone());
        let headers = &mut message.properties.headers;
        let mut deaths: Vec<HeaderValue> = match headers.remove("x-death") {
            Some(HeaderValue::Array(items)) => items,
            _ => Vec::new(),
        };
        let same = |d: &HeaderValue| {
            matches!(d, HeaderValue::Table(t)
                if t.get("queue").and_then(HeaderValue::as_str) == Some(from)
                && t.get("reason").and_then(HeaderValue::as_str) == Some(reason))
        };
        let count = match deaths.iter().position(same) {
            Some(i) => {
                let old = deaths.remove(i);
                match old {
                    HeaderValue::Table(t) => {
                        t.get("count").and_then(HeaderValue::as_i64).unwrap_or(0) + 1
                    }
                    _ => 1,
                }
            }
            None => 1,
        };
        let mut death = Headers::new();
        death.insert("count".into(), HeaderValue::Int(count));
        death.insert("reason".into(), HeaderValue::String(reason.into()));
        death.insert("queue".into(), HeaderValue::String(from.into()));
        death.insert(
            "time".into(),
            HeaderValue::Timestamp(crate::clock::now_millis().max(0) as u64 / 1000),
        );
        death.insert(
            "exchange".into(),
            HeaderValue::String(message.exchange.clone()),
        );
        death.insert(
            "routing-keys".into(),
            HeaderValue::Array(vec![HeaderValue::String(message.routing_key.clone())]),
        );
        if let Some(exp) = message.properties.expiration.take() {
            death.insert("original-expiration".into(), HeaderValue::String(exp));
        }
        deaths.insert(0, HeaderValue::Table(death));
        headers.insert("x-death".into(), HeaderValue::Array(deaths));
        for (name, value) in [
            ("x-first-death-queue", from),
            ("x-first-death-reason", reason),
            ("x-first-death-exchange", message.exchange.as_str()),
        ] {
            headers
                .entry(name.into())
                .or_insert_with(|| HeaderValue::String(value.to_owned()));
        }
        let again = Stored {
            exchange: dlx.clone(),
            routing_key: key.clone(),
            expires_at: None,
            redelivered: false,
            returns: 0,
            ..message
        };
        if self.exchanges.contains_key(&dlx) {
            for target in self.route(&dlx, &key, &again.properties.headers) {
                self.enqueue(&target, again.clone(), now);
            }
        }
    }

    /// Back to its queue, at the front (RabbitMQ keeps a requeued
    /// message's place as far as it can), marked redelivered; on a quorum
    /// queue, past its delivery limit it is dead-lettered instead.
    fn requeue(&mut self, u: Unacked, now: Instant) {
        let Some(q) = self.queues.get_mut(&u.queue) else {
            return;
        };
        let mut message = u.message;
        message.redelivered = true;
        if q.kind() == Some(QueueType::Quorum) {
            message.returns += 1;
            if let Some(limit) = q.int_arg("x-delivery-limit") {
                if limit >= 0 && i64::from(message.returns) > limit {
                    self.dead_letter(&u.queue, message, "delivery_limit", now);
                    return;
                }
            }
        }
        q.messages.push_front(message);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn consume(
        &mut self,
        channel: ChannelId,
        queue: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
        events: mpsc::UnboundedSender<Event>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let conn = self.channel(channel)?.conn;
        if queue == REPLY_TO {
            if !no_ack {
                return Err(Refusal::channel(
                    406,
                    "PRECONDITION_FAILED - reply consumer cannot acknowledge".into(),
                ));
            }
            let token = uuid::Uuid::new_v4().simple().to_string();
            let ch = self.channel(channel)?;
            ch.reply_to = Some(token);
            ch.consumers.insert(
                REPLY_TO.to_owned(),
                Consumer {
                    queue: REPLY_TO.to_owned(),
                    no_ack: true,
                    events,
                },
            );
            return Ok(());
        }
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| not_found("queue", queue))?;
        if q.exclusive.is_some_and(|owner| owner != conn) {
            return Err(Refusal::channel(
                405,
                format!("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost '/'."),
            ));
        }
        if exclusive && !q.consumers.is_empty() {
            return Err(Refusal::channel(
                403,
                format!("ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use"),
            ));
        }
        q.consumers.push((channel, tag.to_owned()));
        q.had_consumer = true;
        q.last_used = now;
        self.channel(channel)?.consumers.insert(
            tag.to_owned(),
            Consumer {
                queue: queue.to_owned(),
                no_ack,
                events,
            },
        );
        self.dispatch(now);
        Ok(())
    }

    pub(super) fn cancel(
        &mut self,
        channel: ChannelId,
        tag: &str,
        now: Instant,
    ) -> Result<(), Refusal> {
        let ch = self.channel(channel)?;
        if let Some(c) = ch.consumers.remove(tag) {
            self.detach(&c.queue, channel, tag, now);
        }
        Ok(())
    }

    /// Takes a consumer off its queue; an auto-delete queue that loses its
    /// last consumer goes.
    fn detach(&mut self, queue: &str, channel: ChannelId, tag: &str, now: Instant) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        q.consumers.retain(|(c, t)| !(*c == channel && t == tag));
        q.last_used = now;
        if q.auto_delete && q.had_consumer && q.consumers.is_empty() {
            self.remove_queue(queue);
        }
    }

    /// Settles deliveries on `channel`: `ack`, or (`requeue` or not) nack.
    pub(super) fn settle(
        &mut self,
        channel: ChannelId,
        tag: u64,
        multiple: bool,
        outcome: Settle,
        now: Instant,
    ) -> Result<(), Refusal> {
        let ch = self.channel(channel)?;
        let tags: Vec<u64> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            ch.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else if ch.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() {
            return Err(Refusal::channel(
                406,
                format!("PRECONDITION_FAILED - unknown delivery tag {tag}"),
            ));
        }
        let settled: Vec<Unacked> = tags.iter().filter_map(|t| ch.unacked.remove(t)).collect();
        for u in settled {
            match outcome {
                Settle::Ack => {}
                Settle::Requeue => self.requeue(u, now),
                Settle::Discard => {
                    let queue = u.queue.clone();
                    self.dead_letter(&queue, u.message, "rejected", now);
                }
            }
        }
        self.dispatch(now);
        Ok(())
    }

    /// `basic.get`: the next ready message of `queue`, if any.
    pub(super) fn get(
        &mut self,
        channel: ChannelId,
        queue: &str,
        no_ack: bool,
        now: Instant,
    ) -> Result<Option<(MemoryDelivery, u32)>, Refusal> {
        self.expire(now);
        let q = self
            .queues
            .get_mut(queue)
            .ok_or_else(|| not_found("queue", queue))?;
        q.last_used = now;
        let Some(message) = q.messages.pop_front() else {
            return Ok(None);
        };
        let left = q.messages.len() as u32;
        let queue_kind = q.kind();
        let ch = self.channel(channel)?;
        ch.next_tag += 1;
        let tag = ch.next_tag;
        let delivery = delivery_of(&message, tag, "", queue_kind);
        if !no_ack {
            ch.unacked.insert(
                tag,
                Unacked {
                    queue: queue.to_owned(),
                    consumer: None,
                    message,
                },
            );
        }
        Ok(Some((delivery, left)))
    }

    /// Drops expired messages from the heads of queues (dead-lettering
    /// them), and deletes queues unused past their `x-expires`.
    pub(super) fn expire(&mut self, now: Instant) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            while let Some(q) = self.queues.get_mut(&name) {
                let due = q
                    .messages
                    .front()
                    .and_then(|m| m.expires_at)
                    .is_some_and(|t| t <= now);
                if !due {
                    break;
                }
                let message = q.messages.pop_front().expect("a head");
                self.dead_letter(&name, message, "expired", now);
            }
            let unused_past = self.queues.get(&name).and_then(|q| {
                let ms = q.int_arg("x-expires")?;
                (q.consumers.is_empty()
                    && q.last_used + Duration::from_millis(ms.max(0) as u64) <= now)
                    .then_some(())
            });
            if unused_past.is_some() {
                self.remove_queue(&name);
            }
        }
    }

    /// The next time something expires: a queue's head, or an unused queue.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .values()
            .flat_map(|q| {
                let head = q.messages.front().and_then(|m| m.expires_at);
                let unused = q
                    .int_arg("x-expires")
                    .filter(|_| q.consumers.is_empty())
                    .map(|ms| q.last_used + Duration::from_millis(ms.max(0) as u64));
                [head, unused]
            })
            .flatten()
            .min()
    }

    /// Hands ready messages to consumers with room under their prefetch,
    /// in turn (only the first, on a single-active-consumer queue).
    pub(super) fn dispatch(&mut self, now: Instant) {
        self.expire(now);
        let names: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.messages.is_empty() && !q.consumers.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            while let Some(q) = self.queues.get(&name) {
                if q.messages.is_empty() || q.consumers.is_empty() {
                    break;
                }
                let candidates: Vec<(ChannelId, String)> = if q.single_active() {
                    q.consumers.iter().take(1).cloned().collect()
                } else {
                    let n = q.consumers.len();
                    (0..n)
                        .map(|i| q.consumers[(q.next_consumer + i) % n].clone())
                        .collect()
                };
                let kind = q.kind();
                let chosen = candidates.into_iter().enumerate().find(|(_, (ch, tag))| {
                    self.channels.get(ch).is_some_and(|c| {
                        c.prefetch == 0
                            || c.unacked
                                .values()
                                .filter(|u| u.consumer.as_deref() == Some(tag))
                                .count()
                                < usize::from(c.prefetch)
                    })
                });
                let Some((offset, (channel, tag))) = chosen else {
                    break;
                };
                let q = self.queues.get_mut(&name).expect("checked");
                q.next_consumer = (q.next_consumer + offset + 1) % q.consumers.len().max(1);
                let message = q.messages.pop_front().expect("not empty");
                let ch = self.channels.get_mut(&channel).expect("chosen");
                ch.next_tag += 1;
                let delivery_tag = ch.next_tag;
                let Some(consumer) = ch.consumers.get(&tag) else {
                    break;
                };
                let delivery = delivery_of(&message, delivery_tag, &tag, kind);
                let no_ack = consumer.no_ack;
                if consumer
                    .events
                    .send(Event::Delivery(Box::new(delivery)))
                    .is_err()
                {
                    // The consumer's receiver is gone: it is cancelled, and
                    // the message stays first in line.
                    ch.consumers.remove(&tag);
                    self.detach(&name, channel, &tag, now);
                    if let Some(q) = self.queues.get_mut(&name) {
                        q.messages.push_front(message);
                    }
                    continue;
                }
                if !no_ack {
                    ch.unacked.insert(
                        delivery_tag,
                        Unacked {
                            queue: name.clone(),
                            consumer: Some(tag),
                            message,
                        },
                    );
                }
            }
        }
    }

    /// A queue's ready messages and consumers, if it exists.
    pub(super) fn queue_counts(&self, name: &str) -> Option<(u32, u32)> {
        self.queues
            .get(name)
            .map(|q| (q.messages.len() as u32, q.consumers.len() as u32))
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`/`basic.reject` with `requeue = true`.
    Requeue,
    /// The same with `requeue = false`: dead-lettered, or dropped.
    Discard,
}

fn delivery_of(m: &Stored, tag: u64, consumer: &str, kind: Option<QueueType>) -> MemoryDelivery {
    let mut properties = m.properties.clone();
    if kind == Some(QueueType::Quorum) && m.returns > 0 {
        properties.headers.insert(
            "x-delivery-count".into(),
            HeaderValue::Int(i64::from(m.returns)),
        );
    }
    MemoryDelivery {
        delivery_tag: tag,
        consumer_tag: consumer.to_owned(),
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        redelivered: m.redelivered,
        properties,
        body: m.body.clone(),
    }
}
