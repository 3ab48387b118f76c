//! Messages: the properties every AMQP message carries, the outgoing
//! [`Message`] and its header values.
//!
//! These types are rabbitry's own, so that the AMQP client library stays an
//! implementation detail. The incoming side, [`Delivery`](crate::Delivery),
//! lives with the consumer that settles it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::codec::Serializer;
use crate::error::Result;

/// `delivery_mode` for messages that survive a broker restart.
pub const PERSISTENT: u8 = 2;
/// `delivery_mode` for messages kept in memory only.
pub const TRANSIENT: u8 = 1;

/// A value in an AMQP header table.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum HeaderValue {
    /// A boolean.
    Bool(bool),
    /// Any integer type.
    Int(i64),
    /// Any floating-point or decimal type.
    Float(f64),
    /// A long string.
    String(String),
    /// A byte array.
    Bytes(Vec<u8>),
    /// A timestamp, seconds since the epoch.
    Timestamp(u64),
    /// An AMQP decimal: `value / 10^scale`. Shown (in JSON and HTTP
    /// headers) as its number string, `1.25`.
    #[serde(serialize_with = "decimal_as_text")]
    Decimal {
        /// Digits after the decimal point.
        scale: u8,
        /// The unscaled value.
        value: i32,
    },
    /// A nested array.
    Array(Vec<HeaderValue>),
    /// A nested table.
    Table(Headers),
    /// No value.
    Void,
}

impl HeaderValue {
    /// The value as a string, when it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as an integer, when it is one.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(n) => Some(*n),
            HeaderValue::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// A textual rendering used for HTTP headers and logs.
    pub fn to_text(&self) -> String {
        match self {
            HeaderValue::String(s) => s.clone(),
            HeaderValue::Bool(b) => b.to_string(),
            HeaderValue::Int(n) => n.to_string(),
            HeaderValue::Float(f) => f.to_string(),
            HeaderValue::Timestamp(t) => t.to_string(),
            HeaderValue::Decimal { scale, value } => decimal_text(*scale, *value),
            HeaderValue::Void => String::new(),
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

/// `value / 10^scale` as a plain number string: `(2, 125)` is `1.25`,
/// `(3, -5)` is `-0.005`.
pub(crate) fn decimal_text(scale: u8, value: i32) -> String {
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    let scale = usize::from(scale);
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

fn decimal_as_text<S: serde::Serializer>(
    scale: &u8,
    value: &i32,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&decimal_text(*scale, *value))
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::String(s.to_owned())
    }
}
impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::String(s)
    }
}
impl From<i64> for HeaderValue {
    fn from(n: i64) -> Self {
        HeaderValue::Int(n)
    }
}
impl From<bool> for HeaderValue {
    fn from(b: bool) -> Self {
        HeaderValue::Bool(b)
    }
}

/// An AMQP header table.
pub type Headers = BTreeMap<String, HeaderValue>;

/// The basic properties of an AMQP message. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Properties {
    /// MIME type of the body.
    pub content_type: Option<String>,
    /// Encoding of the body, such as `gzip`.
    pub content_encoding: Option<String>,
    /// Application headers.
    pub headers: Headers,
    /// 1 (transient) or 2 (persistent).
    pub delivery_mode: Option<u8>,
    /// 0 to 9.
    pub priority: Option<u8>,
    /// Matches a reply to its request.
    pub correlation_id: Option<String>,
    /// Queue (or routing key) the reply should go to.
    pub reply_to: Option<String>,
    /// Per-message TTL in milliseconds, as a string.
    pub expiration: Option<String>,
    /// An application-chosen id, stable across redeliveries and resends.
    pub message_id: Option<String>,
    /// Seconds since the epoch.
    pub timestamp: Option<u64>,
    /// The AMQP `type` property.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The authenticated user; the broker checks it.
    pub user_id: Option<String>,
    /// The sending application.
    pub app_id: Option<String>,
}

/// An outgoing message: a body, its properties, and where it goes.
///
/// A `Message` built by [`Message::new`] has no destination; a
/// [`Producer`](crate::Producer) fills in the exchange and routing key from
/// its settings unless the call gives them.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// The encoded body.
    pub body: Vec<u8>,
    /// The AMQP properties.
    pub properties: Properties,
    /// The routing key; `None` means the producer's.
    pub routing_key: Option<String>,
    /// The exchange; `None` means the producer's.
    pub exchange: Option<String>,
    /// Return the message as an error when no queue takes it.
    pub mandatory: bool,
}

impl Message {
    /// A message with this body and no properties.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        Message {
            body: body.into(),
            ..Message::default()
        }
    }

    /// A message whose body is `value` encoded by `serializer`, with its
    /// content type set.
    pub fn encode<T: Serialize + ?Sized>(serializer: Serializer, value: &T) -> Result<Self> {
        let mut msg = Message::new(serializer.encode(value)?);
        msg.properties.content_type = Some(serializer.content_type().to_owned());
        Ok(msg)
    }

    /// Sets the routing key.
    pub fn routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// Sets the exchange.
    pub fn exchange(mut self, exchange: impl Into<String>) -> Self {
        self.exchange = Some(exchange.into());
        self
    }

    /// Sets the content type.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.properties.content_type = Some(ct.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.properties.correlation_id = Some(id.into());
        self
    }

    /// Sets `reply_to`.
    pub fn reply_to(mut self, queue: impl Into<String>) -> Self {
        self.properties.reply_to = Some(queue.into());
        self
    }

    /// Sets the message id.
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.properties.message_id = Some(id.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.properties.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the delivery mode: persistent (`true`) or transient.
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.properties.delivery_mode = Some(if persistent { PERSISTENT } else { TRANSIENT });
        self
    }

    /// Makes an unroutable message an error instead of a silent drop.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_number_strings() {
        assert_eq!(decimal_text(2, 125), "1.25");
        assert_eq!(decimal_text(3, -5), "-0.005");
        assert_eq!(decimal_text(0, 42), "42");
        assert_eq!(decimal_text(1, i32::MIN), "-214748364.8");
        let v = HeaderValue::Decimal {
            scale: 2,
            value: 125,
        };
        assert_eq!(v.to_text(), "1.25");
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"1.25\"");
    }
}
