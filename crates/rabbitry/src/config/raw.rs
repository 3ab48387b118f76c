//! The first step of parsing: the TOML as written, section by section.
//! Every struct rejects unknown keys, so a typo is an error that names it.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::codec::Serializer;
use crate::topology::ExchangeKind;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    #[serde(default)]
    pub(super) connections: BTreeMap<String, RawConnection>,
    #[serde(default)]
    pub(super) producers: BTreeMap<String, RawProducer>,
    #[serde(default)]
    pub(super) consumers: BTreeMap<String, RawConsumer>,
    pub(super) worker: Option<RawWorker>,
    pub(super) outbox: Option<RawOutbox>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOutbox {
    pub(super) database: String,
    pub(super) connection: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConnection {
    pub(super) url: Option<String>,
    pub(super) urls: Option<Vec<String>>,
    pub(super) heartbeat: Option<u16>,
    pub(super) prefetch_count: Option<u16>,
    pub(super) recovery_timeout: Option<String>,
    pub(super) backoff_initial: Option<String>,
    pub(super) backoff_max: Option<String>,
    pub(super) separate_publishing: Option<bool>,
    pub(super) keep_url_order: Option<bool>,
    pub(super) tls: Option<RawTls>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: Option<String>,
    pub(super) cert_file: Option<String>,
    pub(super) key_file: Option<String>,
    pub(super) server_name: Option<String>,
    pub(super) danger_skip_verification: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProducer {
    pub(super) connection: Option<String>,
    pub(super) exchange: Option<String>,
    pub(super) exchange_type: Option<ExchangeKind>,
    pub(super) routing_key: Option<String>,
    pub(super) queue: Option<String>,
    pub(super) durable: Option<bool>,
    pub(super) auto_delete: Option<bool>,
    pub(super) auto_declare: Option<bool>,
    pub(super) serializer: Option<Serializer>,
    pub(super) reply_to: Option<String>,
    pub(super) mandatory: Option<bool>,
    pub(super) confirms: Option<bool>,
    pub(super) max_in_flight: Option<usize>,
    pub(super) confirm_timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub(super) attempts: Option<u32>,
    pub(super) delays: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsumer {
    pub(super) connection: Option<String>,
    pub(super) queue: Option<String>,
    pub(super) exchange: Option<String>,
    pub(super) exchange_type: Option<ExchangeKind>,
    pub(super) routing_keys: Option<OneOrMany>,
    pub(super) durable: Option<bool>,
    pub(super) exclusive: Option<bool>,
    pub(super) auto_delete: Option<bool>,
    pub(super) auto_declare: Option<bool>,
    pub(super) arguments: Option<toml::Table>,
    pub(super) queue_type: Option<String>,
    pub(super) delivery_limit: Option<u32>,
    pub(super) prefetch_count: Option<u16>,
    pub(super) handler: Option<String>,
    pub(super) retry: Option<RawRetry>,
    pub(super) reply_exchange: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) timeout: Option<String>,
    pub(super) max_response: Option<usize>,
    pub(super) partitions: Option<u16>,
    pub(super) partition_key: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    pub(super) connection: Option<String>,
    pub(super) site: Option<String>,
    pub(super) user: Option<String>,
    pub(super) concurrency: Option<usize>,
    pub(super) prefix: Option<String>,
    pub(super) shutdown_timeout: Option<String>,
}
