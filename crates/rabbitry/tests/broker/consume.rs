//! Consumers: outcomes, redelivery, prefetch.

use std::time::Duration;

use rabbitry::{
    Consumer, ConsumerSettings, HeaderValue, Message, Outcome, Producer, ProducerSettings, Queue,
    Topology,
};

use crate::support::{connect, eventually, unique};

/// Waits until `queue` holds nothing: every message was acked, once.
async fn drained(conn: &rabbitry::Connection, queue: &str) {
    eventually(Duration::from_secs(5), "the queue drained", || async {
        conn.queue_status(queue)
            .await
            .unwrap()
            .is_some_and(|s| s.messages == 0)
    })
    .await;
}

/// Waits until the broker keeps `ready` messages of `queue` back, then
/// checks that the consumer gets nothing more meanwhile (`extra` says what
/// an extra delivery would mean).
async fn held_back(
    conn: &rabbitry::Connection,
    consumer: &mut Consumer,
    queue: &str,
    ready: u32,
    extra: &str,
) {
    eventually(
        Duration::from_secs(5),
        &format!("{ready} messages ready"),
        || async {
            conn.queue_status(queue)
                .await
                .unwrap()
                .is_some_and(|s| s.messages == ready)
        },
    )
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next())
            .await
            .is_err(),
        "{extra}"
    );
}

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
    assert_eq!(&d.body[..], b"one");
    d.settle(Outcome::Reject).await.unwrap();

    let mut dlq = Consumer::start(&conn, ConsumerSettings::new(&dead))
        .await
        .unwrap();
    let d = next(&mut dlq).await;
    assert_eq!(&d.body[..], b"one", "a rejected message is dead-lettered");
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
    held_back(
        &conn,
        &mut consumer,
        &queue,
        3,
        "no third delivery while two are unacked",
    )
    .await;
    a.ack().await.unwrap();
    let c = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&c.body[..], b"2");
    b.ack().await.unwrap();
    c.ack().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_settle_is_refused_and_the_channel_stays_open() {
    let conn = connect().await;
    let queue = unique("once");
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for body in ["a", "b", "c"] {
        producer.publish(Message::new(body)).await.unwrap();
    }
    let a = next(&mut consumer).await;
    let b = next(&mut consumer).await;
    a.ack().await.unwrap();
    let again = a.ack().await.unwrap_err();
    assert_eq!(again.kind(), rabbitry::ErrorKind::AlreadySettled, "{again}");
    let also = a.acker().settle(Outcome::Requeue).await.unwrap_err();
    assert_eq!(also.kind(), rabbitry::ErrorKind::AlreadySettled);
    // Nothing reached the broker: the channel is open, and the other
    // deliveries on it are acked normally, once each.
    assert!(b.is_settleable(), "the channel was closed by a double ack");
    b.ack().await.unwrap();
    let c = next(&mut consumer).await;
    assert_eq!(&c.body[..], b"c");
    assert!(!c.redelivered);
    c.ack().await.unwrap();
    consumer.cancel().await;
    drained(&conn, &queue).await;
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_is_a_stream_and_run_hands_over_each_delivery() {
    use futures_util::StreamExt;
    let conn = connect().await;
    let queue = unique("stream");
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..4 {
        producer
            .publish(Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    // As a stream.
    let first: Vec<rabbitry::Delivery> =
        tokio::time::timeout(Duration::from_secs(5), consumer.by_ref().take(2).collect())
            .await
            .unwrap();
    for d in &first {
        d.ack().await.unwrap();
    }
    assert_eq!(
        first.iter().map(|d| d.body.to_vec()).collect::<Vec<_>>(),
        [b"0".to_vec(), b"1".to_vec()]
    );
    // run: the handler owns the delivery and reads it in its async block;
    // one that settles it itself is not settled twice.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let both = std::sync::Arc::new(tokio::sync::Notify::new());
    let done = both.clone();
    let handled = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            _ = consumer.run(move |d| {
                let (log, done) = (log.clone(), done.clone());
                async move {
                    let text = String::from_utf8(d.body.to_vec()).unwrap();
                    if text == "3" {
                        d.ack().await.unwrap();
                    }
                    let mut log = log.lock().unwrap();
                    log.push(text);
                    if log.len() == 2 {
                        done.notify_one();
                    }
                    Outcome::Ack
                }
            }) => {}
            _ = both.notified() => {}
        }
    })
    .await;
    assert!(handled.is_ok(), "run handed over both deliveries");
    assert_eq!(*seen.lock().unwrap(), ["2", "3"]);
    consumer.cancel().await;
    drained(&conn, &queue).await;
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_consumer_holds_at_most_the_default_prefetch() {
    let conn = connect().await;
    let queue = unique("prefetch");
    let mut topo = Topology::default();
    topo.queue(Queue::durable(&queue));
    conn.declare(&topo).await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..400 {
        producer.publish(Message::new(i.to_string())).await.unwrap();
    }
    let default = rabbitry::defaults::PREFETCH;
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    // Held, never acked: the broker keeps the rest ready.
    let mut held = Vec::new();
    for _ in 0..default {
        held.push(next(&mut consumer).await);
    }
    held_back(
        &conn,
        &mut consumer,
        &queue,
        400 - u32::from(default),
        &format!("a delivery beyond the prefetch of {default}"),
    )
    .await;
    for d in held {
        d.ack().await.unwrap();
    }
    consumer.cancel().await;
    conn.delete_queue(&queue).await.unwrap();
}
