//! # rabbitry
//!
//! A messaging gateway for RabbitMQ: connections that recover, confirmed
//! producers, consumers with explicit outcomes, a worker that handles
//! messages like web requests, request/reply, and a durable outbox. It
//! brings to Rust what collective.zamqp (the add-on that connected Plone
//! sites to RabbitMQ) brought to Plone: hand long work to a worker,
//! replace synchronous calls with request/reply, funnel writes through a
//! one-at-a-time consumer, and integrate with services in any language.
//!
//! Runnable programs for each part are in the repository's `examples/`.
//!
//! ```no_run
//! use rabbitry::{Connection, ConnectionSettings, Consumer, ConsumerSettings, ExchangeKind,
//!                Outcome, Producer, ProducerSettings};
//!
//! # async fn demo() -> rabbitry::Result<()> {
//! let conn = Connection::open(ConnectionSettings::default()).await?;
//! let producer = Producer::new(
//!     &conn,
//!     ProducerSettings::new("service.tasks", ExchangeKind::Topic).routing_key("service.my_template"),
//! )
//! .await?;
//! producer.send(&serde_json::json!({"title": "Hello World!"})).await?; // confirmed
//!
//! let mut consumer = Consumer::start(
//!     &conn,
//!     ConsumerSettings::new("tasks").bind("service.tasks", ExchangeKind::Topic, &["service.*"]),
//! )
//! .await?;
//! consumer.run(|delivery| async move { Outcome::Ack }).await;
//! # Ok(()) }
//! ```
//!
//! ## Cargo features
//!
//! Each feature buys one capability; enable only what you use. Without
//! any, rabbitry connects (and recovers), declares, publishes with
//! confirms, consumes, and runs workers with native handlers and RPC.
//!
//! | feature | default | what it adds | what it pulls in |
//! |---|:---:|---|---|
//! | `sqlite` | yes | the durable `outbox`, the inbox and durable RPC replies on SQLite | sqlx with a bundled SQLite |
//! | `postgres` | | the same on PostgreSQL, with `LISTEN/NOTIFY` wake-ups | sqlx's PostgreSQL driver |
//! | `http` | yes | worker handlers that are tower services (an axum `Router`) or HTTP URLs; `web`'s publish-on-2xx layer | hyper, tower, http |
//! | `config` | yes | `Settings` from TOML, and the worker a config file describes | toml |
//! | `admin` | | `admin::Admin`: Prometheus `/metrics`, `/livez`, `/readyz`, status and dead letters as an axum `Router` | axum, metrics-exporter-prometheus |
//! | `otel` | | OpenTelemetry spans for publish, process and RPC, W3C `traceparent` in AMQP headers (`telemetry`) | the `opentelemetry` API crate |
//! | `testing` | | `memory://NAME`: an in-memory broker for tests, and the `testing` harness (handler tests in milliseconds, under tokio's paused clock) | nothing |
//! | `tls` | yes | `amqps://` URLs: system roots or a CA file, mutual TLS, EXTERNAL login | rustls on the `ring` provider, rustls-native-certs |
//!
//! A producer-only service writes
//! `rabbitry = { version = "0.1", default-features = false }`; an app that
//! uses SQLite through another crate (rusqlite, another sqlx) turns
//! `sqlite` off, since SQLite can be linked only once.
//!
//! ## Layout
//!
//! - [`connection`]: named connections and their recovery.
//! - [`topology`]: exchanges, queues and bindings.
//! - [`publish`]: producers with confirms, returns and resend.
//! - [`consume`]: consumers, deliveries and outcomes.
//! - [`codec`]: serializers by name and content type.
//! - [`clock`]: epoch milliseconds and RFC 3339, as written into messages.
//! - [`headers`]: the `x-rabbitry-*` header names.
//! - [`message`]: properties and outgoing messages.
//! - `config`: TOML settings, validated (feature `config`).
//! - [`error`]: the one error type.
//! - [`worker`]: the consuming server: handlers, retries, dead letters.
//! - [`transaction`]: the unit of work, publishes at commit.
//! - `web`: a tower layer: publish on 2xx only (feature `http`).
//! - [`rpc`]: request/reply client, durable replies.
//! - [`telemetry`]: spans across the broker and the W3C trace context (feature `otel`).
//! - `outbox`: the durable outbox and the idempotent inbox (features `sqlite`, `postgres`).
//! - `memory` and `testing`: an in-memory broker with RabbitMQ's semantics
//!   (`memory://NAME` URLs) and a harness for tests without a broker
//!   (feature `testing`).

#[cfg(feature = "admin")]
pub mod admin;
pub mod clock;
pub mod codec;
#[cfg(feature = "config")]
pub mod config;
pub mod connection;
pub mod consume;
pub mod defaults;
pub mod error;
pub mod headers;
#[cfg(feature = "testing")]
pub mod memory;
pub mod message;
pub mod meters;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
pub mod outbox;
pub mod publish;
pub mod rpc;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod transaction;
#[cfg(feature = "http")]
pub mod web;
pub mod worker;

mod amqp;
mod channel;
#[cfg(test)]
mod layering;
mod limits;
mod setters;
mod task;
mod wire;

pub use codec::{Decoded, Serializer};
#[cfg(feature = "config")]
pub use config::Settings;
pub use connection::{Connection, ConnectionSettings, Drift, QueueStatus};
pub use consume::{Acker, Consumer, ConsumerSettings, Delivery, Outcome};
pub use error::{Error, ErrorKind, Result};
pub use message::{HeaderValue, Headers, Message, Properties};
pub use publish::{Producer, ProducerSettings};
pub use topology::{Exchange, ExchangeKind, Queue, QueueType, Topology};
pub use transaction::UnitOfWork;
pub use worker::Worker;

/// The README's Rust examples, compiled by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
