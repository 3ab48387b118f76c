//! The metrics of connections and publishers, through the [`metrics`]
//! facade: their names, labels and handles. Handles are made once per
//! connection or publisher; recording is an atomic operation. Whatever
//! recorder the application installed exports them (see `rabbitry::admin`
//! for a Prometheus one); without a recorder they cost next to nothing.
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `rabbitry_connection_up` | gauge (1 or 0) | `connection` |
//! | `rabbitry_reconnects_total` | counter | `connection` |
//! | `rabbitry_consumers_cancelled_total` | counter (by the broker) | `connection` |
//! | `rabbitry_declarations_refused_total` | counter (at recovery) | `connection` |
//! | `rabbitry_publishes_total` | counter | `connection` |
//! | `rabbitry_confirms_total` | counter | `connection` |
//! | `rabbitry_nacks_total` | counter | `connection` |
//! | `rabbitry_returns_total` | counter | `connection` |
//! | `rabbitry_republished_total` | counter | `connection` |
//! | `rabbitry_confirm_duration_seconds` | histogram (first send to ack) | `connection` |
//! | `rabbitry_rpc_calls_total` | counter | `connection`, `outcome` (`reply`, `timeout`, `error`) |
//! | `rabbitry_rpc_duration_seconds` | histogram (request to reply) | `connection` |
//! | `rabbitry_rpc_in_flight` | gauge | `connection` |
//! | `rabbitry_outbox_commit_to_publish_seconds` | histogram (row written to publish confirmed) | `database` |
//!
//! A worker adds `rabbitry_deliveries_total{consumer, outcome}`,
//! `rabbitry_handler_duration_seconds{consumer}`,
//! `rabbitry_handlers_in_flight{consumer}` and
//! `rabbitry_replies_unroutable_total{consumer}`.

use metrics::{Counter, Gauge, Histogram};

/// One connection's meters.
pub(crate) struct ConnectionMeters {
    pub(crate) up: Gauge,
    pub(crate) reconnects: Counter,
    pub(crate) consumers_cancelled: Counter,
    pub(crate) declarations_refused: Counter,
}

impl ConnectionMeters {
    pub(crate) fn new(connection: &str) -> ConnectionMeters {
        let c = connection.to_owned();
        ConnectionMeters {
            up: metrics::gauge!("rabbitry_connection_up", "connection" => c.clone()),
            reconnects: metrics::counter!("rabbitry_reconnects_total", "connection" => c.clone()),
            consumers_cancelled: metrics::counter!(
                "rabbitry_consumers_cancelled_total",
                "connection" => c.clone()
            ),
            declarations_refused: metrics::counter!(
                "rabbitry_declarations_refused_total",
                "connection" => c
            ),
        }
    }
}

/// One publisher's meters.
pub(crate) struct PublishMeters {
    pub(crate) publishes: Counter,
    pub(crate) confirms: Counter,
    pub(crate) nacks: Counter,
    pub(crate) returns: Counter,
    pub(crate) republished: Counter,
    pub(crate) confirm_duration: Histogram,
}

impl PublishMeters {
    pub(crate) fn new(connection: &str) -> PublishMeters {
        let c = connection.to_owned();
        PublishMeters {
            publishes: metrics::counter!("rabbitry_publishes_total", "connection" => c.clone()),
            confirms: metrics::counter!("rabbitry_confirms_total", "connection" => c.clone()),
            nacks: metrics::counter!("rabbitry_nacks_total", "connection" => c.clone()),
            returns: metrics::counter!("rabbitry_returns_total", "connection" => c.clone()),
            republished: metrics::counter!("rabbitry_republished_total", "connection" => c.clone()),
            confirm_duration: metrics::histogram!(
                "rabbitry_confirm_duration_seconds",
                "connection" => c
            ),
        }
    }
}

/// One RPC client's meters.
pub(crate) struct RpcMeters {
    pub(crate) replies: Counter,
    pub(crate) timeouts: Counter,
    pub(crate) errors: Counter,
    pub(crate) duration: Histogram,
    pub(crate) in_flight: Gauge,
}

impl RpcMeters {
    pub(crate) fn new(connection: &str) -> RpcMeters {
        let c = connection.to_owned();
        let calls = |outcome: &'static str| metrics::counter!("rabbitry_rpc_calls_total", "connection" => c.clone(), "outcome" => outcome);
        RpcMeters {
            replies: calls("reply"),
            timeouts: calls("timeout"),
            errors: calls("error"),
            duration: metrics::histogram!("rabbitry_rpc_duration_seconds", "connection" => c.clone()),
            in_flight: metrics::gauge!("rabbitry_rpc_in_flight", "connection" => c),
        }
    }
}
