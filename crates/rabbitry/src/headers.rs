//! The `x-rabbitry-*` header names: rabbitry's part of the wire format,
//! read and written by the worker (retries, dead letters), the RPC client
//! (deadlines) and any client in another language that wants to.

/// The attempt number of a retried message (1 is the first attempt).
pub const ATTEMPT: &str = "x-rabbitry-attempt";
/// Why the message failed, on dead letters.
pub const ERROR: &str = "x-rabbitry-error";
/// How many attempts were made, on dead letters.
pub const ATTEMPTS: &str = "x-rabbitry-attempts";
/// The exchange the message was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-rabbitry-original-exchange";
/// The routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-rabbitry-original-routing-key";
/// When the message was dead-lettered (RFC 3339, UTC).
pub const FAILED_AT: &str = "x-rabbitry-failed-at";
/// Set on a dead letter whose own headers were dropped because, with
/// rabbitry's, they no longer fitted in one frame: what was dropped.
pub const TRIMMED: &str = "x-rabbitry-trimmed";
/// The caller's deadline, epoch milliseconds: a request past it is not handled.
pub const DEADLINE: &str = "x-rabbitry-deadline";
/// When the outbox relay published the message, epoch milliseconds: with
/// the row's commit it measures the outbox's delay, and with the consumer's
/// clock the broker's.
pub const PUBLISHED_AT: &str = "x-rabbitry-published-at";
/// When the outbox row was written, epoch milliseconds.
pub const WRITTEN_AT: &str = "x-rabbitry-written-at";
