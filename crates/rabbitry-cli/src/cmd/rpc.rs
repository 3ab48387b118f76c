//! `rabbitry rpc`: one request, wait for its reply.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rabbitry::rpc::{RpcClient, RpcSettings};
use rabbitry::{Decoded, Serializer};

use super::publish::{encode, read_body};
use super::Global;

/// Send a request and print its reply.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Exchange ('' or none: the default exchange).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Routing key.
    #[arg(long = "routing-key")]
    routing_key: String,
    /// How to encode BODY (BODY is JSON for msgpack, json and csv). Default:
    /// JSON goes as application/json, other text as text/plain.
    #[arg(long)]
    serializer: Option<Serializer>,
    /// Send BODY as it is, with this content type.
    #[arg(long = "content-type")]
    content_type: Option<String>,
    /// How long to wait for the reply: 500ms, 5s, 1m.
    #[arg(long, default_value = "5s")]
    timeout: String,
    /// Write the reply's body to this file instead of printing it.
    #[arg(long)]
    output: Option<PathBuf>,
    /// The body: text, @file, or - for stdin.
    body: String,
}

pub(crate) async fn run(global: &Global, args: Args) -> Result<ExitCode> {
    let timeout = rabbitry::config::parse_duration(&args.timeout)?;
    let settings = global.settings()?;
    let conn = global.connect_default(&settings).await?;
    let client = RpcClient::new(
        &conn,
        RpcSettings {
            exchange: args.exchange.clone(),
            timeout,
            ..RpcSettings::default()
        },
    )
    .await?;
    let request = encode(
        read_body(&args.body)?,
        args.serializer,
        args.content_type.as_deref(),
    )?
    .routing_key(&args.routing_key);
    let reply = client.call(request, Some(timeout)).await;
    // The client's reply reader stops when the client goes; closing the
    // connection then lets it finish before the runtime shuts down.
    drop(client);
    conn.close().await;
    // A timeout exits with 4 (see `rabbitry --help`).
    let reply = reply?;
    // Metadata on stderr; stdout is the reply's body alone, so it pipes.
    let content_type = reply.properties.content_type.clone().unwrap_or_default();
    eprintln!("content-type: {content_type}");
    // Bytes are bytes: the body as it came, not a JSON rendering of it.
    let decoded = if Serializer::for_content_type(&content_type) == Some(Serializer::Bytes) {
        Ok(Decoded::Raw(reply.body.to_vec()))
    } else {
        reply.decode_value()
    };
    match (&args.output, decoded) {
        (Some(path), _) => {
            std::fs::write(path, &reply.body)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} bytes to {}", reply.body.len(), path.display());
        }
        (None, Ok(Decoded::Value(serde_json::Value::String(text)))) => outln!("{text}")?,
        (None, Ok(Decoded::Value(v))) => outln!("{}", serde_json::to_string_pretty(&v)?)?,
        (None, Ok(Decoded::Raw(raw))) => match std::str::from_utf8(&raw) {
            Ok(text) if !text.contains('\0') => outln!("{text}")?,
            _ => write_binary(&raw)?,
        },
        (None, Err(e)) => {
            eprintln!("the reply does not decode as {content_type}: {e}");
            write_binary(&reply.body)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Binary bodies go to stdout as they are when it is a file or a pipe
/// (`rabbitry rpc ... > hello.pdf`); a terminal gets a note instead.
fn write_binary(body: &[u8]) -> std::io::Result<()> {
    use std::io::{IsTerminal, Write};
    let mut out = std::io::stdout().lock();
    if out.is_terminal() {
        eprintln!(
            "({} bytes of binary; use --output FILE or redirect stdout)",
            body.len()
        );
        return Ok(());
    }
    out.write_all(body)?;
    out.flush()
}
