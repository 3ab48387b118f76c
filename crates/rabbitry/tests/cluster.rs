//! Failover on the local three-node cluster of `scripts/cluster`: nodes
//! are SIGKILLed under a running producer. A test binary of its own; its
//! tests share the cluster and run one at a time. The main broker on 5672
//! is never touched.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, Message, Producer,
    ProducerSettings, Queue, Topology,
};
use rabbitry_test_support::{cluster, eventually, unique};

/// The tests share one cluster: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A connection over the three nodes, with a quick backoff and a long
/// recovery timeout (a quorum may be gone for a few seconds).
fn settings(name: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new(cluster::urls()[0].clone()).name(name);
    s.urls = cluster::urls();
    s.backoff_initial = Duration::from_millis(100);
    s.backoff_max = Duration::from_secs(1);
    s.recovery_timeout = Duration::from_secs(60);
    s
}

/// Waits until `count` reaches `at`, for at most 60 s.
async fn reaches(count: &AtomicUsize, at: usize, what: &str) {
    eventually(Duration::from_secs(60), what, || async {
        count.load(Ordering::SeqCst) >= at
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publishing_survives_killing_the_connected_node_and_the_leader() {
    const N: usize = 20_000;
    let _serial = SERIAL.lock().await;
    let _cluster = cluster::start();
    let name = unique("cluster.producer");
    let conn = Connection::open(settings(&name)).await.unwrap();
    let queue = unique("qq");
    let mut topology = Topology::default();
    topology.queue(Queue::quorum(&queue));
    conn.declare(&topology).await.unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();

    // Persistent messages with confirms, 500 in flight, ids in order, as
    // far as the test allows: each kill comes right after the test lets
    // the producer go on, so messages are in flight when the node dies.
    let confirmed = Arc::new(AtomicUsize::new(0));
    let (allow, allowed) = tokio::sync::watch::channel(0usize);
    let publishing = tokio::spawn({
        let (producer, confirmed, mut allowed) = (producer.clone(), confirmed.clone(), allowed);
        async move {
            let mut in_flight: VecDeque<rabbitry::publish::Confirmation> = VecDeque::new();
            for i in 0..N {
                if i >= *allowed.borrow() {
                    while let Some(c) = in_flight.pop_front() {
                        c.wait().await?;
                        confirmed.fetch_add(1, Ordering::SeqCst);
                    }
                    allowed
                        .wait_for(|n| i < *n)
                        .await
                        .expect("the test lets it go on");
                }
                let m = Message::new("x").message_id(format!("m-{i:05}"));
                in_flight.push_back(producer.submit(m).await?);
                if in_flight.len() >= 500 {
                    in_flight.pop_front().unwrap().wait().await?;
                    confirmed.fetch_add(1, Ordering::SeqCst);
                }
            }
            while let Some(c) = in_flight.pop_front() {
                c.wait().await?;
                confirmed.fetch_add(1, Ordering::SeqCst);
            }
            Ok::<(), rabbitry::Error>(())
        }
    });

    // The node the producer publishes on dies while it publishes.
    allow.send_replace(3_000);
    reaches(&confirmed, 3_000, "3,000 confirmed").await;
    let connected = cluster::node_of(&format!("{name}.publish")).expect("the publishing node");
    allow.send_replace(10_000);
    cluster::kill(connected);
    let killed_at = Instant::now();
    let before = confirmed.load(Ordering::SeqCst);
    reaches(&confirmed, before + 1, "a confirm after the kill").await;
    println!(
        "killed node {connected} (the producer's) at {before} confirmed; next confirm after {:?}",
        killed_at.elapsed()
    );
    let revive_connected = tokio::task::spawn_blocking(move || cluster::revive(connected));

    // Then the queue's leader.
    reaches(&confirmed, 10_000, "10,000 confirmed").await;
    let leader = cluster::leader(&queue).expect("the queue's leader");
    allow.send_replace(N);
    cluster::kill(leader);
    let killed_at = Instant::now();
    let before = confirmed.load(Ordering::SeqCst);
    reaches(&confirmed, before + 1, "a confirm after killing the leader").await;
    println!(
        "killed node {leader} (the leader) at {before} confirmed; next confirm after {:?}",
        killed_at.elapsed()
    );
    publishing
        .await
        .unwrap()
        .expect("every publish confirmed, none failed");
    revive_connected.await.unwrap();
    cluster::revive(leader);
    println!("re-published: {}", producer.republished());

    // Every confirmed message is on the queue: count by consuming.
    let mut cs = ConsumerSettings::new(&queue);
    cs.auto_declare = false;
    let mut consumer = Consumer::start(&conn, cs).await.unwrap();
    let (mut seen, mut received) = (HashSet::new(), 0usize);
    while seen.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {N} on the queue", seen.len()))
            .expect("the consumer runs");
        seen.insert(d.properties.message_id.clone().unwrap());
        received += 1;
        d.ack().await.unwrap();
    }
    let missing: Vec<String> = (0..N)
        .map(|i| format!("m-{i:05}"))
        .filter(|id| !seen.contains(id))
        .collect();
    assert!(missing.is_empty(), "missing: {missing:?}");
    println!(
        "{N} confirmed, all on the queue; {} duplicates",
        received - N
    );
    consumer.cancel().await;
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}
