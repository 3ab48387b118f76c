//! Retries through delay queues, and the dead-letter queue.
//!
//! A failed message is published to `<queue>.retry.<delay>`, a queue whose
//! messages expire after the delay (`x-message-ttl`) and are then
//! dead-lettered by the broker straight back to `<queue>` through the
//! default exchange. No delivery is held unacked while it waits and no
//! plugin is needed. After the last attempt the message goes to
//! `<queue>.dead` with headers saying why.

use std::time::{Duration, SystemTime};

use crate::clock::rfc3339;

use crate::error::{Error, Result};
use crate::message::{HeaderValue, Headers, Message, Properties};
use crate::topology::{Queue, QueueType, Topology};

use crate::headers::{
    ATTEMPT, ATTEMPTS, ERROR, FAILED_AT, ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY,
};

/// How a consumer's failed messages are retried: `attempts` in all (the
/// first included), waiting `delays[i]` before retry `i + 1`; the last
/// delay repeats when there are more retries than delays.
///
/// ```
/// use std::time::Duration;
/// use rabbitry::worker::Retry;
///
/// let retry = Retry::attempts(5).delays([Duration::from_secs(1), Duration::from_secs(30)]);
/// assert_eq!(retry.delay_before(4), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Retry {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The delay before each retry.
    pub delays: Vec<Duration>,
}

impl Default for Retry {
    /// Three attempts, 1 s and then 5 s apart.
    fn default() -> Self {
        Retry {
            attempts: crate::defaults::RETRY_ATTEMPTS,
            delays: crate::defaults::RETRY_DELAYS.to_vec(),
        }
    }
}

impl Retry {
    /// `n` attempts in all, with the default delays (1 s, then 5 s).
    pub fn attempts(n: u32) -> Self {
        Retry {
            attempts: n,
            ..Retry::default()
        }
    }

    /// No retries: a failure dead-letters at once.
    pub fn never() -> Self {
        Retry::attempts(1)
    }

    /// Sets the delays before the retries.
    #[must_use]
    pub fn delays(mut self, delays: impl IntoIterator<Item = Duration>) -> Self {
        self.delays = delays.into_iter().collect();
        self
    }

    /// Its delay queues and the dead-letter queue of `queue` (of `kind`):
    /// what a worker declares for a consumer of `queue` with this policy,
    /// for a program that declares ahead of its workers.
    pub fn topology(&self, queue: &str, kind: Option<QueueType>) -> Topology {
        topology(queue, kind, self)
    }

    /// The delay before retry number `retry` (1-based).
    pub fn delay_before(&self, retry: u32) -> Duration {
        delay_for(self, retry)
    }

    /// Checks the policy, naming the field that breaks a rule
    /// ([`Error::setting`](crate::Error::setting)(crate::Error::setting)): at least one attempt, a
    /// delay for retries, each delay from 1 ms to RabbitMQ's longest
    /// message TTL (2^32-1 ms).
    pub fn validate(&self) -> Result<()> {
        if self.attempts == 0 {
            return Err(Error::invalid_setting("attempts", "must be at least 1"));
        }
        if self.attempts > 1 && self.delays.is_empty() {
            return Err(Error::invalid_setting(
                "delays",
                "needs at least one delay when attempts > 1",
            ));
        }
        for (i, d) in self.delays.iter().enumerate() {
            if d.as_millis() == 0 || *d > MAX_DELAY {
                return Err(Error::invalid_setting(
                    format!("delays[{i}]"),
                    format!("{d:?}: a retry delay is between 1ms and 49d (RabbitMQ's longest message TTL)"),
                ));
            }
        }
        Ok(())
    }
}

/// The longest retry delay: RabbitMQ's message TTL is at most 2^32-1 ms.
pub(crate) const MAX_DELAY: Duration = Duration::from_millis(u32::MAX as u64);

/// `1s`, `500ms`, `2m`: the delay as it appears in a queue name.
pub(crate) fn delay_label(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// The delay queue for `queue` and `delay`.
pub fn retry_queue(queue: &str, delay: Duration) -> String {
    format!("{queue}.retry.{}", delay_label(delay))
}

/// The dead-letter queue for `queue`.
pub(crate) fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The delay before retry number `retry` (1-based): the configured list,
/// whose last entry repeats.
pub(crate) fn delay_for(policy: &Retry, retry: u32) -> Duration {
    let i = (retry as usize).saturating_sub(1);
    policy
        .delays
        .get(i)
        .or(policy.delays.last())
        .copied()
        .unwrap_or(Duration::from_secs(1))
}

/// Where the broker says a message it dead-lettered first died, and why
/// (`delivery_limit`, `expired`, `rejected`, `maxlen`).
pub(crate) const FIRST_DEATH_QUEUE: &str = "x-first-death-queue";
/// See [`FIRST_DEATH_QUEUE`].
pub(crate) const FIRST_DEATH_REASON: &str = "x-first-death-reason";
/// Every header the broker adds when it dead-letters a message.
const BROKER_DEATH: [&str; 7] = [
    "x-death",
    FIRST_DEATH_QUEUE,
    FIRST_DEATH_REASON,
    "x-first-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-last-death-exchange",
];

/// Why a dead letter is dead: the worker's error header, or else what the
/// broker says of a message it dead-lettered itself.
pub(crate) fn dead_reason(p: &Properties) -> Option<String> {
    let get = |k: &str| p.headers.get(k).and_then(HeaderValue::as_str);
    if let Some(error) = get(ERROR) {
        return Some(error.to_owned());
    }
    let reason = get(FIRST_DEATH_REASON)?;
    let queue = get(FIRST_DEATH_QUEUE).unwrap_or("?");
    Some(match reason {
        "delivery_limit" => format!(
            "dead-lettered by the broker from '{queue}': delivered more times than its delivery limit without being settled (its handler may crash the worker process)"
        ),
        other => format!("dead-lettered by the broker from '{queue}': {other}"),
    })
}

/// The dead-letter and delay queues a consumer of `queue` needs, of the
/// same type as `queue` (`kind`). For a quorum queue they are quorum queues
/// too, and the delay queues dead-letter back `at-least-once`: the broker
/// keeps a message until the queue it goes back to has confirmed it, so a
/// node lost in between loses nothing.
pub(crate) fn topology(queue: &str, kind: Option<QueueType>, policy: &Retry) -> Topology {
    let quorum = kind == Some(QueueType::Quorum);
    let of_kind = |name: String| {
        if quorum {
            Queue::quorum(name)
        } else {
            Queue::durable(name)
        }
    };
    let mut t = Topology::default();
    t.queue(of_kind(dead_queue(queue)));
    for retry in 1..policy.attempts {
        let delay = delay_for(policy, retry);
        let mut q = of_kind(retry_queue(queue, delay));
        q.arguments.insert(
            "x-message-ttl".into(),
            HeaderValue::Int(delay.as_millis() as i64),
        );
        dead_letter_to(&mut q.arguments, queue, quorum);
        t.queue(q);
    }
    t
}

/// Queue arguments that dead-letter to `target` through the default
/// exchange; on a quorum queue, at least once (which RabbitMQ allows only
/// with `x-overflow = reject-publish`).
fn dead_letter_to(arguments: &mut Headers, target: &str, quorum: bool) {
    arguments.insert("x-dead-letter-exchange".into(), HeaderValue::from(""));
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        HeaderValue::from(target),
    );
    if quorum {
        arguments.insert(
            "x-dead-letter-strategy".into(),
            HeaderValue::from("at-least-once"),
        );
        arguments.insert("x-overflow".into(), HeaderValue::from("reject-publish"));
    }
}

/// The consumer's own queue arguments for a delivery limit: after `limit`
/// deliveries that were never settled (the worker process died while
/// handling them, again and again), the broker dead-letters the message to
/// `<queue>.dead`, at least once, instead of redelivering it forever. Only
/// quorum queues count deliveries; [`check_delivery_limit`] says so.
pub(crate) fn limit_deliveries(arguments: &mut Headers, queue: &str, limit: u32) {
    // Positive only: on RabbitMQ 3.x a negative limit means "dead-letter
    // after the first delivery".
    arguments.insert(
        "x-delivery-limit".into(),
        HeaderValue::Int(i64::from(limit)),
    );
    dead_letter_to(arguments, &dead_queue(queue), true);
}

/// Whether a delivery limit can apply to a queue of `kind`.
pub(crate) fn check_delivery_limit(kind: Option<QueueType>, limit: u32) -> Result<()> {
    if limit == 0 {
        return Err(Error::invalid_setting(
            "delivery_limit",
            "must be at least 1",
        ));
    }
    if kind != Some(QueueType::Quorum) {
        return Err(Error::invalid_setting(
            "delivery_limit",
            "needs queue_type = quorum: only quorum queues count deliveries",
        ));
    }
    Ok(())
}

/// The attempt number carried by a message (1 when absent).
pub(crate) fn attempt_of(p: &Properties) -> u32 {
    p.headers
        .get(ATTEMPT)
        .and_then(HeaderValue::as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// The exchange and routing key the message was first published with:
/// from the headers of a retried message, or as delivered.
pub(crate) fn original_route(
    p: &Properties,
    exchange: &str,
    routing_key: &str,
) -> (String, String) {
    let get = |k: &str| {
        p.headers
            .get(k)
            .and_then(HeaderValue::as_str)
            .map(str::to_owned)
    };
    (
        get(ORIGINAL_EXCHANGE).unwrap_or_else(|| exchange.to_owned()),
        get(ORIGINAL_ROUTING_KEY).unwrap_or_else(|| routing_key.to_owned()),
    )
}

/// The copy of a failed message for the delay queue of its next attempt.
pub(crate) fn for_retry(
    body: Vec<u8>,
    mut p: Properties,
    original: (&str, &str),
    next_attempt: u32,
    queue: &str,
    delay: Duration,
) -> Message {
    p.headers
        .insert(ATTEMPT.into(), HeaderValue::Int(next_attempt.into()));
    p.headers
        .insert(ORIGINAL_EXCHANGE.into(), original.0.into());
    p.headers
        .insert(ORIGINAL_ROUTING_KEY.into(), original.1.into());
    // A per-message TTL would fight the queue's; the queue decides.
    p.expiration = None;
    Message {
        body,
        properties: p,
        routing_key: Some(retry_queue(queue, delay)),
        exchange: Some(String::new()),
        mandatory: true,
    }
}

/// The copy of a failed message for the dead-letter queue.
pub(crate) fn for_dead_letter(
    body: Vec<u8>,
    mut p: Properties,
    original: (&str, &str),
    attempts: u32,
    error: &str,
    queue: &str,
) -> Message {
    p.headers.insert(ERROR.into(), error.into());
    p.headers
        .insert(ATTEMPTS.into(), HeaderValue::Int(attempts.into()));
    p.headers
        .insert(ORIGINAL_EXCHANGE.into(), original.0.into());
    p.headers
        .insert(ORIGINAL_ROUTING_KEY.into(), original.1.into());
    p.headers
        .insert(FAILED_AT.into(), rfc3339(SystemTime::now()).into());
    p.headers.remove(ATTEMPT);
    p.expiration = None;
    Message {
        body,
        properties: p,
        routing_key: Some(dead_queue(queue)),
        exchange: Some(String::new()),
        mandatory: true,
    }
}

/// A dead letter made ready to go back where it came from: the rabbitry
/// headers removed, so attempts start again at 1.
pub(crate) fn for_replay(body: Vec<u8>, mut p: Properties) -> Option<Message> {
    let get = |k: &str| {
        p.headers
            .get(k)
            .and_then(HeaderValue::as_str)
            .map(str::to_owned)
    };
    // The worker's own dead letters carry their route; a message the
    // broker dead-lettered (a delivery limit) goes back to the queue it
    // died in, through the default exchange.
    let (exchange, routing_key) = match (get(ORIGINAL_EXCHANGE), get(ORIGINAL_ROUTING_KEY)) {
        (Some(exchange), Some(routing_key)) => (exchange, routing_key),
        _ => (String::new(), get(FIRST_DEATH_QUEUE)?),
    };
    for k in [
        ATTEMPT,
        ERROR,
        ATTEMPTS,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        FAILED_AT,
    ]
    .into_iter()
    .chain(BROKER_DEATH)
    {
        p.headers.remove(k);
    }
    Some(Message {
        body,
        properties: p,
        routing_key: Some(routing_key),
        exchange: Some(exchange),
        mandatory: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_delays() {
        assert_eq!(retry_queue("q", Duration::from_secs(5)), "q.retry.5s");
        assert_eq!(
            retry_queue("q", Duration::from_millis(250)),
            "q.retry.250ms"
        );
        assert_eq!(retry_queue("q", Duration::from_secs(120)), "q.retry.2m");
        let p = Retry::attempts(4).delays([Duration::from_secs(1), Duration::from_secs(5)]);
        assert!(p.validate().is_ok());
        assert!(Retry::attempts(0).validate().is_err());
        assert!(Retry::attempts(2).delays([]).validate().is_err());
        assert!(Retry::never().delays([]).validate().is_ok());
        assert!(Retry::attempts(2)
            .delays([Duration::from_secs(60 * 86_400)])
            .validate()
            .is_err());
        assert_eq!(delay_for(&p, 1), Duration::from_secs(1));
        assert_eq!(delay_for(&p, 3), Duration::from_secs(5));
        let t = topology("q", None, &p);
        let names: Vec<_> = t.queues.iter().map(|q| q.name.as_str()).collect();
        assert_eq!(names, ["q.dead", "q.retry.1s", "q.retry.5s"]);
    }

    #[test]
    fn replay_resets_attempts_and_restores_the_route() {
        let m = for_dead_letter(
            b"x".to_vec(),
            Properties::default(),
            ("shop", "order.new"),
            3,
            "boom",
            "q",
        );
        assert_eq!(m.routing_key.as_deref(), Some("q.dead"));
        assert_eq!(m.properties.headers[ERROR], HeaderValue::from("boom"));
        let r = for_replay(m.body, m.properties).unwrap();
        assert_eq!(r.exchange.as_deref(), Some("shop"));
        assert_eq!(r.routing_key.as_deref(), Some("order.new"));
        assert!(r.properties.headers.is_empty());
        assert_eq!(attempt_of(&r.properties), 1);
    }

    #[test]
    fn a_message_the_broker_dead_lettered_says_why_and_replays_to_its_queue() {
        let mut p = Properties::default();
        for (k, v) in [
            (FIRST_DEATH_QUEUE, "orders"),
            (FIRST_DEATH_REASON, "delivery_limit"),
            ("x-first-death-exchange", ""),
        ] {
            p.headers.insert(k.into(), HeaderValue::from(v));
        }
        p.headers
            .insert("x-death".into(), HeaderValue::Array(Vec::new()));
        let why = dead_reason(&p).unwrap();
        assert!(
            why.contains("'orders'") && why.contains("delivery limit"),
            "{why}"
        );
        let r = for_replay(b"x".to_vec(), p).unwrap();
        assert_eq!(r.exchange.as_deref(), Some(""));
        assert_eq!(r.routing_key.as_deref(), Some("orders"));
        assert!(
            r.properties.headers.is_empty(),
            "{:?}",
            r.properties.headers
        );
        assert_eq!(
            for_replay(b"x".to_vec(), Properties::default()).map(|m| m.routing_key),
            None,
            "no route at all: left in place"
        );
    }
}
