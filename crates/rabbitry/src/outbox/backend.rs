//! What each database gives the outbox: one private trait, implemented once
//! per database in a file of its own (`sqlite.rs`, `postgres.rs`). The
//! relay and the status report are written against it, so a third database
//! is one new file and one `Database` variant.

use std::future::Future;

use super::claim::{BatchOutcome, Claimed};
use super::options::RelayOptions;

/// The scheduling indexes, the same on every database (run after the
/// `not_before` column exists): rows due now are found through the first,
/// scheduled ones through the second, whatever the number of future rows;
/// cancelling looks the message id up among scheduled rows only.
pub(super) const SCHEDULE_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS rabbitry_outbox_ready ON rabbitry_outbox (id)
    WHERE status = 'pending' AND not_before IS NULL;
CREATE INDEX IF NOT EXISTS rabbitry_outbox_due ON rabbitry_outbox (not_before, id)
    WHERE status = 'pending' AND not_before IS NOT NULL;
CREATE INDEX IF NOT EXISTS rabbitry_outbox_scheduled_id ON rabbitry_outbox (message_id)
    WHERE not_before IS NOT NULL;
";

/// When the next scheduled row is due: the same SQL on every database,
/// answered from the partial index on `not_before`.
pub(super) const NEXT_DUE: &str =
    "SELECT CAST(MIN(not_before) AS BIGINT) FROM rabbitry_outbox WHERE status = 'pending' AND not_before IS NOT NULL";

/// The outbox's view of one database's pool.
pub(super) trait Backend: Clone + Send + Sync + 'static {
    /// What a claim holds until its batch is finished: on PostgreSQL the
    /// transaction whose row locks keep other relays off the rows.
    type Held: Send + 'static;
    /// How the database says a new row was committed, if it can.
    type Listener: Send + 'static;
    /// What the active relay holds: PostgreSQL's advisory lock on a
    /// session of its own, or when SQLite's lease was last renewed.
    type Lead: Send + 'static;
    /// The database's name in errors.
    const NAME: &'static str;

    /// Creates the outbox and inbox tables if they do not exist.
    fn migrate(&self) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Claims the oldest due rows (not scheduled, or scheduled no later
    /// than now) that no other relay holds, in id (commit) order.
    fn claim(
        &self,
        options: &RelayOptions,
    ) -> impl Future<Output = sqlx::Result<(Vec<Claimed>, Self::Held)>> + Send;

    /// When the next scheduled row is due (epoch milliseconds), if any.
    fn next_due(&self) -> impl Future<Output = sqlx::Result<Option<i64>>> + Send;

    /// Deletes what was confirmed, marks what the broker refused as
    /// failed, and gives back what got neither.
    fn finish(
        &self,
        held: Self::Held,
        outcome: &BatchOutcome,
    ) -> impl Future<Output = sqlx::Result<()>> + Send;

    /// Becomes, or stays, the outbox's one active relay; `false` while
    /// another relay is. One relay at a time keeps the commit order.
    fn lead(
        &self,
        options: &RelayOptions,
        lead: &mut Option<Self::Lead>,
    ) -> impl Future<Output = sqlx::Result<bool>> + Send;

    /// Gives the lead up (a clean stop): a standby takes over at once.
    fn resign(
        &self,
        options: &RelayOptions,
        lead: Option<Self::Lead>,
    ) -> impl Future<Output = ()> + Send;

    /// Starts listening for commits, when the database can say.
    fn listen(&self) -> impl Future<Output = Option<Self::Listener>> + Send;

    /// Resolves at the next commit notification (never without one).
    fn notified(listener: &mut Self::Listener) -> impl Future<Output = ()> + Send;
}
