//! `rabbitry publish`: one or many confirmed messages.

use std::io::{IsTerminal, Read};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rabbitry::publish::Confirmation;
use rabbitry::{ExchangeKind, HeaderValue, Message, Producer, ProducerSettings, Serializer};

use super::Global;

/// Publish messages.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Exchange ('' or none: the default exchange).
    #[arg(long)]
    exchange: Option<String>,
    /// Routing key.
    #[arg(long = "routing-key")]
    routing_key: Option<String>,
    /// Declare the exchange with this type first (direct, topic, fanout, headers).
    #[arg(long = "exchange-type")]
    exchange_type: Option<ExchangeKind>,
    /// The message: body encoding, properties, headers.
    #[command(flatten)]
    message: MessageArgs,
    /// Publish BODY this many times.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Publish through this configured producer (with -c).
    #[arg(long)]
    producer: Option<String>,
    /// The body: text, @file, or - for stdin.
    body: String,
}

/// What a message is made of, besides its route: shared by `publish` and
/// `schedule`.
#[derive(clap::Args)]
pub(crate) struct MessageArgs {
    /// How to encode BODY: msgpack, json, text, csv, bytes (BODY is JSON for
    /// msgpack, json and csv). Default: a BODY that is JSON goes as
    /// application/json, anything else as text/plain (or bytes if not UTF-8).
    #[arg(long)]
    pub(crate) serializer: Option<Serializer>,
    /// Send BODY as it is, with this content type.
    #[arg(long = "content-type")]
    content_type: Option<String>,
    #[arg(long = "correlation-id")]
    correlation_id: Option<String>,
    #[arg(long = "reply-to")]
    pub(crate) reply_to: Option<String>,
    #[arg(long = "message-id")]
    message_id: Option<String>,
    /// A header, name=value (repeatable).
    #[arg(long = "header", value_name = "K=V")]
    headers: Vec<String>,
    /// Transient (delivery_mode 1) instead of persistent.
    #[arg(long)]
    pub(crate) transient: bool,
    /// Fail when no queue takes the message.
    #[arg(long)]
    mandatory: bool,
}

impl MessageArgs {
    /// The message for `body`, encoded by `serializer` (the flag's, unless
    /// a configured producer decides), with the flags' properties.
    pub(crate) fn build(&self, body: &str, serializer: Option<Serializer>) -> Result<Message> {
        let raw = read_body(body)?;
        let mut m = encode(raw, serializer, self.content_type.as_deref())?;
        m.properties.correlation_id = self.correlation_id.clone();
        m.properties.message_id = self.message_id.clone();
        m.properties.reply_to = self.reply_to.clone();
        m = m.persistent(!self.transient).mandatory(self.mandatory);
        for h in &self.headers {
            let (k, v) = parse_header(h)?;
            m.properties.headers.insert(k, v);
        }
        Ok(m)
    }
}

pub(crate) fn read_body(arg: &str) -> Result<Vec<u8>> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading stdin")?;
        Ok(buf)
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read(path).with_context(|| format!("reading {path}"))
    } else {
        Ok(arg.as_bytes().to_vec())
    }
}

/// Encodes the raw BODY: JSON text for msgpack, json and csv; as is for
/// text and bytes, or when an explicit content type is given. With no
/// serializer, JSON goes as `application/json` and other text as
/// `text/plain`, both unchanged.
pub(crate) fn encode(
    raw: Vec<u8>,
    serializer: Option<Serializer>,
    content_type: Option<&str>,
) -> Result<Message> {
    if let Some(ct) = content_type {
        return Ok(Message::new(raw).content_type(ct));
    }
    let serializer = match serializer {
        Some(s) => s,
        None if serde_json::from_slice::<serde_json::Value>(&raw).is_ok() => {
            return Ok(Message::new(raw).content_type(Serializer::Json.content_type()))
        }
        None if std::str::from_utf8(&raw).is_ok() => Serializer::Text,
        None => Serializer::Bytes,
    };
    let msg = match serializer {
        Serializer::Msgpack | Serializer::Json | Serializer::Csv => {
            let value: serde_json::Value = serde_json::from_slice(&raw).with_context(|| {
                format!("BODY is not valid JSON (needed for --serializer {serializer})")
            })?;
            Message::encode(serializer, &value)?
        }
        Serializer::Text => {
            std::str::from_utf8(&raw).context("BODY is not UTF-8 text")?;
            Message::new(raw).content_type(serializer.content_type())
        }
        Serializer::Bytes => Message::new(raw).content_type(serializer.content_type()),
    };
    Ok(msg)
}

fn parse_header(h: &str) -> Result<(String, HeaderValue)> {
    let Some((k, v)) = h.split_once('=') else {
        bail!("--header `{h}`: expected name=value");
    };
    Ok((k.to_owned(), HeaderValue::from(v)))
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let (connection, mut ps) = match &args.producer {
        Some(name) => {
            let p = settings.producers.get(name).with_context(|| {
                format!(
                    "no producer named '{name}' (known: {})",
                    settings
                        .producers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            (p.connection.clone(), p.producer.clone())
        }
        None => {
            let mut ps = ProducerSettings::new(
                args.exchange.clone().unwrap_or_default(),
                args.exchange_type.unwrap_or_default(),
            );
            // Only declare the exchange when asked to, by giving its type.
            ps.auto_declare = args.exchange_type.is_some();
            ps.durable = !args.message.transient;
            ps.name = "cli".into();
            (rabbitry::defaults::CONNECTION.to_owned(), ps)
        }
    };
    if let Some(k) = &args.routing_key {
        ps.routing_key = Some(k.clone());
    }
    if let Some(q) = &args.message.reply_to {
        ps.reply_to = Some(q.clone());
    }
    if let Some(e) = &args.exchange {
        if args.producer.is_some() {
            ps.exchange = e.clone();
        }
    }
    ps.max_in_flight = PIPELINE;
    // A configured producer's serializer applies; otherwise the BODY decides.
    let serializer = args
        .message
        .serializer
        .or(args.producer.is_some().then_some(ps.serializer));
    let template = args.message.build(&args.body, serializer)?;

    let conn = global.connect(&settings, &connection).await?;
    let producer = Producer::new(&conn, ps).await?;
    let bar = (args.count >= 100 && std::io::stderr().is_terminal()).then(|| {
        let bar = ProgressBar::new(args.count as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    });
    // The producer's own pipelined path, as the relay uses it: each message
    // is handed to the publisher in order (waiting when max_in_flight are
    // unconfirmed), and the confirms are awaited oldest first.
    let mut pending: std::collections::VecDeque<Confirmation> = std::collections::VecDeque::new();
    let mut done = 0usize;
    let mut failed = None;
    for i in 0..args.count {
        let mut msg = template.clone();
        if args.count > 1 {
            if let Some(id) = &args.message.message_id {
                msg.properties.message_id = Some(format!("{id}-{i}"));
            }
        }
        while pending.len() >= PIPELINE {
            if let Some(confirmation) = pending.pop_front() {
                record(
                    confirmation.wait().await,
                    &mut done,
                    &mut failed,
                    bar.as_ref(),
                );
            }
        }
        match producer.submit(msg).await {
            Ok(confirmation) => pending.push_back(confirmation),
            Err(e) => record(Err(e), &mut done, &mut failed, bar.as_ref()),
        }
        if failed.is_some() {
            break;
        }
    }
    for confirmation in pending {
        record(
            confirmation.wait().await,
            &mut done,
            &mut failed,
            bar.as_ref(),
        );
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // The publisher's task stops when the producer goes, before the
    // connections close.
    drop(producer);
    conn.close().await;
    match failed {
        Some((err, invalid)) => {
            eprintln!("error: {err}");
            eprintln!("published {done} of {} (confirmed)", args.count);
            // A message past a protocol limit is the arguments' fault.
            Ok(ExitCode::from(if invalid {
                crate::exit::USAGE
            } else {
                crate::exit::FAILURE
            }))
        }
        None => {
            eprintln!("published {done} (confirmed)");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Confirmations awaited at once: as many as the producer keeps in flight.
const PIPELINE: usize = 1000;

fn record(
    r: rabbitry::Result<()>,
    done: &mut usize,
    failed: &mut Option<(String, bool)>,
    bar: Option<&ProgressBar>,
) {
    match r {
        Ok(()) => {
            *done += 1;
            if let Some(bar) = bar {
                bar.inc(1);
            }
        }
        Err(e) => {
            failed.get_or_insert_with(|| (e.to_string(), e.kind() == rabbitry::ErrorKind::Invalid));
        }
    }
}
