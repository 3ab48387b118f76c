//! Producers: confirms, defaults, mandatory.

use std::time::Duration;

use rabbitry::{
    Consumer, ConsumerSettings, ErrorKind, ExchangeKind, Message, Outcome, Producer,
    ProducerSettings, Queue, Serializer, Topology,
};

use crate::support::{connect, eventually, unique};

#[tokio::test]
async fn confirmed_publish_arrives_with_producer_defaults() {
    let conn = connect().await;
    let exchange = unique("ex");
    let queue = unique("q");
    let mut consumer = Consumer::start(
        &conn,
        ConsumerSettings::new(&queue).bind(&exchange, ExchangeKind::Topic, &["service.*"]),
    )
    .await
    .unwrap();
    let mut settings =
        ProducerSettings::new(&exchange, ExchangeKind::Topic).routing_key("service.my_template");
    settings.reply_to = Some("my_queue".into());
    let producer = Producer::new(&conn, settings).await.unwrap();
    producer
        .publish(
            Message::encode(
                Serializer::Msgpack,
                &serde_json::json!({"title": "Hello World!"}),
            )
            .unwrap()
            .correlation_id("c-1"),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("a delivery within 5 s")
        .unwrap();
    assert_eq!(d.routing_key, "service.my_template");
    assert_eq!(d.exchange, exchange);
    assert_eq!(
        d.properties.content_type.as_deref(),
        Some("application/x-msgpack")
    );
    assert_eq!(
        d.properties.delivery_mode,
        Some(2),
        "durable producers publish persistent messages"
    );
    assert_eq!(d.properties.reply_to.as_deref(), Some("my_queue"));
    assert_eq!(d.properties.correlation_id.as_deref(), Some("c-1"));
    assert!(
        d.properties.message_id.is_some(),
        "a message id is assigned"
    );
    let body: serde_json::Value = d.decode().unwrap();
    assert_eq!(body, serde_json::json!({"title": "Hello World!"}));
    d.settle(Outcome::Ack).await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
    conn.delete_exchange(&exchange).await.unwrap();
}

#[tokio::test]
async fn mandatory_unroutable_message_is_an_error() {
    let conn = connect().await;
    let exchange = unique("ex");
    let producer = Producer::new(
        &conn,
        ProducerSettings::new(&exchange, ExchangeKind::Direct).routing_key("nowhere"),
    )
    .await
    .unwrap();
    let err = producer
        .publish(Message::new("x").mandatory(true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unroutable, "{err}");
    assert!(err.to_string().contains(&exchange), "{err}");
    // Without mandatory the broker drops it and confirms: no error.
    producer.publish(Message::new("x")).await.unwrap();
    // The producer keeps working after a return.
    let err = producer
        .publish(Message::new("y").mandatory(true))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unroutable);
    conn.delete_exchange(&exchange).await.unwrap();
}

#[tokio::test]
async fn transient_producer_and_queue_name_as_routing_key() {
    let conn = connect().await;
    let queue = unique("q");
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let settings = ProducerSettings::default().durable(false).queue(&queue);
    let producer = Producer::new(&conn, settings).await.unwrap();
    producer.send("plain").await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.routing_key, queue);
    assert_eq!(d.properties.delivery_mode, Some(1));
    d.ack().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test]
async fn publish_to_a_missing_exchange_fails_and_the_producer_recovers() {
    let conn = connect().await;
    let queue = unique("q");
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&queue))
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    let missing = unique("missing");
    let err = producer
        .publish(Message::new("x").exchange(&missing))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Channel, "{err}");
    assert!(
        err.to_string().contains(&missing) && err.to_string().contains("NOT_FOUND"),
        "{err}"
    );
    // The next publish goes out on a new channel.
    tokio::time::timeout(
        Duration::from_secs(10),
        producer.publish(Message::new("after")),
    )
    .await
    .expect("publish after a channel error")
    .unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&d.body[..], b"after");
    d.ack().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_publish_on_a_connection_of_their_own_unless_told_not_to() {
    use rabbitry_test_support::broker::has_connection;
    for separate in [true, false] {
        let name = unique(if separate { "two" } else { "one" });
        let mut settings = crate::support::settings(&crate::support::url(), &name);
        settings.separate_publishing = separate;
        let conn = rabbitry::Connection::open(settings).await.unwrap();
        let queue = unique("sep");
        let mut consumer =
            rabbitry::Consumer::start(&conn, rabbitry::ConsumerSettings::new(&queue))
                .await
                .unwrap();
        let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
            .await
            .unwrap();
        producer.publish(Message::new("across")).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&d.body[..], b"across");
        d.ack().await.unwrap();
        let publish_name = format!("{name}.publish");
        let (n, p) = (name.clone(), publish_name.clone());
        let seen = tokio::task::spawn_blocking(move || (has_connection(&n), has_connection(&p)))
            .await
            .unwrap();
        assert_eq!(seen, (true, separate), "main and publishing connections");
        consumer.cancel().await;
        conn.delete_queue(&queue).await.unwrap();
        conn.close().await;
        // Closing the connection closes its publishing connection too.
        if separate {
            eventually(
                Duration::from_secs(10),
                "the publishing connection closed",
                || {
                    let p = publish_name.clone();
                    async move {
                        !tokio::task::spawn_blocking(move || has_connection(&p))
                            .await
                            .unwrap()
                    }
                },
            )
            .await;
        }
    }
}

/// A queue that holds one message and nacks publishes beyond it.
async fn full_queue(conn: &rabbitry::Connection) -> String {
    let queue = unique("full");
    let mut q = Queue::durable(&queue);
    q.arguments
        .insert("x-max-length".into(), rabbitry::HeaderValue::Int(1));
    q.arguments
        .insert("x-overflow".into(), "reject-publish".into());
    let mut t = Topology::default();
    t.queue(q);
    conn.declare(&t).await.unwrap();
    queue
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacked_publish_is_published_again_until_the_broker_takes_it() {
    let conn = connect().await;
    let queue = full_queue(&conn).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("first")).await.unwrap();
    // The queue is full: the broker nacks this one until there is room.
    let second = tokio::spawn({
        let producer = producer.clone();
        async move { producer.publish(Message::new("second")).await }
    });
    let mut cs = ConsumerSettings::new(&queue);
    cs.auto_declare = false;
    let mut consumer = Consumer::start(&conn, cs).await.unwrap();
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery")
            .unwrap();
        bodies.push(String::from_utf8(d.body.to_vec()).unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(bodies, ["first", "second"]);
    second
        .await
        .unwrap()
        .expect("the nacked publish succeeded once there was room");
    consumer.cancel().await;
    conn.delete_queue(&queue).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_nacked_past_the_recovery_timeout_fails_to_the_caller() {
    let mut settings =
        rabbitry::ConnectionSettings::new(crate::support::url()).name(unique("nack"));
    settings.recovery_timeout = Duration::from_millis(500);
    let conn = rabbitry::Connection::open(settings).await.unwrap();
    let queue = full_queue(&conn).await;
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    producer.publish(Message::new("first")).await.unwrap();
    let err = producer
        .publish(Message::new("second"))
        .await
        .expect_err("never room for it");
    assert_eq!(err.kind(), rabbitry::ErrorKind::Nacked, "{err}");
    assert!(
        err.to_string().contains("nacked by the broker each time"),
        "{err}"
    );
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

/// A producer through a proxy, whose confirms the test can hold back.
async fn stalled_producer(
    proxy: &rabbitry_test_support::Proxy,
    recovery_timeout: Duration,
) -> (rabbitry::Connection, Producer, String) {
    let mut settings = rabbitry::ConnectionSettings::new(proxy.url()).name(unique("stall"));
    settings.recovery_timeout = recovery_timeout;
    let conn = rabbitry::Connection::open(settings).await.unwrap();
    let queue = unique("stall");
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let mut ps = ProducerSettings::default().routing_key(&queue);
    ps.confirm_timeout = Duration::from_millis(300);
    let producer = Producer::new(&conn, ps).await.unwrap();
    (conn, producer, queue)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_that_does_not_come_in_time_publishes_the_message_again() {
    let proxy = rabbitry_test_support::Proxy::start().await;
    let (conn, producer, queue) = stalled_producer(&proxy, Duration::from_secs(30)).await;
    // The broker gets the message, but its confirm is held back.
    proxy.hold();
    let publishing = tokio::spawn({
        let producer = producer.clone();
        async move {
            producer
                .publish(Message::new("once").message_id("m-1"))
                .await
        }
    });
    eventually(
        Duration::from_secs(10),
        "published again after the confirm timeout",
        || async { producer.republished() >= 1 },
    )
    .await;
    proxy.release();
    publishing
        .await
        .unwrap()
        .expect("confirmed once the confirms came through");

    // Duplicates, never a loss: every copy is the same message.
    let copies = 1 + producer.republished() as usize;
    let direct = connect().await;
    let mut cs = ConsumerSettings::new(&queue);
    cs.auto_declare = false;
    let mut consumer = Consumer::start(&direct, cs).await.unwrap();
    for _ in 0..copies {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("each copy delivered")
            .unwrap();
        assert_eq!(
            (&d.body[..], d.properties.message_id.as_deref()),
            (&b"once"[..], Some("m-1"))
        );
        d.ack().await.unwrap();
    }
    consumer.cancel().await;
    let left = direct.queue_status(&queue).await.unwrap().unwrap().messages;
    assert_eq!(left, 0, "{copies} copies, no more");
    direct.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_never_confirmed_fails_after_the_recovery_timeout() {
    let proxy = rabbitry_test_support::Proxy::start().await;
    let (_conn, producer, queue) = stalled_producer(&proxy, Duration::from_secs(1)).await;
    proxy.hold();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        producer.publish(Message::new("lost confirm")),
    )
    .await
    .expect("the publish fails within its bound")
    .expect_err("no confirm ever comes");
    assert_eq!(err.kind(), rabbitry::ErrorKind::Timeout, "{err}");
    assert!(
        err.to_string()
            .contains("not confirmed by the broker within 1s"),
        "{err}"
    );
    assert!(producer.republished() >= 1);
    proxy.cut();
    connect().await.delete_queue(&queue).await.unwrap();
}
