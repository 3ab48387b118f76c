//! What the protocol and the connection can carry.
//!
//! AMQP 0-9-1 puts hard limits on what one message may be: names, routing
//! keys and most properties are short strings (at most 255 bytes); a
//! message's properties travel in one content-header frame, which must fit
//! in the `frame_max` the connection negotiated; the broker refuses a body
//! over its `max_message_size` and an `expiration` that is not a
//! non-negative integer. The AMQP client panics on an over-long short
//! string, and the broker answers the others by closing the channel or the
//! whole connection, which takes every other message in flight with it.
//!
//! Everything rabbitry publishes (a producer's messages, replies, retries,
//! dead letters, replays, relayed outbox rows, RPC requests) is checked
//! here first, so that a message that cannot go fails alone with an
//! [`ErrorKind::Invalid`] error naming the field and the limit, before it
//! reaches the client or the wire.

use crate::error::{Error, ErrorKind, Result};
use crate::message::{HeaderValue, Headers, Properties};

/// The longest AMQP short string, in bytes: queue, exchange and consumer
/// names, routing keys, header names and most properties.
pub(crate) const SHORT_STRING_MAX: usize = 255;

/// A frame's own bytes around its payload: type (1), channel (2), size (4)
/// and the end octet (1).
pub(crate) const FRAME_OVERHEAD: usize = 8;

/// A content header's fixed part: class id (2), weight (2), body size (8)
/// and the property flags (2).
const HEADER_FIXED: usize = 2 + 2 + 8 + 2;

/// The longest per-message TTL RabbitMQ accepts, in milliseconds.
pub(crate) const MAX_EXPIRATION_MS: u64 = u32::MAX as u64;

/// RabbitMQ 3.8 to 3.13's default `max_message_size` (128 MiB).
pub(crate) const MAX_MESSAGE_SIZE_3: u64 = 128 * 1024 * 1024;

/// RabbitMQ 4's default `max_message_size` (16 MiB).
pub(crate) const MAX_MESSAGE_SIZE_4: u64 = 16 * 1024 * 1024;

/// What one connection can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// The negotiated frame size; 0 means no limit.
    pub(crate) frame_max: u32,
    /// The largest body the broker takes, by default.
    pub(crate) max_body: u64,
}

/// The broker's major version, from its `connection.start` version text
/// (`3.10.8` is 3): what its limits, and some arguments' meanings,
/// depend on.
pub(crate) fn major(version: &str) -> Option<u32> {
    version.split('.').next()?.parse().ok()
}

impl Limits {
    /// The limits of a connection that negotiated `frame_max` with a
    /// broker of `server_version`. A broker configured with a smaller
    /// `max_message_size` than its version's default refuses such a
    /// message itself; the publisher then fails that message alone.
    pub(crate) fn of(frame_max: u32, server_version: &str) -> Limits {
        let major = major(server_version).unwrap_or(3);
        Limits {
            frame_max,
            max_body: if major >= 4 {
                MAX_MESSAGE_SIZE_4
            } else {
                MAX_MESSAGE_SIZE_3
            },
        }
    }

    /// The largest content-header payload a frame can carry.
    pub(crate) fn max_header(&self) -> usize {
        if self.frame_max == 0 {
            usize::MAX
        } else {
            (self.frame_max as usize).saturating_sub(FRAME_OVERHEAD)
        }
    }
}

impl Default for Limits {
    /// RabbitMQ's defaults: 128 KiB frames, a 128 MiB body.
    fn default() -> Self {
        Limits {
            frame_max: 131_072,
            max_body: MAX_MESSAGE_SIZE_3,
        }
    }
}

fn invalid(text: String) -> Error {
    Error::new(ErrorKind::Invalid, text)
}

/// At most `max` characters of `s`, with an ellipsis when cut: long
/// values are named in errors without flooding them.
pub(crate) fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// `value` fits in a short string; otherwise an error naming `what`.
pub(crate) fn check_short(what: &str, value: &str) -> Result<()> {
    check_short_with(|| what.to_owned(), value)
}

/// [`check_short`] with the name made only for the error: publishing
/// allocates nothing for a value that fits.
fn check_short_with(what: impl FnOnce() -> String, value: &str) -> Result<()> {
    if value.len() > SHORT_STRING_MAX {
        return Err(invalid(format!(
            "{} '{}' is {} bytes; AMQP allows at most {SHORT_STRING_MAX} (a short string)",
            what(),
            shorten(value, 40),
            value.len()
        )));
    }
    Ok(())
}

/// The properties' short strings, header names (nested tables included)
/// and `expiration` are what the protocol and RabbitMQ accept.
pub(crate) fn check_properties(p: &Properties) -> Result<()> {
    let shorts = [
        ("content_type", &p.content_type),
        ("content_encoding", &p.content_encoding),
        ("correlation_id", &p.correlation_id),
        ("reply_to", &p.reply_to),
        ("expiration", &p.expiration),
        ("message_id", &p.message_id),
        ("type", &p.kind),
        ("user_id", &p.user_id),
        ("app_id", &p.app_id),
    ];
    for (name, value) in shorts {
        if let Some(v) = value {
            check_short_with(|| format!("property {name}"), v)?;
        }
    }
    if let Some(e) = &p.expiration {
        check_expiration(e)?;
    }
    check_table("header", &p.headers)
}

fn check_table(path: &str, table: &Headers) -> Result<()> {
    for (k, v) in table {
        check_short_with(|| format!("{path} name"), k)?;
        // Only nested values need a check of their own; the path is made
        // only then.
        if matches!(
            v,
            HeaderValue::Table(_) | HeaderValue::Array(_) | HeaderValue::String(_)
        ) {
            check_value(&|| format!("{path} '{}'", shorten(k, 40)), v)?;
        }
    }
    Ok(())
}

fn check_value(path: &dyn Fn() -> String, v: &HeaderValue) -> Result<()> {
    match v {
        HeaderValue::Table(t) => check_table(&path(), t),
        HeaderValue::Array(items) => items.iter().try_for_each(|i| check_value(path, i)),
        HeaderValue::String(s) if s.len() > u32::MAX as usize => Err(invalid(format!(
            "{}: a string of {} bytes is longer than AMQP's 4 GiB",
            path(),
            s.len()
        ))),
        _ => Ok(()),
    }
}

/// RabbitMQ takes an `expiration` of digits only, at most 2^32 - 1 ms,
/// and closes the channel on anything else.
fn check_expiration(e: &str) -> Result<()> {
    let ok = !e.is_empty()
        && e.bytes().all(|b| b.is_ascii_digit())
        && e.parse::<u64>().is_ok_and(|ms| ms <= MAX_EXPIRATION_MS);
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "property expiration '{}' is not a TTL: RabbitMQ takes milliseconds as digits, \
             0 to {MAX_EXPIRATION_MS}",
            shorten(e, 40)
        )))
    }
}

/// The size of the content-header payload that carries `p`, as the AMQP
/// client encodes it.
pub(crate) fn header_size(p: &Properties) -> usize {
    let short = |s: &Option<String>| s.as_ref().map_or(0, |s| 1 + s.len());
    HEADER_FIXED
        + short(&p.content_type)
        + short(&p.content_encoding)
        + if p.headers.is_empty() {
            0
        } else {
            table_size(&p.headers)
        }
        + p.delivery_mode.map_or(0, |_| 1)
        + p.priority.map_or(0, |_| 1)
        + short(&p.correlation_id)
        + short(&p.reply_to)
        + short(&p.expiration)
        + short(&p.message_id)
        + p.timestamp.map_or(0, |_| 8)
        + short(&p.kind)
        + short(&p.user_id)
        + short(&p.app_id)
}

/// A field table: its length (4) and each entry's name and value.
fn table_size(t: &Headers) -> usize {
    4 + t
        .iter()
        .map(|(k, v)| 1 + k.len() + value_size(v))
        .sum::<usize>()
}

/// A field value: its type octet and its encoding (see `amqp` for the
/// types rabbitry sends).
fn value_size(v: &HeaderValue) -> usize {
    1 + match v {
        HeaderValue::Bool(_) => 1,
        HeaderValue::Int(_) | HeaderValue::Float(_) | HeaderValue::Timestamp(_) => 8,
        HeaderValue::Decimal { .. } => 5,
        HeaderValue::String(s) => 4 + s.len(),
        HeaderValue::Bytes(b) => 4 + b.len(),
        HeaderValue::Array(items) => 4 + items.iter().map(value_size).sum::<usize>(),
        HeaderValue::Table(t) => table_size(t),
        HeaderValue::Void => 0,
    }
}

/// A whole publish: the exchange, the routing key, the properties, the
/// size of their frame and the body's size.
pub(crate) fn check_publish(
    exchange: &str,
    routing_key: &str,
    p: &Properties,
    body_len: usize,
    limits: &Limits,
) -> Result<()> {
    check_short("exchange", exchange)?;
    check_short("routing key", routing_key)?;
    check_properties(p)?;
    let header = header_size(p);
    if header > limits.max_header() {
        return Err(invalid(format!(
            "the message's properties and headers take {header} bytes, more than one frame \
             carries on this connection ({} bytes: frame_max {} less {FRAME_OVERHEAD}); \
             the broker would close the connection",
            limits.max_header(),
            limits.frame_max
        )));
    }
    if body_len as u64 > limits.max_body {
        return Err(invalid(format!(
            "the body is {body_len} bytes, more than the broker's max_message_size ({} bytes)",
            limits.max_body
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_past_255_bytes_are_refused_with_their_length() {
        assert!(check_short("routing key", &"k".repeat(255)).is_ok());
        let e = check_short("routing key", &"k".repeat(256)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains("256 bytes"), "{e}");
        // Bytes, not characters.
        assert!(check_short("queue", &"é".repeat(128)).is_err());
    }

    #[test]
    fn expiration_must_be_milliseconds() {
        for ok in ["0", "60000", "4294967295"] {
            assert!(check_expiration(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-1",
            "1.5",
            "abc",
            "4294967296",
            " 5",
            "99999999999999999999",
        ] {
            assert!(check_expiration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_header_frame_past_frame_max_is_refused() {
        let mut p = Properties::default();
        p.headers
            .insert("big".into(), HeaderValue::String("x".repeat(200_000)));
        let e = check_publish("", "q", &p, 10, &Limits::default()).unwrap_err();
        assert!(e.to_string().contains("frame_max 131072"), "{e}");
        let unlimited = Limits {
            frame_max: 0,
            ..Limits::default()
        };
        assert!(check_publish("", "q", &p, 10, &unlimited).is_ok());
    }

    /// A short string of 0 to 300 bytes: past the limit a fifth of the time.
    fn maybe_long() -> impl proptest::strategy::Strategy<Value = String> {
        "[a-zA-Z0-9._é-]{0,150}"
    }

    fn properties() -> impl proptest::strategy::Strategy<Value = Properties> {
        use proptest::prelude::*;
        let short = || proptest::option::of(maybe_long());
        (
            (short(), short(), short(), short(), short()),
            (short(), short(), short(), short()),
            proptest::option::of(any::<u8>()),
            proptest::option::of(any::<u64>()),
            proptest::collection::btree_map(maybe_long(), crate::amqp::tests::header_value(), 0..6),
        )
            .prop_map(
                |((ct, ce, cid, rt, exp), (mid, kind, uid, app), prio, ts, headers)| Properties {
                    content_type: ct,
                    content_encoding: ce,
                    headers,
                    delivery_mode: prio.map(|p| p % 3),
                    priority: prio,
                    correlation_id: cid,
                    reply_to: rt,
                    expiration: exp,
                    message_id: mid,
                    timestamp: ts,
                    kind,
                    user_id: uid,
                    app_id: app,
                },
            )
    }

    proptest::proptest! {
        /// What the check lets through, the AMQP client encodes without
        /// panicking, in exactly the header size computed here; what it
        /// refuses has a value past a limit.
        #[test]
        fn the_checked_size_is_the_clients_encoded_size(p in properties()) {
            match check_properties(&p) {
                Ok(()) => {
                    let basic = crate::amqp::to_basic(&p);
                    let encoded = amqp_serde::to_bytes(&basic).unwrap();
                    // Class id, weight and body size come before the
                    // properties (whose flags the client encodes).
                    proptest::prop_assert_eq!(header_size(&p), 2 + 2 + 8 + encoded.len());
                }
                Err(e) => {
                    let text = e.to_string();
                    proptest::prop_assert!(
                        text.contains("at most 255") || text.contains("expiration"),
                        "{}", text
                    );
                }
            }
        }
    }

    #[test]
    fn the_broker_version_sets_the_body_limit() {
        assert_eq!(Limits::of(4096, "3.10.8").max_body, MAX_MESSAGE_SIZE_3);
        assert_eq!(Limits::of(4096, "4.1.0").max_body, MAX_MESSAGE_SIZE_4);
        let e = check_publish(
            "",
            "q",
            &Properties::default(),
            17 << 20,
            &Limits::of(0, "4.0"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("max_message_size"), "{e}");
    }
}
