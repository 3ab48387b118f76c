//! The in-memory broker's rules, one by one. Whether they are RabbitMQ's
//! is for the conformance suite that runs on both brokers; these pin the
//! engine's own logic, under tokio's paused clock.

use std::time::Duration;

use super::*;
use crate::message::HeaderValue;

fn args(pairs: &[(&str, HeaderValue)]) -> Headers {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn declare(ch: &MemoryChannel, name: &str, arguments: &[(&str, HeaderValue)]) -> String {
    ch.declare_queue(name, true, false, false, &args(arguments), false)
        .unwrap()
        .0
}

/// The next delivery, within 10 s.
async fn next(rx: &mut mpsc::UnboundedReceiver<Event>) -> MemoryDelivery {
    next_within(rx, Duration::from_secs(10)).await
}

/// The next delivery within `limit` (of virtual time, when the clock is
/// paused).
async fn next_within(rx: &mut mpsc::UnboundedReceiver<Event>, limit: Duration) -> MemoryDelivery {
    match tokio::time::timeout(limit, rx.recv()).await {
        Ok(Some(Event::Delivery(d))) => *d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

fn death(d: &MemoryDelivery) -> (String, String, i64) {
    let Some(HeaderValue::Array(deaths)) = d.properties.headers.get("x-death") else {
        panic!("no x-death: {:?}", d.properties.headers)
    };
    let HeaderValue::Table(t) = &deaths[0] else {
        panic!("not a table")
    };
    let s = |k: &str| t.get(k).and_then(HeaderValue::as_str).unwrap().to_owned();
    (
        s("queue"),
        s("reason"),
        t.get("count").and_then(HeaderValue::as_i64).unwrap(),
    )
}

#[tokio::test]
async fn in_memory_topic_routing_mandatory_returns_and_the_default_exchange() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    ch.declare_exchange(
        "shop",
        ExchangeKind::Topic,
        true,
        false,
        &Headers::new(),
        false,
    )
    .unwrap();
    let q = declare(&ch, "orders", &[]);
    ch.bind_queue(&q, "shop", "order.*", &Headers::new())
        .unwrap();
    let p = Properties::default();
    assert_eq!(
        ch.publish("shop", "order.created", true, p.clone(), "a")
            .unwrap(),
        Published::Ack
    );
    assert_eq!(
        ch.publish("shop", "invoice.sent", true, p.clone(), "b")
            .unwrap(),
        Published::Returned
    );
    assert_eq!(
        ch.publish("shop", "invoice.sent", false, p.clone(), "c")
            .unwrap(),
        Published::Ack
    );
    assert_eq!(
        ch.publish("", "orders", false, p, "d").unwrap(),
        Published::Ack
    );
    assert_eq!(broker.queue_counts("orders"), Some((2, 0)));
}

#[tokio::test]
async fn in_memory_prefetch_holds_back_until_an_ack_and_nack_requeues_first_in_line() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let q = declare(&ch, "jobs", &[]);
    for body in ["1", "2"] {
        ch.publish("", &q, false, Properties::default(), body)
            .unwrap();
    }
    ch.qos(1).unwrap();
    let mut rx = ch.consume(&q, "c1", false, false).unwrap();
    let first = next(&mut rx).await;
    assert_eq!(&first.body[..], b"1");
    assert!(rx.try_recv().is_err(), "prefetch 1 holds the second back");
    ch.settle(first.delivery_tag, false, Settle::Requeue)
        .unwrap();
    let again = next(&mut rx).await;
    assert_eq!((&again.body[..], again.redelivered), (&b"1"[..], true));
    ch.settle(again.delivery_tag, false, Settle::Ack).unwrap();
    let second = next(&mut rx).await;
    assert_eq!((&second.body[..], second.redelivered), (&b"2"[..], false));
    // An unknown tag closes the channel, as RabbitMQ does.
    let err = ch.settle(999, false, Settle::Ack).unwrap_err();
    assert_eq!(err.code, 406);
    assert_eq!(err.text, "PRECONDITION_FAILED - unknown delivery tag 999");
    assert_eq!(ch.qos(1).unwrap_err().code, 504);
    // The closed channel's unacknowledged message went back.
    assert_eq!(broker.queue_counts("jobs"), Some((1, 0)));
}

#[tokio::test]
async fn in_memory_reject_dead_letters_with_x_death() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let dead = declare(&ch, "work.dead", &[]);
    let q = declare(
        &ch,
        "work",
        &[
            ("x-dead-letter-exchange", HeaderValue::String(String::new())),
            (
                "x-dead-letter-routing-key",
                HeaderValue::String(dead.clone()),
            ),
        ],
    );
    ch.publish("", &q, false, Properties::default(), "x")
        .unwrap();
    let mut rx = ch.consume(&q, "c", false, false).unwrap();
    let d = next(&mut rx).await;
    ch.settle(d.delivery_tag, false, Settle::Discard).unwrap();
    let (letter, _) = ch.get(&dead, true).unwrap().expect("dead-lettered");
    assert_eq!(death(&letter), ("work".into(), "rejected".into(), 1));
    assert_eq!(
        letter.properties.headers.get("x-first-death-reason"),
        Some(&HeaderValue::String("rejected".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn in_memory_a_five_minute_retry_queue_runs_on_the_paused_clock() {
    // rabbitry's retry queues: a TTL queue dead-letters back to the work
    // queue through the default exchange.
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let q = declare(&ch, "work", &[]);
    let delay = declare(
        &ch,
        "work.retry.5m",
        &[
            ("x-message-ttl", HeaderValue::Int(300_000)),
            ("x-dead-letter-exchange", HeaderValue::String(String::new())),
            ("x-dead-letter-routing-key", HeaderValue::String(q.clone())),
        ],
    );
    let mut rx = ch.consume(&q, "c", false, false).unwrap();
    ch.publish("", &delay, false, Properties::default(), "later")
        .unwrap();
    let started = Instant::now();
    let wall = std::time::Instant::now();
    let d = next_within(&mut rx, Duration::from_secs(3600)).await;
    println!("a 5-minute TTL took {:?} of wall time", wall.elapsed());
    assert!(
        started.elapsed() >= Duration::from_secs(300),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(death(&d), ("work.retry.5m".into(), "expired".into(), 1));
    // A per-message expiration is kept in x-death as original-expiration.
    let p = Properties {
        expiration: Some("1000".into()),
        ..Properties::default()
    };
    ch.publish("", &delay, false, p, "sooner").unwrap();
    let d = next_within(&mut rx, Duration::from_secs(3600)).await;
    assert_eq!(&d.body[..], b"sooner");
    assert_eq!(d.properties.expiration, None);
}

#[tokio::test]
async fn in_memory_overflow_reject_publish_nacks_and_drop_head_dead_letters() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let full = declare(
        &ch,
        "full",
        &[
            ("x-max-length", HeaderValue::Int(1)),
            ("x-overflow", HeaderValue::String("reject-publish".into())),
        ],
    );
    let p = Properties::default();
    assert_eq!(
        ch.publish("", &full, false, p.clone(), "1").unwrap(),
        Published::Ack
    );
    assert_eq!(
        ch.publish("", &full, false, p.clone(), "2").unwrap(),
        Published::Nack
    );
    let dead = declare(&ch, "heads", &[]);
    let drop = declare(
        &ch,
        "drop",
        &[
            ("x-max-length", HeaderValue::Int(1)),
            ("x-dead-letter-exchange", HeaderValue::String(String::new())),
            (
                "x-dead-letter-routing-key",
                HeaderValue::String(dead.clone()),
            ),
        ],
    );
    ch.publish("", &drop, false, p.clone(), "old").unwrap();
    ch.publish("", &drop, false, p, "new").unwrap();
    let (kept, _) = ch.get(&drop, true).unwrap().unwrap();
    let (dropped, _) = ch.get(&dead, true).unwrap().unwrap();
    assert_eq!(
        (&kept.body[..], &dropped.body[..]),
        (&b"new"[..], &b"old"[..])
    );
    assert_eq!(death(&dropped).1, "maxlen");
}

#[tokio::test]
async fn in_memory_quorum_delivery_limit_counts_returns() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let dead = declare(&ch, "q.dead", &[]);
    let q = declare(
        &ch,
        "q",
        &[
            ("x-queue-type", HeaderValue::String("quorum".into())),
            ("x-delivery-limit", HeaderValue::Int(1)),
            ("x-dead-letter-exchange", HeaderValue::String(String::new())),
            (
                "x-dead-letter-routing-key",
                HeaderValue::String(dead.clone()),
            ),
        ],
    );
    ch.publish("", &q, false, Properties::default(), "poison")
        .unwrap();
    let mut rx = ch.consume(&q, "c", false, false).unwrap();
    let d = next(&mut rx).await;
    assert_eq!(d.properties.headers.get("x-delivery-count"), None);
    ch.settle(d.delivery_tag, false, Settle::Requeue).unwrap();
    let d = next(&mut rx).await;
    assert_eq!(
        d.properties.headers.get("x-delivery-count"),
        Some(&HeaderValue::Int(1))
    );
    ch.settle(d.delivery_tag, false, Settle::Requeue).unwrap();
    let (letter, _) = ch.get(&dead, true).unwrap().expect("past its limit");
    assert_eq!(death(&letter).1, "delivery_limit");
    // A quorum queue is durable.
    let err = ch
        .declare_queue(
            "q2",
            false,
            false,
            false,
            &args(&[("x-queue-type", HeaderValue::String("quorum".into()))]),
            false,
        )
        .unwrap_err();
    assert_eq!(err.code, 406);
}

#[tokio::test]
async fn in_memory_declarations_refuse_as_rabbitmq_does() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    let err = ch
        .declare_queue("missing", true, false, false, &Headers::new(), true)
        .unwrap_err();
    assert_eq!(
        (err.code, err.text.as_str()),
        (404, "NOT_FOUND - no queue 'missing' in vhost '/'")
    );
    let ch = conn.open_channel();
    declare(&ch, "q", &[]);
    let err = ch
        .declare_queue("q", false, false, false, &Headers::new(), false)
        .unwrap_err();
    assert_eq!(err.code, 406);
    assert!(
        err.text
            .contains("inequivalent arg 'durable' for queue 'q'"),
        "{}",
        err.text
    );
    let ch = conn.open_channel();
    ch.declare_exchange(
        "x",
        ExchangeKind::Direct,
        true,
        false,
        &Headers::new(),
        false,
    )
    .unwrap();
    let err = ch
        .declare_exchange(
            "x",
            ExchangeKind::Topic,
            true,
            false,
            &Headers::new(),
            false,
        )
        .unwrap_err();
    assert_eq!(
        err.text,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'topic' but current is 'direct'"
    );
    let ch = conn.open_channel();
    let err = ch
        .publish("nowhere", "k", false, Properties::default(), "x")
        .unwrap_err();
    assert_eq!(err.text, "NOT_FOUND - no exchange 'nowhere' in vhost '/'");
    let (name, _, _) = conn
        .open_channel()
        .declare_queue("", false, true, true, &Headers::new(), false)
        .unwrap();
    assert!(name.starts_with("amq.gen-"), "{name}");
}

#[tokio::test]
async fn in_memory_exclusive_queues_belong_to_their_connection() {
    let broker = MemoryBroker::new();
    let owner = broker.connect();
    let other = broker.connect();
    owner
        .open_channel()
        .declare_queue("mine", false, true, false, &Headers::new(), false)
        .unwrap();
    let err = other
        .open_channel()
        .declare_queue("mine", false, true, false, &Headers::new(), false)
        .unwrap_err();
    assert_eq!(err.code, 405);
    owner.close();
    assert_eq!(
        broker.queue_counts("mine"),
        None,
        "gone with its connection"
    );
}

#[tokio::test]
async fn in_memory_direct_reply_to_and_cancel_on_delete() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let client = conn.open_channel();
    let server = conn.open_channel();
    let q = declare(&server, "rpc", &[]);
    let mut replies = client.consume(state::REPLY_TO, "r", true, false).unwrap();
    let p = Properties {
        reply_to: Some(state::REPLY_TO.into()),
        ..Properties::default()
    };
    client.publish("", &q, false, p, "ping").unwrap();
    let mut requests = server.consume(&q, "s", false, false).unwrap();
    let request = next(&mut requests).await;
    let reply_to = request.properties.reply_to.clone().unwrap();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    server
        .publish("", &reply_to, false, Properties::default(), "pong")
        .unwrap();
    assert_eq!(&next(&mut replies).await.body[..], b"pong");
    server
        .settle(request.delivery_tag, false, Settle::Ack)
        .unwrap();
    // Deleting a queue cancels its consumers.
    server.delete_queue(&q).unwrap();
    assert!(matches!(requests.recv().await, Some(Event::Cancelled)));
}

#[tokio::test(start_paused = true)]
async fn in_memory_an_unused_queue_expires() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    declare(&ch, "brief", &[("x-expires", HeaderValue::Int(60_000))]);
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert!(broker.queue_counts("brief").is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    // The clock task runs once the sleeper yields.
    tokio::task::yield_now().await;
    assert_eq!(broker.queue_counts("brief"), None);
}

#[tokio::test]
async fn in_memory_consistent_hash_keeps_a_key_on_one_partition() {
    let broker = MemoryBroker::new();
    let conn = broker.connect();
    let ch = conn.open_channel();
    ch.declare_exchange(
        "parts",
        ExchangeKind::ConsistentHash,
        true,
        false,
        &Headers::new(),
        false,
    )
    .unwrap();
    for i in 0..3 {
        let q = declare(&ch, &format!("p{i}"), &[]);
        ch.bind_queue(&q, "parts", "1", &Headers::new()).unwrap();
    }
    for n in 0..30 {
        ch.publish(
            "parts",
            &format!("key-{}", n % 5),
            false,
            Properties::default(),
            "x",
        )
        .unwrap();
    }
    let total: u32 = (0..3)
        .map(|i| broker.queue_counts(&format!("p{i}")).unwrap().0)
        .sum();
    assert_eq!(total, 30);
    // Each key's six messages are on one queue.
    for i in 0..3 {
        assert_eq!(broker.queue_counts(&format!("p{i}")).unwrap().0 % 6, 0);
    }
}
