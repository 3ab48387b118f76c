//! A site's dedicated worker, and the PDF service.
//!
//! The site worker is the only writer after a document is created, one
//! message at a time (a lock shared by its consumers, each with
//! concurrency 1): it stores each PDF against its request's correlation id,
//! records the other site's events in the feed, and runs the slow
//! word-count job. Each handler claims its message in the inbox in the same
//! transaction as its writes, so a redelivered message has its effect once.
//! The `document.rendered` event goes out through the outbox, in that same
//! transaction.

use std::sync::Arc;
use std::time::Duration;

use rabbitry::outbox::{self, Database};
use rabbitry::rpc::durable;
use rabbitry::worker::{Body, HandlerError, Meta, Msg, Reply, Retry, State, Worker};
use rabbitry::{Connection, ConsumerSettings, ExchangeKind, HeaderValue, Message, Serializer};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::db::{db_err, with_db};
use crate::names::{self, Names};

/// A queue of the demo that expires after `ms` unused, so that nothing is
/// left behind collecting messages.
fn expiring(settings: ConsumerSettings, ms: i64) -> ConsumerSettings {
    let mut settings = settings;
    settings
        .arguments
        .insert("x-expires".into(), HeaderValue::Int(ms));
    settings
}

/// The site worker's consumers: the replies (`results`), the other sites'
/// events (`feed`) and the slow jobs (`jobs`).
pub fn site_consumers(names: &Names, site: &str, other_sites: &[&str]) -> [ConsumerSettings; 3] {
    let results = names.results_queue(site);
    let feed_keys: Vec<String> = other_sites.iter().map(|o| names.rendered_key(o)).collect();
    let feed_keys: Vec<&str> = feed_keys.iter().map(String::as_str).collect();
    let name = |cs: ConsumerSettings, n: &str| expiring(cs, names::SITE_QUEUE_EXPIRES_MS).name(n);
    [
        name(
            ConsumerSettings::new(&results).bind(
                names::RESULTS_EXCHANGE,
                ExchangeKind::Direct,
                &[&results],
            ),
            "results",
        ),
        name(
            ConsumerSettings::new(names.feed_queue(site)).bind(
                names::EVENTS_EXCHANGE,
                ExchangeKind::Topic,
                &feed_keys,
            ),
            "feed",
        ),
        name(ConsumerSettings::new(names.jobs_queue(site)), "jobs"),
    ]
}

/// The site's dedicated worker: each consumer one message at a time.
pub fn site_worker(
    conn: &Connection,
    state: SiteWorker,
    other_sites: &[&str],
) -> Worker<SiteWorker> {
    let [results, feed, jobs] = site_consumers(&state.names, &state.site, other_sites);
    Worker::new(conn, state.clone())
        .site(state.site.clone())
        .consumer(results, on_result)
        .consumer(feed, on_event)
        .consumer(jobs, on_job)
        .done()
}

/// The PDF service's consumer: the shared `service.pdf` queue, bound to
/// the seed's `service.tasks` with `service.my_template`.
pub fn service_consumer(names: &Names) -> ConsumerSettings {
    expiring(
        ConsumerSettings::new(names.service_queue()).bind(
            names::TASKS_EXCHANGE,
            ExchangeKind::Topic,
            &[names::TEMPLATE_KEY],
        ),
        names::SERVICE_QUEUE_EXPIRES_MS,
    )
    .name("render")
}

/// The file whose presence makes the PDF service fail titles that ask for
/// it (containing `please fail`), to show a failure and its retry.
pub const FAIL_SWITCH: &str = "pdf-service-fails";

/// The PDF service: renders two requests at once and replies through
/// `service.results`. `data_dir` holds its [`FAIL_SWITCH`].
pub fn service_worker(
    conn: &Connection,
    names: &Names,
    data_dir: &std::path::Path,
) -> Worker<Arc<std::path::PathBuf>> {
    Worker::new(conn, Arc::new(data_dir.join(FAIL_SWITCH)))
        .consumer(service_consumer(names), render)
        .concurrency(2)
        .reply_exchange(names::RESULTS_EXCHANGE)
        .done()
}

/// Everything the demo's workers declare: their consumers and their retry
/// and dead-letter queues.
pub fn topology(consumers: &[ConsumerSettings]) -> rabbitry::Topology {
    let mut t = rabbitry::Topology::default();
    for c in consumers {
        t.merge(&c.topology());
        t.merge(&Retry::default().topology(&c.queue, None));
    }
    t
}

/// What the site worker's handlers share.
#[derive(Clone, Debug)]
pub struct SiteWorker {
    /// `a` or `b`.
    pub site: String,
    /// The site's database.
    pub db: Database,
    /// Names.
    pub names: Arc<Names>,
    /// One write at a time across the worker's consumers.
    pub write: Arc<Mutex<()>>,
    /// How long the slow job takes.
    pub job_delay: Duration,
}

/// Stores a PDF reply against its correlation id, then announces it.
pub async fn on_result(
    meta: Meta,
    body: Body,
    State(w): State<SiteWorker>,
) -> Result<(), HandlerError> {
    let correlation_id = meta
        .properties
        .correlation_id
        .clone()
        .ok_or_else(|| HandlerError::invalid("a reply without a correlation id"))?;
    let routed_at = rabbitry::clock::now_millis();
    let header_time = |name: &str| {
        meta.properties
            .headers
            .get(name)
            .and_then(HeaderValue::as_i64)
    };
    let (published_at, service_at) = (header_time(REQUEST_PUBLISHED_AT), header_time(RENDERED_AT));
    let content_type = meta.properties.content_type.clone();
    let ok = content_type.as_deref() == Some("application/pdf") && body.0.starts_with(b"%PDF-");
    let missing = meta
        .properties
        .headers
        .get(MISSING_GLYPHS)
        .and_then(HeaderValue::as_str)
        .map(str::to_owned);
    // Why it failed, as the reply says: its content type, and its text.
    let error = (!ok).then(|| {
        let text = String::from_utf8_lossy(&body.0[..body.0.len().min(300)]).into_owned();
        format!(
            "the PDF service replied with {} instead of a PDF: {}",
            content_type.as_deref().unwrap_or("no content type"),
            text.trim()
        )
    });
    let _one_at_a_time = w.write.lock().await;
    with_db!(&w.db, |pool, sql| {
        let mut tx = pool.begin().await?;
        if !outbox::inbox_claim(&mut *tx, "results", &correlation_id).await? {
            tracing::info!(%correlation_id, "duplicate reply ignored");
            return Ok(());
        }
        let request =
            durable::complete(&mut *tx, &correlation_id, content_type.as_deref(), &body.0)
                .await?
                .ok_or_else(|| {
                    HandlerError::invalid(format!(
                        "no request with correlation id {correlation_id}"
                    ))
                })?;
        let id = request.request["document_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let status = if ok { "rendered" } else { "failed" };
        let updated = sqlx::query(sql(
            "UPDATE documents SET pdf = $2, status = $3, renders = renders + 1, rendered_at = $4, missing = $5, error = $6, \
             published_at = $7, service_at = $8, reply_at = $9 WHERE id = $1",
        ))
        .bind(&id)
        .bind(ok.then(|| body.0.to_vec()))
        .bind(status)
        // Stored: the time the update is written, in the transaction.
        .bind(rabbitry::clock::now_millis())
        .bind(&missing)
        .bind(&error)
        .bind(published_at)
        .bind(service_at)
        .bind(routed_at)
        .execute(&mut *tx)
        .await
        .map_err(|e| db_err("storing a PDF", e))?;
        if updated.rows_affected() != 1 {
            return Err(HandlerError::invalid(format!("no document {id}")));
        }
        let title: String = sqlx::query_scalar(sql("SELECT title FROM documents WHERE id = $1"))
            .bind(&id)
            .fetch_one(&mut *tx)
            .await?;
        if ok {
            let event = Message::encode(
                Serializer::Json,
                &serde_json::json!({ "site": w.site, "id": id, "title": title }),
            )?
            .exchange(names::EVENTS_EXCHANGE)
            .routing_key(w.names.rendered_key(&w.site));
            outbox::publish(&mut *tx, event).await?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// A `document.rendered` event.
#[derive(Debug, Deserialize)]
pub struct Rendered {
    /// The site that rendered it.
    pub site: String,
    /// The document's id there.
    pub id: String,
    /// Its title.
    pub title: String,
}

/// Records another site's `document.rendered` event in the feed.
pub async fn on_event(
    meta: Meta,
    Msg(e): Msg<Rendered>,
    State(w): State<SiteWorker>,
) -> Result<(), HandlerError> {
    let message_id = meta
        .properties
        .message_id
        .clone()
        .ok_or_else(|| HandlerError::invalid("an event without a message id"))?;
    let published_at = meta
        .properties
        .headers
        .get(rabbitry::headers::PUBLISHED_AT)
        .and_then(HeaderValue::as_i64);
    let _one_at_a_time = w.write.lock().await;
    let now = rabbitry::clock::now_millis();
    with_db!(&w.db, |pool, sql| {
        let mut tx = pool.begin().await?;
        if outbox::inbox_claim(&mut *tx, "feed", &message_id).await? {
            sqlx::query(sql(
                "INSERT INTO feed (message_id, from_site, document_id, title, received_at, published_at) VALUES ($1, $2, $3, $4, $5, $6)",
            ))
            .bind(&message_id)
            .bind(&e.site)
            .bind(&e.id)
            .bind(&e.title)
            .bind(now)
            .bind(published_at)
            .execute(&mut *tx)
            .await
            ?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// The slow job's body.
#[derive(Debug, Deserialize)]
pub struct Job {
    /// The document to count.
    pub document_id: String,
    /// Its title.
    pub title: String,
}

/// The slow job: counts the title's words (after a deliberate pause).
pub async fn on_job(
    meta: Meta,
    Msg(job): Msg<Job>,
    State(w): State<SiteWorker>,
) -> Result<(), HandlerError> {
    tokio::time::sleep(w.job_delay).await;
    let words = job.title.split_whitespace().count() as i64;
    let message_id = meta.properties.message_id.clone().unwrap_or_default();
    let _one_at_a_time = w.write.lock().await;
    with_db!(&w.db, |pool, sql| {
        let mut tx = pool.begin().await?;
        if outbox::inbox_claim(&mut *tx, "jobs", &message_id).await? {
            sqlx::query(sql("UPDATE documents SET words = $2 WHERE id = $1"))
                .bind(&job.document_id)
                .bind(words)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// The seed's request body.
#[derive(Debug, Deserialize)]
pub struct RenderRequest {
    /// What the PDF shows.
    pub title: String,
}

/// Renders the requested title as a PDF; the worker sends it back.
///
/// Characters the font lacks go back in the `x-missing-glyphs` header.
/// When the PDF cannot be made at all (no font), the reply is the reason as
/// `text/plain`: the site shows it on the document instead of waiting.
pub async fn render(
    meta: Meta,
    Msg(r): Msg<RenderRequest>,
    State(fail_switch): State<Arc<std::path::PathBuf>>,
) -> Result<Reply, HandlerError> {
    if r.title.to_lowercase().contains("please fail") && fail_switch.exists() {
        let why = format!(
            "the PDF service was told to fail this title (remove {} to let it render)",
            fail_switch.display()
        );
        return Ok(timed(Reply::new(why, "text/plain; charset=utf-8"), &meta));
    }
    let lines = [
        "Rendered by the rabbitry demo PDF service".to_owned(),
        format!(
            "correlation id {}",
            meta.properties.correlation_id.as_deref().unwrap_or("-")
        ),
    ];
    let reply = match crate::pdf::render(&r.title, &lines) {
        Ok(rendered) if rendered.missing.is_empty() => Reply::new(rendered.pdf, "application/pdf"),
        Ok(rendered) => {
            let missing: String = rendered.missing.iter().collect();
            Reply::new(rendered.pdf, "application/pdf").header(MISSING_GLYPHS, missing)
        }
        Err(why) => {
            tracing::error!(error = %why, "cannot render a PDF");
            Reply::new(why, "text/plain; charset=utf-8")
        }
    };
    Ok(timed(reply, &meta))
}

/// The reply header: when the site's relay published the request.
pub const REQUEST_PUBLISHED_AT: &str = "x-demo-request-published-at";
/// The reply header: when the PDF service rendered it.
pub const RENDERED_AT: &str = "x-demo-rendered-at";

/// The reply with the request's trip so far: when it was published (from
/// the relay's header) and when it was rendered.
fn timed(reply: Reply, meta: &Meta) -> Reply {
    let published = meta
        .properties
        .headers
        .get(rabbitry::headers::PUBLISHED_AT)
        .and_then(HeaderValue::as_i64);
    let reply = reply.header(RENDERED_AT, rabbitry::clock::now_millis());
    match published {
        Some(at) => reply.header(REQUEST_PUBLISHED_AT, at),
        None => reply,
    }
}

/// The reply header that lists the characters the PDF's font lacks.
pub const MISSING_GLYPHS: &str = "x-missing-glyphs";
