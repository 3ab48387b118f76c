//! How outgoing messages are stored in a row: their properties as JSON in a
//! lossless, tagged form (header types survive the round trip).

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

#[derive(Serialize, Deserialize, Default)]
struct StoredProperties {
    content_type: Option<String>,
    content_encoding: Option<String>,
    headers: Vec<(String, Stored)>,
    delivery_mode: Option<u8>,
    priority: Option<u8>,
    correlation_id: Option<String>,
    reply_to: Option<String>,
    expiration: Option<String>,
    message_id: Option<String>,
    timestamp: Option<u64>,
    kind: Option<String>,
    user_id: Option<String>,
    app_id: Option<String>,
}

pub(crate) fn encode(p: &Properties) -> String {
    let s = StoredProperties {
        content_type: p.content_type.clone(),
        content_encoding: p.content_encoding.clone(),
        headers: p
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), to_stored(v)))
            .collect(),
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
    let headers: Headers = s
        .headers
        .into_iter()
        .map(|(k, v)| (k, from_stored(v)))
        .collect();
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
}
