//! The admin listener: metrics, health probes, status and dead letters,
//! as an axum [`Router`] that `rabbitry worker --admin ADDR` serves and an
//! application can mount in its own.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text: every `rabbitry_*` metric (see [`crate::meters`]) and the application's own |
//! | `GET /livez` | 200 while the process answers |
//! | `GET /readyz` | 200 while every connection is open and its publishers make progress (no message unconfirmed past its confirm timeout), every consumer is attached as the broker counts it, and every outbox's backlog is under its threshold; else 503 naming what is missing |
//! | `GET /status` | a live HTML page of the same, with the dead letters and Replay and Purge buttons |
//! | `GET /api/status` | the same as JSON: connections, consumers (expected and broker-counted consumers, ready, rate, last error), dead-letter counts, outboxes, RPC calls in flight, the last 50 failures |
//! | `GET /api/events` | server-sent events: the status with the dead letters, every second, read once for all listeners |
//! | `GET /api/dead/{queue}` | the dead letters of a consumer's queue (`?limit=N`, at most [`MAX_DEAD_PAGE`]), with their reasons; their bodies only with the token |
//! | `POST /api/dead/{queue}/replay` | sends dead letters back to their queue: all, `{"count": N}` or `{"message_ids": [...]}` (needs the token) |
//! | `POST /api/dead/{queue}/purge` | deletes them, or the oldest `{"count": N}` (needs the token) |
//!
//! Changes need `Authorization: Bearer TOKEN`; without it the answer is
//! 401 and nothing changes. The token is given ([`Admin::token`]), or read
//! from `RABBITRY_ADMIN_TOKEN`, or made up at start and logged once.
//!
//! A request for the status page or its API (`/status`, `/api/...`) whose
//! `Host` is a name other than `localhost` or one given
//! ([`Admin::allowed_host`], `RABBITRY_ADMIN_HOSTS`) is refused with 421:
//! a web page elsewhere cannot read them through DNS rebinding. An IP
//! address as the host is always accepted; `/metrics` and the probes
//! answer any host (scrapers and load balancers use names).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};
use serde::Deserialize;
use serde_json::json;

use crate::connection::Connection;
use crate::rpc::RpcClient;
use crate::worker::WorkerMetrics;
use crate::worker::{dead, RunningWorker, WorkerConsumer};

mod status;

/// Histogram buckets for every `*_seconds` metric: 100 µs to 60 s.
const BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    15.0, 60.0,
];

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often the recorder's histogram buffers are drained.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs a Prometheus recorder as the process's `metrics` recorder, once,
/// and returns its handle; `None` when the application installed another
/// recorder first (then it serves its own metrics). Call it before
/// connections and workers start: handles made before any recorder record
/// nothing.
pub fn install_prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let recorder = prometheus_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => {
                    spawn_upkeep(&handle);
                    Some(handle)
                }
                Err(_) => {
                    tracing::warn!("a metrics recorder is already installed; /metrics serves nothing of rabbitry's");
                    None
                }
            }
        })
        .clone()
}

/// A Prometheus recorder with rabbitry's histogram buckets (100 µs to
/// 60 s), for an application that installs it itself (wrapped, or in a
/// fan-out with others); [`install_prometheus`] is the usual way.
pub fn prometheus_recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets(&BUCKETS)
        .expect("the buckets are not empty")
        .build_recorder()
}

/// Drains the recorder's histogram buffers every few seconds, scraped or
/// not, so that memory stays bounded; [`install_prometheus`] does this.
pub fn spawn_upkeep(handle: &PrometheusHandle) {
    let upkeep = handle.clone();
    let _ = std::thread::Builder::new()
        .name("rabbitry-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_EVERY);
            upkeep.run_upkeep();
        });
}

/// The outbox backlog at which `/readyz` says "not ready", unless set
/// with [`Admin::outbox_threshold`].
pub const DEFAULT_OUTBOX_THRESHOLD: i64 = 10_000;

#[cfg(any(feature = "sqlite", feature = "postgres"))]
type Outboxes = Vec<crate::outbox::Outbox>;
#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
type Outboxes = Vec<()>;

/// What the admin routes look at.
#[derive(Debug, Clone)]
pub struct Admin {
    connections: Vec<Connection>,
    consumers: Vec<WorkerConsumer>,
    workers: Vec<Arc<WorkerMetrics>>,
    rpc: Vec<RpcClient>,
    outboxes: Outboxes,
    outbox_threshold: i64,
    token: Option<String>,
    hosts: Vec<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            connections: Vec::new(),
            consumers: Vec::new(),
            workers: Vec::new(),
            rpc: Vec::new(),
            outboxes: Vec::new(),
            outbox_threshold: DEFAULT_OUTBOX_THRESHOLD,
            token: None,
            hosts: Vec::new(),
        }
    }
}

struct Shared {
    connections: Vec<Connection>,
    consumers: Vec<WorkerConsumer>,
    workers: Vec<Arc<WorkerMetrics>>,
    rpc: Vec<RpcClient>,
    /// One status for every open page, refreshed by one task.
    hub: status::Hub,
    // Read only where a database feature gives outboxes.
    #[cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]
    outboxes: Outboxes,
    outbox_threshold: i64,
    token: String,
    prometheus: Option<PrometheusHandle>,
}

impl Admin {
    /// Nothing to look at yet.
    pub fn new() -> Admin {
        Admin::default()
    }

    /// Watches `conn` (readiness: it must be open).
    pub fn connection(mut self, conn: &Connection) -> Admin {
        if !self.connections.iter().any(|c| c.same_as(conn)) {
            self.connections.push(conn.clone());
        }
        self
    }

    /// Watches a worker's consumers, their connections and the outbox it
    /// relays.
    pub fn worker(mut self, worker: &RunningWorker) -> Admin {
        for c in worker.consumers() {
            self = self.connection(&c.connection);
            self.consumers.push(c.clone());
        }
        self.workers.push(worker.metrics());
        #[cfg(any(feature = "sqlite", feature = "postgres"))]
        if let Some(outbox) = worker.outbox() {
            self = self.outbox(outbox);
        }
        self
    }

    /// Watches a queue consumed elsewhere (another process, another
    /// host): its ready messages, consumers and dead letters; `/readyz`
    /// asks the broker for at least one consumer.
    pub fn queue(mut self, name: &str, queue: &str, conn: &Connection) -> Admin {
        self = self.connection(conn);
        self.consumers.push(WorkerConsumer {
            name: name.to_owned(),
            queue: queue.to_owned(),
            connection: conn.clone(),
            attachment: None,
        });
        self
    }

    /// Counts an RPC client's calls in flight in the status.
    pub fn rpc(mut self, client: &RpcClient) -> Admin {
        self.rpc.push(client.clone());
        self
    }

    /// Watches an outbox: its backlog, oldest age and failed rows go to
    /// `/metrics` and the status, and `/readyz` fails while the backlog is
    /// at or over the threshold.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub fn outbox(mut self, outbox: &crate::outbox::Outbox) -> Admin {
        self.outboxes.push(outbox.clone());
        self
    }

    /// The backlog at which an outbox makes `/readyz` fail
    /// ([`DEFAULT_OUTBOX_THRESHOLD`] unless set).
    pub fn outbox_threshold(mut self, rows: i64) -> Admin {
        self.outbox_threshold = rows;
        self
    }

    /// The token that changes need. Unset: `RABBITRY_ADMIN_TOKEN`, else a
    /// new one, logged once.
    pub fn token(mut self, token: impl Into<String>) -> Admin {
        self.token = Some(token.into());
        self
    }

    /// A host name (as in the `Host` header, without the port) the routes
    /// answer besides `localhost` and IP addresses: the name the listener
    /// is reached by behind a proxy, say.
    pub fn allowed_host(mut self, host: impl Into<String>) -> Admin {
        self.hosts.push(host.into().to_ascii_lowercase());
        self
    }

    /// The routes. Installs the Prometheus recorder if nothing did.
    pub fn router(self) -> Router {
        let mut hosts = self.hosts;
        if let Ok(list) = std::env::var("RABBITRY_ADMIN_HOSTS") {
            hosts.extend(
                list.split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty()),
            );
        }
        let hosts: Arc<[String]> = hosts.into();
        let token = self
            .token
            .or_else(|| std::env::var("RABBITRY_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| {
                let token = uuid::Uuid::new_v4().simple().to_string();
                tracing::warn!(%token, "admin: no token set (RABBITRY_ADMIN_TOKEN); replay and purge need this one");
                token
            });
        let shared = Arc::new(Shared {
            connections: self.connections,
            consumers: self.consumers,
            workers: self.workers,
            rpc: self.rpc,
            hub: status::Hub::default(),
            outboxes: self.outboxes,
            outbox_threshold: self.outbox_threshold,
            token,
            prometheus: install_prometheus(),
        });
        // What browsers read (the page and its API) answers only the hosts
        // it knows; probes and metrics, read by machines by any name, do not
        // care.
        let pages = Router::new()
            .route("/status", get(status_page))
            .route("/api/status", get(status))
            .route("/api/events", get(status::events))
            .route("/api/dead/{queue}", get(dead_list))
            .route("/api/dead/{queue}/{action}", post(dead_change))
            .layer(axum::middleware::from_fn(move |req, next| {
                check_host(hosts.clone(), req, next)
            }));
        Router::new()
            .route("/metrics", get(metrics_text))
            .route("/livez", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .merge(pages)
            .with_state(shared)
    }
}

/// Refuses a request whose `Host` names a host this listener was not told
/// about (DNS rebinding: a page on another site whose name now points
/// here). IP addresses and `localhost` are accepted.
async fn check_host(
    hosts: Arc<[String]>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if host_allowed(host, &hosts) {
        next.run(req).await
    } else {
        (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({ "error": format!(
                "host '{}' is not one this admin listener answers; add it with Admin::allowed_host or RABBITRY_ADMIN_HOSTS",
                crate::limits::shorten(host, 80)
            ) })),
        )
            .into_response()
    }
}

fn host_allowed(host: &str, allowed: &[String]) -> bool {
    // The name without the port; an IPv6 address keeps its brackets.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !name.ends_with(':') => {
            name
        }
        _ => host,
    }
    .to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    // No Host at all: not a browser.
    name.is_empty()
        || bare.parse::<std::net::IpAddr>().is_ok()
        || name == "localhost"
        || allowed.contains(&name)
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    // The outbox is read when scraped: a query per scrape, none per row.
    for o in outbox_states(&s).await {
        if let Ok(status) = &o.status {
            let database = o.database.clone();
            metrics::gauge!("rabbitry_outbox_backlog", "database" => database.clone())
                .set(status.pending as f64);
            metrics::gauge!("rabbitry_outbox_oldest_seconds", "database" => database.clone())
                .set(status.oldest_pending_ms.unwrap_or(0) as f64 / 1000.0);
            metrics::gauge!("rabbitry_outbox_scheduled", "database" => database.clone())
                .set(status.scheduled as f64);
            metrics::gauge!("rabbitry_outbox_failed", "database" => database)
                .set(status.failed.len() as f64);
        }
    }
    status::consumer_gauges(&s).await;
    let body = s
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// One outbox's status as read now.
struct OutboxState {
    database: String,
    status: std::result::Result<OutboxFigures, String>,
}

/// What the admin shows of an outbox.
#[derive(serde::Serialize)]
struct OutboxFigures {
    pending: i64,
    oldest_pending_ms: Option<i64>,
    scheduled: i64,
    failed: Vec<String>,
}

#[cfg(any(feature = "sqlite", feature = "postgres"))]
async fn outbox_states(s: &Shared) -> Vec<OutboxState> {
    let mut states = Vec::new();
    for o in &s.outboxes {
        let status = o
            .status()
            .await
            .map_err(|e| e.to_string())
            .map(|st| OutboxFigures {
                pending: st.pending,
                oldest_pending_ms: st.oldest_pending_ms,
                scheduled: st.scheduled,
                failed: st
                    .failed
                    .iter()
                    .map(|f| {
                        format!(
                            "row {}: {}",
                            f.id,
                            f.error.as_deref().unwrap_or("no reason")
                        )
                    })
                    .collect(),
            });
        states.push(OutboxState {
            database: o.url().to_owned(),
            status,
        });
    }
    states
}

#[cfg(not(any(feature = "sqlite", feature = "postgres")))]
async fn outbox_states(_: &Shared) -> Vec<OutboxState> {
    Vec::new()
}

/// What is missing for readiness; empty when ready.
async fn missing(s: &Shared) -> Vec<String> {
    let mut missing = Vec::new();
    for o in outbox_states(s).await {
        match o.status {
            Ok(f) if f.pending >= s.outbox_threshold => missing.push(format!(
                "outbox {}: backlog of {} rows, at or over its threshold of {}",
                o.database, f.pending, s.outbox_threshold
            )),
            Ok(_) => {}
            Err(e) => missing.push(format!("outbox {}: cannot read it: {e}", o.database)),
        }
    }
    for c in &s.connections {
        if !c.is_connected() {
            missing.push(format!("connection '{}' is down", c.name()));
        } else if let Some(waited) = c.publisher_stalled() {
            missing.push(format!(
                "connection '{}': a publisher's oldest message has waited {:.1}s for the broker's confirm",
                c.name(),
                waited.as_secs_f64()
            ));
        }
    }
    for c in &s.consumers {
        if c.attachment.as_ref().is_some_and(|a| !a.is_attached()) {
            missing.push(format!(
                "consumer '{}' is not attached to queue '{}'",
                c.name, c.queue
            ));
            continue;
        }
        // Local state can be wrong; ask the broker.
        let expected = status::expected_consumers(s, &c.queue);
        match c.connection.queue_status(&c.queue).await {
            Ok(Some(q)) if q.consumers >= expected => {}
            Ok(Some(q)) => missing.push(format!(
                "consumer '{}': the broker counts {} consumer(s) on queue '{}', {expected} expected",
                c.name, q.consumers, c.queue
            )),
            Ok(None) => missing.push(format!(
                "consumer '{}': queue '{}' does not exist",
                c.name, c.queue
            )),
            Err(e) => missing.push(format!("consumer '{}': cannot ask the broker: {e}", c.name)),
        }
    }
    missing
}

async fn readyz(State(s): State<Arc<Shared>>) -> Response {
    let missing = missing(&s).await;
    if missing.is_empty() {
        (StatusCode::OK, Json(json!({ "ready": true }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "ready": false, "missing": missing })),
        )
            .into_response()
    }
}

async fn status(State(s): State<Arc<Shared>>) -> Response {
    Json(status::collect(&s, false).await).into_response()
}

/// The status page: static HTML whose script follows `/api/events`, and
/// puts every value in as text.
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("admin/status.html"),
    )
        .into_response()
}

/// The consumer whose queue is `queue`: only those are served.
fn consumer_of<'a>(s: &'a Shared, queue: &str) -> Option<&'a WorkerConsumer> {
    s.consumers.iter().find(|c| c.queue == queue)
}

fn not_served(queue: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no consumer here reads queue '{queue}'") })),
    )
        .into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(json!({ "error": "this needs Authorization: Bearer TOKEN (RABBITRY_ADMIN_TOKEN)" })),
    )
        .into_response()
}

/// Whether the request carries the token.
fn authorized(s: &Shared, headers: &HeaderMap) -> bool {
    // The scheme is case-insensitive (RFC 9110).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .unwrap_or_default();
    // The same time whatever the first differing byte.
    given.len() == s.token.len()
        && given
            .bytes()
            .zip(s.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn failed(e: crate::Error) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        Json(json!({ "error": e.to_string() })),
    )
        .into_response()
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
    count: Option<usize>,
}

/// The JSON body a replay may carry: how many, or which.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    count: Option<usize>,
    message_ids: Option<Vec<String>>,
}

/// The most dead letters one `GET /api/dead/{queue}` lists: each is held
/// (unacknowledged) and kept in memory until the page is sent.
pub const MAX_DEAD_PAGE: usize = 200;

async fn dead_list(
    State(s): State<Arc<Shared>>,
    Path(queue): Path<String>,
    Query(q): Query<Limit>,
    headers: HeaderMap,
) -> Response {
    let Some(c) = consumer_of(&s, &queue) else {
        return not_served(&queue);
    };
    let limit = q.limit.unwrap_or(100).min(MAX_DEAD_PAGE);
    let bodies = authorized(&s, &headers);
    match dead::list(&c.connection, &queue, limit).await {
        Ok(letters) => {
            let letters: Vec<_> = letters
                .iter()
                .map(|d| {
                    let mut letter = status::letter_json(d);
                    if !bodies {
                        letter["body"] = serde_json::Value::Null;
                    }
                    letter
                })
                .collect();
            Json(json!({
                "queue": queue,
                "limit": limit,
                "bodies": if bodies { "shown" } else { "hidden: they need Authorization: Bearer TOKEN" },
                "dead_letters": letters,
            }))
            .into_response()
        }
        Err(e) => failed(e),
    }
}

/// `POST /api/dead/{queue}/replay` and `/purge`, behind the token.
async fn dead_change(
    State(s): State<Arc<Shared>>,
    Path((queue, action)): Path<(String, String)>,
    Query(q): Query<Limit>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&s, &headers) {
        return unauthorized();
    }
    let Some(c) = consumer_of(&s, &queue) else {
        return not_served(&queue);
    };
    let which: ReplayBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({ "error": format!("the body is not {{\"count\": N}} or {{\"message_ids\": [...]}}: {e}") })),
                )
                    .into_response()
            }
        }
    };
    let done = match action.as_str() {
        "replay" => match which.message_ids {
            Some(ids) => dead::replay_ids(&c.connection, &queue, &ids).await,
            None => {
                let count = which.count.or(q.count).unwrap_or(usize::MAX);
                dead::replay(&c.connection, &queue, count).await
            }
        }
        .map(|n| json!({ "queue": queue, "replayed": n })),
        "purge" => match (which.message_ids, which.count.or(q.count)) {
            (Some(_), _) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({ "error": "purge takes {\"count\": N} (the oldest N) or nothing (all); message_ids are for replay" })),
                )
                    .into_response()
            }
            (None, Some(count)) => dead::purge_oldest(&c.connection, &queue, count)
                .await
                .map(|n| json!({ "queue": queue, "purged": n })),
            (None, None) => dead::purge(&c.connection, &queue)
                .await
                .map(|n| json!({ "queue": queue, "purged": n })),
        },
        _ => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no action '{action}': replay or purge") })),
            )
                .into_response()
        }
    };
    match done {
        Ok(v) => Json(v).into_response(),
        Err(e) => failed(e),
    }
}
