//! `rabbitry rpc`: one request, wait for its reply.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use rabbitry::rpc::{RpcClient, RpcSettings};
use rabbitry::{Decoded, ErrorKind, Serializer};

use super::publish::{encode, read_body};
use super::Global;

/// Send a request and print its reply.
#[derive(clap::Args)]
pub struct Args {
    /// Exchange ('' or none: the default exchange).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Routing key.
    #[arg(long = "routing-key")]
    routing_key: String,
    /// How to encode BODY (BODY is JSON for msgpack and json).
    #[arg(long, default_value = "msgpack")]
    serializer: Serializer,
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

pub async fn run(global: &Global, args: Args) -> Result<ExitCode> {
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
    let reply = match client.call(request, Some(timeout)).await {
        Ok(r) => r,
        Err(e) if e.kind() == ErrorKind::Timeout => {
            eprintln!("error: {e}");
            conn.close().await;
            return Ok(ExitCode::from(4));
        }
        Err(e) => return Err(e.into()),
    };
    let content_type = reply.properties.content_type.clone().unwrap_or_default();
    println!("content-type: {content_type}");
    match (&args.output, reply.decode_value()) {
        (Some(path), _) => {
            std::fs::write(path, &reply.body)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {} bytes to {}", reply.body.len(), path.display());
        }
        (None, Ok(Decoded::Value(v))) => println!("{}", serde_json::to_string_pretty(&v)?),
        (None, Ok(Decoded::Raw(raw))) => match std::str::from_utf8(&raw) {
            Ok(text) if !text.contains('\0') => println!("{text}"),
            _ => println!("({} bytes of binary; use --output FILE)", raw.len()),
        },
        (None, Err(e)) => println!("({} bytes that do not decode: {e})", reply.body.len()),
    }
    conn.close().await;
    Ok(ExitCode::SUCCESS)
}
