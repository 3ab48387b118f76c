//! A site's web process: the HTTP API and the page. Creating a document
//! writes, in one transaction, the document, the seed's render request
//! (through the outbox, with its context stored for the durable reply) and
//! a slower word-count job. The process relays its outbox itself.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use rabbitry::outbox::{self, Database, Outbox};
use rabbitry::rpc::durable;
use rabbitry::{Message, Serializer};
use serde::Deserialize;

use crate::db::{self, db_err, with_db};
use crate::names::{self, Names};

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
}

/// The site's routes, under `/sites/{site}`.
pub fn router(site: Site) -> Router {
    let base = format!("/sites/{}", site.site);
    Router::new()
        .route(&format!("{base}/"), get(page))
        .route(&base, get(page))
        .route(&format!("{base}/documents"), post(create).get(list))
        .route(&format!("{base}/documents/{{id}}"), get(show))
        .route(&format!("{base}/documents/{{id}}/pdf"), get(pdf))
        .route(&format!("{base}/feed"), get(feed))
        .with_state(site)
}

#[derive(Deserialize)]
struct NewDocument {
    title: Option<serde_json::Value>,
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn internal(e: rabbitry::Error) -> Response {
    tracing::error!(error = %e, "request failed");
    problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn create(
    State(s): State<Site>,
    body: Result<Json<NewDocument>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Ok(Json(doc)) = body else {
        return problem(
            StatusCode::BAD_REQUEST,
            "expected a JSON body like {\"title\": \"...\"}",
        );
    };
    let title = match doc.title {
        Some(serde_json::Value::String(t)) if !t.trim().is_empty() && t.chars().count() <= 200 => {
            t.trim().to_owned()
        }
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                "`title` must be a non-empty string of at most 200 characters",
            )
        }
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

/// The document, the seed's request and the slow job, in one transaction.
async fn create_document(s: &Site, title: &str) -> rabbitry::Result<(String, String)> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let request = Message::encode(Serializer::Msgpack, &serde_json::json!({ "title": title }))?
        .exchange(names::TASKS_EXCHANGE)
        .routing_key(names::TEMPLATE_KEY)
        .reply_to(s.names.results_queue(&s.site));
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

async fn list(State(s): State<Site>) -> Response {
    match db::list_documents(&s.db, &s.site).await {
        Ok(docs) => Json(docs).into_response(),
        Err(e) => internal(e),
    }
}

async fn show(State(s): State<Site>, Path(id): Path<String>) -> Response {
    match db::get_document(&s.db, &s.site, &id).await {
        Ok(Some(d)) => Json(d).into_response(),
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

async fn page(State(s): State<Site>) -> Html<String> {
    Html(include_str!("page.html").replace("{{SITE}}", &s.site))
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
