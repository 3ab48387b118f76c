//! Handling deliveries: the loop that reads one consumer (one at a time,
//! or up to its concurrency), runs the handler under its timeout, and turns
//! the result into the outcome: commit and reply then ack, requeue, retry
//! through a delay queue, or dead-letter.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use super::handler::{Because, BoxFuture, Context, FailureKind, HandlerError, Meta, Reply};
#[cfg(feature = "http")]
use super::http;
use super::metrics::{ConsumerMeter, Counted};
use super::{retry, ConsumerOptions, ErrorHandler, Route};
use crate::consume::{Consumer, Delivery, Outcome};
use crate::error::ErrorKind;
use crate::message::{HeaderValue, Message};
use crate::publish::Producer;
use crate::task::CancellationToken;
use crate::telemetry::{self, Link, Parent};
use crate::transaction::UnitOfWork;

/// Everything one consumer's deliveries are handled with.
pub(super) struct ConsumerRuntime<S> {
    pub(super) name: String,
    pub(super) queue: String,
    pub(super) metrics: Arc<ConsumerMeter>,
    pub(super) connection: String,
    /// The consumer's connection (its node goes into spans).
    pub(super) conn: crate::connection::Connection,
    pub(super) options: ConsumerOptions,
    pub(super) route: Route<S>,
    pub(super) replies: Producer,
    pub(super) site: Option<String>,
    pub(super) user: Option<String>,
    pub(super) error_handlers: Arc<HashMap<String, ErrorHandler>>,
}

/// Reads one consumer until the worker stops: one delivery at a time with
/// concurrency 1, at most `concurrency` at once otherwise.
pub(super) async fn consume_loop<S: Clone + Send + Sync + 'static>(
    rt: Arc<ConsumerRuntime<S>>,
    state: S,
    mut consumer: Consumer,
    concurrency: usize,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut inflight = JoinSet::new();
    loop {
        // Take a slot before a delivery, so that a delivery taken is a
        // delivery started.
        let permit = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let delivery = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        if concurrency == 1 {
            let work = process(&rt, &state, delivery);
            tokio::pin!(work);
            tokio::select! {
                _ = &mut work => {}
                _ = stop.cancelled() => {
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
    let processing = telemetry::process(d.received(), &rt.conn);
    processing
        .run(handle_delivery(rt, state, d))
        .instrument(span)
        .await;
}

async fn handle_delivery<S: Clone + Send + Sync + 'static>(
    rt: &ConsumerRuntime<S>,
    state: &S,
    d: Delivery,
) {
    if let Some(deadline) = d
        .properties
        .headers
        .get(crate::headers::DEADLINE)
        .and_then(HeaderValue::as_i64)
    {
        let late = crate::clock::now_millis() - deadline;
        if late > 0 {
            tracing::Span::current().record("outcome", "expired");
            telemetry::fail_current("expired");
            tracing::warn!(
                late_ms = late,
                "request expired before it was handled; acked without handling"
            );
            rt.metrics.count(Counted::Expired);
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
    let running = rt.metrics.start();
    let result = run_handler(rt, state, ctx).await;
    drop(running);
    rt.metrics.handled(started.elapsed());
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
        #[cfg(feature = "http")]
        Route::Http { service, base } => {
            let uri = http::request_path(base, &ctx.meta);
            let req = match http::to_request(uri, &ctx.meta, ctx.delivery.body.clone()) {
                Ok(r) => r,
                Err(e) => return Err(e),
            };
            let service = service.clone();
            let limit = rt.options.max_response;
            Box::pin(async move {
                match service(req, limit).await {
                    Ok(resp) => http::from_response(resp),
                    Err(e) => Err(e),
                }
            })
        }
    };
    let timeout = rt.options.timeout;
    // The handler's task carries the process span (for its publishes and
    // its outbox rows) and the delivery's log span.
    let mut task = tokio::spawn(telemetry::carry(fut).in_current_span());
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
        Ok(Err(join)) => Err(HandlerError::retry(Because::new(
            "the handler's task failed",
            join,
        ))),
        Err(_) => {
            // Tear the handler down before anything else happens to this
            // delivery: a native handler's future (and its unit of work) is
            // dropped, an HTTP request's connection is closed. Only then
            // may a retry or the next delivery start.
            task.abort();
            let _ = task.await;
            Err(HandlerError::retry(crate::Error::new(
                ErrorKind::Timeout,
                format!("the handler ran past its {timeout:?}; it was cancelled"),
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
        // A message past a protocol limit will not fit next time either.
        let kind = failure_of(&e);
        let err = HandlerError::new(
            kind,
            Because::new("publishing the handler's messages failed", e),
        );
        return fail(rt, d, attempt, err).await;
    }
    if let (Some(reply_to), false) = (&d.properties.reply_to, reply.body.is_empty()) {
        // Mandatory, so that a reply to a queue that does not exist is
        // noticed. Not for direct reply-to: RabbitMQ 3.x returns such a
        // reply as NO_ROUTE although it delivered it, and a requester that
        // is gone cannot be detected there.
        let direct = reply_to.starts_with(crate::rpc::DIRECT_REPLY_TO);
        let mut m = Message::new(reply.body)
            .exchange(reply_exchange(&rt.options.reply_exchange, reply_to))
            .routing_key(reply_to)
            .mandatory(!direct);
        m.properties.content_type = reply.content_type;
        m.properties.headers = reply.headers;
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
                rt.metrics.reply_unroutable();
            }
            Err(e) => {
                // A reply that cannot go (too large, a reply_to past 255
                // bytes) would not go next time: dead-letter the request.
                let kind = failure_of(&e);
                let context = format!(
                    "publishing the reply to '{}' failed",
                    crate::limits::shorten(reply_to, 60)
                );
                let err = HandlerError::new(kind, Because::new(context, e));
                return fail(rt, d, attempt, err).await;
            }
        }
    }
    tracing::Span::current().record("outcome", "ack");
    rt.metrics.count(Counted::Ack);
    settle_or_log(d, Outcome::Ack).await;
}

/// What a failed publish of the worker's own means for the delivery: a
/// message past a protocol limit would not go next time either, so the
/// delivery is dead-lettered; anything else is retried.
fn failure_of(e: &crate::Error) -> FailureKind {
    if e.kind() == ErrorKind::Invalid {
        FailureKind::Invalid
    } else {
        FailureKind::Retry
    }
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

/// Failure: hand it to the exchange's error handler, or retry it (a
/// conflict after the shortest delay), or dead-letter it. Every retry
/// counts against the budget: nothing is requeued for ever.
async fn fail<S>(rt: &ConsumerRuntime<S>, d: &Arc<Delivery>, attempt: u32, err: HandlerError) {
    telemetry::fail_current(err.kind().name());
    let message_id = d.properties.message_id.as_deref();
    let remember = |outcome: Counted, error: String| {
        rt.metrics.failed(&rt.queue, message_id, outcome, error);
    };
    let (exchange, routing_key) = retry::original_route(&d.properties, &d.exchange, &d.routing_key);
    if let Some(on_error) = rt.error_handlers.get(&exchange) {
        tracing::Span::current().record("outcome", "error-handler");
        tracing::error!(error = %err, attempt, "handler failed; passed to the error handler of exchange '{exchange}'");
        remember(Counted::ErrorHandler, err.message());
        on_error(d.clone(), err).await;
        rt.metrics.count(Counted::ErrorHandler);
        settle_or_log(d, Outcome::Ack).await;
        return;
    }
    let policy = &rt.options.retry;
    let queue = &rt.queue;
    let retrying = matches!(err.kind(), FailureKind::Retry | FailureKind::Conflict)
        && attempt < policy.attempts;
    tracing::Span::current().record("outcome", if retrying { "retry" } else { "dead-letter" });
    let message = if retrying {
        // A conflict is worth trying again soon: the shortest delay.
        let delay = if err.kind() == FailureKind::Conflict {
            retry::delay_for(policy, 1)
        } else {
            retry::delay_for(policy, attempt)
        };
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
    // A retry starts a new trace that links to this attempt; a dead letter
    // stays in this one.
    let parent = if retrying {
        Parent::Linked(Link::current())
    } else {
        Parent::Inherit
    };
    let counted = if retrying {
        Counted::Retry
    } else {
        Counted::DeadLetter
    };
    // Remembered before the move, so that whoever sees the dead letter
    // also finds its failure in the status.
    remember(counted, err.message());
    let moved = match rt.replies.publish_with(message, &parent).await {
        Err(e) if e.kind() == ErrorKind::Invalid => {
            // rabbitry's headers pushed it past what the connection
            // carries: it goes to the dead-letter queue, trimmed, alone.
            tracing::Span::current().record("outcome", "dead-letter");
            let why = format!("{}; moving it failed: {e}", err.message());
            tracing::error!(error = %why, "the failed message no longer fits; dead-lettering it trimmed");
            remember(Counted::DeadLetter, why.clone());
            dead_letter_trimmed(rt, d, attempt, &why)
                .await
                .map(|()| Counted::DeadLetter)
        }
        other => other.map(|()| counted),
    };
    match moved {
        Ok(counted) => {
            rt.metrics.count(counted);
            settle_or_log(d, Outcome::Ack).await
        }
        Err(e) => {
            // The publisher cannot make progress (the broker is away): the
            // message goes back to the queue after a pause, never in a
            // tight loop.
            tracing::Span::current().record("outcome", "requeue");
            tracing::error!(error = %e, "could not move the failed message; requeueing it");
            remember(
                Counted::Requeue,
                format!("{}; moving it failed: {e}", err.message()),
            );
            rt.metrics.count(Counted::Requeue);
            tokio::time::sleep(REQUEUE_PAUSE).await;
            settle_or_log(d, Outcome::Requeue).await;
        }
    }
}

/// How long a message whose move failed waits before it is requeued.
const REQUEUE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// The longest error text a dead letter keeps once trimmed.
const TRIMMED_ERROR: usize = 1000;

/// Dead-letters `d` when the full dead letter does not fit: first with the
/// error text shortened, then without the message's own headers (noted in
/// `x-rabbitry-trimmed`), which always fits, since the delivery itself did.
async fn dead_letter_trimmed<S>(
    rt: &ConsumerRuntime<S>,
    d: &Delivery,
    attempt: u32,
    error: &str,
) -> crate::Result<()> {
    let (exchange, routing_key) = retry::original_route(&d.properties, &d.exchange, &d.routing_key);
    let short = crate::limits::shorten(error, TRIMMED_ERROR);
    let letter = |properties| {
        retry::for_dead_letter(
            d.body.to_vec(),
            properties,
            (&exchange, &routing_key),
            attempt,
            &short,
            &rt.queue,
        )
    };
    match rt.replies.publish(letter(d.properties.clone())).await {
        Err(e) if e.kind() == ErrorKind::Invalid => {
            let mut bare = d.properties.clone();
            let dropped: Vec<String> = std::mem::take(&mut bare.headers).into_keys().collect();
            let mut m = letter(bare);
            m.properties.headers.insert(
                crate::headers::TRIMMED.into(),
                format!(
                    "the message's {} header(s) were dropped: with rabbitry's they did not fit in a frame ({})",
                    dropped.len(),
                    crate::limits::shorten(&dropped.join(", "), 200)
                )
                .into(),
            );
            rt.replies.publish(m).await
        }
        other => other,
    }
}

async fn settle_or_log(d: &Delivery, outcome: Outcome) {
    if let Err(e) = d.settle(outcome).await {
        tracing::warn!(error = %e, "settling failed; the broker will redeliver the message");
    }
}
