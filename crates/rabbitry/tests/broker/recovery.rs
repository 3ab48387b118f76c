//! Recovery from real connection failures: a TCP proxy cut, and the
//! broker closing the connection (`rabbitmqctl close_connection`). The
//! tests contain no recovery code: the gateway does it all.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, ErrorKind, Message, Producer,
    ProducerSettings,
};

use crate::support::{close_connection, connect, eventually, settings, unique, url, Proxy};

/// Reads `queue` until every id in `expected` was seen; returns how many
/// deliveries that took.
async fn drain_ids(conn: &Connection, queue: &str, expected: &HashSet<String>) -> usize {
    let mut consumer = Consumer::start(conn, ConsumerSettings::new(queue))
        .await
        .unwrap();
    let mut seen = HashSet::new();
    let mut total = 0;
    while seen.len() < expected.len() {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {} ids arrived", seen.len(), expected.len()))
            .unwrap();
        total += 1;
        seen.insert(d.properties.message_id.clone().unwrap());
        d.ack().await.unwrap();
    }
    assert_eq!(&seen, expected);
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_confirmed_publishes_survive_two_connection_kills() {
    const N: usize = 10_000;
    let proxy = Proxy::start().await;
    let name = unique("publisher");
    let conn = Connection::open(settings(&proxy.url(), &name))
        .await
        .unwrap();
    let direct = connect().await;
    let queue = unique("q");
    let mut topo = rabbitry::Topology::default();
    topo.queue(rabbitry::Queue::durable(&queue));
    direct.declare(&topo).await.unwrap();

    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    let confirmed = Arc::new(AtomicUsize::new(0));
    // Messages from 6,000 on wait for the first kill's recovery, and from
    // 8,000 on for the second kill to have happened, so both kills land
    // while publishing is under way (rabbitmqctl takes a second to run).
    let (phase, _) = tokio::sync::watch::channel(0u8);
    let mut tasks = Vec::with_capacity(N);
    for i in 0..N {
        let producer = producer.clone();
        let confirmed = confirmed.clone();
        let mut phase = phase.subscribe();
        let needed = if i >= 8_000 {
            2
        } else if i >= 6_000 {
            1
        } else {
            0
        };
        tasks.push(tokio::spawn(async move {
            let _ = phase.wait_for(|p| *p >= needed).await;
            let msg = Message::new(vec![b'x'; 256]).message_id(format!("m-{i}"));
            let res = producer.publish(msg).await;
            confirmed.fetch_add(1, Ordering::Relaxed);
            res
        }));
    }

    eventually(Duration::from_secs(60), "3,000 confirms", || async {
        confirmed.load(Ordering::Relaxed) >= 3_000
    })
    .await;
    assert!(proxy.cut() >= 1, "the proxy cut the publisher's connection");
    eventually(
        Duration::from_secs(30),
        "recovery after the cut",
        || async { conn.generation() >= 2 && conn.is_connected() },
    )
    .await;
    phase.send_replace(1);
    eventually(Duration::from_secs(60), "6,000 confirms", || async {
        confirmed.load(Ordering::Relaxed) >= 6_000
    })
    .await;
    let closed = tokio::task::spawn_blocking({
        let name = name.clone();
        move || close_connection(&name)
    })
    .await
    .unwrap();
    assert_eq!(closed, 1, "rabbitmqctl closed the publisher's connection");
    eventually(
        Duration::from_secs(10),
        "the second loss to be noticed",
        || async { conn.generation() >= 3 || !conn.is_connected() },
    )
    .await;
    phase.send_replace(2);

    for t in tasks {
        t.await.unwrap().expect("every publish is confirmed");
    }
    assert!(conn.generation() >= 3, "two recoveries happened");

    let expected: HashSet<String> = (0..N).map(|i| format!("m-{i}")).collect();
    let total = drain_ids(&direct, &queue, &expected).await;
    eprintln!(
        "10,000 ids all present; {total} deliveries ({} resent duplicates)",
        total - N
    );
    direct.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_resumes_after_its_connection_is_cut_mid_stream() {
    const N: usize = 2_000;
    let proxy = Proxy::start().await;
    let conn = Connection::open(settings(&proxy.url(), &unique("consumer")))
        .await
        .unwrap();
    let direct = connect().await;
    let queue = unique("q");
    let mut cs = ConsumerSettings::new(&queue);
    cs.prefetch_count = Some(50);
    let mut consumer = Consumer::start(&conn, cs).await.unwrap();
    let producer = Producer::new(&direct, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    for i in 0..N {
        producer
            .publish(Message::new("x").message_id(format!("m-{i}")))
            .await
            .unwrap();
    }
    let mut seen = HashSet::new();
    let mut cut = false;
    while seen.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("stalled at {} of {N}", seen.len()))
            .expect("the consumer keeps running");
        seen.insert(d.properties.message_id.clone().unwrap());
        if seen.len() == N / 4 && !cut {
            assert!(proxy.cut() >= 1);
            cut = true;
            // This ack goes to a dead channel: the message comes again.
            let _ = d.ack().await;
            continue;
        }
        let _ = d.ack().await;
    }
    assert!(
        conn.generation() >= 2,
        "the consumer's connection was recovered"
    );
    direct.delete_queue(&queue).await.unwrap();
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_auto_delete_queue_comes_back_after_recovery() {
    let proxy = Proxy::start().await;
    let conn = Connection::open(settings(&proxy.url(), &unique("exclusive")))
        .await
        .unwrap();
    let direct = connect().await;
    let queue = unique("excl");
    let mut cs = ConsumerSettings::new(&queue);
    cs.exclusive = true;
    cs.durable = false;
    cs.auto_delete = Some(true);
    let mut consumer = Consumer::start(&conn, cs).await.unwrap();
    let mut ps = ProducerSettings::default().routing_key(&queue);
    ps.mandatory = true;
    let producer = Producer::new(&direct, ps).await.unwrap();
    producer.publish(Message::new("before")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&d.body[..], b"before");
    d.ack().await.unwrap();

    assert!(proxy.cut() >= 1);
    eventually(Duration::from_secs(30), "recovery", || async {
        conn.generation() >= 2
    })
    .await;
    // The broker deleted the exclusive queue with the old connection: a
    // mandatory publish is unroutable until the gateway declares it again.
    eventually(
        Duration::from_secs(30),
        "the exclusive queue to exist again",
        || async {
            match producer.publish(Message::new("after")).await {
                Ok(()) => true,
                Err(e) if e.kind() == ErrorKind::Unroutable => false,
                Err(e) => panic!("unexpected error: {e}"),
            }
        },
    )
    .await;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        &d.body[..],
        b"after",
        "consuming resumed on the recreated queue"
    );
    d.ack().await.unwrap();
    conn.close().await;
}

#[tokio::test]
async fn publish_while_disconnected_waits_a_bounded_time_then_fails() {
    let proxy = Proxy::start().await;
    let mut s = settings(&proxy.url(), &unique("bounded"));
    s.recovery_timeout = Duration::from_secs(1);
    let conn = Connection::open(s).await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(unique("q")))
        .await
        .unwrap();
    drop(proxy); // stops accepting and cuts: the broker is unreachable now
    eventually(
        Duration::from_secs(10),
        "the loss to be noticed",
        || async { !conn.is_connected() },
    )
    .await;
    let started = std::time::Instant::now();
    let err = producer.publish(Message::new("x")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Disconnected, "{err}");
    assert!(err.to_string().contains("did not recover"), "{err}");
    eprintln!("failed after {:?}", started.elapsed());
    conn.close().await;
}

#[tokio::test]
async fn the_url_query_string_sets_the_heartbeat_the_broker_sees() {
    let name = unique("heartbeat");
    let url = format!("{}?heartbeat=7", rabbitry_test_support::broker::url());
    let conn = Connection::open(ConnectionSettings::new(&url).name(&name))
        .await
        .unwrap();
    let seen = rabbitry_test_support::broker::connection_heartbeat(&name);
    let shown = rabbitry_test_support::broker::connection_name(&name);
    conn.close().await;
    assert_eq!(seen, Some(7), "the broker's view of {name}");
    // The broker shows the process beside the connection's name.
    let exe = std::env::current_exe().unwrap();
    let process = exe.file_name().unwrap().to_string_lossy();
    assert_eq!(
        shown,
        Some(format!("{name} ({process}, pid {})", std::process::id()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refused_queue_at_recovery_does_not_keep_the_other_consumers_down() {
    let name = unique("entities");
    let conn = Connection::open(settings(&url(), &name)).await.unwrap();
    let other = connect().await;
    let (refused, consumed) = (unique("refused"), unique("consumed"));
    let mut remembered = rabbitry::Topology::default();
    remembered.queue(rabbitry::Queue::durable(&refused));
    conn.declare(&remembered).await.unwrap();
    let mut consumer = Consumer::start(&conn, ConsumerSettings::new(&consumed))
        .await
        .unwrap();
    // Someone else redeclares the remembered queue with other arguments:
    // from now on the broker refuses the connection's declaration of it.
    other.delete_queue(&refused).await.unwrap();
    let mut conflicting = rabbitry::Topology::default();
    let mut q = rabbitry::Queue::durable(&refused);
    q.arguments
        .insert("x-message-ttl".into(), rabbitry::HeaderValue::Int(60_000));
    conflicting.queue(q);
    other.declare_once(&conflicting).await.unwrap();

    assert!(close_connection(&name) >= 1, "cut {name}");
    eventually(
        Duration::from_secs(15),
        "the connection recovered",
        || async { conn.generation() >= 2 },
    )
    .await;
    let producer = Producer::new(&other, ProducerSettings::default().routing_key(&consumed))
        .await
        .unwrap();
    producer.publish(Message::new("after")).await.unwrap();
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the other consumer resumed despite the refused queue")
        .unwrap();
    assert_eq!(&d.body[..], b"after");
    assert_eq!(
        conn.cancelled_consumers(),
        0,
        "a lost connection is not a broker's cancel"
    );
    d.ack().await.unwrap();
    assert!(conn.refused_declarations() >= 1);

    // Once the conflict is gone, the refused queue is declared by itself.
    other.delete_queue(&refused).await.unwrap();
    eventually(
        Duration::from_secs(15),
        "the refused queue declared again",
        || async { other.queue_status(&refused).await.unwrap().is_some() },
    )
    .await;
    consumer.cancel().await;
    other.delete_queue(&refused).await.unwrap();
    other.delete_queue(&consumed).await.unwrap();
    conn.close().await;
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_are_tried_in_a_random_order_unless_told_to_keep_it() {
    // Two ways to the same broker: directly, and through a proxy that
    // counts the connections it carries.
    let proxy = Proxy::start().await;
    let open_all = |keep_url_order: bool| {
        let proxy_url = proxy.url();
        async move {
            let mut conns = Vec::new();
            for _ in 0..20 {
                let mut s = settings(&proxy_url, &unique("order"));
                s.urls = vec![proxy_url.clone(), url()];
                s.keep_url_order = keep_url_order;
                s.separate_publishing = false;
                conns.push(Connection::open(s).await.unwrap());
            }
            conns
        }
    };
    let kept = open_all(true).await;
    assert_eq!(
        proxy.cut(),
        20,
        "in the given order, the first URL each time"
    );
    for c in kept {
        c.close().await;
    }
    let shuffled = open_all(false).await;
    let through_proxy = proxy.cut();
    assert!(
        (1..20).contains(&through_proxy),
        "shuffled, both URLs are used: {through_proxy} of 20 went to the first"
    );
    for c in shuffled {
        c.close().await;
    }
}
