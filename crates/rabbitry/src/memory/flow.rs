//! Messages through the in-memory broker: publishing (routing, TTLs,
//! length limits, confirms and returns, direct reply-to), consumers with
//! their prefetch, settling, `basic.get`, and handing ready messages to
//! consumers.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::routing::{matching, Destination};
use super::state::{not_found, ChannelId, Consumer, Published, State, Stored, Unacked, REPLY_TO};
use super::{Event, MemoryDelivery, Refusal};
use crate::message::{HeaderValue, Headers, Properties};
use crate::topology::QueueType;

impl State {
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
            if let Some(token) = routing_key
                .strip_prefix(REPLY_TO)
                .and_then(|rest| rest.strip_prefix('.'))
            {
                return Ok(self.reply(token, routing_key, properties, body, mandatory));
            }
        }
        let message = Stored {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties: Arc::new(properties),
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
        let last = queues.len() - 1;
        let mut message = Some(message);
        for (i, q) in queues.iter().enumerate() {
            let m = if i == last {
                message.take().expect("once")
            } else {
                message.clone().expect("kept")
            };
            refused |= !self.enqueue(q, m, now);
        }
        Ok(if refused {
            Published::Nack
        } else {
            Published::Ack
        })
    }

    /// A reply to a direct reply-to consumer, delivered at once (no ack).
    pub(super) fn reply(
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
                exchange: "".into(),
                routing_key: routing_key.into(),
                redelivered: false,
                properties: Arc::new(properties),
                body,
            })));
        }
        Published::Ack
    }

    /// The queues a message reaches from `exchange`, following
    /// exchange-to-exchange bindings, each once.
    pub(super) fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        headers: &Headers,
    ) -> Vec<String> {
        if exchange.is_empty() {
            // The default exchange: the queue of that name, if any.
            return match self.queues.contains_key(routing_key) {
                true => vec![routing_key.to_owned()],
                false => Vec::new(),
            };
        }
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
    pub(super) fn enqueue(&mut self, name: &str, mut message: Stored, now: Instant) -> bool {
        let Some(q) = self.queues.get_mut(name) else {
            return true;
        };
        if !q.consumers.is_empty() && !self.dirty.contains(name) {
            self.dirty.insert(q.name.clone());
        }
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
        // A new deadline (the clock task looks again; only heads expire).
        self.wake |= message.expires_at.is_some();
        let full = q
            .int_arg("x-max-length")
            .is_some_and(|max| q.messages.len() as i64 >= max.max(0));
        if full {
            let overflow = q.str_arg("x-overflow").map(str::to_owned);
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

    /// Back to its queue, at the front (RabbitMQ keeps a requeued
    /// message's place as far as it can), marked redelivered; on a quorum
    /// queue, past its delivery limit it is dead-lettered instead.
    pub(super) fn requeue(&mut self, u: Unacked, now: Instant) {
        let Some(q) = self.queues.get_mut(&*u.queue) else {
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
        self.wake |= message.expires_at.is_some();
        q.messages.push_front(message);
        self.dirty.insert(u.queue);
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
                    tag: REPLY_TO.into(),
                    queue: REPLY_TO.to_owned(),
                    no_ack: true,
                    events,
                    in_flight: 0,
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
                tag: tag.into(),
                queue: queue.to_owned(),
                no_ack,
                events,
                in_flight: 0,
            },
        );
        self.dirty.insert(queue.into());
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
    pub(super) fn detach(&mut self, queue: &str, channel: ChannelId, tag: &str, now: Instant) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        q.consumers.retain(|(c, t)| !(*c == channel && t == tag));
        q.last_used = now;
        // An unused queue's expiry starts now.
        self.wake |= q.consumers.is_empty() && q.arguments.contains_key("x-expires");
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
        // Room under the prefetch of the consumers that had them, and
        // whatever went back: the queues to look at again.
        let mut touched: Vec<Arc<str>> = Vec::new();
        for u in &settled {
            if let Some(c) = u.consumer.as_ref().and_then(|t| ch.consumers.get_mut(&**t)) {
                c.in_flight = c.in_flight.saturating_sub(1);
            }
            if !touched.contains(&u.queue) {
                touched.push(u.queue.clone());
            }
        }
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
        self.dirty.extend(touched);
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
        self.expire_queue(queue, now);
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
        let queue_name = q.name.clone();
        let ch = self.channel(channel)?;
        ch.next_tag += 1;
        let tag = ch.next_tag;
        let delivery = delivery_of(&message, tag, &Arc::from(""), queue_kind);
        if !no_ack {
            ch.unacked.insert(
                tag,
                Unacked {
                    queue: queue_name,
                    consumer: None,
                    message,
                },
            );
        }
        Ok(Some((delivery, left)))
    }

    /// Hands out what the last operation made ready: the queues it put
    /// messages on or made room for (dead-lettering may add more).
    pub(super) fn flush(&mut self, now: Instant) {
        while let Some(name) = self.dirty.pop_first() {
            self.dispatch_queue(&name, now);
        }
    }

    /// Hands ready messages to consumers with room under their prefetch,
    /// on every queue (the clock task's round).
    pub(super) fn dispatch(&mut self, now: Instant) {
        self.expire(now);
        let names: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.messages.is_empty() && !q.consumers.is_empty())
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            self.dispatch_queue(&name, now);
        }
    }

    /// Hands one queue's ready messages to its consumers with room under
    /// their prefetch, in turn (only the first, on a single-active-consumer
    /// queue).
    pub(super) fn dispatch_queue(&mut self, name: &str, now: Instant) {
        self.expire_queue(name, now);
        while let Some(q) = self.queues.get(name) {
            if q.messages.is_empty() || q.consumers.is_empty() {
                break;
            }
            let n = if q.single_active() {
                1
            } else {
                q.consumers.len()
            };
            let start = if q.single_active() {
                0
            } else {
                q.next_consumer
            };
            let kind = q.kind();
            let chosen = (0..n).find_map(|i| {
                let (channel, tag) = &q.consumers[(start + i) % q.consumers.len()];
                let ch = self.channels.get(channel)?;
                let c = ch.consumers.get(tag)?;
                (c.no_ack || ch.prefetch == 0 || c.in_flight < usize::from(ch.prefetch))
                    .then(|| (i, *channel, c.tag.clone()))
            });
            let queue_name = q.name.clone();
            let Some((offset, channel, tag)) = chosen else {
                break;
            };
            let q = self.queues.get_mut(name).expect("checked");
            q.next_consumer = (start + offset + 1) % q.consumers.len().max(1);
            let message = q.messages.pop_front().expect("not empty");
            let ch = self.channels.get_mut(&channel).expect("chosen");
            ch.next_tag += 1;
            let delivery_tag = ch.next_tag;
            let consumer = ch.consumers.get_mut(&*tag).expect("chosen");
            let delivery = delivery_of(&message, delivery_tag, &tag, kind);
            if consumer
                .events
                .send(Event::Delivery(Box::new(delivery)))
                .is_err()
            {
                // The consumer's receiver is gone: it is cancelled, and the
                // message stays first in line.
                ch.consumers.remove(&*tag);
                self.detach(name, channel, &tag, now);
                if let Some(q) = self.queues.get_mut(name) {
                    q.messages.push_front(message);
                }
                continue;
            }
            if !consumer.no_ack {
                consumer.in_flight += 1;
                ch.unacked.insert(
                    delivery_tag,
                    Unacked {
                        queue: queue_name,
                        consumer: Some(tag),
                        message,
                    },
                );
            }
        }
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

fn delivery_of(
    m: &Stored,
    tag: u64,
    consumer: &Arc<str>,
    kind: Option<QueueType>,
) -> MemoryDelivery {
    let mut properties = m.properties.clone();
    if kind == Some(QueueType::Quorum) && m.returns > 0 {
        Arc::make_mut(&mut properties).headers.insert(
            "x-delivery-count".into(),
            HeaderValue::Int(i64::from(m.returns)),
        );
    }
    MemoryDelivery {
        delivery_tag: tag,
        consumer_tag: consumer.clone(),
        exchange: m.exchange.clone(),
        routing_key: m.routing_key.clone(),
        redelivered: m.redelivered,
        properties,
        body: m.body.clone(),
    }
}
