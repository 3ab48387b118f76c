//! Connections that recover.
//!
//! A [`Connection`] is a handle to one named, supervised AMQP connection. A
//! background supervisor owns the socket: when it drops (broker restart,
//! `close_connection`, a network cut, missed heartbeats) the supervisor
//! reconnects with capped exponential backoff and jitter across the listed
//! URLs, declares every remembered [`Topology`] again, and then announces the
//! new link. Producers and consumers watch that announcement to open their
//! channels again, set QoS, restart consuming and resend what was not
//! confirmed. At most one live socket exists per `Connection`.

mod backoff;
pub(crate) use backoff::Backoff;

mod endpoint;
mod supervisor;
mod tls;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

pub use endpoint::{redact, AuthMechanism, Endpoint, UrlOptions};
pub use tls::TlsSettings;

pub(crate) use crate::channel::{ChannelWatch, ConfirmSink};
pub(crate) use crate::wire::close_quietly;

use crate::defaults;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::check_short;
use crate::setters::setters;
use crate::task::Background;
use crate::topology::{Queue, Topology};
use crate::wire::{self, WireChannel, WireConnection, WireError};

/// Settings for one named connection: [`ConnectionSettings::new`] (or
/// `default()`) and a setter per field. New fields can come in a minor
/// release: the struct is `#[non_exhaustive]`, so no user code builds it
/// with a literal.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::ConnectionSettings;
///
/// let settings = ConnectionSettings::new("amqp://guest:guest@localhost:5672/%2f")
///     .name("shop")
///     .heartbeat(30)
///     .recovery_timeout(Duration::from_secs(60));
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct ConnectionSettings {
    /// The connection's name. The broker shows it, with the process's name
    /// and id, as the client-provided name: `shop (worker, pid 4242)`.
    pub name: String,
    /// Broker URLs: the nodes of a cluster, tried in a new random order on
    /// each (re)connect, so that clients spread over the nodes (see
    /// `keep_url_order`).
    pub urls: Vec<String>,
    /// Try `urls` in the order given, first to last, instead.
    pub keep_url_order: bool,
    /// Where `urls` came from, for the log: a configuration file's name,
    /// `AMQP_URL`, `--url`; `code` unless set.
    pub urls_from: String,
    /// TLS settings for the `amqps://` URLs: CA file, client certificate,
    /// server name. The system's root certificates when left default.
    pub tls: TlsSettings,
    /// Heartbeat interval in seconds; 0 turns heartbeats off.
    pub heartbeat: u16,
    /// Default prefetch for consumers on this connection:
    /// [`defaults::PREFETCH`] unless set; 0 means unlimited, which lets a
    /// slow consumer hold a whole backlog in memory.
    pub prefetch_count: u16,
    /// First reconnect delay.
    pub backoff_initial: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// How long an operation waits for the connection to come back before
    /// failing with [`ErrorKind::Disconnected`].
    pub recovery_timeout: Duration,
    /// Publish on a connection of its own (`{name}.publish`, opened when
    /// the first producer starts, recovered the same way), as RabbitMQ
    /// advises: flow control on publishers then cannot stall the acks of
    /// consumers, and the two do not queue behind each other on one socket.
    /// `false` keeps one connection, for brokers that limit connections.
    pub separate_publishing: bool,
}

impl ConnectionSettings {
    /// Settings for `url` with the [`defaults`]: heartbeat
    /// 60 s, prefetch 250, backoff 1 s to 60 s, a 30 s recovery timeout.
    pub fn new(url: impl Into<String>) -> Self {
        ConnectionSettings {
            name: defaults::CONNECTION.to_owned(),
            urls: vec![url.into()],
            keep_url_order: false,
            urls_from: "code".to_owned(),
            tls: TlsSettings::default(),
            heartbeat: defaults::HEARTBEAT,
            prefetch_count: defaults::PREFETCH,
            backoff_initial: defaults::BACKOFF_INITIAL,
            backoff_max: defaults::BACKOFF_MAX,
            recovery_timeout: defaults::RECOVERY_TIMEOUT,
            separate_publishing: true,
        }
    }

    setters! {
        /// Sets the name.
        name: into String;
        /// Sets the broker URLs (the nodes of a cluster).
        urls: Vec<String>;
        /// Tries the URLs in the order given instead of a random one.
        keep_url_order: bool;
        /// Says where the URLs came from, for the log.
        urls_from: into String;
        /// Sets the TLS settings for `amqps://` URLs.
        tls: TlsSettings;
        /// Sets the heartbeat interval in seconds (0: off).
        heartbeat: u16;
        /// Sets the default prefetch of consumers on this connection.
        prefetch_count: u16;
        /// Sets the first reconnect delay.
        backoff_initial: Duration;
        /// Sets the largest reconnect delay.
        backoff_max: Duration;
        /// Sets how long operations wait for a lost connection to return.
        recovery_timeout: Duration;
        /// Publishes on a connection of its own (the default) or not.
        separate_publishing: bool;
    }

    /// Checks the rules of these settings, naming the field that breaks
    /// one ([`Error::setting`](crate::Error::setting)): at least one URL, each a valid AMQP URL,
    /// and a client certificate with its key or neither.
    /// [`Connection::open`] calls it.
    pub fn validate(&self) -> Result<()> {
        if self.urls.is_empty() {
            return Err(Error::invalid_setting(
                "urls",
                "is empty: give at least one broker URL",
            ));
        }
        for (i, u) in self.urls.iter().enumerate() {
            Endpoint::parse(u)
                .map_err(|e| Error::invalid_setting(format!("urls[{i}]"), e.context()))?;
        }
        self.tls.validate().map_err(|e| e.within("tls"))
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings::new(crate::defaults::URL)
    }
}

impl fmt::Debug for ConnectionSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionSettings")
            .field("name", &self.name)
            .field(
                "urls",
                &self.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
            )
            .field("keep_url_order", &self.keep_url_order)
            .field("urls_from", &self.urls_from)
            .field("tls", &self.tls)
            .field("heartbeat", &self.heartbeat)
            .field("prefetch_count", &self.prefetch_count)
            .field("backoff_initial", &self.backoff_initial)
            .field("backoff_max", &self.backoff_max)
            .field("recovery_timeout", &self.recovery_timeout)
            .field("separate_publishing", &self.separate_publishing)
            .finish()
    }
}

/// The current socket, if any, and how many times it has been (re)made.
#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) conn: Option<WireConnection>,
    /// The node the socket went to (kept after a loss: the last one).
    pub(crate) peer: Option<Peer>,
    closed: bool,
}

/// The host and port a connection's socket went to, for span attributes
/// (`server.address`, `server.port`). Cheap to clone.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "otel"), allow(dead_code))]
pub(crate) struct Peer {
    pub(crate) host: Arc<str>,
    pub(crate) port: u16,
}

impl Peer {
    pub(crate) fn of(ep: &Endpoint) -> Peer {
        Peer {
            host: ep.host.as_str().into(),
            port: ep.port,
        }
    }
}

struct Shared {
    settings: ConnectionSettings,
    endpoints: Vec<Endpoint>,
    link: watch::Sender<Link>,
    topology: Mutex<Topology>,
    supervisor: Mutex<Option<Background<()>>>,
    /// The connection producers publish on, once the first one starts.
    publishing: tokio::sync::OnceCell<Connection>,
    /// Declarations the broker refused during recoveries.
    refused_declarations: AtomicU64,
    /// Consumers the broker cancelled (their queue deleted, or its node
    /// gone) while the channel stayed open.
    cancelled_consumers: AtomicU64,
    /// The publishers on this connection, for readiness.
    publishers: Mutex<Vec<std::sync::Weak<dyn Stalled>>>,
    meters: crate::meters::ConnectionMeters,
}

/// A publisher's answer to "can you make progress?".
pub(crate) trait Stalled: Send + Sync {
    /// How long its oldest message has waited past its confirm timeout
    /// without being confirmed or sent; `None` while it makes progress.
    fn stalled_for(&self) -> Option<Duration>;
}

/// A supervised, recovering connection. Cheap to clone; clones share the
/// one socket.
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("name", &self.shared.settings.name)
            .field("generation", &self.generation())
            .finish()
    }
}

impl Connection {
    /// Connects, trying each URL once, and starts supervising the
    /// connection. The first connection failing is an error (naming the
    /// host and saying "connection refused" or "access refused"); after
    /// that, losses are recovered in the background.
    ///
    /// ```no_run
    /// # async fn demo() -> rabbitry::Result<()> {
    /// use std::time::Duration;
    /// use rabbitry::{Connection, ConnectionSettings};
    ///
    /// let mut settings = ConnectionSettings::new("amqp://guest:guest@rabbit-1:5672/%2f").name("shop");
    /// settings.urls.push("amqp://guest:guest@rabbit-2:5672/%2f".into()); // tried in turn
    /// settings.recovery_timeout = Duration::from_secs(30); // how long a publish waits for recovery
    /// let conn = Connection::open(settings).await?;
    /// # conn.close().await; Ok(()) }
    /// ```
    pub async fn open(settings: ConnectionSettings) -> Result<Connection> {
        settings
            .validate()
            .map_err(|e| e.config_of(format_args!("connection '{}'", settings.name)))?;
        let endpoints = settings
            .urls
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<Result<Vec<_>>>()?;
        tracing::info!(
            connection = %settings.name,
            nodes = ?endpoints.iter().map(Endpoint::address).collect::<Vec<_>>(),
            from = %settings.urls_from,
            order = if settings.keep_url_order { "as given" } else { "shuffled on each connect" },
            "connecting"
        );
        let (conn, peer) = supervisor::connect_any(&settings, &endpoints).await?;
        let settings_name = settings.name.clone();
        let (link, _) = watch::channel(Link {
            generation: 1,
            conn: Some(conn),
            peer: Some(peer),
            closed: false,
        });
        let shared = Arc::new(Shared {
            settings,
            endpoints,
            link,
            topology: Mutex::new(Topology::default()),
            supervisor: Mutex::new(None),
            publishing: tokio::sync::OnceCell::new(),
            refused_declarations: AtomicU64::new(0),
            cancelled_consumers: AtomicU64::new(0),
            publishers: Mutex::new(Vec::new()),
            meters: crate::meters::ConnectionMeters::new(&settings_name),
        });
        shared.meters.up.set(1.0);
        let weak = Arc::downgrade(&shared);
        let task = Background::spawn(move |stop| supervisor::run(weak, stop));
        *lock(&shared.supervisor) = Some(task);
        tracing::info!(connection = %shared.settings.name, "connected");
        Ok(Connection { shared })
    }

    /// Whether `other` is a clone of this connection (the same socket).
    pub(crate) fn same_as(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// The connection's name.
    pub fn name(&self) -> &str {
        &self.shared.settings.name
    }

    /// The settings it was opened with.
    pub fn settings(&self) -> &ConnectionSettings {
        &self.shared.settings
    }

    /// How many sockets have been made so far: 1 after `open`, one more
    /// after each recovery.
    pub fn generation(&self) -> u64 {
        self.shared.link.borrow().generation
    }

    /// Whether a socket is up right now.
    pub fn is_connected(&self) -> bool {
        self.shared
            .link
            .borrow()
            .conn
            .as_ref()
            .is_some_and(|c| c.is_open())
    }

    /// Waits until the connection is up with a generation above `after`,
    /// for at most `timeout`.
    pub async fn wait_connected(&self, after: u64, timeout: Duration) -> Result<u64> {
        let link = self.live_link(after, timeout).await?;
        Ok(link.generation)
    }

    /// Declares `topology` now, and again after every recovery. Returns the
    /// queue names (the broker's choice for queues declared without one).
    pub async fn declare(&self, topology: &Topology) -> Result<Vec<String>> {
        let names = self.declare_once(topology).await?;
        lock(&self.shared.topology).merge(topology);
        Ok(names)
    }

    /// How many declarations the broker refused while this connection
    /// recovered (a queue whose home node is down, a conflicting
    /// declaration). Each was logged and is retried on its own; everything
    /// else on the connection resumed.
    pub fn refused_declarations(&self) -> u64 {
        self.shared.refused_declarations.load(Ordering::Relaxed)
    }

    /// The broker's product and version (`RabbitMQ 3.10.8`), as the node
    /// it is connected to announced them; `None` while disconnected.
    pub fn server(&self) -> Option<String> {
        let link = self.shared.link.borrow();
        let (product, version) = link.conn.as_ref()?.server();
        Some(format!("{product} {version}"))
    }

    /// The node this connection's socket went to last.
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) fn peer(&self) -> Option<Peer> {
        self.shared.link.borrow().peer.clone()
    }

    /// How many times the broker cancelled a consumer on this connection:
    /// its queue was deleted, or the node holding it went down. Each was
    /// logged; the consumer declared its queue again and resumed.
    pub fn cancelled_consumers(&self) -> u64 {
        self.shared.cancelled_consumers.load(Ordering::Relaxed)
    }

    pub(crate) fn count_cancelled_consumer(&self) {
        self.shared
            .cancelled_consumers
            .fetch_add(1, Ordering::Relaxed);
        self.shared.meters.consumers_cancelled.increment(1);
    }

    /// Declares `topology` once without remembering it.
    pub async fn declare_once(&self, topology: &Topology) -> Result<Vec<String>> {
        let (channel, watch, _) = self.open_channel(None).await?;
        let names = wire::declare(&channel, &watch, topology).await;
        close_quietly(channel).await;
        names
    }

    /// Compares `topology` with the broker without changing anything.
    /// Returns one [`Drift`] per difference: a missing exchange or queue,
    /// or one whose type, durability or arguments differ (as the broker
    /// words it). Bindings cannot be read over AMQP and are not compared.
    pub async fn check(&self, topology: &Topology) -> Result<Vec<Drift>> {
        let mut drifts = Vec::new();
        for e in &topology.exchanges {
            let what = format!("exchange '{}'", e.name);
            if let Some(d) = self
                .probe(
                    &what,
                    |ch| async move { ch.declare_exchange(e, true).await },
                )
                .await?
            {
                drifts.push(d);
                continue;
            }
            if let Some(d) = self
                .probe(
                    &what,
                    |ch| async move { ch.declare_exchange(e, false).await },
                )
                .await?
            {
                drifts.push(d);
            }
        }
        for q in topology.queues.iter().filter(|q| !q.name.is_empty()) {
            let what = format!("queue '{}'", q.name);
            let passive = self
                .probe(&what, |ch| async move {
                    ch.declare_queue(q, true).await.map(drop)
                })
                .await?;
            if let Some(d) = passive {
                drifts.push(d);
                continue;
            }
            // The queue exists: declaring it again with our arguments is a
            // no-op when they match and a PRECONDITION_FAILED when not.
            if let Some(d) = self
                .probe(&what, |ch| async move {
                    ch.declare_queue(q, false).await.map(drop)
                })
                .await?
            {
                drifts.push(d);
            }
        }
        Ok(drifts)
    }

    /// Runs one operation on a fresh channel; a broker refusal becomes a
    /// [`Drift`], a lost connection an error.
    async fn probe<'a, F, Fut>(&self, what: &str, op: F) -> Result<Option<Drift>>
    where
        F: FnOnce(WireChannel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), WireError>> + 'a,
    {
        let (channel, watch, _) = self.open_channel(None).await?;
        match op(channel.clone()).await {
            Ok(()) => {
                close_quietly(channel).await;
                Ok(None)
            }
            Err(err) => match watch.reason() {
                Some(r) => Ok(Some(Drift {
                    object: what.to_owned(),
                    problem: if r.code == 404 {
                        "missing".to_owned()
                    } else {
                        r.text
                    },
                })),
                None => Err(watch.refusal(ErrorKind::Channel, what.to_owned(), err)),
            },
        }
    }

    /// The number of ready messages and consumers of `queue`, or `None`
    /// when it does not exist. Never creates the queue.
    pub async fn queue_status(&self, queue: &str) -> Result<Option<QueueStatus>> {
        check_short("queue name", queue)?;
        let (channel, watch, _) = self.open_channel(None).await?;
        let res = channel.declare_queue(&Queue::durable(queue), true).await;
        match res {
            Ok((_, messages, consumers)) => {
                close_quietly(channel).await;
                Ok(Some(QueueStatus {
                    messages,
                    consumers,
                }))
            }
            Err(err) => match watch.reason() {
                Some(r) if r.code == 404 => Ok(None),
                _ => Err(watch.refusal(ErrorKind::Channel, format!("queue '{queue}'"), err)),
            },
        }
    }

    /// Removes every ready message from `queue`; returns how many.
    pub async fn purge(&self, queue: &str) -> Result<u32> {
        check_short("queue name", queue)?;
        self.on_fresh_channel(format!("purge of queue '{queue}'"), |ch| async move {
            ch.purge_queue(queue).await
        })
        .await
    }

    /// Deletes `queue` (nothing happens if it does not exist).
    pub async fn delete_queue(&self, queue: &str) -> Result<()> {
        check_short("queue name", queue)?;
        self.on_fresh_channel(format!("delete of queue '{queue}'"), |ch| async move {
            ch.delete_queue(queue).await
        })
        .await
        .map(drop)
    }

    /// Deletes `exchange` (nothing happens if it does not exist).
    pub async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        check_short("exchange name", exchange)?;
        self.on_fresh_channel(
            format!("delete of exchange '{exchange}'"),
            |ch| async move { ch.delete_exchange(exchange).await },
        )
        .await
    }

    /// Runs one operation on a channel of its own, closed afterwards; a
    /// broker refusal becomes an error naming `what` and the broker's reason.
    async fn on_fresh_channel<T, F, Fut>(&self, what: String, op: F) -> Result<T>
    where
        F: FnOnce(WireChannel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, WireError>>,
    {
        let (channel, watch, _) = self.open_channel(None).await?;
        let out = op(channel.clone())
            .await
            .map_err(|e| watch.refusal(ErrorKind::Channel, what, e))?;
        close_quietly(channel).await;
        Ok(out)
    }

    /// The connection producers publish on: a second connection,
    /// `{name}.publish`, opened on first use, or this one when
    /// [`ConnectionSettings::separate_publishing`] is off.
    pub(crate) async fn publishing(&self) -> Result<Connection> {
        if !self.shared.settings.separate_publishing {
            return Ok(self.clone());
        }
        self.shared
            .publishing
            .get_or_try_init(|| async {
                let mut settings = self.shared.settings.clone();
                settings.name = format!("{}.publish", settings.name);
                settings.separate_publishing = false;
                Connection::open(settings).await
            })
            .await
            .cloned()
    }

    /// Closes the connection (and its publishing connection) and stops
    /// recovering it.
    pub async fn close(&self) {
        if let Some(publishing) = self.shared.publishing.get() {
            Box::pin(publishing.close()).await;
        }
        let task = lock(&self.shared.supervisor).take();
        if let Some(task) = task {
            task.stop().await;
        }
    }

    /// Watches a publisher's progress, for [`Connection::publisher_stalled`].
    pub(crate) fn watch_publisher(&self, publisher: std::sync::Weak<dyn Stalled>) {
        let mut list = lock(&self.shared.publishers);
        list.retain(|p| p.strong_count() > 0);
        list.push(publisher);
    }

    /// How long a publisher on this connection (or its publishing
    /// connection) has been unable to get its oldest message confirmed,
    /// once that is longer than its confirm timeout: the broker refuses
    /// or never answers. `None` while every publisher makes progress.
    pub fn publisher_stalled(&self) -> Option<Duration> {
        let own = lock(&self.shared.publishers)
            .iter()
            .filter_map(|p| p.upgrade()?.stalled_for())
            .max();
        let publishing = self
            .shared
            .publishing
            .get()
            .filter(|p| !p.same_as(self))
            .and_then(Connection::publisher_stalled);
        own.into_iter().chain(publishing).max()
    }

    /// Subscribes to link changes.
    pub(crate) fn links(&self) -> watch::Receiver<Link> {
        self.shared.link.subscribe()
    }

    /// Waits for a live socket whose generation is above `after`.
    pub(crate) async fn live_link(&self, after: u64, timeout: Duration) -> Result<Link> {
        let mut rx = self.links();
        let wait = async move {
            rx.wait_for(|l| l.closed || (l.generation > after && l.conn.is_some()))
                .await
                .map(|l| l.clone())
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(link)) if link.closed => Err(self.closed_error()),
            Ok(Ok(link)) => Ok(link),
            Ok(Err(_)) => Err(self.closed_error()),
            Err(_) => Err(Error::new(
                ErrorKind::Disconnected,
                format!(
                    "connection '{}' did not recover within {:?}",
                    self.name(),
                    timeout
                ),
            )),
        }
    }

    fn closed_error(&self) -> Error {
        Error::new(
            ErrorKind::Closed,
            format!("connection '{}' is closed", self.name()),
        )
    }

    /// Opens a channel on the current socket (waiting up to the recovery
    /// timeout for one), with rabbitry's callback registered.
    pub(crate) async fn open_channel(
        &self,
        confirms: Option<Arc<dyn ConfirmSink>>,
    ) -> Result<(WireChannel, ChannelWatch, u64)> {
        let link = self
            .live_link(0, self.shared.settings.recovery_timeout)
            .await?;
        let conn = link.conn.as_ref().ok_or_else(|| self.closed_error())?;
        let (channel, watch) = conn.open_channel(confirms).await.map_err(|e| {
            Error::new(
                ErrorKind::Disconnected,
                format!("opening a channel on connection '{}'", self.name()),
            )
            .with_source(e)
        })?;
        Ok((channel, watch, link.generation))
    }
}

/// A difference between the declared topology and the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drift {
    /// What differs, e.g. `queue 'orders'`.
    pub object: String,
    /// How: `missing`, or the broker's words for the differing argument.
    pub problem: String,
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.object, self.problem)
    }
}

/// What `queue.declare` (passive) reports about a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatus {
    /// Messages ready for delivery.
    pub messages: u32,
    /// Consumers attached.
    pub consumers: u32,
}

/// Locks a std mutex, ignoring poisoning: the data behind our mutexes stays
/// consistent because no code panics while holding them.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
