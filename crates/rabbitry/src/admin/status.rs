//! What the status page and `/api/status` show, and how it reaches every
//! open page: one task reads the broker once a second while at least one
//! page listens to `/api/events`, and every page gets that same status.
//! Ten open pages cost the broker what one does.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::{outbox_states, Shared};
use crate::connection::lock;
use crate::worker::dead;

/// How often the status is read while pages listen.
const EVENT_EVERY: Duration = Duration::from_secs(1);

/// Dead letters shown per queue on the page.
const LETTERS_SHOWN: usize = 20;

/// The status every listening page gets, and the task that refreshes it.
pub(super) struct Hub {
    latest: watch::Sender<Option<Arc<Value>>>,
    /// Whether the refreshing task runs.
    running: Mutex<bool>,
    /// Per consumer, its last reading.
    rates: Mutex<HashMap<String, Reading>>,
}

/// When a consumer's finished deliveries were last counted, the count,
/// and the rate computed then.
type Reading = (Instant, u64, Option<f64>);

impl Default for Hub {
    fn default() -> Self {
        Hub {
            latest: watch::Sender::new(None),
            running: Mutex::new(false),
            rates: Mutex::default(),
        }
    }
}

/// `GET /api/events`: the status now, then each new one.
pub(super) async fn events(State(s): State<Arc<Shared>>) -> Response {
    let rx = s.hub.latest.subscribe();
    refresh_while_listened(&s);
    let stream = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        let ready = first && rx.borrow_and_update().is_some();
        if !ready {
            rx.changed().await.ok()?;
        }
        let status = rx.borrow_and_update().clone()?;
        let event = Event::default()
            .event("status")
            .json_data(&*status)
            .unwrap_or_else(|_| Event::default().comment("status not serializable"));
        Some((Ok::<_, Infallible>(event), (rx, false)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new())
        .into_response()
}

/// Starts the refreshing task unless it runs; it stops once no page
/// listens.
fn refresh_while_listened(s: &Arc<Shared>) {
    let mut running = lock(&s.hub.running);
    if *running {
        return;
    }
    *running = true;
    let s = s.clone();
    tokio::spawn(async move {
        loop {
            let status = collect(&s, true).await;
            s.hub.latest.send_replace(Some(Arc::new(status)));
            tokio::time::sleep(EVENT_EVERY).await;
            // Checked under the lock that a new listener takes after
            // subscribing: either it sees the task running, or the task
            // sees it.
            let mut running = lock(&s.hub.running);
            if s.hub.latest.receiver_count() == 0 {
                *running = false;
                return;
            }
        }
    });
}

/// How many consumers a queue should have: those this process runs on
/// it, or one for a queue watched without consuming it here.
pub(super) fn expected_consumers(s: &Shared, queue: &str) -> u32 {
    let local = s
        .consumers
        .iter()
        .filter(|c| c.queue == queue && c.attachment.is_some())
        .count() as u32;
    local.max(1)
}

/// Sets `rabbitry_queue_consumers{queue}` (as the broker counts them) and
/// `rabbitry_consumers_expected{queue}`: one broker query per queue.
pub(super) async fn consumer_gauges(s: &Shared) {
    let mut seen = Vec::new();
    for c in &s.consumers {
        if seen.contains(&c.queue.as_str()) {
            continue;
        }
        seen.push(&c.queue);
        let queue = c.queue.clone();
        metrics::gauge!("rabbitry_consumers_expected", "queue" => queue.clone())
            .set(f64::from(expected_consumers(s, &c.queue)));
        if let Ok(Some(q)) = c.connection.queue_status(&c.queue).await {
            metrics::gauge!("rabbitry_queue_consumers", "queue" => queue)
                .set(f64::from(q.consumers));
        }
    }
}

/// Deliveries per second that `consumer` finished since the last reading
/// (at least half a second ago); `None` before two readings.
fn rate(s: &Shared, consumer: &str, finished: u64) -> Option<f64> {
    let now = Instant::now();
    let mut rates = lock(&s.hub.rates);
    match rates.get(consumer).copied() {
        Some((then, _, rate)) if now.duration_since(then) < Duration::from_millis(500) => rate,
        Some((then, before, _)) => {
            let secs = now.duration_since(then).as_secs_f64();
            let rate = Some(finished.saturating_sub(before) as f64 / secs);
            rates.insert(consumer.to_owned(), (now, finished, rate));
            rate
        }
        None => {
            rates.insert(consumer.to_owned(), (now, finished, None));
            None
        }
    }
}

/// Connections, consumers, outboxes, RPC calls and the last failures;
/// with `with_dead`, the first dead letters of each queue that has any.
pub(super) async fn collect(s: &Shared, with_dead: bool) -> Value {
    let connections: Vec<_> = s
        .connections
        .iter()
        .map(|c| {
            json!({
                "name": c.name(),
                "connected": c.is_connected(),
                "server": c.server(),
                "generation": c.generation(),
                "cancelled_consumers": c.cancelled_consumers(),
                "refused_declarations": c.refused_declarations(),
            })
        })
        .collect();
    let mut consumers = Vec::new();
    let mut dead_letters = Vec::new();
    for c in &s.consumers {
        let queue = c.connection.queue_status(&c.queue).await.ok().flatten();
        let dead = c
            .connection
            .queue_status(&dead::dead_queue_of(&c.queue))
            .await
            .ok()
            .flatten();
        let dead_count = dead.map(|q| q.messages);
        let worker = s.workers.iter().find(|w| w.finished(&c.name).is_some());
        let finished = worker.and_then(|w| w.finished(&c.name));
        consumers.push(json!({
            "name": c.name,
            "queue": c.queue,
            "attached": c.attachment.as_ref().map(|a| a.is_attached()),
            "expected": expected_consumers(s, &c.queue),
            "consumers": queue.as_ref().map(|q| q.consumers),
            "ready": queue.as_ref().map(|q| q.messages),
            "finished": finished,
            "rate": finished.and_then(|n| rate(s, &c.name, n)),
            "last_error": worker.and_then(|w| w.last_failure(&c.name)),
            "dead_letters": dead_count,
        }));
        if with_dead && dead_count.unwrap_or(0) > 0 {
            let letters = dead::list(&c.connection, &c.queue, LETTERS_SHOWN)
                .await
                .unwrap_or_default();
            dead_letters.push(json!({
                "queue": c.queue,
                "dead_letters": letters.iter().map(letter_json).collect::<Vec<_>>(),
            }));
        }
    }
    let outboxes: Vec<_> = outbox_states(s)
        .await
        .into_iter()
        .map(|o| match o.status {
            Ok(f) => json!({ "database": o.database, "pending": f.pending, "oldest_pending_ms": f.oldest_pending_ms, "scheduled": f.scheduled, "failed": f.failed }),
            Err(e) => json!({ "database": o.database, "error": e }),
        })
        .collect();
    let rpc_in_flight: usize = s.rpc.iter().map(|c| c.in_flight()).sum();
    let mut failures: Vec<_> = s.workers.iter().flat_map(|w| w.failures()).collect();
    // Newest first across workers; RFC 3339 times in UTC sort as text.
    failures.sort_by(|a, b| b.at.cmp(&a.at));
    failures.truncate(crate::worker::FAILURES_KEPT);
    json!({
        "connections": connections,
        "consumers": consumers,
        "outboxes": outboxes,
        "rpc_in_flight": rpc_in_flight,
        "failures": failures,
        "dead": dead_letters,
    })
}

/// A dead letter as the page and `/api/dead/{queue}` show it.
pub(super) fn letter_json(d: &dead::DeadLetter) -> Value {
    json!({
        "error": d.error,
        "attempts": d.attempts,
        "original_exchange": d.original_exchange,
        "original_routing_key": d.original_routing_key,
        "failed_at": d.failed_at,
        "message_id": d.properties.message_id,
        "content_type": d.properties.content_type,
        "headers": d.properties.headers,
        "body_len": d.body_len,
        "body": d.body,
    })
}
