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
use rabbitry::worker::{Body, HandlerError, Meta, Msg, Reply, State};
use rabbitry::{Message, Serializer, Settings};
use serde::Deserialize;
use tokio::sync::Mutex;

use crate::db::{db_err, with_db};
use crate::names::{self, Names};

/// The site worker's settings: results, feed and jobs, one at a time.
pub fn site_settings(
    names: &Names,
    site: &str,
    other_sites: &[&str],
    amqp_url: &str,
) -> rabbitry::Result<Settings> {
    let feed_keys = other_sites
        .iter()
        .map(|o| format!("\"{}\"", names.rendered_key(o)))
        .collect::<Vec<_>>()
        .join(", ");
    let text = format!(
        r#"
[connections.default]
url = "{amqp_url}"

[worker]
site = "{site}"
concurrency = 1
shutdown_timeout = "30s"

[consumers.results]
queue = "{results}"
exchange = "{results_exchange}"
exchange_type = "direct"
routing_keys = ["{results}"]
arguments = {{ "x-expires" = {expires} }}

[consumers.feed]
queue = "{feed}"
exchange = "{events}"
exchange_type = "topic"
routing_keys = [{feed_keys}]
arguments = {{ "x-expires" = {expires} }}

[consumers.jobs]
queue = "{jobs}"
arguments = {{ "x-expires" = {expires} }}
"#,
        expires = names::SITE_QUEUE_EXPIRES_MS,
        results = names.results_queue(site),
        results_exchange = names::RESULTS_EXCHANGE,
        feed = names.feed_queue(site),
        events = names::EVENTS_EXCHANGE,
        jobs = names.jobs_queue(site),
    );
    Settings::from_toml(&text, "demo site worker")
}

/// What the site worker's handlers share.
#[derive(Clone)]
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
    let content_type = meta.properties.content_type.clone();
    let ok = content_type.as_deref() == Some("application/pdf") && body.0.starts_with(b"%PDF-");
    let _one_at_a_time = w.write.lock().await;
    let now = rabbitry::worker::retry::now_millis();
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
            "UPDATE documents SET pdf = $2, status = $3, renders = renders + 1, rendered_at = $4 WHERE id = $1",
        ))
        .bind(&id)
        .bind(ok.then(|| body.0.to_vec()))
        .bind(status)
        .bind(now)
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
#[derive(Deserialize)]
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
    let _one_at_a_time = w.write.lock().await;
    let now = rabbitry::worker::retry::now_millis();
    with_db!(&w.db, |pool, sql| {
        let mut tx = pool.begin().await?;
        if outbox::inbox_claim(&mut *tx, "feed", &message_id).await? {
            sqlx::query(sql(
                "INSERT INTO feed (message_id, from_site, document_id, title, received_at) VALUES ($1, $2, $3, $4, $5)",
            ))
            .bind(&message_id)
            .bind(&e.site)
            .bind(&e.id)
            .bind(&e.title)
            .bind(now)
            .execute(&mut *tx)
            .await
            ?;
        }
        tx.commit().await?;
        Ok(())
    })
}

/// The slow job's body.
#[derive(Deserialize)]
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

/// The PDF service's settings: `service.tasks` / `service.my_template`,
/// replies through `service.results`.
pub fn service_settings(names: &Names, amqp_url: &str) -> rabbitry::Result<Settings> {
    let text = format!(
        r#"
[connections.default]
url = "{amqp_url}"

[worker]
concurrency = 2

[consumers.render]
queue = "{queue}"
exchange = "{tasks}"
exchange_type = "topic"
routing_keys = ["{key}"]
reply_exchange = "{results}"
arguments = {{ "x-expires" = {expires} }}
"#,
        expires = names::SERVICE_QUEUE_EXPIRES_MS,
        queue = names.service_queue(),
        tasks = names::TASKS_EXCHANGE,
        key = names::TEMPLATE_KEY,
        results = names::RESULTS_EXCHANGE,
    );
    Settings::from_toml(&text, "demo PDF service")
}

/// The seed's request body.
#[derive(Deserialize)]
pub struct RenderRequest {
    /// What the PDF shows.
    pub title: String,
}

/// Renders the requested title as a PDF; the worker sends it back.
pub async fn render(meta: Meta, Msg(r): Msg<RenderRequest>) -> Result<Reply, HandlerError> {
    let subtitle = format!(
        "Rendered by the rabbitry demo PDF service (correlation id {})",
        meta.properties.correlation_id.as_deref().unwrap_or("-")
    );
    Ok(Reply::new(
        crate::pdf::render(&r.title, &subtitle),
        "application/pdf",
    ))
}
