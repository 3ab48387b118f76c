//! Configuration: TOML text and environment overrides, checked once into
//! typed [`Settings`].
//!
//! Parsing happens in two steps, as in ripgrep's flags: the raw TOML is read
//! into `Raw*` structs that reject unknown keys, then validated into the
//! typed settings the rest of the library takes. Every error names the file
//! and the key path, and lists the valid values where there is a list.
//!
//! The library never reads files or the environment by itself: callers pass
//! the text and a lookup function ([`Settings::apply_env`]).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::connection::{redact, Connection, ConnectionSettings};
mod raw;
mod validate;

use crate::consume::ConsumerSettings;
use crate::error::{Error, Result};
use crate::publish::ProducerSettings;
use crate::topology::Topology;
use crate::worker::ConsumerOptions;
#[cfg(feature = "http")]
use crate::worker::Worker;

/// A configured consumer: what to read, on which connection, and how the
/// worker handles it: the same types a worker built in code takes.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// The connection's name.
    pub connection: String,
    /// What to declare and consume.
    pub consumer: ConsumerSettings,
    /// An HTTP URL to forward deliveries to, if any.
    pub handler: Option<String>,
    /// Retry policy, concurrency, timeout and reply exchange.
    pub options: ConsumerOptions,
}

/// A configured producer and the connection it uses.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// The connection's name.
    pub connection: String,
    /// How it publishes.
    pub producer: ProducerSettings,
}

/// The `[worker]` section.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Connection used for replies, retries and dead letters.
    pub connection: String,
    /// Substituted for `${site}`.
    pub site: Option<String>,
    /// Passed on with each request.
    pub user: Option<String>,
    /// Handlers running at once for consumers that do not say (1: one at a
    /// time, in order).
    pub concurrency: usize,
    /// Path prefix of dispatched requests.
    pub prefix: String,
    /// How long shutdown waits for handlers in flight.
    pub shutdown_timeout: Duration,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            connection: crate::defaults::CONNECTION.into(),
            site: None,
            user: None,
            concurrency: crate::defaults::CONCURRENCY,
            prefix: String::new(),
            shutdown_timeout: crate::defaults::SHUTDOWN_TIMEOUT,
        }
    }
}

/// The `[outbox]` section: the database whose outbox the worker relays.
#[derive(Debug, Clone)]
pub struct OutboxSettings {
    /// `sqlite://path` or `postgres://...`.
    pub database: String,
    /// The connection the relay publishes on.
    pub connection: String,
}

/// Validated, typed settings.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Connections by name.
    pub connections: BTreeMap<String, ConnectionSettings>,
    /// Producers by name.
    pub producers: BTreeMap<String, ProducerConfig>,
    /// Consumers by name.
    pub consumers: BTreeMap<String, ConsumerConfig>,
    /// The worker section.
    pub worker: WorkerSettings,
    /// The outbox section, if any.
    pub outbox: Option<OutboxSettings>,
}

impl Settings {
    /// Parses TOML text. `source` names it in errors (usually the path).
    pub fn from_toml(text: &str, source: &str) -> Result<Settings> {
        let de = toml::Deserializer::parse(text)
            .map_err(|e| Error::config(format!("{source}: {}", e.to_string().trim())))?;
        let raw: raw::RawSettings = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let message = inner.lines().last().unwrap_or_default().trim().to_owned();
            Error::config(format!(
                "{source}: {path}: {}",
                if message.is_empty() { inner } else { message }
            ))
        })?;
        validate::validate(raw, source)
    }

    /// Applies environment overrides: `AMQP_URL` replaces the URL of the
    /// default connection (creating it when absent).
    pub fn apply_env(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        if let Some(url) = lookup("AMQP_URL").filter(|u| !u.is_empty()) {
            self.replace_url(url, "AMQP_URL");
        }
    }

    /// Makes `url` the default connection's only URL (creating the
    /// connection when absent), noting `source` (`AMQP_URL`, `--url`) as
    /// where it came from. Replacing URLs a file gave is logged as a
    /// warning.
    pub fn replace_url(&mut self, url: String, source: &str) {
        let from_file = self.connections.contains_key(crate::defaults::CONNECTION);
        let conn = self
            .connections
            .entry(crate::defaults::CONNECTION.into())
            .or_insert_with(|| ConnectionSettings::default().name(crate::defaults::CONNECTION));
        if from_file && conn.urls != [url.clone()] {
            // Said out loud: a test once ran against another broker
            // because AMQP_URL silently replaced a three-node list.
            tracing::warn!(
                connection = crate::defaults::CONNECTION,
                replaced = ?conn.urls.iter().map(|u| redact(u)).collect::<Vec<_>>(),
                from = %conn.urls_from,
                by = %redact(&url),
                "{source} replaces the URLs the configuration gives"
            );
        }
        conn.urls = vec![url];
        conn.urls_from = source.to_owned();
    }

    /// The connection called `name`; `default` always exists.
    pub fn connection(&self, name: &str) -> Result<ConnectionSettings> {
        if let Some(c) = self.connections.get(name) {
            return Ok(c.clone());
        }
        if name == crate::defaults::CONNECTION {
            let mut c =
                ConnectionSettings::new(crate::defaults::URL).name(crate::defaults::CONNECTION);
            c.urls_from = "the default URL".to_owned();
            return Ok(c);
        }
        Err(Error::config(format!(
            "no connection named '{name}' (known: {})",
            self.connections
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Everything the producers and consumers on connection `name` declare.
    pub fn topology_for(&self, name: &str) -> Topology {
        let mut t = Topology::default();
        for p in self.producers.values().filter(|p| p.connection == name) {
            t.merge(&p.producer.topology());
        }
        for c in self.consumers.values().filter(|c| c.connection == name) {
            // A consumer with a handler is a worker's: its retry and
            // dead-letter queues are part of what it needs.
            let with_retries = |t: &mut Topology, s: &crate::ConsumerSettings| {
                t.merge(&s.topology());
                if c.handler.is_some() {
                    t.merge(&crate::worker::retry::topology(
                        &s.queue,
                        crate::QueueType::of(&s.arguments),
                        &c.options.retry,
                    ));
                }
            };
            match &c.options.partitions {
                None => with_retries(&mut t, &c.consumer),
                Some(p) => {
                    // The hashing exchange, and the partition queues bound
                    // to it, as the worker declares them.
                    t.merge(&p.routing(&c.consumer));
                    for i in 0..p.count {
                        with_retries(&mut t, &p.partition_settings(&c.consumer, i));
                    }
                }
            }
        }
        t
    }

    /// The names of connections used by producers or consumers, plus those
    /// configured.
    pub fn connection_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.connections.keys().cloned().collect();
        for n in self
            .producers
            .values()
            .map(|p| &p.connection)
            .chain(self.consumers.values().map(|c| &c.connection))
        {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    /// Fails when a name still holds `${site}`: the settings are used
    /// without a site, and the broker would get queues literally named
    /// `...${site}`.
    pub fn check_substituted(&self) -> Result<()> {
        // The field's key path: `consumers.orders.routing_keys[0]`.
        for (name, c) in &self.consumers {
            c.consumer
                .check_substituted()
                .map_err(|e| e.within(&format!("consumers.{name}")))?;
        }
        for (name, p) in &self.producers {
            p.producer
                .check_substituted()
                .map_err(|e| e.within(&format!("producers.{name}")))?;
        }
        Ok(())
    }

    /// Opens each named connection once: those the consumers, the worker
    /// and the outbox use, each named after its section (`default`...).
    pub async fn open_connections(&self) -> Result<BTreeMap<String, Connection>> {
        let mut names: Vec<&str> = self
            .consumers
            .values()
            .map(|c| c.connection.as_str())
            .collect();
        names.push(&self.worker.connection);
        if let Some(o) = &self.outbox {
            names.push(&o.connection);
        }
        let mut open = BTreeMap::new();
        for name in names {
            if !open.contains_key(name) {
                let conn = Connection::open(self.connection(name)?).await?;
                open.insert(name.to_owned(), conn);
            }
        }
        Ok(open)
    }

    #[cfg(feature = "http")]
    /// The worker these settings describe, for consumers that forward to
    /// HTTP applications (`handler = "http://..."`), as `rabbitry worker`
    /// runs it: the same [`Worker`] a program builds in code, with each
    /// consumer's options, on its named connection, the `[worker]` section's
    /// site, user, prefix and shutdown timeout, and the `[outbox]` relayed.
    /// Every check is made before a connection opens; the worker closes the
    /// connections it opened when it shuts down.
    pub async fn forwarding_worker(&self) -> Result<Worker<()>> {
        self.check_substituted()?;
        if self.consumers.is_empty() {
            return Err(Error::config("the configuration defines no [consumers.*]"));
        }
        if let Some((name, _)) = self.consumers.iter().find(|(_, c)| c.handler.is_none()) {
            return Err(Error::config(format!(
                "consumers.{name}: no handler: set `handler = \"http://...\"`, or build the worker in code with Worker::consumer"
            )));
        }
        let conns = self.open_connections().await?;
        let conn = |name: &str| conns[name].clone();
        let mut worker = Worker::new(&conn(&self.worker.connection), ())
            .prefix(self.worker.prefix.clone())
            .shutdown_timeout(self.worker.shutdown_timeout);
        if let Some(site) = &self.worker.site {
            worker = worker.site(site.clone());
        }
        if let Some(user) = &self.worker.user {
            worker = worker.user(user.clone());
        }
        for c in self.consumers.values() {
            let url = c.handler.clone().unwrap_or_default();
            worker = worker
                .forward(c.consumer.clone(), url)
                .options(c.options.clone())
                .connection(&conn(&c.connection))
                .done();
        }
        if let Some(o) = &self.outbox {
            #[cfg(any(feature = "sqlite", feature = "postgres"))]
            {
                let outbox = crate::outbox::Outbox::connect(&o.database).await?;
                worker = worker.with_outbox(outbox).relay_on(&conn(&o.connection));
            }
            #[cfg(not(any(feature = "sqlite", feature = "postgres")))]
            return Err(Error::config(format!(
                "outbox.database = `{}`: this build has no database support (features `sqlite`, `postgres`)",
                crate::connection::redact(&o.database)
            )));
        }
        Ok(worker.owning(conns.into_values().collect()))
    }

    /// These settings with `${site}` replaced by `site` in queue names,
    /// routing keys and consumer names.
    pub fn for_site(&self, site: &str) -> Settings {
        let sub = |s: &str| s.replace("${site}", site);
        let mut out = self.clone();
        out.worker.site = Some(site.to_owned());
        out.consumers = self
            .consumers
            .iter()
            .map(|(name, c)| {
                let mut c = c.clone();
                c.consumer = c.consumer.for_site(site);
                (sub(name), c)
            })
            .collect();
        for p in out.producers.values_mut() {
            p.producer = p.producer.clone().for_site(site);
        }
        out
    }
}

/// The longest duration [`parse_duration`] accepts: 365 days. Longer
/// values are almost certainly mistakes, and they overflow clocks.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Parses `500ms`, `1s`, `2m`, `1h`, `1d`, or a bare number of seconds
/// (decimals allowed), up to [`MAX_DURATION`]. Anything else, including
/// negative, non-finite and overlong values, is a clear error.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| {
        Error::config(format!(
            "invalid duration `{text}` (use e.g. 500ms, 5s, 2m, 1h)"
        ))
    })?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => {
            return Err(Error::config(format!(
                "invalid duration unit `{other}` in `{text}`, expected one of: ms, s, m, h, d"
            )))
        }
    };
    let too_long = || Error::config(format!("duration `{text}` is too long (at most 365d)"));
    // Whole numbers are exact; decimals go through f64 (to the nanosecond).
    let duration = match num.parse::<u64>() {
        Ok(whole) => Duration::from_millis(whole.checked_mul(unit_ms).ok_or_else(too_long)?),
        Err(_) => {
            let secs = n * unit_ms as f64 / 1000.0;
            if !secs.is_finite() || secs > MAX_DURATION.as_secs_f64() {
                return Err(too_long());
            }
            Duration::try_from_secs_f64(secs)
                .map_err(|e| Error::config(format!("invalid duration `{text}`: {e}")))?
        }
    };
    if duration > MAX_DURATION {
        return Err(too_long());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Serializer;
    use crate::message::HeaderValue;
    use crate::topology::ExchangeKind;

    const EXAMPLE: &str = r#"
[connections.default]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
heartbeat = 60
prefetch_count = 0

[producers.render]
connection = "default"
exchange = "service.tasks"
exchange_type = "topic"
routing_key = "service.my_template"
durable = true
serializer = "msgpack"
reply_to = "my_queue"

[consumers.results]
connection = "default"
queue = "my_queue"
exchange = "service.results"
exchange_type = "direct"
routing_keys = ["my_queue"]
durable = true
arguments = { "x-queue-type" = "quorum" }
"#;

    #[test]
    fn parses_the_documented_format() {
        let s = Settings::from_toml(EXAMPLE, "rabbitry.toml").unwrap();
        let p = &s.producers["render"].producer;
        assert_eq!(p.exchange, "service.tasks");
        assert_eq!(p.exchange_type, ExchangeKind::Topic);
        assert_eq!(p.serializer, Serializer::Msgpack);
        assert_eq!(p.reply_to.as_deref(), Some("my_queue"));
        let c = &s.consumers["results"].consumer;
        assert_eq!(c.routing_keys, ["my_queue"]);
        assert_eq!(
            c.arguments["x-queue-type"],
            HeaderValue::String("quorum".into())
        );
        assert_eq!(s.connections["default"].heartbeat, 60);
    }

    #[test]
    fn unknown_key_names_file_and_path() {
        let text = "[connections.default]\nurll = \"amqp://x\"\n";
        let e = Settings::from_toml(text, "app.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("app.toml"), "{e}");
        assert!(e.contains("connections.default"), "{e}");
        assert!(e.contains("urll"), "{e}");
        assert!(e.contains("`url`"), "lists valid keys: {e}");
    }

    #[test]
    fn a_connection_takes_a_tls_table() {
        let text = "[connections.default]\nurl = \"amqps://rabbit/%2f\"\n\
                    tls = { ca_file = \"/etc/ca.pem\", cert_file = \"c.pem\", key_file = \"k.pem\", \
                    server_name = \"rabbit.internal\" }\n";
        let s = Settings::from_toml(text, "app.toml").unwrap();
        let tls = &s.connections["default"].tls;
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/ca.pem"))
        );
        assert_eq!(tls.key_file.as_deref(), Some(std::path::Path::new("k.pem")));
        assert_eq!(tls.server_name.as_deref(), Some("rabbit.internal"));
        assert!(!tls.danger_skip_verification);
        for (table, says) in [
            ("{ cafile = \"x\" }", "unknown field `cafile`"),
            (
                "{ cert_file = \"c.pem\" }",
                "cert_file: is set without key_file: set both (mutual TLS), or neither",
            ),
            ("{ verify = false }", "danger_skip_verification"),
        ] {
            let text = format!("[connections.default]\ntls = {table}\n");
            let e = Settings::from_toml(&text, "app.toml")
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("connections.default.tls") && e.contains(says),
                "{e}"
            );
        }
    }

    #[test]
    fn unknown_exchange_type_and_serializer_list_valid_values() {
        let e = Settings::from_toml("[producers.p]\nexchange_type = \"fan\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("producers.p.exchange_type"), "{e}");
        assert!(e.contains("`direct`") && e.contains("`headers`"), "{e}");
        let e = Settings::from_toml("[producers.p]\nserializer = \"yaml\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("producers.p.serializer"), "{e}");
        assert!(e.contains("`msgpack`") && e.contains("`csv`"), "{e}");
    }

    #[test]
    fn unknown_connection_and_bad_durations_are_named() {
        let e = Settings::from_toml(
            "[consumers.c]\nqueue=\"q\"\nconnection=\"other\"\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("consumers.c.connection") && e.contains("`other`"),
            "{e}"
        );
        let e = Settings::from_toml(
            "[consumers.c]\nqueue=\"q\"\nretry = { attempts = 3, delays = [\"1x\"] }\n",
            "f.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("consumers.c.retry.delays[0]"), "{e}");
    }

    #[test]
    fn queue_type_and_delivery_limit_are_read_and_checked() {
        let s = Settings::from_toml(
            "[consumers.c]\nqueue=\"q\"\nqueue_type=\"quorum\"\ndelivery_limit=3\n",
            "f.toml",
        )
        .unwrap();
        let c = &s.consumers["c"];
        assert_eq!(
            crate::QueueType::of(&c.consumer.arguments),
            Some(crate::QueueType::Quorum)
        );
        assert_eq!(c.options.delivery_limit, Some(3));
        for (toml, path, says) in [
            (
                "queue_type=\"mirrored\"",
                "consumers.c.queue_type",
                "expected one of: classic, quorum, stream",
            ),
            (
                "delivery_limit=3",
                "consumers.c.delivery_limit",
                "needs queue_type = quorum",
            ),
            (
                "queue_type=\"quorum\"\ndelivery_limit=0",
                "consumers.c.delivery_limit",
                "at least 1",
            ),
        ] {
            let e = Settings::from_toml(&format!("[consumers.c]\nqueue=\"q\"\n{toml}\n"), "f.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(path) && e.contains(says), "{toml}: {e}");
        }
    }

    #[test]
    fn partitions_are_read_and_bad_ones_are_named() {
        let s = Settings::from_toml(
            "[consumers.c]\nqueue=\"q\"\nexchange=\"x\"\npartitions=4\npartition_key=\"header:order_id\"\n",
            "f.toml",
        )
        .unwrap();
        let p = s.consumers["c"].options.partitions.clone().unwrap();
        assert_eq!(p.count, 4);
        assert_eq!(
            p.key,
            crate::worker::PartitionKey::Header("order_id".into())
        );
        assert_eq!(s.consumers["c"].options.concurrency, 1);
        for (toml, path, says) in [
            (
                "exchange=\"x\"\npartitions=0",
                "consumers.c.partitions",
                "at least 1",
            ),
            ("partitions=2", "consumers.c.partitions", "need an exchange"),
            (
                "exchange=\"x\"\npartitions=2\nconcurrency=4",
                "consumers.c.concurrency",
                "one message at a time",
            ),
            (
                "exchange=\"x\"\npartitions=2\npartition_key=\"order_id\"",
                "consumers.c.partition_key",
                "header:NAME",
            ),
            (
                "partition_key=\"routing_key\"",
                "consumers.c.partition_key",
                "needs `partitions",
            ),
        ] {
            let e = Settings::from_toml(&format!("[consumers.c]\nqueue=\"q\"\n{toml}\n"), "f.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(path) && e.contains(says), "{toml}: {e}");
        }
    }

    #[test]
    fn amqp_url_overrides_the_default_connection() {
        let mut s = Settings::from_toml(EXAMPLE, "f.toml").unwrap();
        assert_eq!(s.connections["default"].urls_from, "f.toml");
        s.apply_env(|k| (k == "AMQP_URL").then(|| "amqp://other:5673".to_owned()));
        assert_eq!(s.connections["default"].urls, ["amqp://other:5673"]);
        assert_eq!(s.connections["default"].urls_from, "AMQP_URL");
        s.replace_url("amqp://third".into(), "--url");
        assert_eq!(s.connections["default"].urls_from, "--url");
        let mut empty = Settings::default();
        assert_eq!(
            empty.connection("default").unwrap().urls_from,
            "the default URL"
        );
        empty.apply_env(|_| Some("amqp://h".into()));
        assert_eq!(empty.connection("default").unwrap().urls, ["amqp://h"]);
    }

    #[test]
    fn site_substitution() {
        let s = Settings::from_toml(
            "[consumers.orders]\nqueue = \"${site}.orders\"\nexchange=\"shop\"\nrouting_keys=[\"${site}.order.*\"]\n",
            "f",
        )
        .unwrap();
        let a = s.for_site("a");
        let c = &a.consumers["orders"].consumer;
        assert_eq!(c.queue, "a.orders");
        assert_eq!(c.routing_keys, ["a.order.*"]);
    }

    #[test]
    fn handler_urls_are_checked_at_load() {
        for bad in ["not a url", "ftp://h/x", "https://h/x", "/amqp", "http://"] {
            let e = Settings::from_toml(
                &format!("[consumers.c]\nqueue=\"q\"\nhandler=\"{bad}\"\n"),
                "app.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("app.toml") && e.contains("consumers.c.handler"),
                "{bad}: {e}"
            );
        }
        let ok = Settings::from_toml(
            "[consumers.c]\nqueue=\"q\"\nhandler=\"http://127.0.0.1:8000/amqp\"\n",
            "app.toml",
        )
        .unwrap();
        assert_eq!(
            ok.consumers["c"].handler.as_deref(),
            Some("http://127.0.0.1:8000/amqp")
        );
    }

    #[test]
    fn hostile_durations_are_errors_in_config() {
        for (key, value) in [
            ("timeout", "\"99999999999999999999999s\""),
            ("timeout", "\"1e309\""),
            ("timeout", "\"inf\""),
            ("timeout", "\"nan\""),
            ("retry", "{ attempts = 2, delays = [\"1e20\"] }"),
            ("retry", "{ attempts = 2, delays = [\"60d\"] }"),
            ("retry", "{ attempts = 2, delays = [\"0s\"] }"),
        ] {
            let e = Settings::from_toml(
                &format!("[consumers.c]\nqueue=\"q\"\n{key} = {value}\n"),
                "app.toml",
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("consumers.c.{key}")), "{value}: {e}");
        }
    }

    #[test]
    fn unsubstituted_site_is_reported_with_its_key() {
        let s = Settings::from_toml(
            "[consumers.o]\nqueue = \"${site}.orders\"\n[producers.p]\nrouting_key = \"${site}.k\"\n",
            "f",
        )
        .unwrap();
        let e = s.check_substituted().unwrap_err().to_string();
        assert!(e.contains("consumers.o.queue"), "{e}");
        assert!(s.for_site("a").check_substituted().is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        for bad in [
            "1x",
            "",
            "inf",
            "nan",
            "-1s",
            "1e309",
            "1e20",
            "99999999999999999999999s",
            "366d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
