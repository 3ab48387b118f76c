//! How outgoing messages are stored in a row: their properties as JSON in a
//! lossless, tagged form (header types survive the round trip).
//!
//! Rows written by other programs (the table is a contract any language
//! may write with plain SQL) may give headers as a plain JSON object
//! instead: `{"content_type": "application/json", "headers": {"order_id":
//! "7", "attempt": 1}}`. Strings, integers, floats, booleans, null, arrays
//! and objects map to the AMQP header types of the same kind. Unknown keys
//! are errors, so that a typo (`content-type`) is reported on the row
//! instead of being dropped.

use serde::{Deserialize, Serialize};

use crate::message::{HeaderValue, Headers, Properties};

#[derive(Serialize, Deserialize)]
enum Stored {
    B(bool),
    I(i64),
    F(f64),
    S(String),
    X(Vec<u8>),
    T(u64),
    D(u8, i32),
    A(Vec<Stored>),
    M(Vec<(String, Stored)>),
    V,
}

fn to_stored(v: &HeaderValue) -> Stored {
    match v {
        HeaderValue::Bool(b) => Stored::B(*b),
        HeaderValue::Int(n) => Stored::I(*n),
        HeaderValue::Float(f) => Stored::F(*f),
        HeaderValue::String(s) => Stored::S(s.clone()),
        HeaderValue::Bytes(b) => Stored::X(b.clone()),
        HeaderValue::Timestamp(t) => Stored::T(*t),
        HeaderValue::Decimal { scale, value } => Stored::D(*scale, *value),
        HeaderValue::Array(a) => Stored::A(a.iter().map(to_stored).collect()),
        HeaderValue::Table(t) => {
            Stored::M(t.iter().map(|(k, v)| (k.clone(), to_stored(v))).collect())
        }
        HeaderValue::Void => Stored::V,
    }
}

fn from_stored(v: Stored) -> HeaderValue {
    match v {
        Stored::B(b) => HeaderValue::Bool(b),
        Stored::I(n) => HeaderValue::Int(n),
        Stored::F(f) => HeaderValue::Float(f),
        Stored::S(s) => HeaderValue::String(s),
        Stored::X(b) => HeaderValue::Bytes(b),
        Stored::T(t) => HeaderValue::Timestamp(t),
        Stored::D(scale, value) => HeaderValue::Decimal { scale, value },
        Stored::A(a) => HeaderValue::Array(a.into_iter().map(from_stored).collect()),
        Stored::M(m) => {
            HeaderValue::Table(m.into_iter().map(|(k, v)| (k, from_stored(v))).collect())
        }
        Stored::V => HeaderValue::Void,
    }
}

/// Headers as rabbitry writes them (tagged, in order), or as another
/// program may: a plain JSON object.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum StoredHeaders {
    Tagged(Vec<(String, Stored)>),
    Plain(serde_json::Map<String, serde_json::Value>),
}

impl Default for StoredHeaders {
    fn default() -> Self {
        StoredHeaders::Tagged(Vec::new())
    }
}

fn from_json(v: serde_json::Value) -> HeaderValue {
    use serde_json::Value;
    match v {
        Value::Null => HeaderValue::Void,
        Value::Bool(b) => HeaderValue::Bool(b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => HeaderValue::Int(i),
            None => HeaderValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => HeaderValue::String(s),
        Value::Array(a) => HeaderValue::Array(a.into_iter().map(from_json).collect()),
        Value::Object(m) => {
            HeaderValue::Table(m.into_iter().map(|(k, v)| (k, from_json(v))).collect())
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StoredProperties {
    content_type: Option<String>,
    content_encoding: Option<String>,
    #[serde(default)]
    headers: StoredHeaders,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
    #[serde(alias = "type")]
    kind: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
}

pub(crate) fn encode(p: &Properties) -> String {
    let s = StoredProperties {
        content_type: p.content_type.clone(),
        content_encoding: p.content_encoding.clone(),
        headers: StoredHeaders::Tagged(
            p.headers
                .iter()
                .map(|(k, v)| (k.clone(), to_stored(v)))
                .collect(),
        ),
        delivery_mode: p.delivery_mode,
        priority: p.priority,
        correlation_id: p.correlation_id.clone(),
        reply_to: p.reply_to.clone(),
        expiration: p.expiration.clone(),
        message_id: p.message_id.clone(),
        timestamp: p.timestamp,
        kind: p.kind.clone(),
        user_id: p.user_id.clone(),
        app_id: p.app_id.clone(),
    };
    // Serializing plain data to JSON cannot fail.
    serde_json::to_string(&s).unwrap_or_default()
}

pub(crate) fn decode(text: &str) -> Result<Properties, serde_json::Error> {
    let s: StoredProperties = serde_json::from_str(text)?;
    let headers: Headers = match s.headers {
        StoredHeaders::Tagged(h) => h.into_iter().map(|(k, v)| (k, from_stored(v))).collect(),
        StoredHeaders::Plain(h) => h.into_iter().map(|(k, v)| (k, from_json(v))).collect(),
    };
    Ok(Properties {
        content_type: s.content_type,
        content_encoding: s.content_encoding,
        headers,
        delivery_mode: s.delivery_mode,
        priority: s.priority,
        correlation_id: s.correlation_id,
        reply_to: s.reply_to,
        expiration: s.expiration,
        message_id: s.message_id,
        timestamp: s.timestamp,
        kind: s.kind,
        user_id: s.user_id,
        app_id: s.app_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_survive_storage_with_their_types() {
        let mut p = Properties {
            content_type: Some("application/x-msgpack".into()),
            correlation_id: Some("c".into()),
            delivery_mode: Some(2),
            ..Properties::default()
        };
        p.headers
            .insert("bytes".into(), HeaderValue::Bytes(vec![1, 2]));
        p.headers.insert("n".into(), HeaderValue::Int(5));
        p.headers.insert("s".into(), "x".into());
        assert_eq!(decode(&encode(&p)).unwrap(), p);
    }

    #[test]
    fn another_programs_plain_properties_are_read_and_typos_refused() {
        let p = decode(
            r#"{"content_type": "application/json", "correlation_id": "c-1",
                "headers": {"order_id": "7", "n": 3, "ok": true, "f": 1.5, "none": null}}"#,
        )
        .unwrap();
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.headers["order_id"], HeaderValue::String("7".into()));
        assert_eq!(p.headers["n"], HeaderValue::Int(3));
        assert_eq!(p.headers["ok"], HeaderValue::Bool(true));
        assert_eq!(p.headers["f"], HeaderValue::Float(1.5));
        assert_eq!(p.headers["none"], HeaderValue::Void);
        assert_eq!(decode("{}").unwrap(), Properties::default());
        let typo = decode(r#"{"content-type": "text/plain"}"#).unwrap_err();
        assert!(typo.to_string().contains("content-type"), "{typo}");
        assert!(decode("not json").is_err());
        assert!(decode(r#"{"headers": 5}"#).is_err());
    }
}
