//! Tests that stop the broker (`rabbitmqctl stop_app`). They live in their
//! own test binary, which cargo runs after (never alongside) the others,
//! and each holds a guard that starts the broker again even when it fails.

use std::time::Duration;

use rabbitry::outbox::{self, Database, Outbox, RelayOptions};
use rabbitry::{
    Connection, ConnectionSettings, Consumer, ConsumerSettings, Message, Queue, Topology,
};
use rabbitry_test_support::broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_commits_while_the_broker_is_stopped_arrive_in_order_after() {
    let mut settings =
        ConnectionSettings::new("amqp://guest:guest@127.0.0.1:5672/%2f").name("outage-test");
    settings.backoff_initial = Duration::from_millis(200);
    settings.backoff_max = Duration::from_secs(1);
    settings.recovery_timeout = Duration::from_secs(5);
    let conn = Connection::open(settings).await.unwrap();
    let queue = format!(
        "test.outage.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let mut t = Topology::default();
    t.queue(Queue::durable(&queue));
    conn.declare(&t).await.unwrap();
    let dir = std::env::temp_dir().join(&queue);
    std::fs::create_dir_all(&dir).unwrap();
    let outbox = Outbox::connect(&format!("sqlite://{}/outbox.db", dir.display()))
        .await
        .unwrap();
    let relay = outbox
        .spawn_relay(&conn, RelayOptions::default())
        .await
        .unwrap();

    let guard = tokio::task::spawn_blocking(broker::stop).await.unwrap();
    for _ in 0..100 {
        if !conn.is_connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!conn.is_connected(), "the broker is down");

    let Database::Sqlite(pool) = outbox.database().clone() else {
        unreachable!()
    };
    for i in 0..100 {
        let mut tx = pool.begin().await.unwrap();
        outbox::publish(&mut *tx, Message::new(format!("{i}")).routing_key(&queue))
            .await
            .unwrap();
        outbox
            .commit(tx)
            .await
            .expect("the commit succeeds with the broker down");
    }
    assert_eq!(outbox.status().await.unwrap().pending, 100);

    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    assert!(broker::port_open(), "the broker is back");

    let mut consumer = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match Consumer::start(&conn, ConsumerSettings::new(&queue)).await {
                Ok(c) => return c,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    })
    .await
    .expect("consuming after recovery");
    let mut firsts: Vec<u32> = Vec::new();
    while firsts.len() < 100 {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of 100 arrived", firsts.len()))
            .unwrap();
        let n: u32 = String::from_utf8(d.body.to_vec()).unwrap().parse().unwrap();
        if !firsts.contains(&n) {
            firsts.push(n);
        }
        d.ack().await.unwrap();
    }
    assert_eq!(
        firsts,
        (0..100).collect::<Vec<_>>(),
        "all 100, in commit order"
    );
    relay.stop().await.unwrap();
    conn.delete_queue(&queue).await.unwrap();
    conn.close().await;
}
