//! A site's web process: the HTTP API and the page. Creating a document
//! writes, in one transaction, the document, the seed's render request
//! (through the outbox, with its context stored for the durable reply) and
//! a slower word-count job. The process relays its outbox itself.
//!
//! The page works without JavaScript: the server renders the documents and
//! the feed, the form posts and redirects back, and a failed document has a
//! Retry render form. With JavaScript, it follows the site live and patches
//! rows in place.

use std::sync::Arc;

use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Json, Router};
use rabbitry::outbox::{self, Database, Outbox};
use rabbitry::rpc::durable;
use rabbitry::{Connection, Message, Serializer};
use serde::Deserialize;

use crate::db::{self, db_err, with_db, Document, FeedEvent};
use crate::names::{self, Names};

/// How long a document may be pending before the page says what it waits
/// for.
const WAITING_HINT_AFTER_MS: i64 = 3_000;

/// What a web process needs.
#[derive(Clone, Debug)]
pub struct Site {
    /// `a` or `b`.
    pub site: String,
    /// Its database.
    pub db: Database,
    /// Its outbox (same database).
    pub outbox: Outbox,
    /// Queue and key names.
    pub names: Arc<Names>,
    /// The broker, asked what a pending document waits for.
    pub conn: Connection,
    /// Becomes true when the process stops: open event streams end, so
    /// that the server can stop at once.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

/// The site's routes, under `/sites/{site}`.
pub fn router(site: Site) -> Router {
    let base = format!("/sites/{}", site.site);
    let shared = Feed::start(site.clone());
    Router::new()
        .route(&format!("{base}/"), get(page))
        .route(&base, get(page))
        .route(&format!("{base}/documents"), post(create).get(list))
        .route(&format!("{base}/documents/{{id}}"), get(show))
        .route(&format!("{base}/documents/{{id}}/pdf"), get(pdf))
        .route(&format!("{base}/documents/{{id}}/retry"), post(retry))
        .route(&format!("{base}/feed"), get(feed))
        .route(&format!("{base}/events"), get(events))
        .route(&format!("{base}/broker"), get(broker))
        .with_state(site)
        .layer(Extension(shared))
}

#[derive(Deserialize)]
struct NewDocument {
    title: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct NewDocumentForm {
    title: Option<String>,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn internal(e: rabbitry::Error) -> Response {
    tracing::error!(error = %e, "request failed");
    problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

/// Whether the request is a plain HTML form post (the page without
/// JavaScript), which is answered with a redirect or a page.
fn is_form(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"))
}

/// The title, checked: non-empty, at most 200 characters.
fn checked_title(title: Option<&str>) -> Result<String, &'static str> {
    match title.map(str::trim) {
        Some(t) if !t.is_empty() && t.chars().count() <= 200 => Ok(t.to_owned()),
        _ => Err("`title` must be a non-empty string of at most 200 characters"),
    }
}

async fn create(State(s): State<Site>, req: Request) -> Response {
    if is_form(&req) {
        let typed = match Form::<NewDocumentForm>::from_request(req, &()).await {
            Ok(Form(f)) => f.title.unwrap_or_default(),
            Err(_) => String::new(),
        };
        return match checked_title(Some(&typed)) {
            Ok(title) => match create_document(&s, &title).await {
                Ok(_) => Redirect::to(&format!("/sites/{}/", s.site)).into_response(),
                Err(e) => {
                    tracing::error!(error = %e, "creating a document failed");
                    render_page(
                        &s,
                        Some(&e.to_string()),
                        &typed,
                        StatusCode::SERVICE_UNAVAILABLE,
                    )
                    .await
                }
            },
            Err(why) => render_page(&s, Some(why), &typed, StatusCode::BAD_REQUEST).await,
        };
    }
    let Ok(Json(doc)) = Json::<NewDocument>::from_request(req, &()).await else {
        return problem(
            StatusCode::BAD_REQUEST,
            "expected a JSON body like {\"title\": \"...\"}",
        );
    };
    let title = match &doc.title {
        Some(serde_json::Value::String(t)) => checked_title(Some(t)),
        _ => checked_title(None),
    };
    let title = match title {
        Ok(t) => t,
        Err(why) => return problem(StatusCode::BAD_REQUEST, why),
    };
    match create_document(&s, &title).await {
        Ok((id, correlation_id)) => (
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "id": id, "correlation_id": correlation_id })),
        )
            .into_response(),
        Err(e) => internal(e),
    }
}

/// The seed's render request for `title`, with `document_id` as the
/// context its durable reply finds.
fn render_request(s: &Site, title: &str) -> rabbitry::Result<Message> {
    Ok(
        Message::encode(Serializer::Msgpack, &serde_json::json!({ "title": title }))?
            .exchange(names::TASKS_EXCHANGE)
            .routing_key(names::TEMPLATE_KEY)
            .reply_to(s.names.results_queue(&s.site)),
    )
}

/// The document, the seed's request and the slow job, in one transaction.
async fn create_document(s: &Site, title: &str) -> rabbitry::Result<(String, String)> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let request = render_request(s, title)?;
    let job = Message::encode(
        Serializer::Json,
        &serde_json::json!({ "document_id": id, "title": title }),
    )?
    .routing_key(s.names.jobs_queue(&s.site));
    let context = serde_json::json!({ "document_id": id });
    let now = rabbitry::clock::now_millis();
    let correlation_id = with_db!(&s.db, |pool, sql| {
        let mut tx = pool.begin().await.map_err(|e| db_err("begin", e))?;
        let correlation_id = durable::send(&mut *tx, "render", &context, request).await?;
        sqlx::query(sql(
            "INSERT INTO documents (id, title, status, correlation_id, created_at) VALUES ($1, $2, 'pending', $3, $4)",
        ))
        .bind(&id)
        .bind(title)
        .bind(&correlation_id)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("inserting a document", e))?;
        outbox::publish(&mut *tx, job).await?;
        s.outbox.commit(tx).await?;
        correlation_id
    });
    Ok((id, correlation_id))
}

/// Sends the render request again for a document that failed (or waits):
/// a new request with a new correlation id, in one transaction with the
/// document's update. Answered with 202 (JSON) or a redirect (a form).
async fn retry(State(s): State<Site>, Path(id): Path<String>, req: Request) -> Response {
    let form = is_form(&req);
    let done = retry_document(&s, &id).await;
    match (done, form) {
        (Ok(true), true) => Redirect::to(&format!("/sites/{}/", s.site)).into_response(),
        (Ok(true), false) => {
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id }))).into_response()
        }
        (Ok(false), _) => problem(StatusCode::NOT_FOUND, format!("no document {id}")),
        (Err(e), _) => internal(e),
    }
}

async fn retry_document(s: &Site, id: &str) -> rabbitry::Result<bool> {
    let context = serde_json::json!({ "document_id": id });
    with_db!(&s.db, |pool, sql| {
        let mut tx = pool.begin().await.map_err(|e| db_err("begin", e))?;
        let title: Option<String> =
            sqlx::query_scalar(sql("SELECT title FROM documents WHERE id = $1"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| db_err("reading a document", e))?;
        let Some(title) = title else {
            return Ok(false);
        };
        let request = render_request(s, &title)?;
        let correlation_id = durable::send(&mut *tx, "render", &context, request).await?;
        sqlx::query(sql(
            "UPDATE documents SET status = 'pending', correlation_id = $2, error = NULL, created_at = $3 WHERE id = $1",
        ))
        .bind(id)
        .bind(&correlation_id)
        .bind(rabbitry::clock::now_millis())
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("retrying a document", e))?;
        s.outbox.commit(tx).await?;
        Ok(true)
    })
}

/// Says what documents pending for a while wait for, as the broker sees
/// it: the PDF service's queue, or the site's results queue.
async fn explain_waiting(s: &Site, docs: &mut [Document]) {
    let now = rabbitry::clock::now_millis();
    let waiting: Vec<&mut Document> = docs
        .iter_mut()
        .filter(|d| d.status == "pending" && now - d.created_at > WAITING_HINT_AFTER_MS)
        .collect();
    if waiting.is_empty() {
        return;
    }
    let mut hints = Vec::new();
    for (what, queue) in [
        ("the PDF service", s.names.service_queue()),
        ("the site worker", s.names.results_queue(&s.site)),
    ] {
        let said = match s.conn.queue_status(&queue).await {
            Ok(Some(q)) => format!(
                "{} ready on {queue}, {} consumer{} ({what})",
                q.messages,
                q.consumers,
                if q.consumers == 1 { "" } else { "s" }
            ),
            Ok(None) => format!("{queue} does not exist ({what} is not running)"),
            Err(e) => format!("the broker cannot be asked about {queue}: {e}"),
        };
        hints.push(said);
    }
    let hint = format!("waiting: {}", hints.join("; "));
    for d in waiting {
        d.waiting = Some(hint.clone());
    }
}

async fn list(State(s): State<Site>) -> Response {
    match db::list_documents(&s.db, &s.site).await {
        Ok(mut docs) => {
            explain_waiting(&s, &mut docs).await;
            Json(docs).into_response()
        }
        Err(e) => internal(e),
    }
}

async fn show(State(s): State<Site>, Path(id): Path<String>) -> Response {
    match db::get_document(&s.db, &s.site, &id).await {
        Ok(Some(d)) => {
            let mut docs = [d];
            explain_waiting(&s, &mut docs).await;
            let [d] = docs;
            Json(d).into_response()
        }
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no document {id}")),
        Err(e) => internal(e),
    }
}

async fn pdf(State(s): State<Site>, Path(id): Path<String>) -> Response {
    match db::get_pdf(&s.db, &id).await {
        Ok(Some((bytes, title))) => (
            [
                (header::CONTENT_TYPE, "application/pdf".to_owned()),
                (header::CONTENT_DISPOSITION, content_disposition(&title)),
            ],
            bytes,
        )
            .into_response(),
        Ok(None) => problem(
            StatusCode::NOT_FOUND,
            format!("no PDF for document {id} (yet)"),
        ),
        Err(e) => internal(e),
    }
}

/// `inline; filename="<title>.pdf"`: a plain ASCII name for every browser
/// and file system (quotes, slashes, `<>:|?*` and non-ASCII become `_`),
/// and the exact title in
/// `filename*` (RFC 6266, percent-encoded UTF-8).
fn content_disposition(title: &str) -> String {
    let name: String = title.chars().take(100).collect();
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || " -_.,()[]!'+=&@#".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = format!("{name}.pdf")
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!(
        "inline; filename=\"{}.pdf\"; filename*=UTF-8''{encoded}",
        ascii.trim()
    )
}

async fn feed(State(s): State<Site>) -> Response {
    match db::list_feed(&s.db).await {
        Ok(events) => Json(events).into_response(),
        Err(e) => internal(e),
    }
}

/// One queue of the broker panel, as the broker counts it.
#[derive(Debug, Clone, serde::Serialize)]
struct QueueFigures {
    /// What it is for.
    role: &'static str,
    /// Its name.
    queue: String,
    /// Messages ready (`None`: the queue does not exist).
    ready: Option<u32>,
    /// Consumers.
    consumers: Option<u32>,
    /// Messages waiting in its delay queues for another attempt.
    retrying: u32,
    /// Messages in its dead-letter queue.
    dead: u32,
}

/// The broker panel: the site's queues and the PDF service's, and the
/// site's outbox.
async fn broker_figures(s: &Site) -> serde_json::Value {
    let queues = [
        ("PDF service requests", s.names.service_queue()),
        ("replies to this site", s.names.results_queue(&s.site)),
        ("word-count jobs", s.names.jobs_queue(&s.site)),
        ("the other site's events", s.names.feed_queue(&s.site)),
    ];
    let depth = |q: Option<rabbitry::QueueStatus>| q.map_or(0, |q| q.messages);
    let mut out = Vec::new();
    for (role, queue) in queues {
        let status = s.conn.queue_status(&queue).await.ok().flatten();
        let mut retrying = 0;
        for delay in rabbitry::worker::Retry::default().delays {
            let q = rabbitry::worker::retry::retry_queue(&queue, delay);
            retrying += depth(s.conn.queue_status(&q).await.ok().flatten());
        }
        let dead_queue = rabbitry::worker::dead::dead_queue_of(&queue);
        let dead = depth(s.conn.queue_status(&dead_queue).await.ok().flatten());
        out.push(QueueFigures {
            role,
            queue,
            ready: status.as_ref().map(|q| q.messages),
            consumers: status.as_ref().map(|q| q.consumers),
            retrying,
            dead,
        });
    }
    let outbox = match s.outbox.status().await {
        Ok(o) => serde_json::json!({ "pending": o.pending, "failed": o.failed.len() }),
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    serde_json::json!({ "queues": out, "outbox": outbox })
}

async fn broker(State(s): State<Site>) -> Response {
    Json(broker_figures(&s).await).into_response()
}

/// How often a page's event stream looks for changes.
const EVENTS_EVERY: std::time::Duration = std::time::Duration::from_millis(500);
/// How often it asks the broker for the panel's figures.
const BROKER_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The site's state as the pages show it (documents, feed, broker panel),
/// read by one task for every open page: a hundred pages cost what one
/// does. The task reads only while a page listens.
#[derive(Clone)]
struct Feed {
    latest: Arc<tokio::sync::watch::Sender<Option<Arc<str>>>>,
    /// Wakes the task when a page arrives, so that it needs no wait.
    wake: Arc<tokio::sync::Notify>,
}

impl Feed {
    fn start(site: Site) -> Feed {
        let feed = Feed {
            latest: Arc::new(tokio::sync::watch::channel(None).0),
            wake: Arc::new(tokio::sync::Notify::new()),
        };
        tokio::spawn(feed.clone().refresh(site));
        feed
    }

    /// Every half second while a page listens: the site's state, sent on
    /// when it changed. Ends when the site stops.
    async fn refresh(self, mut s: Site) {
        let mut broker: Option<(std::time::Instant, serde_json::Value)> = None;
        loop {
            if *s.stopping.borrow() {
                return;
            }
            if self.latest.receiver_count() > 0 {
                let mut docs = db::list_documents(&s.db, &s.site).await.unwrap_or_default();
                explain_waiting(&s, &mut docs).await;
                let feed = db::list_feed(&s.db).await.unwrap_or_default();
                if broker
                    .as_ref()
                    .is_none_or(|(at, _)| at.elapsed() >= BROKER_EVERY)
                {
                    broker = Some((std::time::Instant::now(), broker_figures(&s).await));
                }
                let figures = broker.as_ref().map(|(_, b)| b.clone());
                let snapshot: Arc<str> =
                    serde_json::json!({ "documents": docs, "feed": feed, "broker": figures })
                        .to_string()
                        .into();
                self.latest.send_if_modified(|latest| {
                    let changed = latest.as_deref() != Some(&*snapshot);
                    if changed {
                        *latest = Some(snapshot);
                    }
                    changed
                });
            } else {
                // Nobody listens: the next page gets a fresh reading.
                broker = None;
                self.latest.send_replace(None);
            }
            tokio::select! {
                _ = tokio::time::sleep(EVENTS_EVERY) => {}
                _ = self.wake.notified() => {}
                _ = s.stopping.changed() => return,
            }
        }
    }
}

/// `GET /sites/{site}/events`: server-sent events, each the site's
/// documents and feed, sent when they change (the page patches its rows
/// from them), with a keep-alive; a lost page reconnects within a second.
async fn events(State(s): State<Site>, Extension(feed): Extension<Feed>) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let mut latest = feed.latest.subscribe();
    feed.wake.notify_one();
    // What others already see goes out at once.
    latest.mark_changed();
    let state = (latest, s.stopping.clone(), true);
    let stream =
        futures_util::stream::unfold(state, |(mut latest, mut stopping, first)| async move {
            loop {
                if *stopping.borrow() {
                    return None;
                }
                tokio::select! {
                    changed = latest.changed() => changed.ok()?,
                    _ = stopping.changed() => return None,
                }
                let Some(snapshot) = latest.borrow_and_update().clone() else {
                    continue;
                };
                let mut event = Event::default().event("site").data(&*snapshot);
                if first {
                    event = event.retry(std::time::Duration::from_millis(1000));
                }
                return Some((
                    Ok::<_, std::convert::Infallible>(event),
                    (latest, stopping, false),
                ));
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(2)))
        .into_response()
}

async fn page(State(s): State<Site>) -> Response {
    render_page(&s, None, "", StatusCode::OK).await
}

/// Text made safe for HTML (content and attribute values).
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Never a `{{...}}` placeholder of the page template.
            '{' => out.push_str("&#123;"),
            c => out.push(c),
        }
    }
    out
}

/// One document's row, as the server renders it (the page's script
/// renders the same markup).
fn document_row(site: &str, d: &Document) -> String {
    let mut details = format!(
        "<div class=\"muted\">{} · words: {}</div>",
        esc(&d.id),
        d.words.map_or("counting…".to_owned(), |w| w.to_string())
    );
    if let Some(e) = &d.error {
        details.push_str(&format!("<div class=\"why\">{}</div>", esc(e)));
    }
    if let Some(m) = &d.missing {
        details.push_str(&format!(
            "<div class=\"muted\">not in the PDF's font, left out: {}</div>",
            esc(m)
        ));
    }
    if let Some(w) = &d.waiting {
        details.push_str(&format!("<div class=\"hint\">{}</div>", esc(w)));
    }
    details.push_str(&timeline_html(site, d));
    let action = match (&d.pdf_url, d.status.as_str()) {
        (Some(url), _) => format!("<a href=\"{}\" target=\"_blank\">PDF</a>", esc(url)),
        (None, "failed") => format!(
            "<form method=\"post\" action=\"/sites/{site}/documents/{}/retry\" class=\"retry\"><button>Retry render</button></form>",
            esc(&d.id)
        ),
        _ => String::new(),
    };
    format!(
        "<tr id=\"doc-{id}\" data-status=\"{status}\"><td><strong class=\"title\">{title}</strong>{details}</td><td><span class=\"badge {status}\">{status}</span></td><td>{action}</td></tr>",
        id = esc(&d.id),
        status = esc(&d.status),
        title = esc(&d.title),
    )
}

/// `HH:MM:SS.mmm` (UTC) of epoch milliseconds.
fn clock_time(ms: i64) -> String {
    let t = rabbitry::clock::rfc3339(rabbitry::clock::time_of(ms));
    t.get(11..23).unwrap_or_default().to_owned()
}

/// The document's trip, step by step, each with its time and its latency
/// from the step before; the other site's two steps come from its feed
/// (the page's script fills them in).
fn timeline_html(site: &str, d: &Document) -> String {
    let t = &d.timeline;
    let steps: [(String, Option<i64>); 5] = [
        ("committed with its outbox row".into(), Some(t.committed)),
        (
            format!(
                "published to service.tasks, correlation id {}",
                d.correlation_id
            ),
            t.published,
        ),
        ("rendered by the PDF service".into(), t.rendered),
        (
            format!("reply routed through service.results to site {site}'s results queue"),
            t.routed,
        ),
        ("stored by the site worker".into(), t.stored),
    ];
    let mut out = String::from("<ol class=\"timeline\">");
    let mut before: Option<i64> = None;
    for (label, at) in steps {
        let when = match at {
            Some(at) => {
                let delta = before.map_or(String::new(), |b| format!(" (+{} ms)", at - b));
                before = Some(at);
                format!("{}{delta}", clock_time(at))
            }
            None => "…".to_owned(),
        };
        out.push_str(&format!(
            "<li><span class=\"at\">{when}</span> {}</li>",
            esc(&label)
        ));
    }
    out.push_str("</ol>");
    out
}

/// A queue of the broker panel (the page's script makes the same).
fn queue_row(q: &serde_json::Value) -> String {
    let number = |k: &str| q[k].as_u64().map_or("–".to_owned(), |n| n.to_string());
    let flag = |bad: bool| if bad { "bad" } else { "" };
    format!(
        "<tr><td title=\"{role}\">{queue}<div class=\"muted\">{role}</div></td><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
        number("ready"),
        flag(q["consumers"].as_u64() == Some(0)),
        number("consumers"),
        number("retrying"),
        flag(q["dead"].as_u64().unwrap_or(0) > 0),
        number("dead"),
        role = esc(q["role"].as_str().unwrap_or_default()),
        queue = esc(q["queue"].as_str().unwrap_or_default()),
    )
}

/// The outbox's line of the broker panel.
fn outbox_line(o: &serde_json::Value) -> String {
    match o["error"].as_str() {
        Some(e) => format!("outbox: {e}"),
        None => format!(
            "outbox: {} waiting to be published, {} failed",
            o["pending"], o["failed"]
        ),
    }
}

fn feed_item(e: &FeedEvent) -> String {
    format!(
        "<li><strong class=\"title\">{}</strong><div class=\"muted\">rendered on site {}</div></li>",
        esc(&e.title),
        esc(&e.from_site)
    )
}

/// The page with the documents and the feed rendered in, an error to show
/// and the title the user typed (kept when the form failed).
async fn render_page(s: &Site, error: Option<&str>, typed: &str, status: StatusCode) -> Response {
    let mut docs = db::list_documents(&s.db, &s.site).await.unwrap_or_default();
    explain_waiting(s, &mut docs).await;
    let feed = db::list_feed(&s.db).await.unwrap_or_default();
    let rows: String = if docs.is_empty() {
        "<tr class=\"empty\"><td class=\"muted\">No documents yet.</td></tr>".to_owned()
    } else {
        docs.iter().map(|d| document_row(&s.site, d)).collect()
    };
    let items: String = if feed.is_empty() {
        "<li class=\"muted empty\">Nothing yet.</li>".to_owned()
    } else {
        feed.iter().map(feed_item).collect()
    };
    let broker = broker_figures(s).await;
    let queues: String = broker["queues"]
        .as_array()
        .map(|qs| qs.iter().map(queue_row).collect())
        .unwrap_or_default();
    let html = include_str!("page.html")
        .replace("{{DOCUMENTS}}", &rows)
        .replace("{{FEED}}", &items)
        .replace("{{QUEUES}}", &queues)
        .replace("{{OUTBOX}}", &esc(&outbox_line(&broker["outbox"])))
        .replace("{{ERROR}}", &esc(error.unwrap_or("")))
        .replace("{{TYPED}}", &esc(typed))
        .replace("{{SITE}}", &s.site);
    (status, Html(html)).into_response()
}

#[cfg(test)]
mod tests {
    use super::content_disposition;

    #[test]
    fn downloads_are_named_after_the_title() {
        assert_eq!(
            content_disposition("Hello World!"),
            "inline; filename=\"Hello World!.pdf\"; filename*=UTF-8''Hello%20World%21.pdf"
        );
        let d = content_disposition("Grüße \"x\"/€");
        assert!(d.starts_with("inline; filename=\"Gr__e _x___.pdf\""), "{d}");
        assert!(
            d.contains("filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%22x%22%2F%E2%82%AC.pdf"),
            "{d}"
        );
    }
}
