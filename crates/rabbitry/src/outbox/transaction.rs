//! The outbox's own transaction: the application's database transaction,
//! plus the messages staged in it, written as rows in one statement at
//! commit.
//!
//! [`outbox::publish`](super::publish) writes one row per call, one round
//! trip each. A unit of work with several messages pays that for every
//! message; this type stages them in memory and writes them all with one
//! multi-row `INSERT` just before the commit, in the order they were
//! staged, inside the same transaction. The message exists if and only if
//! the commit does, as with `publish`. The commit then wakes this
//! process's relays, as [`Outbox::commit`] does.

use std::ops::{Deref, DerefMut};

use super::{db_error, Database, Outbox, OutboxExecutor, OutboxRow};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;

/// A database that an [`Outbox`] can run on: `sqlx::Sqlite` (feature
/// `sqlite`) or `sqlx::Postgres` (feature `postgres`).
pub trait OutboxDatabase: sqlx::Database
where
    Self::Connection: OutboxExecutor,
{
    /// The name used in errors.
    const NAME: &'static str;
    /// This database's pool, if `db` is on it.
    fn pool(db: &Database) -> Option<&sqlx::Pool<Self>>;
}

#[cfg(feature = "sqlite")]
impl OutboxDatabase for sqlx::Sqlite {
    const NAME: &'static str = "sqlite";
    fn pool(db: &Database) -> Option<&sqlx::Pool<Self>> {
        match db {
            Database::Sqlite(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

#[cfg(feature = "postgres")]
impl OutboxDatabase for sqlx::Postgres {
    const NAME: &'static str = "postgres";
    fn pool(db: &Database) -> Option<&sqlx::Pool<Self>> {
        match db {
            Database::Postgres(pool) => Some(pool),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }
}

/// An application's database transaction that stages outbox messages.
///
/// It dereferences to the connection, so the application's own queries
/// run in it as in any sqlx transaction (`.execute(&mut *tx)`). Staged
/// messages are written at [`commit`](Transaction::commit), after any
/// rows written in the same transaction with
/// [`outbox::publish`](super::publish). Dropping it without a commit rolls
/// everything back, staged messages included.
///
/// ```no_run
/// # #[cfg(feature = "sqlite")]
/// # async fn demo(outbox: rabbitry::outbox::Outbox) -> rabbitry::Result<()> {
/// use rabbitry::Message;
///
/// let mut tx = outbox.begin::<sqlx::Sqlite>().await?;
/// sqlx::query("UPDATE orders SET paid = 1 WHERE id = 7")
///     .execute(&mut *tx)
///     .await
///     .map_err(|e| rabbitry::outbox::db_error("shop.db", "update", e))?;
/// tx.publish(Message::new("order 7 paid").routing_key("orders.paid"))?;
/// tx.publish(Message::new("order 7 ships").routing_key("orders.ship"))?;
/// tx.commit().await?; // both rows in one statement, then the commit
/// # Ok(()) }
/// ```
pub struct Transaction<DB: sqlx::Database> {
    tx: sqlx::Transaction<'static, DB>,
    staged: Vec<OutboxRow>,
    outbox: Outbox,
}

impl<DB: sqlx::Database> std::fmt::Debug for Transaction<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("staged", &self.staged.len())
            .finish_non_exhaustive()
    }
}

impl Outbox {
    /// Begins a transaction on this outbox's database, in which messages
    /// can be staged with [`Transaction::publish`]. `DB` names the
    /// database (`sqlx::Sqlite` or `sqlx::Postgres`); naming the other
    /// one is an error that says which this outbox is on.
    pub async fn begin<DB: OutboxDatabase>(&self) -> Result<Transaction<DB>>
    where
        DB::Connection: OutboxExecutor,
    {
        let pool = DB::pool(&self.db).ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!(
                    "this outbox is not on {}: begin the transaction with the database it was opened on",
                    <DB as OutboxDatabase>::NAME
                ),
            )
        })?;
        let tx = pool
            .begin()
            .await
            .map_err(|e| db_error(&self.url, "begin", e))?;
        Ok(self.transaction(tx))
    }

    /// Wraps a transaction the application began itself, on a pool of
    /// its own, so that messages can be staged in it.
    pub fn transaction<DB: sqlx::Database>(
        &self,
        tx: sqlx::Transaction<'static, DB>,
    ) -> Transaction<DB> {
        Transaction {
            tx,
            staged: Vec::new(),
            outbox: self.clone(),
        }
    }
}

impl<DB: sqlx::Database> Transaction<DB>
where
    DB::Connection: OutboxExecutor,
{
    /// Stages `message`, to be written as an outbox row at commit, and
    /// returns its message id. The message is checked now: one without a
    /// routing key is an error here, not at commit.
    pub fn publish(&mut self, message: Message) -> Result<String> {
        let row = OutboxRow::from_message(message)?;
        let id = row.message_id.clone();
        self.staged.push(row);
        Ok(id)
    }

    /// Stages `message` to be published no earlier than `when` (see
    /// [`publish_at`](super::publish_at)); returns its message id.
    pub fn publish_at(&mut self, message: Message, when: std::time::SystemTime) -> Result<String> {
        let mut row = OutboxRow::from_message(message)?;
        row.not_before = Some(crate::clock::millis_of(when));
        let id = row.message_id.clone();
        self.staged.push(row);
        Ok(id)
    }

    /// Messages staged so far.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Writes the staged rows, commits, and wakes this process's relays.
    /// If writing the rows fails, nothing is committed.
    pub async fn commit(mut self) -> Result<()> {
        if !self.staged.is_empty() {
            let conn: &mut DB::Connection = &mut self.tx;
            conn.insert_outbox_rows(&self.staged).await?;
        }
        self.outbox.commit(self.tx).await
    }

    /// Rolls back: the application's writes and the staged messages.
    pub async fn rollback(self) -> Result<()> {
        self.tx
            .rollback()
            .await
            .map_err(|e| db_error(&self.outbox.url, "rollback", e))
    }
}

impl<DB: sqlx::Database> Deref for Transaction<DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.tx
    }
}

impl<DB: sqlx::Database> DerefMut for Transaction<DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }
}
