//! The worker: the consuming server that dispatches each delivery to a
//! handler, the way collective.zamqp hands a message to the site as a
//! request.
//!
//! A worker is built in code, in the manner of axum's `Router`: one
//! [`Worker::consumer`] (or [`service`](Worker::service), or
//! [`forward`](Worker::forward)) per queue, each followed by the options
//! that concern it on the [`ConsumerBuilder`] it returns
//! ([`retry`](ConsumerBuilder::retry),
//! [`concurrency`](ConsumerBuilder::concurrency),
//! [`timeout`](ConsumerBuilder::timeout)...).
//! A configuration file is parsed into the same types
//! ([`Settings::forwarding_worker`](crate::Settings::forwarding_worker)).
//!
//! A handler is a native async function with extractors ([`Handler`]),
//! any tower `Service` such as an axum `Router`, or the URL of an HTTP
//! application in any language ([`http`]). Whatever it is, its result
//! decides the outcome: success acks (after its unit of work has
//! published, and after the reply), a conflict requeues, bad input
//! dead-letters at once, anything else is retried through delay queues and
//! then dead-lettered ([`retry`]). With a concurrency of 1 (the default)
//! messages are handled one at a time, in order. Shutdown stops consuming,
//! lets the handlers in flight finish within a deadline, acks them and
//! closes; what was not started stays on the queue.
//!
//! ```no_run
//! use std::time::Duration;
//! use rabbitry::worker::{HandlerError, Msg, Retry, State, Worker};
//! use rabbitry::{Connection, ConnectionSettings, ConsumerSettings, ExchangeKind};
//!
//! #[derive(serde::Deserialize)]
//! struct Order { id: u64 }
//!
//! async fn save(Msg(order): Msg<Order>, State(db): State<String>) -> Result<(), HandlerError> {
//!     println!("order {} into {db}", order.id);
//!     Ok(())
//! }
//!
//! # async fn demo() -> rabbitry::Result<()> {
//! let conn = Connection::open(ConnectionSettings::default()).await?;
//! let running = Worker::new(&conn, "orders.db".to_owned())
//!     .consumer(
//!         ConsumerSettings::new("orders").bind("shop", ExchangeKind::Topic, &["order.*"]),
//!         save,
//!     )
//!     .retry(Retry::attempts(3).delays([Duration::from_secs(1), Duration::from_secs(10)]))
//!     .concurrency(1)
//!     .start()
//!     .await?;
//! running.shutdown().await;
//! # Ok(()) }
//! ```

mod dispatch;

pub mod dead;
mod handler;
#[cfg(feature = "http")]
pub mod http;
mod metrics;
mod partition;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use handler::{
    Body, BoxError, BoxFuture, Context, FailureKind, FromContext, Handler, HandlerError, IntoReply,
    Json, Meta, Msg, Msgpack, Reply, ResultExt, State,
};
pub use retry::Retry;

use crate::connection::Connection;
use crate::consume::{Consumer, ConsumerSettings, Delivery};
use crate::error::{Error, Result};
use crate::publish::{Producer, ProducerSettings};
use crate::setters::setters;
use crate::task::{Background, CancellationToken};
use crate::topology::{QueueType, Topology};
use dispatch::ConsumerRuntime;
use handler::BoxHandler;
#[cfg(feature = "http")]
use http::BoxService;
#[cfg(feature = "admin")]
pub(crate) use metrics::FAILURES_KEPT;
pub use metrics::{Counted, Failure, WorkerMetrics};
pub use partition::{PartitionKey, Partitions};

/// Called with a failed delivery and its error; the delivery is then acked.
pub type ErrorHandler = Arc<dyn Fn(Arc<Delivery>, HandlerError) -> BoxFuture<()> + Send + Sync>;

/// How a worker handles one consumer's deliveries: `default()` and a
/// setter per field (or [`ConsumerBuilder`]'s methods). The struct is
/// `#[non_exhaustive]`, so a new option is not a breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// How failures are retried.
    pub retry: Retry,
    /// Handlers running at once (1: one at a time, in order).
    pub concurrency: usize,
    /// How long one handler may run; past it, the handler is torn down and
    /// the delivery retried.
    pub timeout: Duration,
    /// The exchange replies go through (empty: the default exchange).
    /// Replies to direct reply-to always use the default exchange.
    pub reply_exchange: String,
    /// On a quorum queue: after this many deliveries that were never
    /// settled (the process died handling them), the broker dead-letters
    /// the message to `<queue>.dead` instead of delivering it again.
    pub delivery_limit: Option<u32>,
    /// Split into partition queues for per-key ordering (see
    /// [`Partitions`]).
    pub partitions: Option<Partitions>,
    /// The largest response body an HTTP handler (a tower service or an
    /// HTTP URL) may give, in bytes. Past it, the request fails without
    /// reading the rest, and the message is dead-lettered with the reason.
    pub max_response: usize,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            retry: Retry::default(),
            concurrency: crate::defaults::CONCURRENCY,
            timeout: crate::defaults::HANDLER_TIMEOUT,
            reply_exchange: String::new(),
            delivery_limit: None,
            partitions: None,
            max_response: crate::defaults::MAX_RESPONSE,
        }
    }
}

impl ConsumerOptions {
    setters! {
        /// Sets how failures are retried.
        retry: Retry;
        /// Sets how many handlers run at once (1: one at a time, in order).
        concurrency: usize;
        /// Sets how long one handler may run.
        timeout: Duration;
        /// Sets the exchange replies go through.
        reply_exchange: into String;
        /// Sets the delivery limit (quorum queues only).
        delivery_limit: some u32;
        /// Splits the consumer into partition queues.
        partitions: some Partitions;
        /// Sets the largest response body an HTTP handler may give.
        max_response: usize;
    }

    /// Checks these options for a consumer of `settings`, naming the field
    /// that breaks a rule ([`Error::setting`](crate::Error::setting)): a concurrency of at least
    /// 1, a valid retry policy, a delivery limit only on a quorum queue,
    /// partitions with an exchange and one message at a time, and no
    /// stream queue (a worker settles messages one by one; a stream is
    /// read from an offset). The one home of these rules: the worker calls
    /// it at [`start`](Worker::start), and the configuration at parsing.
    pub fn validate(&self, settings: &ConsumerSettings) -> Result<()> {
        if self.concurrency == 0 {
            return Err(Error::invalid_setting("concurrency", "must be at least 1"));
        }
        self.retry.validate().map_err(|e| e.within("retry"))?;
        let kind = QueueType::of(&settings.arguments);
        if kind == Some(QueueType::Stream) {
            return Err(Error::invalid_setting(
                "queue_type",
                "a worker cannot consume a stream queue (its messages are read from an offset, not settled one by one); use a Consumer",
            ));
        }
        if let Some(limit) = self.delivery_limit {
            retry::check_delivery_limit(kind, limit)?;
        }
        if let Some(p) = &self.partitions {
            p.check(settings, self.concurrency)?;
        }
        Ok(())
    }
}

/// What handles a consumer's deliveries.
pub(crate) enum Route<S> {
    Native(BoxHandler<S>),
    #[cfg(feature = "http")]
    Http {
        service: BoxService,
        base: String,
    },
}

impl<S> Clone for Route<S> {
    fn clone(&self) -> Self {
        match self {
            Route::Native(h) => Route::Native(h.clone()),
            #[cfg(feature = "http")]
            Route::Http { service, base } => Route::Http {
                service: service.clone(),
                base: base.clone(),
            },
        }
    }
}

/// A handler as registered, before the worker starts.
enum Target<S> {
    Native(BoxHandler<S>),
    #[cfg(feature = "http")]
    Service(BoxService),
    #[cfg(feature = "http")]
    Url(String),
}

impl<S> Clone for Target<S> {
    fn clone(&self) -> Self {
        match self {
            Target::Native(h) => Target::Native(h.clone()),
            #[cfg(feature = "http")]
            Target::Service(s) => Target::Service(s.clone()),
            #[cfg(feature = "http")]
            Target::Url(u) => Target::Url(u.clone()),
        }
    }
}

struct ConsumerSpec<S> {
    settings: ConsumerSettings,
    target: Target<S>,
    options: ConsumerOptions,
    conn: Connection,
}

impl<S> ConsumerSpec<S> {
    /// The consumer's settings as declared: with the queue arguments its
    /// delivery limit adds.
    fn declared(&self) -> ConsumerSettings {
        let mut settings = self.settings.clone();
        if let Some(limit) = self.options.delivery_limit {
            retry::limit_deliveries(&mut settings.arguments, &settings.queue, limit);
        }
        settings
    }

    /// The consumer, or its partitions: one spec per partition queue, once
    /// the hashing exchange and the partition queues are declared (and
    /// remembered for recovery).
    async fn partitioned(self) -> Result<Vec<ConsumerSpec<S>>> {
        let Some(specs) = self.partitions() else {
            return Ok(vec![self]);
        };
        self.conn.declare(&self.topology()).await?;
        Ok(specs)
    }

    /// One spec per partition, when the consumer is split.
    fn partitions(&self) -> Option<Vec<ConsumerSpec<S>>> {
        let p = self.options.partitions.as_ref()?;
        Some(
            (0..p.count)
                .map(|i| ConsumerSpec {
                    settings: p.partition_settings(&self.settings, i),
                    target: self.target.clone(),
                    options: ConsumerOptions {
                        partitions: None,
                        ..self.options.clone()
                    },
                    conn: self.conn.clone(),
                })
                .collect(),
        )
    }

    /// Everything the consumer declares: its queue (or its partitions,
    /// their exchange and bindings), and their retry queues.
    fn topology(&self) -> Topology {
        let mut t = Topology::default();
        match (self.partitions(), &self.options.partitions) {
            (Some(specs), Some(p)) => {
                for spec in &specs {
                    t.merge(&spec.topology());
                }
                t.merge(&p.routing(&self.settings));
            }
            _ => {
                t.merge(&self.declared().topology());
                t.merge(&self.retry_topology());
            }
        }
        t
    }

    /// Its dead-letter and delay queues, of its queue's type.
    fn retry_topology(&self) -> Topology {
        retry::topology(
            &self.settings.queue,
            QueueType::of(&self.settings.arguments),
            &self.options.retry,
        )
    }
}

/// A worker being built: consumers with their handlers and options, and
/// what the worker as a whole does. [`start`](Worker::start) or
/// [`run`](Worker::run) it.
pub struct Worker<S = ()> {
    conn: Connection,
    state: S,
    consumers: Vec<ConsumerSpec<S>>,
    site: Option<String>,
    user: Option<String>,
    #[cfg(feature = "http")]
    prefix: String,
    shutdown_timeout: Duration,
    error_handlers: HashMap<String, ErrorHandler>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    outbox: Option<crate::outbox::Outbox>,
    relay_conn: Option<Connection>,
    owned: Vec<Connection>,
}

impl<S> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("connection", &self.conn.name())
            .field(
                "consumers",
                &self
                    .consumers
                    .iter()
                    .map(|c| c.settings.name.as_str())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<S: Clone + Send + Sync + 'static> Worker<S> {
    /// A worker on `conn` (its consumers consume there, and their replies,
    /// retries and dead letters are published there, unless
    /// [`ConsumerBuilder::connection`] says otherwise), with `state`
    /// shared by native handlers through [`State`].
    pub fn new(conn: &Connection, state: S) -> Self {
        Worker {
            conn: conn.clone(),
            state,
            consumers: Vec::new(),
            site: None,
            user: None,
            #[cfg(feature = "http")]
            prefix: String::new(),
            shutdown_timeout: crate::defaults::SHUTDOWN_TIMEOUT,
            error_handlers: HashMap::new(),
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox: None,
            relay_conn: None,
            owned: Vec::new(),
        }
    }

    fn add(self, settings: ConsumerSettings, target: Target<S>) -> ConsumerBuilder<S> {
        let spec = ConsumerSpec {
            settings,
            target,
            options: ConsumerOptions::default(),
            conn: self.conn.clone(),
        };
        ConsumerBuilder { worker: self, spec }
    }

    /// Consumes what `settings` describe and handles each delivery with a
    /// native `handler`: an async function whose arguments are extractors.
    /// The consumer's options follow ([`ConsumerBuilder`]).
    pub fn consumer<H, T>(self, settings: ConsumerSettings, handler: H) -> ConsumerBuilder<S>
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.add(settings, Target::Native(handler::boxed(handler)))
    }

    #[cfg(feature = "http")]
    /// Consumes what `settings` describe and hands each delivery to a tower
    /// service (an axum `Router`) as
    /// `POST {prefix}/{connection}/{exchange}/{routing_key}[/{correlation_id}]`.
    pub fn service<Svc, RB>(self, settings: ConsumerSettings, service: Svc) -> ConsumerBuilder<S>
    where
        Svc: http::RequestService<RB>,
        RB: http::ResponseBody,
    {
        self.add(settings, Target::Service(http::boxed_service(service)))
    }

    #[cfg(feature = "http")]
    /// Consumes what `settings` describe and forwards each delivery to the
    /// HTTP application at `url` (`http://host:port/path`), in any
    /// language. A URL that is not one is an error at
    /// [`start`](Worker::start).
    pub fn forward(self, settings: ConsumerSettings, url: impl Into<String>) -> ConsumerBuilder<S> {
        self.add(settings, Target::Url(url.into()))
    }

    /// The site handlers see in [`Meta::site`] (and HTTP applications in
    /// `amqp-site`).
    pub fn site(mut self, site: impl Into<String>) -> Self {
        self.site = Some(site.into());
        self
    }

    /// The user handlers see in [`Meta::user`] (and HTTP applications in
    /// `amqp-user`).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    #[cfg(feature = "http")]
    /// The path prefix of requests to tower services.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long shutdown waits for the handlers in flight.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Sets the error handler for messages published to `exchange`: it gets
    /// each failed message and its error instead of a retry or dead letter;
    /// the message is then acked and the error logged.
    pub fn on_error<F, Fut>(mut self, exchange: &str, f: F) -> Self
    where
        F: Fn(Arc<Delivery>, HandlerError) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.error_handlers.insert(
            exchange.to_owned(),
            Arc::new(move |d, e| Box::pin(f(d, e)) as BoxFuture<()>),
        );
        self
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    /// Relays `outbox` on the worker's connection while the worker runs,
    /// and stops the relay at shutdown.
    pub fn with_outbox(mut self, outbox: crate::outbox::Outbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    /// The connection the outbox relay publishes on, when not the worker's.
    pub fn relay_on(mut self, conn: &Connection) -> Self {
        self.relay_conn = Some(conn.clone());
        self
    }

    #[cfg(all(feature = "config", feature = "http"))]
    /// Connections the worker closes at shutdown (the configuration layer
    /// opens them for the worker it builds).
    pub(crate) fn owning(mut self, conns: Vec<Connection>) -> Self {
        self.owned = conns;
        self
    }

    /// Everything the worker declares when it starts: each consumer's
    /// exchange, queue and bindings, and its retry and dead-letter queues.
    pub fn topology(&self) -> Topology {
        let mut t = Topology::default();
        for c in &self.consumers {
            t.merge(&c.topology());
        }
        t
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let running = self.start().await?;
        shutdown.await;
        running.shutdown().await;
        Ok(())
    }

    /// Checks every consumer and option, declares, and starts every
    /// consumer. Returns once all of them are consuming.
    pub async fn start(self) -> Result<RunningWorker> {
        self.check()?;
        let Worker {
            conn,
            state,
            consumers,
            site,
            user,
            #[cfg(feature = "http")]
            prefix,
            shutdown_timeout,
            error_handlers,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox,
            relay_conn,
            owned,
        } = self;
        let error_handlers = Arc::new(error_handlers);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut metrics = WorkerMetrics::default();
        let mut started = Vec::new();
        // One reply producer per connection, shared by its consumers.
        let mut replies: Vec<(Connection, Producer)> = Vec::new();
        let mut expanded = Vec::with_capacity(consumers.len());
        for spec in consumers {
            expanded.extend(spec.partitioned().await?);
        }
        for spec in expanded {
            let declared = spec.declared();
            let spec_retry_topology = spec.retry_topology();
            let ConsumerSpec {
                settings,
                target,
                options,
                conn: consumer_conn,
            } = spec;
            let route = match target {
                Target::Native(h) => Route::Native(h),
                #[cfg(feature = "http")]
                Target::Service(service) => Route::Http {
                    service,
                    base: prefix.clone(),
                },
                #[cfg(feature = "http")]
                Target::Url(url) => Route::Http {
                    service: http::url_client(),
                    base: url,
                },
            };
            let producer = match replies.iter().find(|(c, _)| c.same_as(&consumer_conn)) {
                Some((_, p)) => p.clone(),
                None => {
                    let ps = ProducerSettings::default()
                        .name(format!("{}.replies", consumer_conn.name()))
                        .auto_declare(false)
                        .message_ids(false);
                    let p = Producer::new(&consumer_conn, ps).await?;
                    replies.push((consumer_conn.clone(), p.clone()));
                    p
                }
            };
            consumer_conn.declare(&spec_retry_topology).await?;
            let mut cs = declared;
            cs.prefetch_count = Some(
                cs.prefetch_count
                    .unwrap_or(options.concurrency.min(usize::from(u16::MAX)) as u16),
            );
            let consumer = Consumer::start(&consumer_conn, cs).await?;
            started.push(WorkerConsumer {
                name: settings.name.clone(),
                queue: consumer.queue().to_owned(),
                connection: consumer_conn.clone(),
                attachment: Some(consumer.attachment()),
            });
            tracing::info!(
                consumer = %settings.name,
                queue = %consumer.queue(),
                concurrency = options.concurrency,
                "consuming"
            );
            let concurrency = options.concurrency;
            let runtime = Arc::new(ConsumerRuntime {
                name: settings.name.clone(),
                queue: settings.queue.clone(),
                metrics: metrics.consumer(&settings.name),
                connection: consumer_conn.name().to_owned(),
                conn: consumer_conn.clone(),
                options,
                route,
                replies: producer,
                site: site.clone(),
                user: user.clone(),
                error_handlers: error_handlers.clone(),
            });
            let state = state.clone();
            tasks.push(Background::spawn_with(stop.child_token(), move |stop| {
                dispatch::consume_loop(runtime, state, consumer, concurrency, stop)
            }));
        }
        #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
        let _ = (&conn, relay_conn);
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        let relay = match &outbox {
            Some(outbox) => Some(
                outbox
                    .spawn_relay(
                        relay_conn.as_ref().unwrap_or(&conn),
                        crate::outbox::RelayOptions::default(),
                    )
                    .await?,
            ),
            None => None,
        };
        Ok(RunningWorker {
            stop,
            tasks,
            metrics: Arc::new(metrics),
            consumers: started,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            relay,
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            outbox,
            connections: owned,
            shutdown_timeout,
        })
    }

    /// Every check that can be made before anything is declared: each
    /// consumer's settings and options by their own `validate`, its
    /// handler's URL, its names and `${site}`, and one name per consumer.
    fn check(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for c in &self.consumers {
            let name = &c.settings.name;
            let err = |e: Error| e.config_of(format_args!("consumer '{name}'"));
            if !names.insert(name.as_str()) {
                return Err(err(Error::invalid_setting(
                    "name",
                    "two consumers have this name; give each its own (ConsumerSettings::name)",
                )));
            }
            c.settings.validate().map_err(err)?;
            c.settings.check_substituted().map_err(err)?;
            c.options.validate(&c.settings).map_err(err)?;
            // Every name it declares (its retry and dead-letter queues
            // included) and its consumer tag fit in a short string.
            crate::topology::check_names(&c.topology())
                .and_then(|()| {
                    crate::limits::check_short(
                        "consumer tag (the consumer's name and 33 bytes)",
                        &format!("{name}.{}", "0".repeat(32)),
                    )
                })
                .map_err(err)?;
            #[cfg(feature = "http")]
            if let Target::Url(url) = &c.target {
                http::check_url(url).map_err(err)?;
            }
        }
        Ok(())
    }
}

/// A consumer being added to a [`Worker`]: its options, then the next
/// consumer, the worker's own settings, or [`start`](Self::start).
///
/// [`Worker::consumer`], [`service`](Worker::service) and
/// [`forward`](Worker::forward) return it, so an option always has its
/// consumer: there is no "consumer added last" to get wrong.
#[must_use = "the consumer is added when the chain goes on: call start, run or done"]
pub struct ConsumerBuilder<S = ()> {
    worker: Worker<S>,
    spec: ConsumerSpec<S>,
}

impl<S> std::fmt::Debug for ConsumerBuilder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerBuilder")
            .field("consumer", &self.spec.settings.name)
            .field("options", &self.spec.options)
            .finish()
    }
}

impl<S: Clone + Send + Sync + 'static> ConsumerBuilder<S> {
    fn option(mut self, set: impl FnOnce(ConsumerOptions) -> ConsumerOptions) -> Self {
        self.spec.options = set(std::mem::take(&mut self.spec.options));
        self
    }

    /// How this consumer's failures are retried.
    pub fn retry(self, retry: Retry) -> Self {
        self.option(|o| o.retry(retry))
    }

    /// How many deliveries it handles at once (1, the default: one at a
    /// time, in order).
    pub fn concurrency(self, n: usize) -> Self {
        self.option(|o| o.concurrency(n))
    }

    /// How long one of its handlers may run.
    pub fn timeout(self, timeout: Duration) -> Self {
        self.option(|o| o.timeout(timeout))
    }

    /// The largest response body (bytes) its HTTP handler may give
    /// ([`defaults::MAX_RESPONSE`](crate::defaults::MAX_RESPONSE) unless set).
    pub fn max_response(self, bytes: usize) -> Self {
        self.option(|o| o.max_response(bytes))
    }

    /// Its delivery limit; its queue must be a quorum queue
    /// ([`ConsumerSettings::queue_type`]): a message whose handling killed
    /// the process `limit` times goes to `<queue>.dead`.
    pub fn delivery_limit(self, limit: u32) -> Self {
        self.option(|o| o.delivery_limit(limit))
    }

    /// Splits it into `count` partition queues, each read one message at
    /// a time by a single active consumer, so that messages with the same
    /// `key` are handled in order while different keys go in parallel,
    /// over several worker processes (see [`Partitions`]). Its exchange
    /// becomes a consistent-hash exchange.
    pub fn partitions(self, count: u16, key: PartitionKey) -> Self {
        self.option(|o| o.partitions(Partitions::new(count, key)))
    }

    /// The exchange its replies go through.
    pub fn reply_exchange(self, exchange: impl Into<String>) -> Self {
        self.option(|o| o.reply_exchange(exchange))
    }

    /// All its options at once.
    pub fn options(self, options: ConsumerOptions) -> Self {
        self.option(|_| options)
    }

    /// The connection it consumes on, when it is not the worker's.
    pub fn connection(mut self, conn: &Connection) -> Self {
        self.spec.conn = conn.clone();
        self
    }

    /// Adds the consumer and goes back to the worker.
    pub fn done(self) -> Worker<S> {
        let ConsumerBuilder { mut worker, spec } = self;
        worker.consumers.push(spec);
        worker
    }

    /// Adds it, then the next consumer ([`Worker::consumer`]).
    pub fn consumer<H, T>(self, settings: ConsumerSettings, handler: H) -> ConsumerBuilder<S>
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.done().consumer(settings, handler)
    }

    #[cfg(feature = "http")]
    /// Adds it, then the next consumer ([`Worker::service`]).
    pub fn service<Svc, RB>(self, settings: ConsumerSettings, service: Svc) -> ConsumerBuilder<S>
    where
        Svc: http::RequestService<RB>,
        RB: http::ResponseBody,
    {
        self.done().service(settings, service)
    }

    #[cfg(feature = "http")]
    /// Adds it, then the next consumer ([`Worker::forward`]).
    pub fn forward(self, settings: ConsumerSettings, url: impl Into<String>) -> ConsumerBuilder<S> {
        self.done().forward(settings, url)
    }

    /// Adds it, then sets the worker's site ([`Worker::site`]).
    pub fn site(self, site: impl Into<String>) -> Worker<S> {
        self.done().site(site)
    }

    /// Adds it, then sets the worker's user ([`Worker::user`]).
    pub fn user(self, user: impl Into<String>) -> Worker<S> {
        self.done().user(user)
    }

    #[cfg(feature = "http")]
    /// Adds it, then sets the worker's path prefix ([`Worker::prefix`]).
    pub fn prefix(self, prefix: impl Into<String>) -> Worker<S> {
        self.done().prefix(prefix)
    }

    /// Adds it, then sets the worker's shutdown timeout
    /// ([`Worker::shutdown_timeout`]).
    pub fn shutdown_timeout(self, timeout: Duration) -> Worker<S> {
        self.done().shutdown_timeout(timeout)
    }

    /// Adds it, then sets an error handler ([`Worker::on_error`]).
    pub fn on_error<F, Fut>(self, exchange: &str, f: F) -> Worker<S>
    where
        F: Fn(Arc<Delivery>, HandlerError) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.done().on_error(exchange, f)
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    /// Adds it, then relays `outbox` ([`Worker::with_outbox`]).
    pub fn with_outbox(self, outbox: crate::outbox::Outbox) -> Worker<S> {
        self.done().with_outbox(outbox)
    }

    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    /// Adds it, then sets the relay's connection ([`Worker::relay_on`]).
    pub fn relay_on(self, conn: &Connection) -> Worker<S> {
        self.done().relay_on(conn)
    }

    /// Everything the worker declares with this consumer added
    /// ([`Worker::topology`]).
    pub fn topology(&self) -> Topology {
        let mut t = self.worker.topology();
        t.merge(&self.spec.topology());
        t
    }

    /// Adds it and starts the worker ([`Worker::start`]).
    pub async fn start(self) -> Result<RunningWorker> {
        self.done().start().await
    }

    /// Adds it and runs the worker until `shutdown` ([`Worker::run`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        self.done().run(shutdown).await
    }
}

/// One consumer of a running worker, as status pages and readiness
/// probes see it.
#[derive(Debug, Clone)]
pub struct WorkerConsumer {
    /// The consumer's name.
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// The connection it consumes on.
    pub connection: Connection,
    /// Whether it is attached to its queue now; `None` for a queue watched
    /// without consuming it here (`rabbitry status`), where only the
    /// broker's consumer count tells.
    pub attachment: Option<crate::consume::Attachment>,
}

/// A started worker.
pub struct RunningWorker {
    stop: CancellationToken,
    tasks: Vec<Background<()>>,
    metrics: Arc<WorkerMetrics>,
    consumers: Vec<WorkerConsumer>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    relay: Option<crate::outbox::Relay>,
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    outbox: Option<crate::outbox::Outbox>,
    connections: Vec<Connection>,
    shutdown_timeout: Duration,
}

impl std::fmt::Debug for RunningWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningWorker")
            .field("consumers", &self.tasks.len())
            .finish()
    }
}

impl RunningWorker {
    /// The worker's counters (deliveries by outcome, handler time, in flight).
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.metrics.clone()
    }

    /// Its consumers: name, queue, connection and whether each is attached.
    pub fn consumers(&self) -> &[WorkerConsumer] {
        &self.consumers
    }

    /// The outbox it relays, if any.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub fn outbox(&self) -> Option<&crate::outbox::Outbox> {
        self.outbox.as_ref()
    }

    /// Stops consuming, waits for the handlers in flight (up to the
    /// shutdown timeout), settles them, stops the outbox relay, and closes
    /// the connections the worker opened itself (those given to
    /// [`Worker::new`] stay open: they are the caller's). Deliveries not
    /// started go back to their queues.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        for task in self.tasks {
            if task.stop_within(deadline).await.is_err() {
                tracing::warn!(
                    timeout = ?self.shutdown_timeout,
                    "handlers still running at the shutdown deadline; their messages will be redelivered"
                );
            }
        }
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        if let Some(relay) = self.relay {
            // The relay finishes its current round (rows are deleted only
            // after their confirm, so nothing is lost either way).
            if let Err(e) = relay.stop().await {
                tracing::warn!(error = %e, "the outbox relay ended with an error");
            }
        }
        for c in self.connections {
            c.close().await;
        }
        tracing::info!("worker stopped");
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
