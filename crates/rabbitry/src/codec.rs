//! Serializers: turning values into message bodies and back.
//!
//! Each [`Serializer`] has a name (used in configuration and on the command
//! line) and a content type (sent with each message). Decoding follows the
//! delivery's content type, and accepts the common aliases
//! (`application/msgpack`, `application/x-json`). A content type nobody knows
//! is not an error: [`decode_value`] gives back the raw bytes.
//!
//! msgpack writes structs as maps, so peers in Python, Node or Go read them
//! as dictionaries and not as positional arrays.

use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A registered body format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Serializer {
    /// MessagePack, `application/x-msgpack`. Structs become maps.
    #[default]
    Msgpack,
    /// JSON, `application/json`.
    Json,
    /// UTF-8 text, `text/plain`.
    Text,
    /// RFC 4180 CSV with a header row, `text/csv`: a list of maps.
    Csv,
    /// Raw bytes, `application/octet-stream`.
    Bytes,
}

impl Serializer {
    /// Every registered serializer.
    pub const ALL: [Serializer; 5] = [
        Serializer::Msgpack,
        Serializer::Json,
        Serializer::Text,
        Serializer::Csv,
        Serializer::Bytes,
    ];

    /// The name used in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Serializer::Msgpack => "msgpack",
            Serializer::Json => "json",
            Serializer::Text => "text",
            Serializer::Csv => "csv",
            Serializer::Bytes => "bytes",
        }
    }

    /// The content type written on outgoing messages.
    pub fn content_type(self) -> &'static str {
        match self {
            Serializer::Msgpack => "application/x-msgpack",
            Serializer::Json => "application/json",
            Serializer::Text => "text/plain",
            Serializer::Csv => "text/csv",
            Serializer::Bytes => "application/octet-stream",
        }
    }

    /// Looks up the serializer that reads `content_type`, aliases included.
    /// Parameters such as `; charset=utf-8` are ignored.
    pub fn for_content_type(content_type: &str) -> Option<Serializer> {
        let essence = content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        match essence.as_str() {
            "application/x-msgpack" | "application/msgpack" | "application/vnd.msgpack" => {
                Some(Serializer::Msgpack)
            }
            "application/json" | "application/x-json" | "text/json" => Some(Serializer::Json),
            "text/plain" => Some(Serializer::Text),
            "text/csv" => Some(Serializer::Csv),
            "application/octet-stream" => Some(Serializer::Bytes),
            _ => None,
        }
    }

    /// Encodes a value.
    ///
    /// `text` accepts a string; `bytes` accepts a string or a byte sequence;
    /// `csv` accepts a sequence of maps or structs.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        match self {
            Serializer::Msgpack => rmp_serde::to_vec_named(value)
                .map_err(|e| Error::codec("msgpack encode").with_source(e)),
            Serializer::Json => {
                serde_json::to_vec(value).map_err(|e| Error::codec("json encode").with_source(e))
            }
            Serializer::Text | Serializer::Bytes => {
                match serde_json::to_value(value)
                    .map_err(|e| Error::codec("text encode").with_source(e))?
                {
                    serde_json::Value::String(s) => Ok(s.into_bytes()),
                    serde_json::Value::Array(items) if self == Serializer::Bytes => items
                        .into_iter()
                        .map(|v| {
                            v.as_u64()
                                .and_then(|n| u8::try_from(n).ok())
                                .ok_or_else(|| Error::codec("bytes encode: expected bytes"))
                        })
                        .collect(),
                    other => Err(Error::codec(format!(
                        "{} encode: expected a string, got {}",
                        self.name(),
                        json_type_name(&other)
                    ))),
                }
            }
            Serializer::Csv => encode_csv(value),
        }
    }

    /// Decodes a body into `T`.
    pub fn decode<T: DeserializeOwned>(self, body: &[u8]) -> Result<T> {
        match self {
            Serializer::Msgpack => rmp_serde::from_slice(body)
                .map_err(|e| Error::codec("msgpack decode").with_source(e)),
            Serializer::Json => {
                serde_json::from_slice(body).map_err(|e| Error::codec("json decode").with_source(e))
            }
            Serializer::Text | Serializer::Bytes | Serializer::Csv => {
                let value = self.decode_json(body)?;
                serde_json::from_value(value)
                    .map_err(|e| Error::codec(format!("{} decode", self.name())).with_source(e))
            }
        }
    }

    /// Decodes a body into a JSON value: msgpack and json become their
    /// values, text a string, csv a list of objects, bytes `{"base64": ...}`.
    pub fn decode_json(self, body: &[u8]) -> Result<serde_json::Value> {
        match self {
            Serializer::Msgpack => rmp_serde::from_slice(body)
                .map_err(|e| Error::codec("msgpack decode").with_source(e)),
            Serializer::Json => {
                serde_json::from_slice(body).map_err(|e| Error::codec("json decode").with_source(e))
            }
            Serializer::Text => std::str::from_utf8(body)
                .map(|s| serde_json::Value::String(s.to_owned()))
                .map_err(|e| Error::codec("text decode").with_source(e)),
            Serializer::Csv => decode_csv(body),
            Serializer::Bytes => Ok(base64_value(body)),
        }
    }
}

impl fmt::Display for Serializer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Serializer {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Serializer::ALL
            .into_iter()
            .find(|ser| ser.name() == s)
            .ok_or_else(|| {
                Error::config(format!(
                    "unknown serializer `{s}`, expected one of: {}",
                    Serializer::ALL.map(Serializer::name).join(", ")
                ))
            })
    }
}

/// The outcome of decoding a body by its content type.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A known content type, decoded into a JSON value.
    Value(serde_json::Value),
    /// An unknown or missing content type: the body as it came.
    Raw(Vec<u8>),
}

/// Decodes a body by content type. An unknown or missing content type gives
/// [`Decoded::Raw`]; a known one that fails to decode is an error.
pub fn decode_value(content_type: Option<&str>, body: &[u8]) -> Result<Decoded> {
    match content_type.and_then(Serializer::for_content_type) {
        Some(ser) => ser.decode_json(body).map(Decoded::Value),
        None => Ok(Decoded::Raw(body.to_vec())),
    }
}

/// `{"base64": "..."}`, the JSON form of bytes that are not text.
pub(crate) fn base64_value(body: &[u8]) -> serde_json::Value {
    serde_json::json!({ "base64": base64_encode(body) })
}

/// Standard base64 with padding. Small enough not to need a dependency.
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn json_type_name(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn encode_csv<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let rows =
        match serde_json::to_value(value).map_err(|e| Error::codec("csv encode").with_source(e))? {
            serde_json::Value::Array(rows) => rows,
            other => {
                return Err(Error::codec(format!(
                    "csv encode: expected a list of maps, got {}",
                    json_type_name(&other)
                )))
            }
        };
    let mut columns: Vec<String> = Vec::new();
    for row in &rows {
        let serde_json::Value::Object(map) = row else {
            return Err(Error::codec(format!(
                "csv encode: expected each row to be a map, got {}",
                json_type_name(row)
            )));
        };
        for key in map.keys() {
            if !columns.contains(key) {
                columns.push(key.clone());
            }
        }
    }
    let mut writer = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::codec("csv encode").with_source(e);
    writer.write_record(&columns).map_err(csv_err)?;
    for row in &rows {
        let record = columns.iter().map(|c| match row.get(c) {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        });
        writer.write_record(record).map_err(csv_err)?;
    }
    writer
        .into_inner()
        .map_err(|e| Error::codec("csv encode").with_source(e.into_error()))
}

fn decode_csv(body: &[u8]) -> Result<serde_json::Value> {
    let mut reader = csv::Reader::from_reader(body);
    let csv_err = |e: csv::Error| Error::codec("csv decode").with_source(e);
    let headers = reader.headers().map_err(csv_err)?.clone();
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_err)?;
        let row: serde_json::Map<String, serde_json::Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_owned(), serde_json::Value::String(v.to_owned())))
            .collect();
        rows.push(serde_json::Value::Object(row));
    }
    Ok(serde_json::Value::Array(rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Task {
        title: String,
    }

    #[test]
    fn msgpack_writes_structs_as_maps() {
        let body = Serializer::Msgpack
            .encode(&Task {
                title: "Hello World!".into(),
            })
            .unwrap();
        // fixmap with one entry, then the key "title".
        assert_eq!(body[0], 0x81);
        assert_eq!(&body[1..7], b"\xa5title");
        let as_map: std::collections::BTreeMap<String, String> =
            Serializer::Msgpack.decode(&body).unwrap();
        assert_eq!(as_map["title"], "Hello World!");
    }

    #[test]
    fn content_types_and_aliases() {
        for ser in Serializer::ALL {
            assert_eq!(Serializer::for_content_type(ser.content_type()), Some(ser));
            assert_eq!(ser.name().parse::<Serializer>().unwrap(), ser);
        }
        assert_eq!(
            Serializer::for_content_type("application/msgpack"),
            Some(Serializer::Msgpack)
        );
        assert_eq!(
            Serializer::for_content_type("application/x-json; charset=utf-8"),
            Some(Serializer::Json)
        );
        assert_eq!(Serializer::for_content_type("application/pdf"), None);
    }

    #[test]
    fn unknown_serializer_lists_valid_names() {
        let err = "yaml".parse::<Serializer>().unwrap_err().to_string();
        assert!(err.contains("`yaml`"), "{err}");
        assert!(err.contains("msgpack, json, text, csv, bytes"), "{err}");
    }

    #[test]
    fn unknown_content_type_decodes_to_raw_bytes() {
        assert_eq!(
            decode_value(Some("application/pdf"), b"%PDF-1.4").unwrap(),
            Decoded::Raw(b"%PDF-1.4".to_vec())
        );
        assert_eq!(
            decode_value(None, b"x").unwrap(),
            Decoded::Raw(b"x".to_vec())
        );
    }

    #[test]
    fn malformed_body_is_a_codec_error() {
        let err = decode_value(Some("application/json"), b"{not json").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Codec);
    }

    #[test]
    fn csv_round_trips_rows_of_maps_with_quoting() {
        let rows = json!([{"name": "a, \"quoted\"", "n": "1"}, {"name": "line\nbreak", "n": "2"}]);
        let body = Serializer::Csv.encode(&rows).unwrap();
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(
            text.starts_with("n,name\n") || text.starts_with("name,n\n"),
            "{text}"
        );
        assert!(text.contains("\"a, \"\"quoted\"\"\""), "{text}");
        assert_eq!(Serializer::Csv.decode_json(&body).unwrap(), rows);
    }

    #[test]
    fn text_and_bytes() {
        assert_eq!(Serializer::Text.encode("hé").unwrap(), "hé".as_bytes());
        assert!(Serializer::Text.encode(&json!({"a": 1})).is_err());
        assert_eq!(
            Serializer::Bytes.decode_json(b"\x00\xff").unwrap(),
            json!({"base64": "AP8="})
        );
        assert_eq!(base64_encode(b"Hello World!"), "SGVsbG8gV29ybGQh");
        assert_eq!(base64_encode(b"ab"), "YWI=");
    }
}
