//! Asynchronous RPC over the broker: a client that many calls share, and
//! durable replies handled by the worker.
//!
//! An [`RpcClient`] owns one channel. It consumes replies from RabbitMQ's
//! direct reply-to pseudo-queue (`amq.rabbitmq.reply-to`, the default) or
//! from a named exclusive queue, and publishes requests on the same
//! channel, each with a fresh correlation id, `reply_to`, and a deadline
//! header (`x-rabbitry-deadline`, epoch milliseconds) that the worker
//! honours. Replies are matched to calls by correlation id. A call that
//! times out is forgotten (a late reply is logged and dropped); a call whose
//! request is unroutable (mandatory) fails at once; a lost connection fails
//! every call in flight at once, and the client serves new calls again
//! after recovery.
//!
//! The server side is the [`Worker`](crate::worker::Worker): a handler's
//! result is the reply. For replies that must survive the requester's
//! restart, see [`durable`].

#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod durable;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::amqp::to_basic;
use crate::channel::{CloseReason, Returned};
use crate::clock::now_millis;
use crate::codec::{decode_value, Decoded, Serializer};
use crate::connection::{lock, Backoff, ConfirmSink, Connection};
use crate::error::{Error, ErrorKind, Result};
use crate::headers::DEADLINE;
use crate::message::{HeaderValue, Message, Properties};
use crate::task::{Background, CancellationToken};
use crate::telemetry::{self, Parent};
use crate::topology::{Queue, Topology};
use crate::wire::{Deliveries, WireChannel};

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Where replies come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyQueue {
    /// RabbitMQ's direct reply-to: no queue to declare, fastest.
    DirectReplyTo,
    /// An exclusive, auto-delete queue with this name (empty: the broker
    /// names it), declared again after recovery.
    Named(String),
}

/// How an [`RpcClient`] calls.
#[derive(Debug, Clone)]
pub struct RpcSettings {
    /// The exchange requests go to (default exchange when empty).
    pub exchange: String,
    /// Where replies come back.
    pub reply_queue: ReplyQueue,
    /// The timeout of calls that do not give one.
    pub timeout: Duration,
    /// Make requests mandatory, so an unroutable request fails at once.
    pub mandatory: bool,
}

impl Default for RpcSettings {
    fn default() -> Self {
        RpcSettings {
            exchange: String::new(),
            reply_queue: ReplyQueue::DirectReplyTo,
            timeout: Duration::from_secs(5),
            mandatory: true,
        }
    }
}

/// A reply.
#[derive(Debug, Clone)]
pub struct Response {
    /// The body.
    pub body: Vec<u8>,
    /// Its properties (content type, correlation id...).
    pub properties: Properties,
}

impl Response {
    /// Decodes the body into `T` by its content type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        let ct = self.properties.content_type.as_deref().unwrap_or("");
        Serializer::for_content_type(ct)
            .ok_or_else(|| {
                Error::codec(format!(
                    "cannot decode a reply of content type {ct:?} into a typed value"
                ))
            })?
            .decode(&self.body)
    }

    /// Decodes the body by content type, or gives the raw bytes.
    pub fn decode_value(&self) -> Result<Decoded> {
        decode_value(self.properties.content_type.as_deref(), &self.body)
    }
}

type Waiter = oneshot::Sender<Result<Response>>;

#[derive(Default)]
struct Calls {
    waiting: HashMap<String, Waiter>,
}

/// Matches returns (unroutable requests) to calls.
struct ReturnSink {
    calls: Arc<Mutex<Calls>>,
}

impl ConfirmSink for ReturnSink {
    fn ack(&self, _: u64, _: bool) {}
    fn nack(&self, _: u64, _: bool) {}
    fn returned(&self, r: Returned) {
        let Some(id) = r.correlation_id else { return };
        if let Some(w) = lock(&self.calls).waiting.remove(&id) {
            let _ = w.send(Err(Error::new(
                ErrorKind::Unroutable,
                format!("request {id} was not routed to any queue: {}", r.text),
            )));
        }
    }
    fn closed(&self, reason: &CloseReason) {
        fail_all(
            &self.calls,
            ErrorKind::Channel,
            &format!(
                "the broker closed the RPC channel: {} ({})",
                reason.text, reason.code
            ),
        );
    }
}

fn fail_all(calls: &Mutex<Calls>, kind: ErrorKind, why: &str) {
    let waiting: Vec<_> = lock(calls).waiting.drain().collect();
    for (id, w) in waiting {
        let _ = w.send(Err(Error::new(kind, format!("call {id}: {why}"))));
    }
}

/// One call on its way: where it goes and how its reply is recognised.
struct Call {
    route: Route,
    correlation_id: String,
    exchange: String,
    routing_key: String,
    timeout: Duration,
}

/// The channel the client currently uses, and the reply address on it.
#[derive(Clone)]
struct Route {
    channel: WireChannel,
    reply_to: String,
    /// What a request may be on this channel.
    limits: crate::limits::Limits,
}

/// An RPC client; cheap to clone, and many calls may be in flight at once.
#[derive(Clone)]
pub struct RpcClient {
    settings: Arc<RpcSettings>,
    conn: Connection,
    calls: Arc<Mutex<Calls>>,
    route: watch::Receiver<Option<Route>>,
    meters: Arc<crate::meters::RpcMeters>,
    /// The reply reader; it stops when the last clone of the client goes.
    _task: Arc<Background<()>>,
}

impl std::fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcClient")
            .field("exchange", &self.settings.exchange)
            .field("in_flight", &lock(&self.calls).waiting.len())
            .finish()
    }
}

impl RpcClient {
    /// Opens the client's channel and starts consuming replies.
    pub async fn new(conn: &Connection, settings: RpcSettings) -> Result<RpcClient> {
        let calls: Arc<Mutex<Calls>> = Arc::default();
        let (route_tx, route_rx) = watch::channel(None);
        let first = open_route(conn, &settings, &calls).await?;
        let (route, incoming) = first;
        route_tx.send_replace(Some(route));
        let task = {
            let (conn, settings, calls) = (conn.clone(), settings.clone(), calls.clone());
            Background::spawn(move |stop| run(conn, settings, calls, route_tx, incoming, stop))
        };
        Ok(RpcClient {
            settings: Arc::new(settings),
            conn: conn.clone(),
            calls,
            route: route_rx,
            meters: Arc::new(crate::meters::RpcMeters::new(conn.name())),
            _task: Arc::new(task),
        })
    }

    /// Calls with `value` encoded by `serializer` to `routing_key`, and
    /// decodes the reply into `R`.
    pub async fn call_value<T: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        routing_key: &str,
        serializer: Serializer,
        value: &T,
    ) -> Result<R> {
        let m = Message::encode(serializer, value)?.routing_key(routing_key);
        self.call(m, None).await?.decode()
    }

    /// Sends `request` and waits for its reply, for `timeout` (or the
    /// client's). The message's exchange defaults to the client's; its
    /// correlation id, `reply_to` and deadline header are set here.
    ///
    /// ```no_run
    /// # async fn demo(conn: rabbitry::Connection) -> rabbitry::Result<()> {
    /// use std::time::Duration;
    /// use rabbitry::rpc::{RpcClient, RpcSettings};
    /// use rabbitry::{Message, Serializer};
    ///
    /// let client = RpcClient::new(&conn, RpcSettings { exchange: "service.tasks".into(), ..RpcSettings::default() }).await?;
    /// let request = Message::encode(Serializer::Msgpack, &serde_json::json!({"title": "Hello"}))?
    ///     .routing_key("service.my_template");
    /// let reply = client.call(request, Some(Duration::from_secs(5))).await?; // over direct reply-to
    /// println!("{:?}: {} bytes", reply.properties.content_type, reply.body.len());
    /// # Ok(()) }
    /// ```
    pub async fn call(&self, mut request: Message, timeout: Option<Duration>) -> Result<Response> {
        let timeout = timeout.unwrap_or(self.settings.timeout);
        let route = self.current_route(timeout).await?;
        let correlation_id = uuid::Uuid::new_v4().to_string();
        let p = &mut request.properties;
        p.correlation_id = Some(correlation_id.clone());
        p.reply_to = Some(route.reply_to.clone());
        p.headers.insert(
            DEADLINE.into(),
            HeaderValue::Int(now_millis() + timeout.as_millis() as i64),
        );
        if p.delivery_mode.is_none() {
            p.delivery_mode = Some(crate::message::TRANSIENT);
        }
        let exchange = request
            .exchange
            .take()
            .unwrap_or_else(|| self.settings.exchange.clone());
        let routing_key = request
            .routing_key
            .take()
            .ok_or_else(|| Error::new(ErrorKind::Invalid, "an RPC request needs a routing key"))?;
        // The call's client span: the server's process span is its child.
        let span = telemetry::publish(
            &mut request.properties,
            request.body.len(),
            telemetry::Publish {
                exchange: &exchange,
                routing_key: &routing_key,
                conn: &self.conn,
            },
            &Parent::Inherit,
            true,
        );
        let call = Call {
            route,
            correlation_id,
            exchange,
            routing_key,
            timeout,
        };
        let result = self.round_trip(request, call).await;
        span.finish(&result);
        result
    }

    /// Sends the request and waits for its reply.
    async fn round_trip(&self, request: Message, call: Call) -> Result<Response> {
        let Call {
            route,
            correlation_id,
            exchange,
            routing_key,
            timeout,
        } = call;
        let (tx, rx) = oneshot::channel();
        lock(&self.calls).waiting.insert(correlation_id.clone(), tx);
        let started = std::time::Instant::now();
        self.meters.in_flight.increment(1.0);
        // Removes the entry however this call ends, cancellation included.
        let _waiting = WaitingEntry {
            calls: &self.calls,
            correlation_id: &correlation_id,
            in_flight: &self.meters.in_flight,
        };
        // A request that cannot go fails here, before the client panics on
        // it or the broker closes the channel every call shares.
        crate::limits::check_publish(
            &exchange,
            &routing_key,
            &request.properties,
            request.body.len(),
            &route.limits,
        )?;
        let mandatory = self.settings.mandatory || request.mandatory;
        if let Err(e) = route
            .channel
            .publish(
                &exchange,
                &routing_key,
                mandatory,
                to_basic(&request.properties),
                request.body,
            )
            .await
        {
            self.meters.errors.increment(1);
            return Err(
                Error::new(ErrorKind::Disconnected, "sending the RPC request").with_source(e),
            );
        }
        let result = tokio::time::timeout(timeout, rx).await;
        match &result {
            Ok(Ok(Ok(_))) => {
                self.meters.replies.increment(1);
                self.meters.duration.record(started.elapsed().as_secs_f64());
            }
            Err(_) => self.meters.timeouts.increment(1),
            _ => self.meters.errors.increment(1),
        }
        match result {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::new(ErrorKind::Closed, "RPC client closed")),
            Err(_) => Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "timed out after {timeout:?} waiting for a reply from exchange '{exchange}', routing key '{routing_key}'"
                    ),
                )),
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.calls).waiting.len()
    }

    async fn current_route(&self, timeout: Duration) -> Result<Route> {
        let mut rx = self.route.clone();
        let wait = async move {
            rx.wait_for(|r| r.as_ref().is_some_and(|r| r.channel.is_open()))
                .await
                .ok()
                .and_then(|r| r.clone())
        };
        match tokio::time::timeout(timeout.min(self.conn.settings().recovery_timeout), wait).await {
            Ok(Some(r)) => Ok(r),
            _ => Err(Error::new(
                ErrorKind::Disconnected,
                format!(
                    "RPC client on connection '{}' has no channel (connection down)",
                    self.conn.name()
                ),
            )),
        }
    }
}

/// A call's place in the waiting table, freed when the call ends: by a
/// reply, an error, a timeout, or the caller dropping the call's future.
struct WaitingEntry<'a> {
    calls: &'a Mutex<Calls>,
    correlation_id: &'a str,
    in_flight: &'a metrics::Gauge,
}

impl Drop for WaitingEntry<'_> {
    fn drop(&mut self) {
        lock(self.calls).waiting.remove(self.correlation_id);
        self.in_flight.decrement(1.0);
    }
}

async fn open_route(
    conn: &Connection,
    settings: &RpcSettings,
    calls: &Arc<Mutex<Calls>>,
) -> Result<(Route, Deliveries)> {
    let sink: Arc<dyn ConfirmSink> = Arc::new(ReturnSink {
        calls: calls.clone(),
    });
    let (channel, watch, _) = conn.open_channel(Some(sink)).await?;
    let queue = match &settings.reply_queue {
        ReplyQueue::DirectReplyTo => DIRECT_REPLY_TO.to_owned(),
        ReplyQueue::Named(name) => {
            let mut t = Topology::default();
            t.queue(Queue::exclusive(name));
            let names = crate::wire::declare(&channel, &watch, &t).await?;
            names.into_iter().next().unwrap_or_else(|| name.clone())
        }
    };
    let (_, incoming) = channel.consume(&queue, "", true).await.map_err(|e| {
        watch.refusal(
            ErrorKind::Channel,
            format!("consuming replies from '{queue}'"),
            e,
        )
    })?;
    Ok((
        Route {
            channel,
            reply_to: queue,
            limits: watch.limits(),
        },
        incoming,
    ))
}

/// Dispatches replies; on loss, fails the calls in flight and reopens.
async fn run(
    conn: Connection,
    settings: RpcSettings,
    calls: Arc<Mutex<Calls>>,
    route: watch::Sender<Option<Route>>,
    mut incoming: Deliveries,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        loop {
            let m = tokio::select! {
                m = incoming.recv() => m,
                _ = stop.cancelled() => return,
            };
            let Some(m) = m else { break };
            let properties = m.properties;
            let Some(id) = properties.correlation_id.clone() else {
                tracing::warn!("a reply without a correlation id was dropped");
                continue;
            };
            let waiter = lock(&calls).waiting.remove(&id);
            match waiter {
                Some(w) => {
                    let _ = w.send(Ok(Response {
                        body: m.body.into(),
                        properties,
                    }));
                }
                None => tracing::warn!(correlation_id = %id, "late or unknown reply dropped"),
            }
        }
        route.send_replace(None);
        fail_all(
            &calls,
            ErrorKind::Disconnected,
            &format!(
                "connection '{}' lost while waiting for the reply",
                conn.name()
            ),
        );
        // Reopen on the next live socket.
        backoff.reset();
        loop {
            if stop.is_cancelled() {
                return;
            }
            match open_route(&conn, &settings, &calls).await {
                Ok((r, i)) => {
                    route.send_replace(Some(r));
                    incoming = i;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Closed => return,
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %e, ?delay, "reopening the RPC channel failed");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }
}
