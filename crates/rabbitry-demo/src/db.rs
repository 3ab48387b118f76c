//! A site's own database: documents and the feed, on SQLite (one file per
//! site) or PostgreSQL (one schema per site). The outbox, inbox and request
//! tables of rabbitry live beside them.

use rabbitry::outbox::Database;
use rabbitry::{Error, ErrorKind, Result};
use serde::Serialize;
use sqlx::Row;

/// Runs `$body` with `$pool` bound to the site's pool and `$sql` turning a
/// `$1`-style query into the backend's placeholder style.
macro_rules! with_db {
    ($db:expr, |$pool:ident, $sql:ident| $body:expr) => {
        match $db {
            rabbitry::outbox::Database::Sqlite($pool) => {
                let $sql = |s: &'static str| sqlx::AssertSqlSafe(s.replace('$', "?"));
                $body
            }
            rabbitry::outbox::Database::Postgres($pool) => {
                let $sql = |s: &'static str| sqlx::AssertSqlSafe(s.to_owned());
                $body
            }
        }
    };
}
pub(crate) use with_db;

const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL,
    correlation_id TEXT NOT NULL, pdf BLOB, renders INTEGER NOT NULL DEFAULT 0,
    words INTEGER, created_at INTEGER NOT NULL, rendered_at INTEGER);
CREATE INDEX IF NOT EXISTS documents_correlation ON documents (correlation_id);
CREATE TABLE IF NOT EXISTS feed (
    message_id TEXT PRIMARY KEY, from_site TEXT NOT NULL, document_id TEXT NOT NULL,
    title TEXT NOT NULL, received_at INTEGER NOT NULL);
";

const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS documents (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, status TEXT NOT NULL,
    correlation_id TEXT NOT NULL, pdf BYTEA, renders INTEGER NOT NULL DEFAULT 0,
    words INTEGER, created_at BIGINT NOT NULL, rendered_at BIGINT);
CREATE INDEX IF NOT EXISTS documents_correlation ON documents (correlation_id);
CREATE TABLE IF NOT EXISTS feed (
    message_id TEXT PRIMARY KEY, from_site TEXT NOT NULL, document_id TEXT NOT NULL,
    title TEXT NOT NULL, received_at BIGINT NOT NULL);
";

/// Columns added after the first release of the demo, for databases made
/// before them: `missing` (characters the PDF's font lacked), `error` (why
/// rendering failed), and the times of a document's trip (epoch ms):
/// `published_at` (the relay published the request), `service_at` (the PDF
/// service rendered it), `reply_at` (the reply reached the site worker);
/// `rendered_at` is when the worker stored it. A feed event's
/// `published_at` is when the other site's relay published it.
const ADDED_COLUMNS: [(&str, &str, &str); 6] = [
    ("documents", "missing", "TEXT"),
    ("documents", "error", "TEXT"),
    ("documents", "published_at", "BIGINT"),
    ("documents", "service_at", "BIGINT"),
    ("documents", "reply_at", "BIGINT"),
    ("feed", "published_at", "BIGINT"),
];

/// The database URL of `site`: `<data dir>/<site>.db` for SQLite, or the
/// given PostgreSQL database with the site's own schema.
pub fn site_url(database: Option<&str>, data_dir: &std::path::Path, site: &str) -> String {
    match database {
        Some(pg) if pg.starts_with("postgres") => {
            let sep = if pg.contains('?') { '&' } else { '?' };
            format!("{pg}{sep}options=-c%20search_path%3Ddemo_site_{site}")
        }
        _ => format!("sqlite://{}/site-{site}.db", data_dir.display()),
    }
}

/// Connects, and creates the schema (and the PostgreSQL schema) if needed.
pub async fn open(url: &str, site: &str) -> Result<Database> {
    if url.starts_with("postgres") {
        let base = url.split("?options=").next().unwrap_or(url);
        let base = base.split("&options=").next().unwrap_or(base);
        if let Database::Postgres(pool) = Database::connect(base).await? {
            let create = format!("CREATE SCHEMA IF NOT EXISTS demo_site_{site}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(create))
                .execute(&pool)
                .await
                .map_err(|e| db_err("creating the site schema", e))?;
            pool.close().await;
        }
    }
    let db = Database::connect(url).await?;
    rabbitry::rpc::durable::migrate(&db).await?;
    match &db {
        Database::Sqlite(pool) => {
            sqlx::raw_sql(SQLITE_SCHEMA)
                .execute(pool)
                .await
                .map_err(|e| db_err("schema", e))?;
            for (table, column, kind) in ADDED_COLUMNS {
                let has: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2",
                )
                .bind(table)
                .bind(column)
                .fetch_one(pool)
                .await
                .map_err(|e| db_err("schema", e))?;
                if has == 0 {
                    let add = format!("ALTER TABLE {table} ADD COLUMN {column} {kind}");
                    sqlx::raw_sql(sqlx::AssertSqlSafe(add))
                        .execute(pool)
                        .await
                        .map_err(|e| db_err("schema", e))?;
                }
            }
        }
        Database::Postgres(pool) => {
            sqlx::raw_sql(PG_SCHEMA)
                .execute(pool)
                .await
                .map_err(|e| db_err("schema", e))?;
            for (table, column, kind) in ADDED_COLUMNS {
                let add = format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}");
                sqlx::raw_sql(sqlx::AssertSqlSafe(add))
                    .execute(pool)
                    .await
                    .map_err(|e| db_err("schema", e))?;
            }
        }
    }
    // The listings read the newest rows through these, never the whole
    // table (whose rows hold the PDFs).
    let indexes = "CREATE INDEX IF NOT EXISTS documents_created ON documents (created_at);
        CREATE INDEX IF NOT EXISTS feed_received ON feed (received_at);";
    with_db!(&db, |pool, _sql| sqlx::raw_sql(indexes)
        .execute(pool)
        .await
        .map(drop))
    .map_err(|e| db_err("schema", e))?;
    Ok(db)
}

pub(crate) fn db_err(what: &str, e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Database, format!("site database: {what}")).with_source(e)
}

/// A document as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Document {
    /// Its id.
    pub id: String,
    /// Its title.
    pub title: String,
    /// `pending`, `rendered` or `failed`.
    pub status: String,
    /// The correlation id of its render request.
    pub correlation_id: String,
    /// How many times a PDF was stored (1 when all is well).
    pub renders: i64,
    /// The word count, once the slow job has run.
    pub words: Option<i64>,
    /// Where its PDF is, once rendered.
    pub pdf_url: Option<String>,
    /// Characters of the title the PDF's font lacks (left out of the PDF).
    pub missing: Option<String>,
    /// Why rendering failed, when it did.
    pub error: Option<String>,
    /// When it was created (epoch milliseconds).
    pub created_at: i64,
    /// What a document pending for a while waits for (filled by the web
    /// process from the broker).
    pub waiting: Option<String>,
    /// The times of its trip, epoch milliseconds, each where it happened.
    pub timeline: Timeline,
}

/// A document's trip through the system, each step's time (epoch ms) as
/// recorded where it happened. The last two steps are the other site's:
/// its feed says when the event was published and received.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// The web process committed the document with its outbox row.
    pub committed: i64,
    /// The site's relay published the request to `service.tasks`.
    pub published: Option<i64>,
    /// The PDF service rendered it.
    pub rendered: Option<i64>,
    /// The reply reached the site worker through `service.results`.
    pub routed: Option<i64>,
    /// The site worker stored the PDF (and wrote `document.rendered` to
    /// its outbox).
    pub stored: Option<i64>,
}

fn document<R: Row>(r: &R, site: &str) -> Document
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i32: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i32>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let id: String = r.try_get("id").unwrap_or_default();
    let status: String = r.try_get("status").unwrap_or_default();
    let renders = r
        .try_get::<i64, _>("renders")
        .or_else(|_| r.try_get::<i32, _>("renders").map(i64::from))
        .unwrap_or_default();
    let words = r
        .try_get::<Option<i64>, _>("words")
        .or_else(|_| {
            r.try_get::<Option<i32>, _>("words")
                .map(|w| w.map(i64::from))
        })
        .unwrap_or_default();
    Document {
        pdf_url: (status == "rendered").then(|| format!("/sites/{site}/documents/{id}/pdf")),
        id,
        title: r.try_get("title").unwrap_or_default(),
        status,
        correlation_id: r.try_get("correlation_id").unwrap_or_default(),
        renders,
        words,
        missing: r.try_get("missing").unwrap_or_default(),
        error: r.try_get("error").unwrap_or_default(),
        created_at: r.try_get("created_at").unwrap_or_default(),
        waiting: None,
        timeline: Timeline {
            committed: r.try_get("created_at").unwrap_or_default(),
            published: r.try_get("published_at").unwrap_or_default(),
            rendered: r.try_get("service_at").unwrap_or_default(),
            routed: r.try_get("reply_at").unwrap_or_default(),
            stored: r.try_get("rendered_at").unwrap_or_default(),
        },
    }
}

/// One document.
pub async fn get_document(db: &Database, site: &str, id: &str) -> Result<Option<Document>> {
    with_db!(db, |pool, sql| {
        let row = sqlx::query(sql(
            "SELECT id, title, status, correlation_id, renders, words, missing, error, created_at, published_at, service_at, reply_at, rendered_at FROM documents WHERE id = $1",
        ))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(|e| db_err("reading a document", e))?;
        Ok(row.map(|r| document(&r, site)))
    })
}

/// The newest documents first.
pub async fn list_documents(db: &Database, site: &str) -> Result<Vec<Document>> {
    with_db!(db, |pool, sql| {
        let rows = sqlx::query(sql(
            "SELECT id, title, status, correlation_id, renders, words, missing, error, created_at, published_at, service_at, reply_at, rendered_at FROM documents ORDER BY created_at DESC LIMIT 200",
        ))
        .fetch_all(pool)
        .await
        .map_err(|e| db_err("listing documents", e))?;
        Ok(rows.iter().map(|r| document(r, site)).collect())
    })
}

/// A document's PDF, if stored, and its title (for the download's name).
pub async fn get_pdf(db: &Database, id: &str) -> Result<Option<(Vec<u8>, String)>> {
    with_db!(db, |pool, sql| {
        let row = sqlx::query(sql("SELECT pdf, title FROM documents WHERE id = $1"))
            .bind(id)
            .fetch_optional(pool)
            .await
            .map_err(|e| db_err("reading a PDF", e))?;
        Ok(row.and_then(|r| {
            let pdf = r.try_get::<Option<Vec<u8>>, _>("pdf").ok().flatten()?;
            Some((pdf, r.try_get("title").unwrap_or_default()))
        }))
    })
}

/// An event received from another site.
#[derive(Debug, Clone, Serialize)]
pub struct FeedEvent {
    /// The site it came from.
    pub from_site: String,
    /// The document there.
    pub document_id: String,
    /// Its title.
    pub title: String,
    /// When the other site's relay published the event (epoch ms).
    pub published_at: Option<i64>,
    /// When this site's worker received it (epoch ms).
    pub received_at: i64,
}

/// The feed, newest first.
pub async fn list_feed(db: &Database) -> Result<Vec<FeedEvent>> {
    with_db!(db, |pool, sql| {
        let rows = sqlx::query(sql(
            "SELECT from_site, document_id, title, published_at, received_at FROM feed ORDER BY received_at DESC LIMIT 500",
        ))
        .fetch_all(pool)
        .await
        .map_err(|e| db_err("reading the feed", e))?;
        Ok(rows
            .iter()
            .map(|r| FeedEvent {
                from_site: r.try_get("from_site").unwrap_or_default(),
                document_id: r.try_get("document_id").unwrap_or_default(),
                title: r.try_get("title").unwrap_or_default(),
                published_at: r.try_get("published_at").unwrap_or_default(),
                received_at: r.try_get("received_at").unwrap_or_default(),
            })
            .collect())
    })
}
