//! Tests against the real RabbitMQ on 127.0.0.1:5672 (or `AMQP_URL`).
//! One binary, grouped by topic, with shared helpers in `support`.

mod admin;
mod blast;
mod consume;
mod errors;
mod hardening;
mod publish;
mod recovery;
mod rpc;
mod schedule;
mod support;
mod transactions;
mod worker;
