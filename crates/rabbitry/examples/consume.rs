//! Consume with explicit outcomes: ack what was handled, requeue a
//! conflict, reject (dead-letter) what cannot be handled. Each delivery
//! settles once; the consumer is a `Stream`.
//!
//! ```sh
//! cargo run -p rabbitry --example consume
//! ```

use std::time::Duration;

use futures_util::StreamExt;
use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, HeaderValue, Message, Outcome,
    Producer, ProducerSettings, Queue, Topology,
};

/// Publishes "ok", "bad" and "ok" to a queue of `prefix`, consumes them,
/// rejects "bad" to a dead-letter queue, and returns (acked, dead-lettered).
pub(crate) async fn run(url: &str, prefix: &str) -> rabbitry::Result<(usize, u32)> {
    let conn = Connection::open(ConnectionSettings::new(url)).await?;
    let queue = format!("{prefix}.tasks");
    let dead = format!("{prefix}.tasks.dead");
    let mut topology = Topology::default();
    topology.queue(Queue::durable(&dead));
    conn.declare(&topology).await?;

    // Rejected messages go to the dead-letter queue, through the default
    // exchange: queue arguments pass through unchanged.
    let mut settings = ConsumerSettings::new(&queue);
    settings
        .arguments
        .insert("x-dead-letter-exchange".into(), HeaderValue::from(""));
    settings.arguments.insert(
        "x-dead-letter-routing-key".into(),
        HeaderValue::from(dead.as_str()),
    );
    settings.prefetch_count = Some(10);
    let mut consumer = Consumer::start(&conn, settings).await?;

    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue)).await?;
    for body in ["ok", "bad", "ok"] {
        producer.publish(Message::new(body)).await?;
    }

    let mut acked = 0;
    // The consumer is a Stream: take the three deliveries.
    let mut three = consumer.by_ref().take(3);
    while let Ok(Some(delivery)) = tokio::time::timeout(Duration::from_secs(10), three.next()).await
    {
        let outcome = if &delivery.body[..] == b"ok" {
            acked += 1;
            Outcome::Ack
        } else {
            Outcome::Reject
        };
        println!(
            "{:?} -> {outcome:?}",
            String::from_utf8_lossy(&delivery.body)
        );
        delivery.settle(outcome).await?;
        // Settling twice is refused, and nothing reaches the broker.
        assert!(delivery.ack().await.is_err());
    }
    consumer.cancel().await;
    // The broker dead-letters asynchronously: look until it has (or 5 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut dead_lettered = 0;
    while dead_lettered == 0 && tokio::time::Instant::now() < deadline {
        dead_lettered = conn.queue_status(&dead).await?.map_or(0, |s| s.messages);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{acked} acked, {dead_lettered} dead-lettered");

    conn.delete_queue(&queue).await?;
    conn.delete_queue(&dead).await?;
    conn.close().await;
    Ok((acked, dead_lettered))
}

#[tokio::main]
async fn main() -> rabbitry::Result<()> {
    run(
        rabbitry::defaults::URL,
        &format!("example.{}", std::process::id()),
    )
    .await
    .map(drop)
}
