//! Property tests of every parser and codec that takes outside input: the
//! AMQP URL, durations, the config loader, header text for HTTP, and every
//! serializer's decoder. Each takes arbitrary input without panicking, and
//! encoding then decoding gives the value back. (No broker needed.)

use proptest::prelude::*;
use rabbitry::config::parse_duration;
use rabbitry::connection::Endpoint;
use rabbitry::worker::http::{decode_header_text, encode_header_text};
use rabbitry::{Serializer, Settings};

/// Percent-encodes everything but ASCII letters and digits.
fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// JSON values that every self-describing serializer can carry.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn url_parser_takes_anything(s in any::<String>()) {
        let _ = Endpoint::parse(&s);
        let _ = Endpoint::parse(&format!("amqp://{s}"));
    }

    #[test]
    fn url_round_trips(
        user in "[^\u{0}]{1,12}",
        password in "[^\u{0}]{0,12}",
        host in "[a-z][a-z0-9.-]{0,20}",
        port in 1u16..,
        vhost in "[^\u{0}]{1,12}",
    ) {
        let url = format!("amqp://{}:{}@{host}:{port}/{}", pct(&user), pct(&password), pct(&vhost));
        let e = Endpoint::parse(&url).unwrap();
        prop_assert_eq!(&e.user, &user);
        prop_assert_eq!(&e.password, &password);
        prop_assert_eq!(&e.host, &host);
        prop_assert_eq!(e.port, port);
        prop_assert_eq!(&e.vhost, &vhost);
    }

    #[test]
    fn duration_parser_takes_anything(s in any::<String>()) {
        if let Ok(d) = parse_duration(&s) {
            prop_assert!(d <= rabbitry::config::MAX_DURATION);
        }
    }

    #[test]
    fn durations_round_trip(ms in 0u64..(365 * 24 * 3600 * 1000)) {
        prop_assert_eq!(parse_duration(&format!("{ms}ms")).unwrap().as_millis(), u128::from(ms));
        let secs = ms / 1000;
        prop_assert_eq!(parse_duration(&format!("{secs}s")).unwrap().as_secs(), secs);
    }

    #[test]
    fn config_loader_takes_anything(text in any::<String>()) {
        let _ = Settings::from_toml(&text, "fuzz.toml");
    }

    #[test]
    fn config_loader_takes_any_value_at_any_key(
        section in prop::sample::select(vec!["connections.c", "producers.p", "consumers.c", "worker", "outbox"]),
        key in prop::sample::select(vec![
            "url", "urls", "heartbeat", "queue", "exchange", "exchange_type", "routing_keys",
            "retry", "timeout", "handler", "serializer", "concurrency", "database",
            "recovery_timeout", "arguments", "shutdown_timeout", "prefetch_count",
        ]),
        value in prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            any::<String>().prop_map(|s| format!("{s:?}")),
            Just("[]".to_owned()),
            Just("{ attempts = 0 }".to_owned()),
            Just("\"1e309\"".to_owned()),
        ],
    ) {
        let text = format!("[{section}]\n{key} = {value}\nqueue = \"q\"\n");
        let _ = Settings::from_toml(&text, "fuzz.toml");
    }

    #[test]
    fn header_text_round_trips_and_is_always_a_valid_http_value(s in any::<String>()) {
        let encoded = encode_header_text(&s);
        prop_assert!(axum::http::HeaderValue::from_str(&encoded).is_ok());
        prop_assert!(encoded.bytes().all(|b| (b' '..=b'~').contains(&b)));
        prop_assert_eq!(decode_header_text(&encoded), Some(s));
    }

    #[test]
    fn header_text_decoder_takes_anything(s in any::<String>()) {
        let _ = decode_header_text(&s);
    }

    #[test]
    fn every_decoder_takes_any_bytes(body in prop::collection::vec(any::<u8>(), 0..256)) {
        for ser in Serializer::ALL {
            let _ = ser.decode_json(&body);
            let _ = ser.decode::<serde_json::Value>(&body);
        }
        let _ = rabbitry::codec::decode_value(Some("application/x-msgpack"), &body);
    }

    #[test]
    fn msgpack_and_json_round_trip(v in json_value()) {
        for ser in [Serializer::Msgpack, Serializer::Json] {
            let bytes = ser.encode(&v).unwrap();
            prop_assert_eq!(ser.decode_json(&bytes).unwrap(), v.clone());
        }
    }

    #[test]
    fn text_and_bytes_round_trip(s in any::<String>(), raw in prop::collection::vec(any::<u8>(), 0..64)) {
        let text = Serializer::Text.encode(&s).unwrap();
        prop_assert_eq!(Serializer::Text.decode::<String>(&text).unwrap(), s);
        let bytes = Serializer::Bytes.encode(&raw).unwrap();
        prop_assert_eq!(&bytes, &raw);
    }

    #[test]
    fn csv_round_trips(rows in prop::collection::vec(
        prop::collection::btree_map("[a-z]{1,6}", "[^\u{0}]{0,12}", 3..4), 1..6)
    ) {
        // Every row has the same columns, as a CSV file does.
        let keys: Vec<String> = rows[0].keys().cloned().collect();
        let rows: Vec<std::collections::BTreeMap<String, String>> = rows
            .iter()
            .map(|r| keys.iter().cloned().zip(r.values().cloned()).collect())
            .collect();
        let body = Serializer::Csv.encode(&rows).unwrap();
        let back: Vec<std::collections::BTreeMap<String, String>> =
            Serializer::Csv.decode(&body).unwrap();
        prop_assert_eq!(back, rows);
    }
}
