//! How a relay works: the options a caller gives
//! [`Outbox::spawn_relay`](super::Outbox::spawn_relay), read by the relay
//! and by each database's leases.

use std::time::Duration;

use crate::error::{Error, Result};

/// The shortest lease a relay takes: it is renewed every quarter of itself.
pub const MIN_LEASE: Duration = Duration::from_millis(100);

/// How a relay works: `default()` and a setter per field. The struct is
/// `#[non_exhaustive]`, so a new option is not a breaking change.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::outbox::RelayOptions;
///
/// let options = RelayOptions::default().batch(200).lease(Duration::from_secs(5));
/// assert!(options.validate().is_ok());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct RelayOptions {
    /// Rows claimed and published per round.
    pub batch: usize,
    /// Polling interval when nothing wakes the relay (other processes'
    /// commits on SQLite); at least 30 s where the database announces
    /// commits (PostgreSQL).
    pub poll: Duration,
    /// How long a SQLite lease on claimed rows lasts.
    pub lease: Duration,
    /// This relay's name in leases.
    pub owner: String,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch: crate::defaults::RELAY_BATCH,
            poll: crate::defaults::RELAY_POLL,
            lease: crate::defaults::RELAY_LEASE,
            owner: format!("relay-{}", uuid::Uuid::new_v4().simple()),
        }
    }
}

impl RelayOptions {
    crate::setters::setters! {
        /// Sets how many rows are claimed and published per round.
        batch: usize;
        /// Sets the polling interval when nothing wakes the relay.
        poll: Duration;
        /// Sets how long a lease (on the lead, on claimed rows) lasts.
        lease: Duration;
        /// Names this relay in leases.
        owner: into String;
    }

    /// Checks the rules of these options, naming the field that breaks
    /// one ([`Error::setting`](crate::Error::setting)): at least one row
    /// per round, a polling interval of at least a millisecond, a lease of
    /// at least [`MIN_LEASE`] (it is renewed every quarter of itself), and
    /// an owner name. [`Outbox::spawn_relay`](super::Outbox::spawn_relay)
    /// calls it.
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            return Err(Error::invalid_setting("batch", "must be at least 1"));
        }
        if self.poll < Duration::from_millis(1) {
            return Err(Error::invalid_setting("poll", "must be at least 1ms"));
        }
        if self.lease < MIN_LEASE {
            return Err(Error::invalid_setting(
                "lease",
                format!("{:?}: must be at least {MIN_LEASE:?}", self.lease),
            ));
        }
        if self.owner.is_empty() {
            return Err(Error::invalid_setting("owner", "is empty"));
        }
        Ok(())
    }
}
