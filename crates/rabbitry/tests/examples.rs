//! The examples in `examples/`, run against the real broker (and SQLite),
//! each with names of its own: what a user runs with `cargo run --example`
//! is what these tests check. Each runs again on an in-memory broker of
//! its own (`memory://NAME`, the `in_memory_*` tests), unchanged: those
//! need no broker and no network.

#![allow(dead_code)] // each example's `main`

#[path = "../examples/consume.rs"]
mod consume;
#[path = "../examples/outbox_axum.rs"]
mod outbox_axum;
#[path = "../examples/publish.rs"]
mod publish;
#[path = "../examples/rpc.rs"]
mod rpc;
#[path = "../examples/worker.rs"]
mod worker;

fn prefix(name: &str) -> String {
    format!(
        "test.example.{name}.{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

const REAL: &str = rabbitry::defaults::URL;

/// An in-memory broker of the test's own.
fn memory(name: &str) -> String {
    format!("memory://{}", prefix(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_example_confirms_three_and_refuses_the_unroutable() {
    assert_eq!(publish::run(REAL, &prefix("publish")).await.unwrap(), 3);
}

#[tokio::test]
async fn in_memory_publish_example_confirms_three_and_refuses_the_unroutable() {
    let url = memory("publish");
    assert_eq!(publish::run(&url, &prefix("publish")).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_example_acks_two_and_dead_letters_one() {
    assert_eq!(
        consume::run(REAL, &prefix("consume")).await.unwrap(),
        (2, 1)
    );
}

#[tokio::test]
async fn in_memory_consume_example_acks_two_and_dead_letters_one() {
    let url = memory("consume");
    assert_eq!(
        consume::run(&url, &prefix("consume")).await.unwrap(),
        (2, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_example_handles_orders_natively_and_invoices_through_a_router() {
    assert_eq!(worker::run(REAL, &prefix("worker")).await.unwrap(), 4);
}

#[tokio::test]
async fn in_memory_worker_example_handles_orders_natively_and_invoices_through_a_router() {
    let url = memory("worker");
    assert_eq!(worker::run(&url, &prefix("worker")).await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_example_gets_its_answer() {
    assert_eq!(rpc::run(REAL, &prefix("rpc")).await.unwrap(), 42);
}

#[tokio::test]
async fn in_memory_rpc_example_gets_its_answer() {
    let url = memory("rpc");
    assert_eq!(rpc::run(&url, &prefix("rpc")).await.unwrap(), 42);
}

async fn outbox_example(url: &str) {
    let dir = std::env::temp_dir().join(prefix("outbox"));
    std::fs::create_dir_all(&dir).unwrap();
    let body = outbox_axum::run(url, &prefix("outbox"), &dir)
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(body, r#"{"item":"book"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_example_publishes_what_the_web_handler_committed() {
    outbox_example(REAL).await;
}

#[tokio::test]
async fn in_memory_outbox_example_publishes_what_the_web_handler_committed() {
    outbox_example(&memory("outbox")).await;
}
