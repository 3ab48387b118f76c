//! Rows between the databases and the relay: a claimed row read column by
//! column into the message it stores (or why it cannot be one), and what
//! became of a batch. Each database's file produces these; the relay
//! consumes them.

use super::store;
use crate::error::{Error, Result};
use crate::message::Message;

/// A claimed row, as the message it stores.
pub(super) struct Claimed {
    pub(super) id: i64,
    /// When the row was written (epoch milliseconds).
    pub(super) created_at: i64,
    /// When it was due: its write, or its scheduled time if later. The
    /// commit-to-publish histogram measures from here.
    pub(super) due_at: i64,
    /// The message, or why the row cannot be one (a row another program
    /// wrote with malformed properties).
    pub(super) message: std::result::Result<Message, String>,
}

/// A claimed row's columns, each read as its documented type; a column of
/// the wrong type (a foreign writer's mistake) is the reason the row fails.
pub(super) struct Columns {
    pub(super) message_id: std::result::Result<Option<String>, String>,
    pub(super) exchange: std::result::Result<String, String>,
    pub(super) routing_key: std::result::Result<String, String>,
    pub(super) properties: std::result::Result<String, String>,
    pub(super) body: std::result::Result<Vec<u8>, String>,
    pub(super) mandatory: std::result::Result<bool, String>,
    pub(super) created_at: std::result::Result<i64, String>,
    /// The later of `created_at` and `not_before`, when readable.
    pub(super) due_at: Option<i64>,
}

/// Column `i` of a claimed row as a `T`, or why not, naming the column.
fn typed<'r, R: sqlx::Row, T>(r: &'r R, i: usize, name: &str) -> std::result::Result<T, String>
where
    usize: sqlx::ColumnIndex<R>,
    T: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    r.try_get(i).map_err(|e| format!("column {name}: {e}"))
}

impl Columns {
    /// A claimed row whose columns hold their documented types, read at
    /// the claim's positions (id, then exchange to message_id as 1 to 7),
    /// with the due time at `due_at`.
    pub(super) fn typed<R: sqlx::Row>(r: &R, due_at: usize) -> Columns
    where
        usize: sqlx::ColumnIndex<R>,
        for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
        for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    {
        Columns {
            exchange: typed(r, 1, "exchange"),
            routing_key: typed(r, 2, "routing_key"),
            properties: typed(r, 3, "properties"),
            body: typed(r, 4, "body"),
            mandatory: typed(r, 5, "mandatory"),
            created_at: typed(r, 6, "created_at"),
            message_id: typed(r, 7, "message_id"),
            due_at: r.try_get(due_at).ok(),
        }
    }
}

/// The message a claimed row stores, or why it cannot be one. A bad row is
/// marked failed with the reason, never dropped, and never holds up the
/// rows behind it.
pub(super) fn claimed_from(id: i64, c: Columns) -> Claimed {
    let created_at = c.created_at.as_ref().copied().unwrap_or(0);
    let due_at = c.due_at.unwrap_or(created_at).max(created_at);
    let message = (|| {
        let (exchange, routing_key) = (c.exchange?, c.routing_key?);
        let (body, mandatory, message_id) = (c.body?, c.mandatory?, c.message_id?);
        c.created_at?;
        let mut properties = store::decode(&c.properties?)
            .map_err(|e| format!("malformed properties (JSON) in column properties: {e}"))?;
        // The documented column is the message id when the properties do
        // not set one, so that consumers can tell a resend.
        if properties.message_id.is_none() {
            properties.message_id = message_id.filter(|m| !m.is_empty());
        }
        Ok(Message {
            body,
            properties,
            routing_key: Some(routing_key),
            exchange: Some(exchange),
            mandatory,
        })
    })();
    Claimed {
        id,
        created_at,
        due_at,
        message,
    }
}

/// What became of a batch: confirmed, refused (with why), or neither.
#[derive(Default)]
pub(super) struct BatchOutcome {
    pub(super) sent: Vec<i64>,
    pub(super) failed: Vec<(i64, String)>,
    pub(super) unconfirmed: Vec<i64>,
    pub(super) transient: Option<Error>,
}

impl BatchOutcome {
    pub(super) fn finish(self) -> Result<usize> {
        match self.transient {
            Some(e) => Err(e),
            None => Ok(self.sent.len() + self.failed.len()),
        }
    }
}
