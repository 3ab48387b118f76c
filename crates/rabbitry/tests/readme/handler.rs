//! The handler test the README shows, between the markers below; a test
//! in `in_memory.rs` checks that the README holds this text.

// README:begin
use std::time::Duration;

use rabbitry::testing::TestBroker;
use rabbitry::worker::{dead, Counted, HandlerError, Msg, Worker};
use rabbitry::{ConsumerSettings, Message, Serializer};

#[derive(serde::Deserialize)]
struct Order {
    id: u64,
    items: Vec<String>,
}

/// The handler under test: an order without items is refused for good.
async fn save_order(Msg(order): Msg<Order>) -> Result<(), HandlerError> {
    if order.items.is_empty() {
        return Err(HandlerError::invalid(format!(
            "order {} has no items",
            order.id
        )));
    }
    Ok(())
}

#[tokio::test]
async fn an_order_without_items_is_dead_lettered_with_its_reason() {
    let broker = TestBroker::new(); // in memory: no RabbitMQ needed
    let conn = broker.connect().await.unwrap();
    let running = Worker::new(&conn, ())
        .consumer(ConsumerSettings::new("orders"), save_order)
        .start()
        .await
        .unwrap();

    for order in [
        r#"{"id": 1, "items": ["book"]}"#,
        r#"{"id": 2, "items": []}"#,
    ] {
        let message = Message::new(order)
            .content_type(Serializer::Json.content_type())
            .routing_key("orders");
        broker.publish("", message).unwrap();
    }

    let metrics = running.metrics();
    metrics
        .until(Duration::from_secs(5), |m| m.finished("orders") == Some(2))
        .await
        .unwrap();
    assert_eq!(metrics.outcomes("orders", Counted::Ack), 1);
    assert_eq!(metrics.outcomes("orders", Counted::DeadLetter), 1);
    let letters = dead::list(&conn, "orders", 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert!(letters[0]
        .error
        .as_deref()
        .unwrap()
        .contains("order 2 has no items"));
    running.shutdown().await;
}
// README:end
