//! The examples in `examples/`, run against the real broker (and SQLite),
//! each with names of its own: what a user runs with `cargo run --example`
//! is what these tests check.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_example_confirms_three_and_refuses_the_unroutable() {
    assert_eq!(publish::run(&prefix("publish")).await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_example_acks_two_and_dead_letters_one() {
    assert_eq!(consume::run(&prefix("consume")).await.unwrap(), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_example_handles_orders_natively_and_invoices_through_a_router() {
    assert_eq!(worker::run(&prefix("worker")).await.unwrap(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_example_gets_its_answer() {
    assert_eq!(rpc::run(&prefix("rpc")).await.unwrap(), 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_example_publishes_what_the_web_handler_committed() {
    let dir = std::env::temp_dir().join(prefix("outbox"));
    std::fs::create_dir_all(&dir).unwrap();
    let body = outbox_axum::run(&prefix("outbox"), &dir).await.unwrap();
    assert_eq!(body, r#"{"item":"book"}"#);
}
