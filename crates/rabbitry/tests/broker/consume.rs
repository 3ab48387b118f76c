//! Consumers: outcomes, redelivery, prefetch.

use std::time::Duration;

use rabbitry::{
    Consumer, ConsumerSettings, HeaderValue, Message, Outcome, Producer, ProducerSettings, Queue,
    Topology,
};

use crate::support::{connect, eventually, unique};

async fn next(c: &mut Consumer) -> rabbitry::Delivery {
    tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("a delivery within 5 s")
        .expect("the consumer is running")
}

#[tokio::test]
async fn outcomes_ack_requeue_and_reject_to_dead_letter() {
    let conn = connect().await;
    let queue = unique("q");
    let dead = format!("{queue}.dlq");
    let mut topo = Topology::default();
    topo.queue(Queue::durable(&dead));
    conn.declare(&topo).await.unwrap();
    let mut settings = ConsumerSettings::new(&queue);
    settings
        .arguments
        .insert("x-dead-letter-exchange".into(), HeaderValue::from(""));
    settings.arguments.insert(
        "x-dead-letter-routing-key".into(),
        HeaderValue::from(dead.as_str()),
    );
    let mut consumer = Consumer::start(&conn, settings).await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("one")).await.unwrap();

    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    d.settle(Outcome::Requeue).await.unwrap();
    let d = next(&mut consumer).await;
    assert!(
        d.redelivered,
        "a requeued message comes back marked redelivered"
    );
    assert_eq!(d.body, b"one");
    d.settle(Outcome::Reject).await.unwrap();

    let mut dlq = Consumer::start(&conn, ConsumerSettings::new(&dead))
        .await
        .unwrap();
    let d = next(&mut dlq).await;
    assert_eq!(d.body, b"one", "a rejected message is dead-lettered");
    d.ack().await.unwrap();
    eventually(Duration::from_secs(5), "the queue to be empty", || async {
        conn.queue_status(&queue).await.unwrap().unwrap().messages == 0
    })
    .await;
    conn.delete_queue(&queue).await.unwrap();
    conn.delete_queue(&dead).await.unwrap();
}

#[tokio::test]
async fn prefetch_caps_unacknowledged_deliveries() {
    let conn = connect().await;
    let queue = unique("q");
    let mut settings = ConsumerSettings::new(&queue);
    settings.prefetch_count = Some(2);
    let mut consumer = Consumer::start(&conn, settings).await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..5 {
        producer
            .publish(Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    let a = consumer.next().await.unwrap();
    let b = consumer.next().await.unwrap();
    // With two unacked, the broker holds the other three back.
    eventually(Duration::from_secs(5), "3 messages ready", || async {
        conn.queue_status(&queue).await.unwrap().unwrap().messages == 3
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "no third delivery while two are unacked"
    );
    a.ack().await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.body, b"2");
    b.ack().await.unwrap();
    c.ack().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}
