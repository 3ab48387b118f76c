//! Publish with publisher confirms: `publish` returns once the broker has
//! the message, and `mandatory` turns "no queue took it" into an error.
//!
//! ```sh
//! cargo run -p rabbitry --example publish
//! ```

use rabbitry::{
    Connection, ConnectionSettings, ErrorKind, Message, Producer, ProducerSettings, Queue,
    Serializer, Topology,
};

/// Publishes three orders to a queue of `prefix` and returns how many the
/// queue holds, then shows what an unroutable message does.
pub(crate) async fn run(url: &str, prefix: &str) -> rabbitry::Result<u32> {
    let conn = Connection::open(ConnectionSettings::new(url)).await?;
    let queue = format!("{prefix}.orders");
    let mut topology = Topology::default();
    topology.queue(Queue::durable(&queue));
    conn.declare(&topology).await?;

    // The default exchange routes by queue name: the queue is the key.
    let orders = Producer::new(&conn, ProducerSettings::default().routing_key(&queue)).await?;
    for id in 1..=3 {
        let order = serde_json::json!({"id": id, "item": "book"});
        orders
            .publish(Message::encode(Serializer::Json, &order)?.message_id(format!("order-{id}")))
            .await?; // confirmed by the broker
    }
    let held = conn.queue_status(&queue).await?.map_or(0, |s| s.messages);
    println!("{queue} holds {held} confirmed order(s)");

    // Mandatory: a message no queue takes is an error, not a silent drop.
    let nowhere = Message::new("lost?")
        .routing_key(format!("{prefix}.no-such-queue"))
        .mandatory(true);
    match orders.publish(nowhere).await {
        Err(e) if e.kind() == ErrorKind::Unroutable => println!("refused, as it should be: {e}"),
        other => println!("unexpected: {other:?}"),
    }

    conn.delete_queue(&queue).await?;
    conn.close().await;
    Ok(held)
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
