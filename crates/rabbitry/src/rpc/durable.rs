//! Durable replies: request/reply that survives the requester.
//!
//! The requester writes, in its own database transaction, the request's
//! context in `rabbitry_requests` (keyed by a new correlation id) and the
//! request itself in the outbox, with `reply_to` naming a durable queue.
//! The site's worker consumes that queue; its handler calls [`complete`],
//! which stores the reply against the correlation id and returns the
//! request's context, in the handler's transaction. Whoever asks later
//! (the same process after a restart, or another one) finds the reply
//! with [`get`].

use std::future::Future;

use serde::Serialize;
use sqlx::Row;

use crate::clock::now_millis;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::outbox::{db_error, with_pool, Database, OutboxExecutor};

#[cfg(feature = "sqlite")]
const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rabbitry_requests (
    correlation_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    reply_content_type TEXT,
    reply BLOB,
    replied_at INTEGER
);
";

#[cfg(feature = "postgres")]
const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rabbitry_requests (
    correlation_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    reply_content_type TEXT,
    reply BYTEA,
    replied_at BIGINT
);
";

/// Creates the `rabbitry_requests` table if it does not exist (and the
/// outbox's tables, which durable requests are sent through).
pub async fn migrate(db: &Database) -> Result<()> {
    db.migrate().await?;
    let schema = match db {
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => SQLITE_SCHEMA,
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => PG_SCHEMA,
    };
    with_pool!(db, |pool| sqlx::raw_sql(schema)
        .execute(pool)
        .await
        .map(drop))
    .map_err(|e| db_error("requests", "creating the requests table", e))
}

/// A stored request and, once it came, its reply.
#[derive(Debug, Clone, Serialize)]
pub struct StoredRequest {
    /// Its correlation id.
    pub correlation_id: String,
    /// What kind of request it is, for the reply's handler.
    pub kind: String,
    /// The requester's context, as JSON.
    pub request: serde_json::Value,
    /// When it was sent (epoch ms).
    pub created_at: i64,
    /// The reply's content type.
    pub reply_content_type: Option<String>,
    /// The reply's body.
    #[serde(skip)]
    pub reply: Option<Vec<u8>>,
    /// When the reply was stored (epoch ms).
    pub replied_at: Option<i64>,
}

/// A connection that can store requests: `&mut *tx` of an sqlx
/// transaction on SQLite or PostgreSQL.
pub trait RequestStore: OutboxExecutor {
    /// Inserts a request row.
    fn insert_request(
        &mut self,
        correlation_id: &str,
        kind: &str,
        request: &str,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Stores a reply once; returns the request, or `None` if unknown.
    fn store_reply(
        &mut self,
        correlation_id: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> impl Future<Output = Result<Option<StoredRequest>>> + Send;
}

macro_rules! request_store {
    ($conn:ty, $db:literal, $insert:literal, $update:literal, $select:literal) => {
        impl RequestStore for $conn {
            async fn insert_request(
                &mut self,
                correlation_id: &str,
                kind: &str,
                request: &str,
            ) -> Result<()> {
                sqlx::query($insert)
                    .bind(correlation_id)
                    .bind(kind)
                    .bind(request)
                    .bind(now_millis())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($db, "storing a request", e))?;
                Ok(())
            }

            async fn store_reply(
                &mut self,
                correlation_id: &str,
                content_type: Option<&str>,
                body: &[u8],
            ) -> Result<Option<StoredRequest>> {
                sqlx::query($update)
                    .bind(correlation_id)
                    .bind(content_type)
                    .bind(body)
                    .bind(now_millis())
                    .execute(&mut *self)
                    .await
                    .map_err(|e| db_error($db, "storing a reply", e))?;
                let row = sqlx::query($select)
                    .bind(correlation_id)
                    .fetch_optional(&mut *self)
                    .await
                    .map_err(|e| db_error($db, "reading a request", e))?;
                row.map(|r| stored(&r)).transpose()
            }
        }
    };
}

#[cfg(feature = "sqlite")]
request_store!(
    sqlx::SqliteConnection,
    "sqlite",
    "INSERT INTO rabbitry_requests (correlation_id, kind, request, created_at) VALUES (?1, ?2, ?3, ?4)",
    "UPDATE rabbitry_requests SET reply_content_type = ?2, reply = ?3, replied_at = ?4 \
     WHERE correlation_id = ?1 AND replied_at IS NULL",
    "SELECT correlation_id, kind, request, created_at, reply_content_type, reply, replied_at \
     FROM rabbitry_requests WHERE correlation_id = ?1"
);

#[cfg(feature = "postgres")]
request_store!(
    sqlx::PgConnection,
    "postgres",
    "INSERT INTO rabbitry_requests (correlation_id, kind, request, created_at) VALUES ($1, $2, $3, $4)",
    "UPDATE rabbitry_requests SET reply_content_type = $2, reply = $3, replied_at = $4 \
     WHERE correlation_id = $1 AND replied_at IS NULL",
    "SELECT correlation_id, kind, request, created_at, reply_content_type, reply, replied_at \
     FROM rabbitry_requests WHERE correlation_id = $1"
);

fn stored<R: Row>(r: &R) -> Result<StoredRequest>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<Vec<u8>>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let err = |e| db_error("requests", "decoding a request row", e);
    let request: String = r.try_get("request").map_err(err)?;
    Ok(StoredRequest {
        correlation_id: r.try_get("correlation_id").map_err(err)?,
        kind: r.try_get("kind").map_err(err)?,
        request: serde_json::from_str(&request).unwrap_or(serde_json::Value::String(request)),
        created_at: r.try_get("created_at").map_err(err)?,
        reply_content_type: r.try_get("reply_content_type").map_err(err)?,
        reply: r.try_get("reply").map_err(err)?,
        replied_at: r.try_get("replied_at").map_err(err)?,
    })
}

/// Sends `message` as a durable request, in the caller's transaction: it
/// gets a new correlation id (returned), its context is stored under it,
/// and the message goes through the outbox, mandatory: a request that no
/// queue takes is marked failed in the outbox, not dropped. `message`
/// needs a routing key and a `reply_to` naming a durable queue that a
/// worker consumes.
pub async fn send<E: RequestStore + ?Sized>(
    conn: &mut E,
    kind: &str,
    context: &serde_json::Value,
    mut message: Message,
) -> Result<String> {
    if message.properties.reply_to.is_none() {
        return Err(Error::new(
            ErrorKind::Invalid,
            "a durable request needs reply_to: the durable queue its reply goes to",
        ));
    }
    let correlation_id = uuid::Uuid::new_v4().to_string();
    message.properties.correlation_id = Some(correlation_id.clone());
    message.mandatory = true;
    conn.insert_request(&correlation_id, kind, &context.to_string())
        .await?;
    crate::outbox::publish(conn, message).await?;
    Ok(correlation_id)
}

/// Stores a reply against its correlation id, in the caller's
/// transaction, and returns the request it answers (`None` for an unknown
/// correlation id). A second reply for the same request is ignored.
pub async fn complete<E: RequestStore + ?Sized>(
    conn: &mut E,
    correlation_id: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Option<StoredRequest>> {
    conn.store_reply(correlation_id, content_type, body).await
}

/// Looks up a request (and its reply, if stored) by correlation id.
pub async fn get(db: &Database, correlation_id: &str) -> Result<Option<StoredRequest>> {
    let sql = match db {
        #[cfg(feature = "sqlite")]
        Database::Sqlite(_) => {
            "SELECT correlation_id, kind, request, created_at, reply_content_type, reply, replied_at \
             FROM rabbitry_requests WHERE correlation_id = ?1"
        }
        #[cfg(feature = "postgres")]
        Database::Postgres(_) => {
            "SELECT correlation_id, kind, request, created_at, reply_content_type, reply, replied_at \
             FROM rabbitry_requests WHERE correlation_id = $1"
        }
    };
    with_pool!(db, |pool| {
        let row = sqlx::query(sql)
            .bind(correlation_id)
            .fetch_optional(pool)
            .await
            .map_err(|e| db_error("requests", "reading a request", e))?;
        row.map(|r| stored(&r)).transpose()
    })
}
