//! The second step of parsing: each section of the raw TOML checked into
//! the typed settings, one small function per section. Every error names
//! the file and the key path.

use std::time::Duration;

use super::raw::{
    OneOrMany, RawConnection, RawConsumer, RawOutbox, RawProducer, RawRetry, RawSettings, RawWorker,
};
use super::{
    parse_duration, ConsumerConfig, OutboxSettings, ProducerConfig, Settings, WorkerSettings,
};
use crate::connection::{ConnectionSettings, TlsSettings};
use crate::consume::ConsumerSettings;
use crate::defaults;
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
        Ok(self.optional_duration(value, path)?.unwrap_or(default))
    }

    fn optional_duration(&self, value: Option<&String>, path: &str) -> Result<Option<Duration>> {
        value
            .map(|v| parse_duration(v).map_err(|e| self.err(path, e.context())))
            .transpose()
    }

    /// A settings type's `validate` error, at the key path of the section
    /// (`path`) and the field it names.
    fn rule(&self, path: &str, e: Error) -> Error {
        match e.setting() {
            Some(field) => self.err(&format!("{path}.{field}"), e.context()),
            None => self.err(path, e.context()),
        }
    }

    /// `conn` must be `default` or a configured connection.
    fn known_connection(&self, settings: &Settings, conn: &str, path: &str) -> Result<()> {
        if conn == defaults::CONNECTION || settings.connections.contains_key(conn) {
            return Ok(());
        }
        let known = std::iter::once(defaults::CONNECTION.to_owned())
            .chain(
                settings
                    .connections
                    .keys()
                    .filter(|k| *k != defaults::CONNECTION)
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
        (None, Some(us)) => us,
        (None, None) => vec![defaults::URL.to_owned()],
    };
    let mut cs = ConnectionSettings::new(defaults::URL)
        .name(name)
        .urls(urls)
        .urls_from(at.source);
    set(&mut cs, c.heartbeat, ConnectionSettings::heartbeat);
    set(
        &mut cs,
        c.prefetch_count,
        ConnectionSettings::prefetch_count,
    );
    set(
        &mut cs,
        c.separate_publishing,
        ConnectionSettings::separate_publishing,
    );
    set(
        &mut cs,
        c.keep_url_order,
        ConnectionSettings::keep_url_order,
    );
    if let Some(tls) = c.tls {
        let mut t = TlsSettings::default()
            .danger_skip_verification(tls.danger_skip_verification.unwrap_or(false));
        set(&mut t, tls.ca_file, TlsSettings::ca_file);
        set(&mut t, tls.cert_file, TlsSettings::cert_file);
        set(&mut t, tls.key_file, TlsSettings::key_file);
        set(&mut t, tls.server_name, TlsSettings::server_name);
        cs = cs.tls(t);
    }
    let duration =
        |v: Option<&String>, key: &str| at.optional_duration(v, &format!("{path}.{key}"));
    set(
        &mut cs,
        duration(c.recovery_timeout.as_ref(), "recovery_timeout")?,
        ConnectionSettings::recovery_timeout,
    );
    set(
        &mut cs,
        duration(c.backoff_initial.as_ref(), "backoff_initial")?,
        ConnectionSettings::backoff_initial,
    );
    set(
        &mut cs,
        duration(c.backoff_max.as_ref(), "backoff_max")?,
        ConnectionSettings::backoff_max,
    );
    cs.validate().map_err(|e| at.rule(&path, e))?;
    Ok(cs)
}

/// Applies `setter` when the file gave a value: the key maps to its
/// setter, and the settings type keeps its own default otherwise.
fn set<S: Clone, V>(settings: &mut S, value: Option<V>, setter: fn(S, V) -> S) {
    if let Some(v) = value {
        *settings = setter(settings.clone(), v);
    }
}

fn producer_section(
    at: &At<'_>,
    settings: &Settings,
    name: &str,
    p: RawProducer,
) -> Result<ProducerConfig> {
    let connection = p.connection.unwrap_or_else(|| defaults::CONNECTION.into());
    at.known_connection(
        settings,
        &connection,
        &format!("producers.{name}.connection"),
    )?;
    let path = format!("producers.{name}");
    let mut producer = ProducerSettings::default()
        .name(name)
        .exchange(p.exchange.unwrap_or_default())
        .exchange_type(p.exchange_type.unwrap_or_default());
    set(&mut producer, p.durable, ProducerSettings::durable);
    set(&mut producer, p.auto_delete, ProducerSettings::auto_delete);
    set(
        &mut producer,
        p.auto_declare,
        ProducerSettings::auto_declare,
    );
    set(&mut producer, p.routing_key, ProducerSettings::routing_key);
    set(&mut producer, p.queue, ProducerSettings::queue);
    set(&mut producer, p.serializer, ProducerSettings::serializer);
    set(&mut producer, p.reply_to, ProducerSettings::reply_to);
    set(&mut producer, p.mandatory, ProducerSettings::mandatory);
    set(&mut producer, p.confirms, ProducerSettings::confirms);
    set(
        &mut producer,
        p.max_in_flight,
        ProducerSettings::max_in_flight,
    );
    let confirm_timeout = at.optional_duration(
        p.confirm_timeout.as_ref(),
        &format!("{path}.confirm_timeout"),
    )?;
    set(
        &mut producer,
        confirm_timeout,
        ProducerSettings::confirm_timeout,
    );
    producer.validate().map_err(|e| at.rule(&path, e))?;
    Ok(ProducerConfig {
        connection,
        producer,
    })
}

fn retry_section(at: &At<'_>, path: &str, r: Option<RawRetry>) -> Result<Retry> {
    let Some(r) = r else {
        return Ok(Retry::default());
    };
    let mut retry = Retry::attempts(r.attempts.unwrap_or(defaults::RETRY_ATTEMPTS));
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
    retry.validate().map_err(|e| at.rule(path, e))?;
    Ok(retry)
}

fn consumer_section(
    at: &At<'_>,
    settings: &Settings,
    name: &str,
    c: RawConsumer,
) -> Result<ConsumerConfig> {
    let path = format!("consumers.{name}");
    let connection = c.connection.unwrap_or_else(|| defaults::CONNECTION.into());
    at.known_connection(settings, &connection, &format!("{path}.connection"))?;
    let queue = c
        .queue
        .ok_or_else(|| at.err(&format!("{path}.queue"), "is required"))?;
    if let Some(url) = &c.handler {
        #[cfg(feature = "http")]
        crate::worker::http::check_url(url).map_err(|e| at.rule(&path, e))?;
        #[cfg(not(feature = "http"))]
        return Err(at.err(
            &format!("{path}.handler"),
            format!("`{url}`: this build cannot forward to HTTP handlers (feature `http`)"),
        ));
    }
    let routing_keys = match c.routing_keys {
        None => Vec::new(),
        Some(OneOrMany::One(k)) => vec![k],
        Some(OneOrMany::Many(ks)) => ks,
    };
    let mut consumer = ConsumerSettings::new(queue)
        .name(name)
        .exchange(c.exchange.unwrap_or_default())
        .exchange_type(c.exchange_type.unwrap_or_default())
        .routing_keys(routing_keys);
    set(&mut consumer, c.durable, ConsumerSettings::durable);
    set(&mut consumer, c.exclusive, ConsumerSettings::exclusive);
    set(&mut consumer, c.auto_delete, ConsumerSettings::auto_delete);
    set(
        &mut consumer,
        c.auto_declare,
        ConsumerSettings::auto_declare,
    );
    set(
        &mut consumer,
        c.prefetch_count,
        ConsumerSettings::prefetch_count,
    );
    if let Some(arguments) = c.arguments {
        consumer = consumer.arguments(
            arguments
                .iter()
                .map(|(k, v)| (k.clone(), toml_to_header(v)))
                .collect(),
        );
    }
    if let Some(kind) = &c.queue_type {
        let kind: QueueType = kind
            .parse()
            .map_err(|e: Error| at.err(&format!("{path}.queue_type"), e.context()))?;
        consumer = consumer.queue_type(kind);
    }
    consumer.validate().map_err(|e| at.rule(&path, e))?;
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
            Some(crate::worker::Partitions::new(n, key))
        }
    };
    let mut options = ConsumerOptions::default()
        .retry(retry_section(at, &format!("{path}.retry"), c.retry)?)
        .reply_exchange(c.reply_exchange.unwrap_or_default());
    // Partitions handle one message at a time each, whatever the
    // worker-wide concurrency says; a consumer's own setting is checked.
    options = options.concurrency(match (&partitions, c.concurrency) {
        (_, Some(n)) => n,
        (Some(_), None) => 1,
        (None, None) => settings.worker.concurrency,
    });
    set(&mut options, partitions, ConsumerOptions::partitions);
    set(
        &mut options,
        c.delivery_limit,
        ConsumerOptions::delivery_limit,
    );
    set(&mut options, c.max_response, ConsumerOptions::max_response);
    let timeout = at.optional_duration(c.timeout.as_ref(), &format!("{path}.timeout"))?;
    set(&mut options, timeout, ConsumerOptions::timeout);
    options.validate(&consumer).map_err(|e| at.rule(&path, e))?;
    Ok(ConsumerConfig {
        connection,
        consumer,
        handler: c.handler,
        options,
    })
}

fn worker_section(at: &At<'_>, settings: &Settings, w: RawWorker) -> Result<WorkerSettings> {
    let connection = w.connection.unwrap_or_else(|| defaults::CONNECTION.into());
    at.known_connection(settings, &connection, "worker.connection")?;
    if let Some(n) = w.concurrency {
        // The default of the consumers that set none: their rule.
        ConsumerOptions::default()
            .concurrency(n)
            .validate(&ConsumerSettings::default())
            .map_err(|e| at.rule("worker", e))?;
    }
    Ok(WorkerSettings {
        connection,
        site: w.site,
        user: w.user,
        concurrency: w.concurrency.unwrap_or(defaults::CONCURRENCY),
        prefix: w.prefix.unwrap_or_default(),
        shutdown_timeout: at.duration(
            w.shutdown_timeout.as_ref(),
            "worker.shutdown_timeout",
            defaults::SHUTDOWN_TIMEOUT,
        )?,
    })
}

fn outbox_section(at: &At<'_>, settings: &Settings, o: RawOutbox) -> Result<OutboxSettings> {
    let connection = o.connection.unwrap_or_else(|| defaults::CONNECTION.into());
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
