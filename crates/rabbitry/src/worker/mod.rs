//! The worker: the consuming server that dispatches each delivery to a
//! handler, the way collective.zamqp hands a message to the site as a
//! request.
//!
//! A handler is a native async function with extractors
//! ([`handler`]), any tower `Service` such as an axum `Router`, or the URL
//! of an HTTP application in any language ([`http`]). Whatever it is, its
//! result decides the outcome: success acks (after its unit of work has
//! published, and after the reply), a conflict requeues, bad input
//! dead-letters at once, anything else is retried through delay queues and
//! then dead-lettered ([`retry`]). With `concurrency = 1` (the default)
//! messages are handled one at a time, in order. Shutdown stops consuming,
//! lets the handlers in flight finish within a deadline, acks them and
//! closes; what was not started stays on the queue.

pub mod dead;
pub mod handler;
pub mod http;
pub mod metrics;
pub mod retry;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

pub use handler::{
    Body, BoxError, BoxFuture, Context, FailureKind, FromContext, Handler, HandlerError, IntoReply,
    Json, Meta, Msg, Msgpack, Reply, ResultExt, State,
};

use crate::config::{ConsumerConfig, Settings};
use crate::connection::{stopped, Connection};
use crate::consume::{Consumer, Delivery, Outcome};
use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderValue, Message};
use crate::publish::{Producer, ProducerSettings};
use crate::transaction::UnitOfWork;
use handler::BoxHandler;
use http::BoxService;
use metrics::{Counted, WorkerMetrics};

/// Called with a failed delivery and its error; the delivery is then acked.
pub type ErrorHandler = Arc<dyn Fn(Arc<Delivery>, HandlerError) -> BoxFuture<()> + Send + Sync>;

enum Route<S> {
    Native(BoxHandler<S>),
    Http { service: BoxService, base: String },
}

impl<S> Clone for Route<S> {
    fn clone(&self) -> Self {
        match self {
            Route::Native(h) => Route::Native(h.clone()),
            Route::Http { service, base } => Route::Http {
                service: service.clone(),
                base: base.clone(),
            },
        }
    }
}

/// A worker being configured. Build it with handlers, then
/// [`start`](Worker::start) or [`run`](Worker::run) it.
pub struct Worker<S = ()> {
    settings: Settings,
    outbox: Option<crate::outbox::Outbox>,
    state: S,
    routes: HashMap<String, Route<S>>,
    error_handlers: HashMap<String, ErrorHandler>,
}

impl<S: Clone + Send + Sync + 'static> Worker<S> {
    /// A worker for the consumers in `settings` (already substituted for
    /// a site with [`Settings::for_site`] when needed), with shared `state`
    /// for native handlers.
    pub fn new(settings: Settings, state: S) -> Self {
        Worker {
            settings,
            outbox: None,
            state,
            routes: HashMap::new(),
            error_handlers: HashMap::new(),
        }
    }

    /// Handles consumer `consumer`'s deliveries with a native handler.
    pub fn handle<H, T>(mut self, consumer: &str, handler: H) -> Self
    where
        H: Handler<T, S>,
        T: 'static,
    {
        self.routes
            .insert(consumer.to_owned(), Route::Native(handler::boxed(handler)));
        self
    }

    /// Handles consumer `consumer`'s deliveries as requests to a tower
    /// service (an axum `Router`), under the worker's path prefix.
    pub fn service<Svc, RB>(mut self, consumer: &str, service: Svc) -> Self
    where
        Svc: http::RequestService<RB>,
        RB: http::ResponseBody,
    {
        let base = self.settings.worker.prefix.clone();
        self.routes.insert(
            consumer.to_owned(),
            Route::Http {
                service: http::boxed_service(service),
                base,
            },
        );
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

    /// Relays `outbox` while the worker runs (on the `[outbox]` section's
    /// connection), and flushes it at shutdown.
    pub fn with_outbox(mut self, outbox: crate::outbox::Outbox) -> Self {
        self.outbox = Some(outbox);
        self
    }

    /// Runs until `shutdown` resolves, then shuts down gracefully.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let running = self.start().await?;
        shutdown.await;
        running.shutdown().await;
        Ok(())
    }

    /// Connects, declares, and starts every consumer. Returns once all of
    /// them are consuming.
    pub async fn start(self) -> Result<RunningWorker> {
        let Worker {
            settings,
            outbox,
            state,
            mut routes,
            error_handlers,
        } = self;
        settings.check_substituted()?;
        let mut connections: HashMap<String, Connection> = HashMap::new();
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let metrics = Arc::new(WorkerMetrics::default());
        let mut replies_by_conn: HashMap<String, Producer> = HashMap::new();
        for (name, config) in &settings.consumers {
            let route = match routes.remove(name) {
                Some(r) => r,
                None => match &config.handler {
                    Some(url) => Route::Http {
                        service: http::url_client(config.timeout),
                        base: url.clone(),
                    },
                    None => {
                        return Err(Error::config(format!(
                            "consumer '{name}' has no handler: set `handler = \"http://...\"` in its section or register one in code"
                        )))
                    }
                },
            };
            let conn_name = config.connection.clone();
            let conn = connection_for(&settings, &mut connections, &conn_name).await?;
            let replies = match replies_by_conn.get(&conn_name) {
                Some(p) => p.clone(),
                None => {
                    let mut ps = ProducerSettings {
                        name: format!("{name}.replies"),
                        auto_declare: false,
                        message_ids: false,
                        ..ProducerSettings::default()
                    };
                    ps.routing_key = None;
                    let p = Producer::new(&conn, ps).await?;
                    replies_by_conn.insert(conn_name.clone(), p.clone());
                    p
                }
            };
            conn.declare(&retry::topology(&config.consumer.queue, &config.retry))
                .await?;
            let concurrency = config
                .concurrency
                .unwrap_or(settings.worker.concurrency)
                .max(1);
            let mut cs = config.consumer.clone();
            cs.prefetch_count = Some(
                cs.prefetch_count
                    .unwrap_or(concurrency.min(u16::MAX as usize) as u16),
            );
            let consumer = Consumer::start(&conn, cs).await?;
            tracing::info!(consumer = %name, queue = %consumer.queue(), concurrency, "consuming");
            let runtime = Arc::new(ConsumerRuntime {
                name: name.clone(),
                metrics: metrics.clone(),
                connection: conn_name.clone(),
                config: config.clone(),
                route,
                replies,
                site: settings.worker.site.clone(),
                user: settings.worker.user.clone(),
                error_handlers: error_handlers.clone(),
            });
            tasks.push(tokio::spawn(consume_loop(
                runtime,
                state.clone(),
                consumer,
                concurrency,
                stop_rx.clone(),
            )));
        }
        let relay = match outbox {
            Some(outbox) => {
                let name = settings
                    .outbox
                    .as_ref()
                    .map_or(crate::config::DEFAULT_CONNECTION.to_owned(), |o| {
                        o.connection.clone()
                    });
                let conn = connection_for(&settings, &mut connections, &name).await?;
                Some(
                    outbox
                        .spawn_relay(&conn, crate::outbox::RelayOptions::default())
                        .await?,
                )
            }
            None => None,
        };
        if let Some(unused) = routes.keys().next() {
            return Err(Error::config(format!(
                "a handler was registered for consumer '{unused}', which the settings do not define"
            )));
        }
        Ok(RunningWorker {
            stop,
            tasks,
            metrics,
            relay,
            connections: connections.into_values().collect(),
            shutdown_timeout: settings.worker.shutdown_timeout,
        })
    }
}

/// The worker's connection called `name`, opened on first use: one
/// connection per name, shared by every consumer on it.
async fn connection_for(
    settings: &Settings,
    connections: &mut HashMap<String, Connection>,
    name: &str,
) -> Result<Connection> {
    if let Some(c) = connections.get(name) {
        return Ok(c.clone());
    }
    let mut cs = settings.connection(name)?;
    cs.name = format!("rabbitry-worker.{name}");
    let c = Connection::open(cs).await?;
    connections.insert(name.to_owned(), c.clone());
    Ok(c)
}

/// A started worker.
pub struct RunningWorker {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    metrics: Arc<WorkerMetrics>,
    relay: Option<crate::outbox::Relay>,
    connections: Vec<Connection>,
    shutdown_timeout: Duration,
}

impl RunningWorker {
    /// The worker's counters (deliveries by outcome, handler time, in flight).
    pub fn metrics(&self) -> Arc<WorkerMetrics> {
        self.metrics.clone()
    }

    /// Stops consuming, waits for the handlers in flight (up to the
    /// shutdown timeout), settles them, and closes the connections.
    /// Deliveries not started go back to their queues.
    pub async fn shutdown(self) {
        self.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        for mut task in self.tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                tracing::warn!(
                    timeout = ?self.shutdown_timeout,
                    "handlers still running at the shutdown deadline; their messages will be redelivered"
                );
                task.abort();
            }
        }
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

struct ConsumerRuntime<S> {
    name: String,
    metrics: Arc<WorkerMetrics>,
    connection: String,
    config: ConsumerConfig,
    route: Route<S>,
    replies: Producer,
    site: Option<String>,
    user: Option<String>,
    error_handlers: HashMap<String, ErrorHandler>,
}

/// Reads one consumer until the worker stops: one delivery at a time with
/// concurrency 1, at most `concurrency` at once otherwise.
async fn consume_loop<S: Clone + Send + Sync + 'static>(
    rt: Arc<ConsumerRuntime<S>>,
    state: S,
    mut consumer: Consumer,
    concurrency: usize,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut inflight = JoinSet::new();
    loop {
        // Take a slot before a delivery, so that a delivery taken is a
        // delivery started.
        let permit = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let delivery = tokio::select! {
            biased;
            _ = stopped(&mut stop) => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        if concurrency == 1 {
            let work = process(&rt, &state, delivery);
            tokio::pin!(work);
            tokio::select! {
                _ = &mut work => {}
                _ = stopped(&mut stop) => {
                    // Stop consuming before this handler's ack goes out, so
                    // that the broker sends nothing more to this worker.
                    consumer.cancel().await;
                    work.await;
                    break;
                }
            }
            drop(permit);
        } else {
            let rt = rt.clone();
            let state = state.clone();
            inflight.spawn(async move {
                process(&rt, &state, delivery).await;
                drop(permit);
            });
        }
        while inflight.try_join_next().is_some() {}
    }
    // Stop consuming first; what the broker already sent but no handler
    // started goes back to the queue when the channel closes.
    consumer.cancel().await;
    while inflight.join_next().await.is_some() {}
    drop(consumer);
    tracing::info!(consumer = %rt.name, "stopped");
}

async fn process<S: Clone + Send + Sync + 'static>(
    rt: &ConsumerRuntime<S>,
    state: &S,
    d: Delivery,
) {
    let span = tracing::info_span!(
        "delivery",
        queue = %d.queue,
        routing_key = %d.routing_key,
        message_id = d.properties.message_id.as_deref().unwrap_or(""),
        outcome = tracing::field::Empty,
    );
    handle_delivery(rt, state, d).instrument(span).await;
}

async fn handle_delivery<S: Clone + Send + Sync + 'static>(
    rt: &ConsumerRuntime<S>,
    state: &S,
    d: Delivery,
) {
    if let Some(deadline) = d
        .properties
        .headers
        .get(retry::DEADLINE)
        .and_then(HeaderValue::as_i64)
    {
        let late = retry::now_millis() - deadline;
        if late > 0 {
            tracing::Span::current().record("outcome", "expired");
            tracing::warn!(
                late_ms = late,
                "request expired before it was handled; acked without handling"
            );
            rt.metrics.count(&rt.name, Counted::Expired);
            settle_or_log(&d, Outcome::Ack).await;
            return;
        }
    }
    let attempt = retry::attempt_of(&d.properties);
    let (exchange, routing_key) = retry::original_route(&d.properties, &d.exchange, &d.routing_key);
    let delivery = Arc::new(d);
    let unit = UnitOfWork::new();
    let ctx = Context {
        delivery: delivery.clone(),
        meta: Meta {
            exchange,
            routing_key,
            queue: delivery.queue.clone(),
            connection: rt.connection.clone(),
            redelivered: delivery.redelivered,
            attempt,
            site: rt.site.clone(),
            user: rt.user.clone(),
            properties: delivery.properties.clone(),
        },
        unit: unit.clone(),
    };
    let started = std::time::Instant::now();
    let running = rt.metrics.start(&rt.name);
    let result = run_handler(rt, state, ctx).await;
    drop(running);
    rt.metrics.handled(&rt.name, started.elapsed());
    match result {
        Ok(reply) => succeed(rt, &delivery, attempt, &unit, reply).await,
        Err(err) => {
            unit.abort();
            fail(rt, &delivery, attempt, err).await;
        }
    }
}

/// Runs the handler in its own task, so that a panic is caught, under the
/// consumer's timeout.
async fn run_handler<S: Clone + Send + Sync + 'static>(
    rt: &ConsumerRuntime<S>,
    state: &S,
    ctx: Context,
) -> std::result::Result<Reply, HandlerError> {
    let fut: BoxFuture<std::result::Result<Reply, HandlerError>> = match &rt.route {
        Route::Native(h) => h(ctx, state.clone()),
        Route::Http { service, base } => {
            let uri = http::request_path(base, &ctx.meta);
            let req = match http::to_request(uri, &ctx.meta, ctx.delivery.body.clone()) {
                Ok(r) => r,
                Err(e) => return Err(e),
            };
            let service = service.clone();
            Box::pin(async move {
                match service(req).await {
                    Ok(resp) => http::from_response(resp),
                    Err(e) => Err(HandlerError::retry(e)),
                }
            })
        }
    };
    let timeout = rt.config.timeout;
    let mut task = tokio::spawn(fut);
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) if join.is_panic() => {
            let payload = join.into_panic();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string payload".into());
            Err(HandlerError::retry(format!("handler panicked: {text}")))
        }
        Ok(Err(join)) => Err(HandlerError::retry(format!("handler task failed: {join}"))),
        Err(_) => {
            // Tear the handler down before anything else happens to this
            // delivery: a native handler's future (and its unit of work) is
            // dropped, an HTTP request's connection is closed. Only then
            // may a retry or the next delivery start.
            task.abort();
            let _ = task.await;
            Err(HandlerError::retry(format!(
                "handler timed out after {timeout:?}; it was cancelled"
            )))
        }
    }
}

/// Success: the unit of work's publishes (confirmed), the reply, then the
/// ack. If a publish fails, nothing is acked: the delivery takes the retry
/// path, so it is neither lost nor spun in a tight loop.
async fn succeed<S>(
    rt: &ConsumerRuntime<S>,
    d: &Arc<Delivery>,
    attempt: u32,
    unit: &UnitOfWork,
    reply: Reply,
) {
    if let Err(e) = unit.commit(None).await {
        let err = HandlerError::retry(format!("publishing the handler's messages failed: {e}"));
        return fail(rt, d, attempt, err).await;
    }
    if let (Some(reply_to), false) = (&d.properties.reply_to, reply.body.is_empty()) {
        // Mandatory, so that a reply to a queue that does not exist is
        // noticed. Not for direct reply-to: RabbitMQ 3.x returns such a
        // reply as NO_ROUTE although it delivered it, and a requester that
        // is gone cannot be detected there.
        let direct = reply_to.starts_with(crate::rpc::DIRECT_REPLY_TO);
        let mut m = Message::new(reply.body)
            .exchange(reply_exchange(&rt.config.reply_exchange, reply_to))
            .routing_key(reply_to)
            .mandatory(!direct);
        m.properties.content_type = reply.content_type;
        m.properties.correlation_id = d.properties.correlation_id.clone();
        match rt.replies.publish(m).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Unroutable => {
                // The requester is gone (or never had a queue): retrying the
                // request would not make its reply routable.
                tracing::warn!(
                    reply_to = %reply_to,
                    correlation_id = d.properties.correlation_id.as_deref().unwrap_or(""),
                    error = %e,
                    "the reply was not routed to any queue; it is dropped and the request acked"
                );
                rt.metrics.reply_unroutable(&rt.name);
            }
            Err(e) => {
                let err = HandlerError::retry(format!(
                    "publishing the reply to '{reply_to}' failed: {e}"
                ));
                return fail(rt, d, attempt, err).await;
            }
        }
    }
    tracing::Span::current().record("outcome", "ack");
    rt.metrics.count(&rt.name, Counted::Ack);
    settle_or_log(d, Outcome::Ack).await;
}

/// The exchange a reply to `reply_to` goes through: the default exchange
/// for RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to...`), which no
/// other exchange can route to, and the consumer's `reply_exchange`
/// otherwise.
pub(crate) fn reply_exchange<'a>(configured: &'a str, reply_to: &str) -> &'a str {
    if reply_to.starts_with(crate::rpc::DIRECT_REPLY_TO) {
        ""
    } else {
        configured
    }
}

/// Failure: requeue a conflict; otherwise hand it to the exchange's error
/// handler, or retry it, or dead-letter it.
async fn fail<S>(rt: &ConsumerRuntime<S>, d: &Arc<Delivery>, attempt: u32, err: HandlerError) {
    if err.kind() == FailureKind::Conflict {
        tracing::Span::current().record("outcome", "requeue");
        tracing::info!(error = %err, "conflict; requeued");
        rt.metrics.count(&rt.name, Counted::Requeue);
        settle_or_log(d, Outcome::Requeue).await;
        return;
    }
    let (exchange, routing_key) = retry::original_route(&d.properties, &d.exchange, &d.routing_key);
    if let Some(on_error) = rt.error_handlers.get(&exchange) {
        tracing::Span::current().record("outcome", "error-handler");
        tracing::error!(error = %err, attempt, "handler failed; passed to the error handler of exchange '{exchange}'");
        on_error(d.clone(), err).await;
        rt.metrics.count(&rt.name, Counted::ErrorHandler);
        settle_or_log(d, Outcome::Ack).await;
        return;
    }
    let policy = &rt.config.retry;
    let queue = &rt.config.consumer.queue;
    let retrying = err.kind() == FailureKind::Retry && attempt < policy.attempts;
    tracing::Span::current().record("outcome", if retrying { "retry" } else { "dead-letter" });
    let message = if retrying {
        let delay = retry::delay_for(policy, attempt);
        tracing::warn!(error = %err, attempt, ?delay, "handler failed; will retry");
        retry::for_retry(
            d.body.to_vec(),
            d.properties.clone(),
            (&exchange, &routing_key),
            attempt + 1,
            queue,
            delay,
        )
    } else {
        tracing::error!(error = %err, attempt, "handler failed; dead-lettered to '{}'", retry::dead_queue(queue));
        retry::for_dead_letter(
            d.body.to_vec(),
            d.properties.clone(),
            (&exchange, &routing_key),
            attempt,
            &err.message(),
            queue,
        )
    };
    match rt.replies.publish(message).await {
        Ok(()) => {
            let counted = if retrying {
                Counted::Retry
            } else {
                Counted::DeadLetter
            };
            rt.metrics.count(&rt.name, counted);
            settle_or_log(d, Outcome::Ack).await
        }
        Err(e) => {
            tracing::Span::current().record("outcome", "requeue");
            tracing::error!(error = %e, "could not move the failed message; requeueing it");
            rt.metrics.count(&rt.name, Counted::Requeue);
            settle_or_log(d, Outcome::Requeue).await;
        }
    }
}

async fn settle_or_log(d: &Delivery, outcome: Outcome) {
    if let Err(e) = d.settle(outcome).await {
        tracing::warn!(error = %e, "settling failed; the broker will redeliver the message");
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
