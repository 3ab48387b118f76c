//! Every default of the settings types, each named once.
//!
//! `ConnectionSettings::default()`, `ProducerSettings::default()`,
//! `ConsumerSettings::default()`, `ConsumerOptions::default()`,
//! `Retry::default()` and `RelayOptions::default()` are built from these,
//! and the configuration layer falls back to the same values for keys a
//! file leaves out, so a default changes in one place.
//!
//! # Settings that grow without breaking their users
//!
//! Each settings type is `#[non_exhaustive]`: code outside rabbitry builds
//! it from `new` or `default()` and its setters (or assigns a field of a
//! value it has), never with a struct literal, so a field added in a minor
//! release breaks no one. This is the whole of what a user's code can
//! write, and it keeps compiling when a type gains a field:
//!
//! ```
//! use std::time::Duration;
//! use rabbitry::outbox::RelayOptions;
//! use rabbitry::worker::{ConsumerOptions, Retry};
//! use rabbitry::{ConnectionSettings, ConsumerSettings, ExchangeKind, ProducerSettings};
//!
//! let connection = ConnectionSettings::default().name("shop").heartbeat(30);
//! let producer = ProducerSettings::new("shop", ExchangeKind::Topic).confirm_timeout(Duration::from_secs(5));
//! let consumer = ConsumerSettings::new("orders").prefetch_count(10);
//! let retry = Retry::attempts(5).delays([Duration::from_secs(1)]);
//! let options = ConsumerOptions::default().concurrency(4).retry(retry);
//! let relay = RelayOptions::default().batch(100);
//! let mut tls = rabbitry::connection::TlsSettings::default();
//! tls.server_name = Some("broker.internal".into());
//! # assert!(connection.validate().is_ok() && producer.validate().is_ok());
//! # assert!(consumer.validate().is_ok() && options.validate(&consumer).is_ok());
//! # assert!(relay.validate().is_ok() && tls.validate().is_ok());
//! ```
//!
//! A struct literal, which a new field would break, does not compile:
//!
//! ```compile_fail,E0639
//! let settings = rabbitry::ProducerSettings { name: "p".into(), ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let settings = rabbitry::ConsumerSettings { queue: "q".into(), ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let settings = rabbitry::ConnectionSettings { heartbeat: 5, ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let options = rabbitry::worker::ConsumerOptions { concurrency: 2, ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let retry = rabbitry::worker::Retry { attempts: 2, ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let relay = rabbitry::outbox::RelayOptions { batch: 2, ..Default::default() };
//! ```
//! ```compile_fail,E0639
//! let tls = rabbitry::connection::TlsSettings { danger_skip_verification: true, ..Default::default() };
//! ```

use std::time::Duration;

/// The URL used when none is configured: the local broker as guest.
pub const URL: &str = "amqp://guest:guest@localhost:5672/%2f";

/// A connection's name when none is given (also the configuration's
/// connection for sections that name none).
pub const CONNECTION: &str = "default";

/// Heartbeat interval in seconds.
pub const HEARTBEAT: u16 = 60;

/// Unacknowledged deliveries a plain consumer holds when nothing else is
/// set: enough to keep a consumer busy over a network round trip, and
/// bounded, so that a backlog stays on the broker rather than in one
/// process. A worker's consumers hold as many as their concurrency.
pub const PREFETCH: u16 = 250;

/// The first reconnect delay.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);

/// The largest reconnect delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long an operation waits for a lost connection to come back.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a confirm may take before the message is published again.
/// Long enough for a busy broker, short enough to notice a confirm lost
/// with a cluster node (RabbitMQ elects a quorum queue's new leader within
/// a second or two).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

/// The shortest confirm timeout a producer uses; a shorter setting is
/// raised to it.
pub const MIN_CONFIRM_TIMEOUT: Duration = Duration::from_millis(100);

/// Messages a producer keeps waiting for a confirm at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Handlers a worker's consumer runs at once: one at a time, in order.
pub const CONCURRENCY: usize = 1;

/// How long one handler may run.
pub const HANDLER_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest response an HTTP handler may give (8 MiB: well under the
/// broker's maximum message size, 16 MiB on RabbitMQ 4, so that the reply
/// can go).
pub const MAX_RESPONSE: usize = 8 * 1024 * 1024;

/// How long a worker's shutdown waits for the handlers in flight.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Attempts in all, the first included, before a message is dead-lettered.
pub const RETRY_ATTEMPTS: u32 = 3;

/// The delays before the retries (the last repeats).
pub const RETRY_DELAYS: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];

/// Outbox rows a relay claims and publishes per round.
pub const RELAY_BATCH: usize = 500;

/// How often a relay looks for rows when nothing wakes it.
pub const RELAY_POLL: Duration = Duration::from_millis(500);

/// How long a relay's lease (on the lead, and on claimed SQLite rows) lasts.
pub const RELAY_LEASE: Duration = Duration::from_secs(10);
