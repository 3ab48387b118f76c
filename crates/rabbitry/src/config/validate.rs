//! The second step of parsing: each section of the raw TOML checked into
//! the typed settings, one small function per section. Every error names
//! the file and the key path.

use std::time::Duration;

use super::raw::{
    OneOrMany, RawConnection, RawConsumer, RawOutbox, RawProducer, RawRetry, RawSettings, RawWorker,
};
use super::{
    parse_duration, ConsumerConfig, OutboxSettings, ProducerConfig, Settings, WorkerSettings,
    DEFAULT_CONNECTION,
};
use crate::connection::{ConnectionSettings, DEFAULT_URL};
use crate::consume::ConsumerSettings;
use crate::error::{Error, Result};
use crate::message::HeaderValue;
use crate::publish::ProducerSettings;
use crate::topology::QueueType;
use crate::worker::{ConsumerOptions, Retry};

fn toml_to_header(v: &toml::Value) -> HeaderValue {
    match v {
        toml::Value::String(s) => HeaderValue::String(s.clone()),
        toml::Value::Integer(n) => HeaderValue::Int(*n),
        toml::Value::Float(f) => HeaderValue::Float(*f),
        toml::Value::Boolean(b) => HeaderValue::Bool(*b),
        toml::Value::Datetime(d) => HeaderValue::String(d.to_string()),
        toml::Value::Array(items) => HeaderValue::Array(items.iter().map(toml_to_header).collect()),
        toml::Value::Table(t) => HeaderValue::Table(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_header(v)))
                .collect(),
        ),
    }
}

/// Builds error messages that name the file and the key path.
struct At<'a> {
    source: &'a str,
}

impl At<'_> {
    fn err(&self, path: &str, msg: impl std::fmt::Display) -> Error {
        Error::config(format!("{}: {path}: {msg}", self.source))
    }

    fn duration(&self, value: Option<&String>, path: &str, default: Duration) -> Result<Duration> {
        match value {
            None => Ok(default),
            Some(v) => parse_duration(v).map_err(|e| self.err(path, e.context())),
        }
    }

    /// `conn` must be `default` or a configured connection.
    fn known_connection(&self, settings: &Settings, conn: &str, path: &str) -> Result<()> {
        if conn == DEFAULT_CONNECTION || settings.connections.contains_key(conn) {
            return Ok(());
        }
        let known = std::iter::once(DEFAULT_CONNECTION.to_owned())
            .chain(
                settings
                    .connections
                    .keys()
                    .filter(|k| *k != DEFAULT_CONNECTION)
                    .cloned(),
            )
            .collect::<Vec<_>>()
            .join(", ");
        Err(self.err(
            path,
            format!("unknown connection `{conn}`, expected one of: {known}"),
        ))
    }
}

pub(super) fn validate(raw: RawSettings, source: &str) -> Result<Settings> {
    let at = At { source };
    let mut settings = Settings::default();
    for (name, c) in raw.connections {
        let cs = connection_section(&at, &name, c)?;
        settings.connections.insert(name, cs);
    }
    if let Some(w) = raw.worker {
        settings.worker = worker_section(&at, &settings, w)?;
    }
    for (name, p) in raw.producers {
        let p = producer_section(&at, &settings, &name, p)?;
        settings.producers.insert(name, p);
    }
    for (name, c) in raw.consumers {
        let c = consumer_section(&at, &settings, &name, c)?;
        settings.consumers.insert(name, c);
    }
    if let Some(o) = raw.outbox {
        settings.outbox = Some(outbox_section(&at, &settings, o)?);
    }
    Ok(settings)
}

fn connection_section(at: &At<'_>, name: &str, c: RawConnection) -> Result<ConnectionSettings> {
    let path = format!("connections.{name}");
    let urls = match (c.url, c.urls) {
        (Some(_), Some(_)) => return Err(at.err(&path, "set either `url` or `urls`, not both")),
        (Some(u), None) => vec![u],
        (None, Some(us)) if !us.is_empty() => us,
        (None, Some(_)) => return Err(at.err(&format!("{path}.urls"), "is empty")),
        (None, None) => vec![DEFAULT_URL.to_owned()],
    };
    for (i, u) in urls.iter().enumerate() {
        crate::connection::Endpoint::parse(u)
            .map_err(|e| at.err(&format!("{path}.urls[{i}]"), e.context()))?;
    }
    let mut cs = ConnectionSettings::new(DEFAULT_URL).name(name);
    cs.urls = urls;
    cs.urls_from = at.source.to_owned();
    cs.heartbeat = c.heartbeat.unwrap_or(cs.heartbeat);
    cs.prefetch_count = c
        .prefetch_count
        .unwrap_or(crate::connection::DEFAULT_PREFETCH);
    cs.separate_publishing = c.separate_publishing.unwrap_or(cs.separate_publishing);
    cs.keep_url_order = c.keep_url_order.unwrap_or(cs.keep_url_order);
    if let Some(tls) = c.tls {
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            return Err(at.err(
                &format!("{path}.tls"),
                "set both `cert_file` and `key_file` (mutual TLS), or neither",
            ));
        }
        cs.tls = crate::connection::TlsSettings {
            ca_file: tls.ca_file.map(Into::into),
            cert_file: tls.cert_file.map(Into::into),
            key_file: tls.key_file.map(Into::into),
            server_name: tls.server_name,
            danger_skip_verification: tls.danger_skip_verification.unwrap_or(false),
        };
    }
    cs.recovery_timeout = at.duration(
        c.recovery_timeout.as_ref(),
        &format!("{path}.recovery_timeout"),
        cs.recovery_timeout,
    )?;
    cs.backoff_initial = at.duration(
        c.backoff_initial.as_ref(),
        &format!("{path}.backoff_initial"),
        cs.backoff_initial,
    )?;
    cs.backoff_max = at.duration(
        c.backoff_max.as_ref(),
        &format!("{path}.backoff_max"),
        cs.backoff_max,
    )?;
    Ok(cs)
}

fn producer_section(
    at: &At<'_>,
    settings: &Settings,
    name: &str,
    p: RawProducer,
) -> Result<ProducerConfig> {
    let connection = p.connection.unwrap_or_else(|| DEFAULT_CONNECTION.into());
    at.known_connection(
        settings,
        &connection,
        &format!("producers.{name}.connection"),
    )?;
    let defaults = ProducerSettings::default();
    let producer = ProducerSettings {
        name: name.to_owned(),
        exchange: p.exchange.unwrap_or_default(),
        exchange_type: p.exchange_type.unwrap_or_default(),
        durable: p.durable.unwrap_or(defaults.durable),
        auto_delete: p.auto_delete,
        auto_declare: p.auto_declare.unwrap_or(defaults.auto_declare),
        routing_key: p.routing_key,
        queue: p.queue,
        serializer: p.serializer.unwrap_or(defaults.serializer),
        reply_to: p.reply_to,
        mandatory: p.mandatory.unwrap_or(defaults.mandatory),
        confirms: p.confirms.unwrap_or(defaults.confirms),
        max_in_flight: p.max_in_flight.unwrap_or(defaults.max_in_flight),
        confirm_timeout: at.duration(
            p.confirm_timeout.as_ref(),
            &format!("producers.{name}.confirm_timeout"),
            defaults.confirm_timeout,
        )?,
        message_ids: true,
    };
    Ok(ProducerConfig {
        connection,
        producer,
    })
}

fn retry_section(at: &At<'_>, path: &str, r: Option<RawRetry>) -> Result<Retry> {
    let Some(r) = r else {
        return Ok(Retry::default());
    };
    let mut retry = Retry::attempts(r.attempts.unwrap_or(Retry::default().attempts));
    if let Some(ds) = r.delays {
        let mut delays = Vec::with_capacity(ds.len());
        for (i, d) in ds.iter().enumerate() {
            delays.push(
                parse_duration(d)
                    .map_err(|e| at.err(&format!("{path}.delays[{i}]"), e.context()))?,
            );
        }
        retry = retry.delays(delays);
    }
    retry.validate().map_err(|e| {
        // "retry: delays[0] = ...": keep the key path the file uses.
        let detail = e.context().trim_start_matches("retry: ");
        let key = detail.split([' ', ':']).next().unwrap_or_default();
        at.err(&format!("{path}.{key}"), detail)
    })?;
    Ok(retry)
}

fn consumer_section(
    at: &At<'_>,
    settings: &Settings,
    name: &str,
    c: RawConsumer,
) -> Result<ConsumerConfig> {
    let path = format!("consumers.{name}");
    let connection = c.connection.unwrap_or_else(|| DEFAULT_CONNECTION.into());
    at.known_connection(settings, &connection, &format!("{path}.connection"))?;
    let queue = c
        .queue
        .ok_or_else(|| at.err(&format!("{path}.queue"), "is required"))?;
    if let Some(url) = &c.handler {
        #[cfg(feature = "http")]
        crate::worker::http::check_url(url).map_err(|m| at.err(&format!("{path}.handler"), m))?;
        #[cfg(not(feature = "http"))]
        return Err(at.err(
            &format!("{path}.handler"),
            format!("`{url}`: this build cannot forward to HTTP handlers (feature `http`)"),
        ));
    }
    if c.concurrency == Some(0) {
        return Err(at.err(&format!("{path}.concurrency"), "must be at least 1"));
    }
    let routing_keys = match c.routing_keys {
        None => Vec::new(),
        Some(OneOrMany::One(k)) => vec![k],
        Some(OneOrMany::Many(ks)) => ks,
    };
    let defaults = ConsumerSettings::default();
    let mut consumer = ConsumerSettings {
        name: name.to_owned(),
        queue,
        exchange: c.exchange.unwrap_or_default(),
        exchange_type: c.exchange_type.unwrap_or_default(),
        routing_keys,
        durable: c.durable.unwrap_or(defaults.durable),
        exclusive: c.exclusive.unwrap_or(defaults.exclusive),
        auto_delete: c.auto_delete,
        auto_declare: c.auto_declare.unwrap_or(defaults.auto_declare),
        arguments: c
            .arguments
            .unwrap_or_default()
            .iter()
            .map(|(k, v)| (k.clone(), toml_to_header(v)))
            .collect(),
        prefetch_count: c.prefetch_count,
    };
    if let Some(kind) = &c.queue_type {
        let kind: QueueType = kind
            .parse()
            .map_err(|e: Error| at.err(&format!("{path}.queue_type"), e.context()))?;
        consumer = consumer.queue_type(kind);
    }
    if let Some(limit) = c.delivery_limit {
        crate::worker::retry::check_delivery_limit(QueueType::of(&consumer.arguments), limit)
            .map_err(|m| at.err(&format!("{path}.delivery_limit"), m))?;
    }
    let partitions = match (c.partitions, &c.partition_key) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(at.err(
                &format!("{path}.partition_key"),
                "needs `partitions = N` beside it",
            ))
        }
        (Some(n), key) => {
            let key = match key {
                Some(k) => k
                    .parse()
                    .map_err(|e: Error| at.err(&format!("{path}.partition_key"), e.context()))?,
                None => crate::worker::PartitionKey::RoutingKey,
            };
            let p = crate::worker::Partitions::new(n, key);
            // Partitions handle one message at a time each, whatever the
            // worker-wide concurrency says.
            p.check(&consumer, c.concurrency.unwrap_or(1))
                .map_err(|e| at.err(&format!("{path}.partitions"), e.context()))?;
            Some(p)
        }
    };
    let concurrency = match &partitions {
        Some(_) => 1,
        None => c.concurrency.unwrap_or(settings.worker.concurrency),
    };
    let options = ConsumerOptions {
        retry: retry_section(at, &format!("{path}.retry"), c.retry)?,
        concurrency,
        timeout: at.duration(
            c.timeout.as_ref(),
            &format!("{path}.timeout"),
            crate::worker::DEFAULT_TIMEOUT,
        )?,
        reply_exchange: c.reply_exchange.unwrap_or_default(),
        delivery_limit: c.delivery_limit,
        partitions,
        max_response: c
            .max_response
            .unwrap_or(crate::worker::DEFAULT_MAX_RESPONSE),
    };
    Ok(ConsumerConfig {
        connection,
        consumer,
        handler: c.handler,
        options,
    })
}

fn worker_section(at: &At<'_>, settings: &Settings, w: RawWorker) -> Result<WorkerSettings> {
    let connection = w.connection.unwrap_or_else(|| DEFAULT_CONNECTION.into());
    at.known_connection(settings, &connection, "worker.connection")?;
    if w.concurrency == Some(0) {
        return Err(at.err("worker.concurrency", "must be at least 1"));
    }
    Ok(WorkerSettings {
        connection,
        site: w.site,
        user: w.user,
        concurrency: w.concurrency.unwrap_or(1),
        prefix: w.prefix.unwrap_or_default(),
        shutdown_timeout: at.duration(
            w.shutdown_timeout.as_ref(),
            "worker.shutdown_timeout",
            crate::worker::DEFAULT_SHUTDOWN_TIMEOUT,
        )?,
    })
}

fn outbox_section(at: &At<'_>, settings: &Settings, o: RawOutbox) -> Result<OutboxSettings> {
    let connection = o.connection.unwrap_or_else(|| DEFAULT_CONNECTION.into());
    at.known_connection(settings, &connection, "outbox.connection")?;
    if !(o.database.starts_with("sqlite:") || o.database.starts_with("postgres")) {
        return Err(at.err(
            "outbox.database",
            "expected sqlite://PATH or postgres://...",
        ));
    }
    Ok(OutboxSettings {
        database: o.database,
        connection,
    })
}
