//! `rabbitry demo`: the seed's request/reply flow, end to end, on the
//! local broker. A service consumes `service.tasks`, the site publishes
//! the seed's request and receives the reply on its queue.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use rabbitry::{
    Consumer, ConsumerSettings, ExchangeKind, Message, Producer, ProducerSettings, Serializer,
};

use super::Global;

/// Run the seed's request/reply flow against the broker.
#[derive(clap::Args)]
pub struct Args {}

pub async fn run(global: &Global, _args: Args) -> Result<ExitCode> {
    let settings = global.settings()?;
    let conn = global.connect_default(&settings).await?;
    let reply_queue = "rabbitry.demo.my_queue";

    let mut service = Consumer::start(
        &conn,
        ConsumerSettings::new("rabbitry.demo.service").bind(
            "service.tasks",
            ExchangeKind::Topic,
            &["service.my_template"],
        ),
    )
    .await?;
    let mut site = Consumer::start(
        &conn,
        ConsumerSettings::new(reply_queue).bind(
            "service.results",
            ExchangeKind::Direct,
            &[reply_queue],
        ),
    )
    .await?;
    let requests = Producer::new(
        &conn,
        ProducerSettings::new("service.tasks", ExchangeKind::Topic),
    )
    .await?;
    let replies = Producer::new(
        &conn,
        ProducerSettings::new("service.results", ExchangeKind::Direct),
    )
    .await?;

    let correlation_id = uuid::Uuid::new_v4().to_string();
    requests
        .publish(
            Message::encode(
                Serializer::Msgpack,
                &serde_json::json!({"title": "Hello World!"}),
            )?
            .routing_key("service.my_template")
            .correlation_id(&correlation_id)
            .reply_to(reply_queue),
        )
        .await?;
    println!("site    -> service.tasks/service.my_template  correlation_id={correlation_id}");

    let request = tokio::time::timeout(Duration::from_secs(10), service.next())
        .await
        .context("the service got no request within 10 s")?
        .context("service consumer stopped")?;
    let body: serde_json::Value = request.decode()?;
    println!(
        "service <- {} {body}",
        request.properties.content_type.as_deref().unwrap_or("?")
    );
    let pdf = format!(
        "%PDF-1.4\n% {}\n%%EOF\n",
        body["title"].as_str().unwrap_or_default()
    );
    replies
        .publish(
            Message::new(pdf.into_bytes())
                .content_type("application/pdf")
                .routing_key(request.properties.reply_to.clone().unwrap_or_default())
                .correlation_id(
                    request
                        .properties
                        .correlation_id
                        .clone()
                        .unwrap_or_default(),
                ),
        )
        .await?;
    request.ack().await?;
    println!("service -> service.results/{reply_queue}  application/pdf");

    let reply = tokio::time::timeout(Duration::from_secs(10), site.next())
        .await
        .context("the site got no reply within 10 s")?
        .context("site consumer stopped")?;
    println!(
        "site    <- {} ({} bytes) correlation_id={}",
        reply.properties.content_type.as_deref().unwrap_or("?"),
        reply.body.len(),
        reply.properties.correlation_id.as_deref().unwrap_or("?")
    );
    reply.ack().await?;
    service.cancel().await;
    site.cancel().await;
    conn.close().await;
    Ok(ExitCode::SUCCESS)
}
