//! Translation between rabbitry's types and the AMQP client's.
//!
//! Everything that touches `amqprs` types for properties and tables goes
//! through here, so the client stays out of the public API.

use amqprs::{BasicProperties, FieldTable, FieldValue};

use crate::message::{HeaderValue, Headers, Properties};

/// Our header table as the client's field table. Keys longer than 255 bytes
/// cannot be sent and are skipped.
pub(crate) fn to_table(headers: &Headers) -> FieldTable {
    let mut table = FieldTable::new();
    for (k, v) in headers {
        if let Ok(name) = k.as_str().try_into() {
            table.insert(name, to_field(v));
        }
    }
    table
}

fn to_field(v: &HeaderValue) -> FieldValue {
    match v {
        HeaderValue::Bool(b) => FieldValue::t(*b),
        HeaderValue::Int(n) => FieldValue::l(*n),
        HeaderValue::Float(f) => FieldValue::d(*f),
        HeaderValue::String(s) => FieldValue::from(s.as_str()),
        HeaderValue::Bytes(b) => b
            .clone()
            .try_into()
            .map(FieldValue::x)
            .unwrap_or(FieldValue::V),
        HeaderValue::Timestamp(t) => FieldValue::T(*t),
        HeaderValue::Decimal { scale, value } => {
            FieldValue::D(amqprs::DecimalValue::new(*scale, *value))
        }
        HeaderValue::Array(items) => items
            .iter()
            .map(to_field)
            .collect::<Vec<_>>()
            .try_into()
            .map(FieldValue::A)
            .unwrap_or(FieldValue::V),
        HeaderValue::Table(t) => FieldValue::F(to_table(t)),
        HeaderValue::Void => FieldValue::V,
    }
}

pub(crate) fn from_table(table: &FieldTable) -> Headers {
    table
        .as_ref()
        .iter()
        .map(|(k, v)| (k.to_string(), from_field(v)))
        .collect()
}

fn from_field(v: &FieldValue) -> HeaderValue {
    match v {
        FieldValue::t(b) => HeaderValue::Bool(*b),
        FieldValue::b(n) => HeaderValue::Int((*n).into()),
        FieldValue::B(n) => HeaderValue::Int((*n).into()),
        FieldValue::s(n) => HeaderValue::Int((*n).into()),
        FieldValue::u(n) => HeaderValue::Int((*n).into()),
        FieldValue::I(n) => HeaderValue::Int((*n).into()),
        FieldValue::i(n) => HeaderValue::Int((*n).into()),
        FieldValue::l(n) => HeaderValue::Int(*n),
        FieldValue::f(f) => HeaderValue::Float((*f).into()),
        FieldValue::d(f) => HeaderValue::Float(*f),
        // The client keeps a decimal's parts private; its serde form is
        // the pair (scale, value).
        FieldValue::D(d) => match serde_json::to_value(d)
            .ok()
            .and_then(|v| serde_json::from_value::<(u8, i32)>(v).ok())
        {
            Some((scale, value)) => HeaderValue::Decimal { scale, value },
            None => HeaderValue::String(d.to_string()),
        },
        FieldValue::S(s) => HeaderValue::String(String::from(s.clone())),
        FieldValue::A(items) => {
            HeaderValue::Array(Vec::from(items.clone()).iter().map(from_field).collect())
        }
        FieldValue::T(t) => HeaderValue::Timestamp(*t),
        FieldValue::F(t) => HeaderValue::Table(from_table(t)),
        FieldValue::V => HeaderValue::Void,
        FieldValue::x(b) => HeaderValue::Bytes(Vec::from(b.clone())),
    }
}

pub(crate) fn to_basic(p: &Properties) -> BasicProperties {
    let mut b = BasicProperties::default();
    if let Some(v) = &p.content_type {
        b.with_content_type(v);
    }
    if let Some(v) = &p.content_encoding {
        b.with_content_encoding(v);
    }
    if !p.headers.is_empty() {
        b.with_headers(to_table(&p.headers));
    }
    if let Some(v) = p.delivery_mode {
        b.with_delivery_mode(v);
    }
    if let Some(v) = p.priority {
        b.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        b.with_correlation_id(v);
    }
    if let Some(v) = &p.reply_to {
        b.with_reply_to(v);
    }
    if let Some(v) = &p.expiration {
        b.with_expiration(v);
    }
    if let Some(v) = &p.message_id {
        b.with_message_id(v);
    }
    if let Some(v) = p.timestamp {
        b.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        b.with_message_type(v);
    }
    if let Some(v) = &p.user_id {
        b.with_user_id(v);
    }
    if let Some(v) = &p.app_id {
        b.with_app_id(v);
    }
    b.finish()
}

pub(crate) fn from_basic(b: &BasicProperties) -> Properties {
    Properties {
        content_type: b.content_type().cloned(),
        content_encoding: b.content_encoding().cloned(),
        headers: b.headers().map(from_table).unwrap_or_default(),
        delivery_mode: b.delivery_mode(),
        priority: b.priority(),
        correlation_id: b.correlation_id().cloned(),
        reply_to: b.reply_to().cloned(),
        expiration: b.expiration().cloned(),
        message_id: b.message_id().cloned(),
        timestamp: b.timestamp(),
        kind: b.message_type().cloned(),
        user_id: b.user_id().cloned(),
        app_id: b.app_id().cloned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn properties_round_trip() {
        let mut headers = Headers::new();
        headers.insert("s".into(), "v".into());
        headers.insert("n".into(), HeaderValue::Int(-3));
        headers.insert("b".into(), HeaderValue::Bool(true));
        headers.insert(
            "a".into(),
            HeaderValue::Array(vec![HeaderValue::Int(1), "x".into()]),
        );
        let p = Properties {
            content_type: Some("application/json".into()),
            headers,
            delivery_mode: Some(2),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            message_id: Some("m".into()),
            timestamp: Some(7),
            kind: Some("t".into()),
            ..Properties::default()
        };
        assert_eq!(from_basic(&to_basic(&p)), p);
    }

    /// Any header value, nested tables and arrays included.
    pub(crate) fn header_value() -> impl proptest::strategy::Strategy<Value = HeaderValue> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            any::<bool>().prop_map(HeaderValue::Bool),
            any::<i64>().prop_map(HeaderValue::Int),
            any::<f64>()
                .prop_filter("NaN is not equal to itself", |f| !f.is_nan())
                .prop_map(HeaderValue::Float),
            any::<String>().prop_map(HeaderValue::String),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(HeaderValue::Bytes),
            any::<u64>().prop_map(HeaderValue::Timestamp),
            (any::<u8>(), any::<i32>())
                .prop_map(|(scale, value)| HeaderValue::Decimal { scale, value }),
            Just(HeaderValue::Void),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(HeaderValue::Array),
                prop::collection::btree_map("[a-z-]{1,12}", inner, 0..4)
                    .prop_map(HeaderValue::Table),
            ]
        })
    }

    proptest::proptest! {
        /// Every header value survives the trip to the AMQP client's table
        /// and back, decimals included.
        #[test]
        fn header_tables_round_trip(
            headers in proptest::collection::btree_map("[a-zA-Z0-9._-]{1,32}", header_value(), 0..8)
        ) {
            proptest::prop_assert_eq!(from_table(&to_table(&headers)), headers);
        }
    }
}
