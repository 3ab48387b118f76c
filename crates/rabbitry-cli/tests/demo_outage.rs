//! The demo through a broker outage. This stops RabbitMQ
//! (`rabbitmqctl stop_app`), so it is its own test binary, which cargo runs
//! alone, and a guard starts the broker again even if the test fails.

mod common;

use std::time::Duration;

use common::{create, wait_rendered, Demo};
use rabbitry_test_support::broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_created_while_the_broker_is_down_are_rendered_after() {
    let demo = Demo::start();
    let base = demo.base.clone();
    let guard = tokio::task::spawn_blocking(broker::stop).await.unwrap();
    assert!(!broker::port_open(), "the broker is down");

    // The web processes still accept documents: they only write the database.
    let mut ids = std::collections::BTreeMap::new();
    for site in ["a", "b"] {
        for i in 0..5 {
            ids.entry(site)
                .or_insert_with(Vec::new)
                .push(create(&base, site, &format!("Written offline {i}")).await);
        }
    }

    tokio::task::spawn_blocking(move || drop(guard))
        .await
        .unwrap();
    assert!(broker::port_open(), "the broker is back");
    for (site, ids) in &ids {
        let docs = wait_rendered(&base, site, ids, Duration::from_secs(120)).await;
        assert!(docs.iter().all(|d| d["renders"] == 1), "{docs:?}");
    }
    let instance = demo.instance.clone();
    assert!(demo.stop().success());
    common::cleanup(&instance).await;
}
