//! Topology: exchanges, queues and bindings, declared from settings.
//!
//! A [`Topology`] is a plain description. A [`Connection`](crate::Connection)
//! remembers every topology declared through it and declares it again after
//! each recovery, so exclusive and auto-delete queues come back with the
//! connection. Names starting with `amq.` belong to the broker and are never
//! declared.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderValue, Headers};

/// The type of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    /// Routes by exact routing key.
    #[default]
    Direct,
    /// Routes by routing-key pattern (`*` one word, `#` any).
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes by header values.
    Headers,
    /// Spreads messages over its queues by a stable hash of the routing
    /// key or of a header (`x-consistent-hash`, a plugin shipped with
    /// RabbitMQ: `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`).
    ConsistentHash,
}

impl ExchangeKind {
    /// Every exchange type.
    pub const ALL: [ExchangeKind; 5] = [
        ExchangeKind::Direct,
        ExchangeKind::Topic,
        ExchangeKind::Fanout,
        ExchangeKind::Headers,
        ExchangeKind::ConsistentHash,
    ];

    /// The AMQP name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
            ExchangeKind::ConsistentHash => "x-consistent-hash",
        }
    }
}

impl fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExchangeKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        ExchangeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown exchange type `{s}`, expected one of: {}",
                    ExchangeKind::ALL.map(ExchangeKind::as_str).join(", ")
                ))
            })
    }
}

/// The queue argument that names a queue's type.
pub(crate) const QUEUE_TYPE: &str = "x-queue-type";

/// A queue's type, as RabbitMQ knows it (`x-queue-type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueueType {
    /// One node holds the queue: fast, and gone while that node is down.
    Classic,
    /// Replicated over a majority of a cluster's nodes (Raft); the type
    /// RabbitMQ recommends for data that must survive a node.
    Quorum,
    /// An append-only log that consumers read from an offset.
    Stream,
}

impl QueueType {
    /// Every type, in the order error messages list them.
    pub const ALL: [QueueType; 3] = [QueueType::Classic, QueueType::Quorum, QueueType::Stream];

    /// The name RabbitMQ uses.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }

    /// The type `arguments` ask for, if they name one RabbitMQ knows.
    pub fn of(arguments: &Headers) -> Option<QueueType> {
        let name = arguments.get(QUEUE_TYPE)?.as_str()?;
        QueueType::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// Sets `arguments` to ask for this type.
    pub fn set(self, arguments: &mut Headers) {
        arguments.insert(QUEUE_TYPE.into(), self.as_str().into());
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        QueueType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown queue type `{s}`, expected one of: {}",
                    QueueType::ALL.map(QueueType::as_str).join(", ")
                ))
            })
    }
}

/// Whether a name belongs to the broker (`amq.*`, or the default exchange).
pub(crate) fn is_reserved(name: &str) -> bool {
    name.is_empty() || name.starts_with("amq.")
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    /// Its name. Empty is the default exchange, which is never declared.
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Extra arguments, passed through.
    pub arguments: Headers,
}

impl Exchange {
    /// A durable exchange of `kind`.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Exchange {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            arguments: Headers::new(),
        }
    }
}

/// A queue to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    /// Its name. Empty lets the broker choose one.
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Used by this connection only, and deleted with it.
    pub exclusive: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Arguments passed through unchanged: `x-message-ttl`,
    /// `x-dead-letter-exchange`, `x-queue-type`, `x-single-active-consumer`...
    pub arguments: Headers,
}

impl Queue {
    /// A durable queue.
    pub fn durable(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: Headers::new(),
        }
    }

    /// A durable quorum queue: replicated over the cluster's nodes.
    pub fn quorum(name: impl Into<String>) -> Self {
        Queue::durable(name).queue_type(QueueType::Quorum)
    }

    /// Asks for `kind` (the `x-queue-type` argument).
    pub fn queue_type(mut self, kind: QueueType) -> Self {
        kind.set(&mut self.arguments);
        self
    }

    /// A transient queue that belongs to this connection alone.
    pub fn exclusive(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: Headers::new(),
        }
    }
}

/// A binding of a queue to an exchange by one routing (binding) key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The queue.
    pub queue: String,
    /// The exchange.
    pub exchange: String,
    /// The binding key.
    pub routing_key: String,
}

/// A set of exchanges, queues and bindings, declared together in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Exchanges, declared first.
    pub exchanges: Vec<Exchange>,
    /// Queues, declared next.
    pub queues: Vec<Queue>,
    /// Bindings, declared last.
    pub bindings: Vec<Binding>,
}

impl Topology {
    /// Adds an exchange unless it is reserved or already present.
    pub fn exchange(&mut self, exchange: Exchange) -> &mut Self {
        if !is_reserved(&exchange.name) && !self.exchanges.iter().any(|e| e.name == exchange.name) {
            self.exchanges.push(exchange);
        }
        self
    }

    /// Adds a queue unless already present (by name; server-named queues are
    /// always added).
    pub fn queue(&mut self, queue: Queue) -> &mut Self {
        if queue.name.is_empty() || !self.queues.iter().any(|q| q.name == queue.name) {
            self.queues.push(queue);
        }
        self
    }

    /// Adds a binding unless already present. Bindings to the default
    /// exchange are implicit and skipped.
    pub fn bind(
        &mut self,
        queue: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> &mut Self {
        let b = Binding {
            queue: queue.into(),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        };
        if !b.exchange.is_empty() && !self.bindings.contains(&b) {
            self.bindings.push(b);
        }
        self
    }

    /// Adds everything in `other`.
    pub fn merge(&mut self, other: &Topology) -> &mut Self {
        for e in &other.exchanges {
            self.exchange(e.clone());
        }
        for q in &other.queues {
            self.queue(q.clone());
        }
        for b in &other.bindings {
            self.bind(&b.queue, &b.exchange, &b.routing_key);
        }
        self
    }

    /// Whether there is nothing to declare.
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty() && self.queues.is_empty() && self.bindings.is_empty()
    }

    /// Each exchange, queue and binding as a topology of its own, in
    /// declaration order, so that one the broker refuses does not stop the
    /// others. A topology with a server-named queue stays whole: its
    /// bindings need the name the queue gets.
    pub(crate) fn entities(&self) -> Vec<Topology> {
        if self.queues.iter().any(|q| q.name.is_empty()) {
            return vec![self.clone()];
        }
        let exchanges = self.exchanges.iter().map(|e| Topology {
            exchanges: vec![e.clone()],
            ..Topology::default()
        });
        let queues = self.queues.iter().map(|q| Topology {
            queues: vec![q.clone()],
            ..Topology::default()
        });
        let bindings = self.bindings.iter().map(|b| Topology {
            bindings: vec![b.clone()],
            ..Topology::default()
        });
        exchanges.chain(queues).chain(bindings).collect()
    }
}

/// Every name, key and argument name in `t` fits in an AMQP short string:
/// one past 255 bytes is an error naming it, before the client (which
/// panics on it) sees it.
pub(crate) fn check_names(t: &Topology) -> Result<()> {
    use crate::limits::check_short;
    let arguments = |args: &crate::message::Headers| {
        args.keys()
            .try_for_each(|k| check_short("argument name", k))
    };
    for e in &t.exchanges {
        check_short("exchange name", &e.name)?;
        arguments(&e.arguments)?;
    }
    for q in &t.queues {
        check_short("queue name", &q.name)?;
        arguments(&q.arguments)?;
    }
    for b in &t.bindings {
        check_short("queue name", &b.queue)?;
        check_short("exchange name", &b.exchange)?;
        check_short("binding key", &b.routing_key)?;
    }
    Ok(())
}

/// Refuses what means something else on the broker's version than it
/// does on others: a negative `x-delivery-limit` is "unlimited" on
/// RabbitMQ 4 but "dead-letter after the first delivery" on 3.x, so it is
/// never sent to a 3.x broker.
pub(crate) fn check_for_server(q: &Queue, server_version: &str) -> Result<()> {
    let limit = q
        .arguments
        .get("x-delivery-limit")
        .and_then(HeaderValue::as_i64);
    match (limit, crate::limits::major(server_version)) {
        (Some(limit), Some(major)) if limit < 0 && major < 4 => Err(Error::new(
            ErrorKind::Declare,
            format!(
                "queue '{}': x-delivery-limit {limit} is not sent to RabbitMQ {server_version}: \
                 before 4.0 a negative limit dead-letters every message after its first \
                 delivery; leave it out for no limit",
                q.name
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_negative_delivery_limit_is_refused_before_rabbitmq_4() {
        let mut q = Queue::quorum("q");
        q.arguments
            .insert("x-delivery-limit".into(), HeaderValue::Int(-1));
        let e = check_for_server(&q, "3.10.8").unwrap_err().to_string();
        assert!(
            e.contains("queue 'q'") && e.contains("RabbitMQ 3.10.8"),
            "{e}"
        );
        assert!(check_for_server(&q, "4.1.0").is_ok());
        q.arguments
            .insert("x-delivery-limit".into(), HeaderValue::Int(5));
        assert!(check_for_server(&q, "3.10.8").is_ok());
    }

    #[test]
    fn reserved_names_are_never_added() {
        let mut t = Topology::default();
        t.exchange(Exchange::new("amq.topic", ExchangeKind::Topic))
            .exchange(Exchange::new("", ExchangeKind::Direct))
            .exchange(Exchange::new("shop", ExchangeKind::Topic))
            .exchange(Exchange::new("shop", ExchangeKind::Topic))
            .bind("q", "", "q")
            .bind("q", "shop", "a")
            .bind("q", "shop", "a");
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!(t.bindings.len(), 1);
    }

    #[test]
    fn exchange_kind_parse_lists_valid_values() {
        assert_eq!(
            "topic".parse::<ExchangeKind>().unwrap(),
            ExchangeKind::Topic
        );
        let err = "fan".parse::<ExchangeKind>().unwrap_err().to_string();
        assert!(err.contains("direct, topic, fanout, headers"), "{err}");
    }
}
