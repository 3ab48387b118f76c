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

mod tls;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_stops_only_the_queues_it_holds() {
    use rabbitry::worker::{HandlerError, Meta, State, Worker};
    use rabbitry::QueueType;
    let _serial = SERIAL.lock().await;
    let _cluster = cluster::start();
    let urls = cluster::urls();
    // A classic queue homed on node 2, and a quorum queue led by node 2:
    // both declared over a connection to it.
    let on_two = Connection::open(ConnectionSettings::new(&urls[1]).name(unique("cluster.two")))
        .await
        .unwrap();
    let (quorum, classic) = (unique("qq"), unique("classic"));
    let mut t = Topology::default();
    t.queue(Queue::durable(&classic));
    t.queue(Queue::quorum(&quorum));
    on_two.declare_once(&t).await.unwrap();
    on_two.close().await;

    // A worker on node 1 consumes both.
    let mut on_one = settings(&unique("cluster.worker"));
    on_one.keep_url_order = true;
    let conn = Connection::open(on_one).await.unwrap();
    let handled: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let handler = |State(handled): State<Arc<std::sync::Mutex<Vec<String>>>>, meta: Meta| async move {
        handled.lock().unwrap().push(meta.queue.clone());
        Ok::<_, HandlerError>(())
    };
    let running = Worker::new(&conn, handled.clone())
        .consumer(
            ConsumerSettings::new(&quorum).queue_type(QueueType::Quorum),
            handler,
        )
        .consumer(ConsumerSettings::new(&classic), handler)
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&conn, ProducerSettings::default())
        .await
        .unwrap();
    let count = |queue: &str| {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|q| q.as_str() == queue)
            .count()
    };

    assert_eq!(
        cluster::leader(&quorum),
        Some(2),
        "the quorum queue's leader"
    );
    cluster::kill(2);
    let killed_at = Instant::now();
    producer
        .publish(Message::new("q").routing_key(&quorum))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(20),
        "the quorum queue consumed with node 2 down",
        || async { count(&quorum) == 1 },
    )
    .await;
    println!(
        "quorum queue consumed {:?} after node 2 died",
        killed_at.elapsed()
    );

    cluster::revive(2);
    let revived_at = Instant::now();
    // Routed to the classic queue once it is back; until then its
    // publishes are refused, and published again.
    producer
        .publish(Message::new("c").routing_key(&classic).mandatory(true))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the classic queue's consumer back with node 2",
        || async { count(&classic) == 1 },
    )
    .await;
    println!(
        "classic queue consumed {:?} after node 2 came back; the broker cancelled {} consumers",
        revived_at.elapsed(),
        conn.cancelled_consumers()
    );
    assert!(
        conn.cancelled_consumers() >= 1,
        "the broker cancelled the classic queue's consumer when its node died"
    );
    running.shutdown().await;
    for q in [&quorum, &classic] {
        for name in [
            q.to_string(),
            format!("{q}.dead"),
            format!("{q}.retry.1s"),
            format!("{q}.retry.5s"),
        ] {
            let _ = conn.delete_queue(&name).await;
        }
    }
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_an_inbox_has_each_effect_once_across_node_deaths() {
    use rabbitry::outbox::{self, Database, Outbox};
    use rabbitry::worker::{HandlerError, Meta, State, Worker};
    use rabbitry::QueueType;
    const PER_STEP: usize = 1_000;
    let _serial = SERIAL.lock().await;
    let _cluster = cluster::start();
    let queue = unique("qq.work");
    let name = unique("cluster.worker");
    let conn = Connection::open(settings(&name)).await.unwrap();
    let observer = Connection::open(settings(&unique("cluster.observer")))
        .await
        .unwrap();
    let db = Outbox::connect(&rabbitry_test_support::db::sqlite_url())
        .await
        .unwrap();
    let Database::Sqlite(pool) = db.database().clone() else {
        unreachable!()
    };
    sqlx::raw_sql("CREATE TABLE effects (message_id TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    // The handler's effect and its inbox row commit together; a
    // redelivered duplicate finds its inbox row and does nothing.
    let handler = |State(pool): State<sqlx::SqlitePool>, meta: Meta| async move {
        let id = meta.properties.message_id.clone().unwrap_or_default();
        let mut tx = pool.begin().await?;
        if outbox::inbox_claim(&mut *tx, "work", &id).await? {
            sqlx::query("INSERT INTO effects (message_id) VALUES (?1)")
                .bind(&id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok::<_, HandlerError>(())
    };
    let running = Worker::new(&conn, pool.clone())
        .consumer(
            ConsumerSettings::new(&queue).queue_type(QueueType::Quorum),
            handler,
        )
        .start()
        .await
        .unwrap();
    let producer = Producer::new(&observer, ProducerSettings::default().routing_key(&queue))
        .await
        .unwrap();
    let effects = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects")
            .fetch_one(&pool)
            .await
            .unwrap() as usize
    };
    let mut published = 0;
    for round in 1..=3 {
        for target in ["connected", "leader"] {
            for _ in 0..PER_STEP {
                producer
                    .publish(Message::new("x").message_id(format!("m-{published:05}")))
                    .await
                    .unwrap();
                published += 1;
            }
            // Kill while the worker works through the new messages.
            let node = match target {
                "connected" => cluster::node_of(&name).expect("the worker's node"),
                _ => cluster::leader(&queue).expect("the queue's leader"),
            };
            cluster::kill(node);
            let killed_at = Instant::now();
            // A message published after the kill is handled: the worker
            // consumes again.
            producer
                .publish(Message::new("x").message_id(format!("m-{published:05}")))
                .await
                .unwrap();
            published += 1;
            eventually(Duration::from_secs(60), "consumption resumed", || async {
                effects().await >= published
            })
            .await;
            let resumed = killed_at.elapsed();
            // The broker's count can read 0 for a moment after a kill, and
            // a quorum queue counts a dead node's consumer until it is back.
            let counted = || async {
                observer
                    .queue_status(&queue)
                    .await
                    .ok()
                    .flatten()
                    .map_or(0, |s| s.consumers)
            };
            eventually(
                Duration::from_secs(20),
                "the broker to count the worker's consumer",
                || async { counted().await >= 1 },
            )
            .await;
            let consumers = counted().await;
            println!(
                "round {round}: killed node {node} ({target}); consuming again after {resumed:?}; \
                 the broker counts {consumers} consumer(s)"
            );
            cluster::revive(node);
        }
    }
    eventually(Duration::from_secs(60), "every message handled", || async {
        effects().await >= published
    })
    .await;
    let distinct: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT message_id) FROM effects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(distinct as usize, published, "every message had its effect");
    assert_eq!(effects().await, published, "each effect exactly once");
    running.shutdown().await;
    for q in [
        queue.clone(),
        format!("{queue}.dead"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.5s"),
    ] {
        let _ = observer.delete_queue(&q).await;
    }
    conn.close().await;
    observer.close().await;
}
