//! Time and death in the in-memory broker: messages expiring at the head
//! of their queue, queues expiring unused, and dead-lettering with the
//! `x-death` history RabbitMQ 3.x keeps.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::state::{State, Stored};
use crate::message::{HeaderValue, Headers};

impl State {
    /// Dead-letters `message` from queue `from` for `reason` (`rejected`,
    /// `expired`, `maxlen`, `delivery_limit`) through the queue's
    /// dead-letter exchange, with the `x-death` history RabbitMQ keeps. A
    /// queue without one drops it.
    pub(super) fn dead_letter(
        &mut self,
        from: &str,
        mut message: Stored,
        reason: &str,
        now: Instant,
    ) {
        let Some(q) = self.queues.get(from) else {
            return;
        };
        let Some(dlx) = q.str_arg("x-dead-letter-exchange").map(str::to_owned) else {
            return;
        };
        let key = q
            .str_arg("x-dead-letter-routing-key")
            .map(str::to_owned)
            .unwrap_or_else(|| message.routing_key.to_string());
        let properties = Arc::make_mut(&mut message.properties);
        let expiration = properties.expiration.take();
        let headers = &mut properties.headers;
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
            HeaderValue::String(message.exchange.to_string()),
        );
        death.insert(
            "routing-keys".into(),
            HeaderValue::Array(vec![HeaderValue::String(message.routing_key.to_string())]),
        );
        if let Some(exp) = expiration {
            death.insert("original-expiration".into(), HeaderValue::String(exp));
        }
        deaths.insert(0, HeaderValue::Table(death));
        headers.insert("x-death".into(), HeaderValue::Array(deaths));
        for (name, value) in [
            ("x-first-death-queue", from),
            ("x-first-death-reason", reason),
            ("x-first-death-exchange", &*message.exchange),
        ] {
            headers
                .entry(name.into())
                .or_insert_with(|| HeaderValue::String(value.to_owned()));
        }
        let again = Stored {
            exchange: dlx.as_str().into(),
            routing_key: key.as_str().into(),
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

    /// Drops expired messages from the heads of queues (dead-lettering
    /// them), and deletes queues unused past their `x-expires`.
    pub(super) fn expire(&mut self, now: Instant) {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.expire_queue(&name, now);
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

    /// Dead-letters the expired messages at the head of one queue.
    pub(super) fn expire_queue(&mut self, name: &str, now: Instant) {
        while let Some(q) = self.queues.get_mut(name) {
            let due = q
                .messages
                .front()
                .and_then(|m| m.expires_at)
                .is_some_and(|t| t <= now);
            if !due {
                break;
            }
            let message = q.messages.pop_front().expect("a head");
            self.dead_letter(name, message, "expired", now);
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
}
