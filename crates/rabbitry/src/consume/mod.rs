//! Consumers: queues read as a stream of [`Delivery`] values, each settled
//! with an explicit [`Outcome`].
//!
//! A [`Consumer`] declares its queue, exchange and bindings, sets the
//! prefetch, and consumes with manual acks. A background task restarts all
//! of that on every recovered socket; deliveries that were buffered from a
//! lost channel are dropped (the broker redelivers them), so a handler only
//! sees deliveries it can still settle.

mod delivery;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use delivery::{Acker, Delivery, Outcome};

use crate::connection::{close_quietly, Backoff, Connection};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Headers;
use crate::setters::setters;
use crate::task::{Background, CancellationToken};
use crate::topology::{is_reserved, Exchange, ExchangeKind, Queue, QueueType, Topology};
use crate::wire::{self, Deliveries, Incoming, WireChannel};

/// The most unacknowledged deliveries a consumer of a quorum queue holds:
/// every one is tracked by the queue's Raft log on each replica.
pub const QUORUM_MAX_PREFETCH: u16 = 2_000;

/// How long stopping waits for the broker to confirm a cancel.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a consumer reads and how: [`ConsumerSettings::new`] (or
/// `default()`) and a setter per field. The struct is `#[non_exhaustive]`,
/// so a new field is not a breaking change.
///
/// ```
/// use rabbitry::{ConsumerSettings, ExchangeKind, QueueType};
///
/// let orders = ConsumerSettings::new("orders")
///     .bind("shop", ExchangeKind::Topic, &["order.*"])
///     .queue_type(QueueType::Quorum)
///     .prefetch_count(50);
/// assert!(orders.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerSettings {
    /// The consumer's name (also its consumer tag prefix).
    pub name: String,
    /// The queue; empty lets the broker name it.
    pub queue: String,
    /// The exchange to bind to; empty means none (the default exchange).
    pub exchange: String,
    /// The exchange's type.
    pub exchange_type: ExchangeKind,
    /// Binding keys: one or many.
    pub routing_keys: Vec<String>,
    /// Durable queue and exchange.
    pub durable: bool,
    /// Exclusive to this connection.
    pub exclusive: bool,
    /// Auto-delete; `None` means `!durable`.
    pub auto_delete: Option<bool>,
    /// Declare the exchange, queue and bindings.
    pub auto_declare: bool,
    /// Queue arguments, passed through unchanged.
    pub arguments: Headers,
    /// Unacknowledged deliveries at once; `None` takes the connection's.
    pub prefetch_count: Option<u16>,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            name: "default".into(),
            queue: String::new(),
            exchange: String::new(),
            exchange_type: ExchangeKind::Direct,
            routing_keys: Vec::new(),
            durable: true,
            exclusive: false,
            auto_delete: None,
            auto_declare: true,
            arguments: Headers::new(),
            prefetch_count: None,
        }
    }
}

impl ConsumerSettings {
    /// Settings for consuming `queue`; the consumer is named after it.
    pub fn new(queue: impl Into<String>) -> Self {
        let queue = queue.into();
        ConsumerSettings {
            name: queue.clone(),
            queue,
            ..ConsumerSettings::default()
        }
    }

    setters! {
        /// Names the consumer (in logs, metrics and its consumer tag).
        name: into String;
        /// Sets the queue (empty: the broker names it).
        queue: into String;
        /// Sets the exchange to bind to (see also [`bind`](Self::bind)).
        exchange: into String;
        /// Sets the exchange's type.
        exchange_type: ExchangeKind;
        /// Sets the binding keys.
        routing_keys: Vec<String>;
        /// Durable queue and exchange (the default) or not.
        durable: bool;
        /// Exclusive to this connection or not (the default).
        exclusive: bool;
        /// Auto-delete or not (unset: `!durable`).
        auto_delete: some bool;
        /// Declares the exchange, queue and bindings (the default) or not.
        auto_declare: bool;
        /// Sets the queue arguments.
        arguments: Headers;
        /// Sets how many unacknowledged deliveries it holds at once.
        prefetch_count: some u16;
    }

    /// Checks the rules of these settings, naming the field that breaks
    /// one ([`Error::setting`](crate::Error::setting)): the consumer's name, queue, exchange and
    /// binding keys fit in an AMQP short string (255 bytes).
    pub fn validate(&self) -> Result<()> {
        let exchange = ("exchange".to_owned(), &self.exchange);
        for (field, value) in self.site_names().into_iter().chain([exchange]) {
            crate::limits::check_short(&field, value)
                .map_err(|e| Error::invalid_setting(field.clone(), e.context()))?;
        }
        Ok(())
    }

    /// The fields that may hold `${site}`, by name: the consumer's name,
    /// its queue and its binding keys.
    fn site_names(&self) -> Vec<(String, &String)> {
        let mut fields = vec![
            ("name".to_owned(), &self.name),
            ("queue".to_owned(), &self.queue),
        ];
        fields.extend(
            self.routing_keys
                .iter()
                .enumerate()
                .map(|(i, k)| (format!("routing_keys[{i}]"), k)),
        );
        fields
    }

    /// Fails when a name still holds `${site}`, naming the field: such
    /// settings are used without a site
    /// ([`Settings::for_site`](crate::config::Settings::for_site) substitutes
    /// it), and the broker would get queues literally named `...${site}`.
    pub fn check_substituted(&self) -> Result<()> {
        let fields = self.site_names();
        unsubstituted(fields.iter().map(|(f, v)| (f.as_str(), Some(v.as_str()))))
    }

    /// These settings with `${site}` replaced by `site` in every field
    /// [`check_substituted`](Self::check_substituted) looks at.
    #[cfg(feature = "config")]
    pub(crate) fn for_site(mut self, site: &str) -> Self {
        let sub = |s: &mut String| *s = s.replace("${site}", site);
        sub(&mut self.name);
        sub(&mut self.queue);
        self.routing_keys.iter_mut().for_each(sub);
        self
    }

    /// Declares the queue as `kind` (the `x-queue-type` argument):
    /// `QueueType::Quorum` for a queue that must survive the loss of a
    /// cluster node.
    pub fn queue_type(mut self, kind: QueueType) -> Self {
        kind.set(&mut self.arguments);
        self
    }

    /// Binds the queue to `exchange` of `kind` with `keys`.
    pub fn bind(mut self, exchange: impl Into<String>, kind: ExchangeKind, keys: &[&str]) -> Self {
        self.exchange = exchange.into();
        self.exchange_type = kind;
        self.routing_keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    /// What this consumer declares: its exchange (unless reserved), its
    /// queue and one binding per key. Without keys, the queue is bound by
    /// its own name (or `*` on fanout exchanges... which ignore keys).
    pub fn topology(&self) -> Topology {
        let mut t = Topology::default();
        if !self.auto_declare {
            return t;
        }
        let auto_delete = self.auto_delete.unwrap_or(!self.durable);
        if !is_reserved(&self.exchange) {
            t.exchange(Exchange {
                name: self.exchange.clone(),
                kind: self.exchange_type,
                durable: self.durable,
                auto_delete,
                arguments: Headers::new(),
            });
        }
        t.queue(Queue {
            name: self.queue.clone(),
            durable: self.durable && !self.exclusive,
            exclusive: self.exclusive,
            auto_delete,
            arguments: self.arguments.clone(),
        });
        if !self.exchange.is_empty() {
            if self.routing_keys.is_empty() {
                t.bind(&self.queue, &self.exchange, &self.queue);
            }
            for key in &self.routing_keys {
                t.bind(&self.queue, &self.exchange, key);
            }
        }
        t
    }
}

/// A running consumer. Deliveries arrive through [`Consumer::next`].
pub struct Consumer {
    rx: mpsc::Receiver<Delivery>,
    task: Option<Background<()>>,
    queue: String,
    attachment: Attachment,
    /// The connection it consumes on (its node goes into spans).
    conn: Connection,
}

/// Whether a consumer is attached to its queue now: set once the broker
/// accepted `basic.consume`, cleared when the channel or the consumer
/// ends, set again when it resumes. Cheap to clone and to read; readiness
/// probes hold one. The gauge `rabbitry_consumer_attached{consumer}`
/// follows it.
#[derive(Debug, Clone)]
pub struct Attachment(Arc<(AtomicBool, metrics::Gauge)>);

impl Attachment {
    fn new(consumer: &str) -> Attachment {
        let gauge =
            metrics::gauge!("rabbitry_consumer_attached", "consumer" => consumer.to_owned());
        Attachment(Arc::new((AtomicBool::new(false), gauge)))
    }

    /// Whether the consumer is attached.
    pub fn is_attached(&self) -> bool {
        self.0 .0.load(Ordering::Relaxed)
    }

    fn set(&self, attached: bool) {
        self.0 .0.store(attached, Ordering::Relaxed);
        self.0 .1.set(if attached { 1.0 } else { 0.0 });
    }
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("queue", &self.queue)
            .finish()
    }
}

impl Consumer {
    /// Declares, sets QoS and starts consuming. A refused declaration is
    /// returned here, not retried.
    ///
    /// ```no_run
    /// # async fn demo(conn: rabbitry::Connection) -> rabbitry::Result<()> {
    /// use rabbitry::{Consumer, ConsumerSettings, ExchangeKind, Outcome};
    ///
    /// let mut settings = ConsumerSettings::new("orders").bind("shop", ExchangeKind::Topic, &["order.*"]);
    /// settings.prefetch_count = Some(10);
    /// let mut orders = Consumer::start(&conn, settings).await?;
    /// while let Some(delivery) = orders.next().await {
    ///     let outcome = match delivery.decode::<serde_json::Value>() {
    ///         Ok(_) => Outcome::Ack,
    ///         Err(_) => Outcome::Reject, // dead-lettered if the queue says where
    ///     };
    ///     delivery.settle(outcome).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start(conn: &Connection, settings: ConsumerSettings) -> Result<Consumer> {
        let mut prefetch = settings
            .prefetch_count
            .unwrap_or(conn.settings().prefetch_count);
        if QueueType::of(&settings.arguments) == Some(QueueType::Quorum)
            && (prefetch == 0 || prefetch > QUORUM_MAX_PREFETCH)
        {
            prefetch = QUORUM_MAX_PREFETCH;
        }
        let capacity = if prefetch == 0 {
            256
        } else {
            prefetch as usize
        };
        let (tx, rx) = mpsc::channel(capacity);
        let (started_tx, started_rx) = oneshot::channel();
        let own = conn.clone();
        let conn = conn.clone();
        let attachment = Attachment::new(&settings.name);
        let attached = attachment.clone();
        let task = Background::spawn(move |stop| {
            run(
                conn,
                settings,
                prefetch,
                tx,
                stop,
                Some(started_tx),
                attached,
            )
        });
        match started_rx.await {
            Ok(Ok(queue)) => Ok(Consumer {
                rx,
                task: Some(task),
                queue,
                attachment,
                conn: own,
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(Error::new(ErrorKind::Closed, "consumer task ended")),
        }
    }

    /// The queue's name (the broker's choice when declared without one; it
    /// changes after recovery for such queues).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Whether it is attached to its queue now, as a handle to keep.
    pub fn attachment(&self) -> Attachment {
        self.attachment.clone()
    }

    /// The next delivery, or `None` once the consumer has stopped. The
    /// consumer is also a [`Stream`](futures_util::Stream) of deliveries.
    pub async fn next(&mut self) -> Option<Delivery> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        loop {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(d)) if d.is_settleable() => return Poll::Ready(Some(d)),
                // From a channel that is gone: the broker redelivers it.
                Poll::Ready(Some(_)) => continue,
                other => return other,
            }
        }
    }

    /// Runs `handler` on each delivery, one at a time, and settles each
    /// with the outcome it returns. The handler owns the delivery, so its
    /// async block can read it; if the handler settled it itself, the
    /// returned outcome is not sent again. Ends when the consumer stops.
    /// With the `otel` feature, each handler call runs in a `process
    /// {queue}` span, a child of the trace the message carries.
    ///
    /// ```no_run
    /// # async fn demo(mut consumer: rabbitry::Consumer) {
    /// use rabbitry::Outcome;
    /// consumer
    ///     .run(|delivery| async move {
    ///         match delivery.decode::<serde_json::Value>() {
    ///             Ok(order) => { println!("{order}"); Outcome::Ack }
    ///             Err(_) => Outcome::Reject,
    ///         }
    ///     })
    ///     .await;
    /// # }
    /// ```
    pub async fn run<F, Fut>(&mut self, mut handler: F)
    where
        F: FnMut(Delivery) -> Fut,
        Fut: std::future::Future<Output = Outcome>,
    {
        while let Some(d) = self.next().await {
            let acker = d.acker();
            let scope = crate::telemetry::process(d.received(), &self.conn);
            let outcome = scope.run(handler(d)).await;
            match acker.settle(outcome).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadySettled => {}
                Err(err) => tracing::warn!(
                    error = %err,
                    "settling a delivery failed; the broker will redeliver it"
                ),
            }
        }
    }

    /// Stops consuming: the broker stops sending, deliveries not yet taken
    /// with [`next`](Consumer::next) go back to the queue when the channel
    /// closes. Deliveries already taken can still be settled.
    pub async fn cancel(&mut self) {
        if let Some(task) = self.task.take() {
            task.stop().await;
        }
        self.rx.close();
    }
}

impl futures_util::Stream for Consumer {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        self.get_mut().poll_delivery(cx)
    }
}

type Started = oneshot::Sender<Result<String>>;

/// The consumer's life: (re)open, declare, consume, forward; repeat after
/// each loss until stopped.
async fn run(
    conn: Connection,
    settings: ConsumerSettings,
    prefetch: u16,
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    mut started: Option<Started>,
    attached: Attachment,
) {
    let topology = settings.topology();
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        if stop.is_cancelled() {
            return;
        }
        let session = tokio::select! {
            s = open_session(&conn, &settings, &topology, prefetch) => s,
            _ = stop.cancelled() => return,
        };
        let (channel, queue, mut incoming, tag, generation) = match session {
            Ok(s) => s,
            Err(err) => {
                if let Some(started) = started.take() {
                    let _ = started.send(Err(err));
                    return;
                }
                if err.kind() == ErrorKind::Closed {
                    return;
                }
                let delay = backoff.next_delay();
                tracing::warn!(queue = %settings.queue, error = %err, ?delay, "restarting consumer failed");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        backoff.reset();
        attached.set(true);
        if let Some(started) = started.take() {
            let _ = started.send(Ok(queue.clone()));
        } else {
            tracing::info!(queue = %queue, generation, "consumer resumed");
        }
        let stopped = loop {
            tokio::select! {
                m = incoming.recv() => match m {
                    Some(m) => {
                        if tx.send(to_delivery(m, &channel, &queue)).await.is_err() { break true; }
                    }
                    None => break false,
                },
                _ = stop.cancelled() => break true,
            }
        };
        attached.set(false);
        if stopped {
            // Bounded: stopping must not hang on a broker that does not answer.
            let cancel = channel.cancel(&tag);
            if tokio::time::timeout(CLOSE_TIMEOUT, cancel).await.is_err() {
                tracing::warn!(queue = %queue, "basic.cancel got no answer; closing anyway");
            }
            // Deliveries still in our buffer were never handed out; they
            // stay unacked and return to the queue when the channel closes,
            // which happens when the last delivery holding it is dropped.
            return;
        }
        if channel.is_open() {
            // The deliveries ended with the channel still open: the broker
            // sent basic.cancel. Consume again at once; the declarations
            // bring a deleted queue back.
            conn.count_cancelled_consumer();
            tracing::warn!(
                queue = %queue,
                "the broker cancelled the consumer (queue deleted, or its node down); \
                 declaring and consuming again"
            );
        }
        close_quietly(channel).await;
        // The channel ended: wait for a new socket, or (if the socket is
        // fine and only the channel went) retry after a pause.
        let mut links = conn.links();
        let changed = async move { links.wait_for(|l| l.generation != generation).await.is_ok() };
        let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
    }
}

type Session = (WireChannel, String, Deliveries, String, u64);

async fn open_session(
    conn: &Connection,
    settings: &ConsumerSettings,
    topology: &Topology,
    prefetch: u16,
) -> Result<Session> {
    let (channel, watch, generation) = conn.open_channel(None).await?;
    channel
        .qos(prefetch)
        .await
        .map_err(|e| watch.refusal(ErrorKind::Channel, "basic.qos".into(), e))?;
    let names = wire::declare(&channel, &watch, topology).await?;
    let queue = names
        .first()
        .cloned()
        .unwrap_or_else(|| settings.queue.clone());
    let tag = format!("{}.{}", settings.name, uuid::Uuid::new_v4().simple());
    crate::limits::check_short("consumer tag (the consumer's name and 33 bytes)", &tag)?;
    crate::limits::check_short("queue name", &queue)?;
    let (tag, incoming) = channel
        .consume(&queue, &tag, false)
        .await
        .map_err(|e| watch.refusal(ErrorKind::Channel, format!("consuming queue '{queue}'"), e))?;
    Ok((channel, queue, incoming, tag, generation))
}

fn to_delivery(m: Incoming, channel: &WireChannel, queue: &str) -> Delivery {
    Delivery::new(
        m.body,
        m.properties,
        m.exchange,
        m.routing_key,
        m.redelivered,
        queue.to_owned(),
        m.delivery_tag,
        channel.clone(),
    )
}

/// The one home of the `${site}` rule: the first field whose value still
/// holds the placeholder fails, named.
pub(crate) fn unsubstituted<'a>(
    fields: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<()> {
    for (field, value) in fields {
        if let Some(v) = value.filter(|v| v.contains("${site}")) {
            return Err(Error::invalid_setting(
                field,
                format!("`{v}` uses ${{site}} but no site is set: pass --site, set `site` in [worker], or call Settings::for_site"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_binds_each_key_and_respects_reserved_exchanges() {
        let s = ConsumerSettings::new("q").bind("ex", ExchangeKind::Topic, &["a.*", "b.#"]);
        let t = s.topology();
        assert_eq!(t.exchanges.len(), 1);
        assert_eq!(t.bindings.len(), 2);
        let s = ConsumerSettings::new("q").bind("amq.topic", ExchangeKind::Topic, &["x"]);
        let t = s.topology();
        assert!(t.exchanges.is_empty());
        assert_eq!(t.bindings.len(), 1);
        let t = ConsumerSettings::new("q").topology();
        assert!(t.bindings.is_empty() && t.queues.len() == 1);
    }
}
