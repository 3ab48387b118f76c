//! A harness for testing handlers, consumers, RPC and outbox code without
//! a broker (feature `testing`).
//!
//! A [`TestBroker`] is an in-memory broker of the test's own (see
//! [`crate::memory`] for what it emulates). The code under test connects
//! to it through the usual [`Connection`], with the `memory://` URL it
//! gives, and runs unchanged. The test then publishes, waits for the
//! outcome with a timeout (the worker's [`until`](crate::worker::WorkerMetrics::until),
//! a [`Captured`] queue's [`next`](Captured::next)), and asserts on what
//! was acked, retried, dead-lettered, replied and published. Under
//! tokio's paused clock (`#[tokio::test(start_paused = true)]`) the
//! delays of retry queues and TTLs pass as soon as nothing else can run.
//!
//! ```
//! use std::time::Duration;
//! use rabbitry::testing::TestBroker;
//! use rabbitry::worker::{Counted, HandlerError, Json, Msg, Worker};
//! use rabbitry::{ConsumerSettings, Message, Serializer};
//!
//! async fn greet(Msg(name): Msg<String>) -> Result<Json<String>, HandlerError> {
//!     Ok(Json(format!("hello, {name}")))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> rabbitry::Result<()> {
//! let broker = TestBroker::new();
//! let conn = broker.connect().await?;
//! let running = Worker::new(&conn, ())
//!     .consumer(ConsumerSettings::new("greetings"), greet)
//!     .start()
//!     .await?;
//!
//! let mut replies = broker.capture_queue()?; // a reply_to queue
//! let request = Message::encode(Serializer::Json, &"ada")?
//!     .routing_key("greetings")
//!     .reply_to(replies.queue());
//! broker.publish("", request)?;
//!
//! let reply = replies.next(Duration::from_secs(5)).await?;
//! assert_eq!(&reply.body[..], br#""hello, ada""#);
//! running
//!     .metrics()
//!     .until(Duration::from_secs(5), |m| m.outcomes("greetings", Counted::Ack) == 1)
//!     .await?;
//! running.shutdown().await;
//! # Ok(()) }
//! ```

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::connection::{Connection, ConnectionSettings};
use crate::error::{Error, ErrorKind, Result};
use crate::memory::{
    Event, MemoryBroker, MemoryChannel, MemoryConnection, MemoryDelivery, Published, Refusal,
};
use crate::message::{Headers, Message};

/// An in-memory broker of one test's own, and what the test does on it
/// from outside the code under test.
#[derive(Debug)]
pub struct TestBroker {
    broker: MemoryBroker,
    url: String,
    /// The test's own connection and channel, for publishing; opened
    /// again after a cut or a refusal closed them.
    own: Mutex<(MemoryConnection, MemoryChannel)>,
}

impl Default for TestBroker {
    fn default() -> Self {
        TestBroker::new()
    }
}

/// The error of the broker's refusal of `what`.
fn refused(what: &str) -> impl FnOnce(Refusal) -> Error + '_ {
    move |r| crate::channel::refused(ErrorKind::Channel, what, r.code, &r.text)
}

impl TestBroker {
    /// A new, empty broker with a name of its own.
    pub fn new() -> TestBroker {
        let name = format!("test-{}", uuid::Uuid::new_v4().simple());
        let broker = MemoryBroker::named(&name);
        let own = Mutex::new(open(&broker));
        TestBroker {
            url: format!("memory://{name}"),
            broker,
            own,
        }
    }

    /// The URL that reaches it: `memory://test-...`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connection settings for it, named `test`.
    pub fn settings(&self) -> ConnectionSettings {
        ConnectionSettings::new(&self.url).name("test")
    }

    /// Opens a [`Connection`] to it, as the code under test would.
    pub async fn connect(&self) -> Result<Connection> {
        Connection::open(self.settings()).await
    }

    /// The broker itself, for what the harness does not cover.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// Publishes `message` to `exchange` (`""`: the default exchange,
    /// which routes to the queue its routing key names) as another
    /// service would. The message must reach a queue: an unroutable one,
    /// or one a queue refuses, is an error.
    pub fn publish(&self, exchange: &str, message: Message) -> Result<()> {
        let key = message.routing_key.unwrap_or_default();
        let what = format!("publish to exchange '{exchange}'");
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if !own.1.is_open() {
            *own = open(&self.broker);
        }
        let outcome = own
            .1
            .publish(exchange, &key, true, message.properties, message.body)
            .map_err(refused(&what))?;
        match outcome {
            Published::Ack => Ok(()),
            Published::Returned => Err(Error::new(
                ErrorKind::Unroutable,
                format!("no queue takes routing key '{key}' on exchange '{exchange}'"),
            )),
            Published::Nack => Err(Error::new(
                ErrorKind::Nacked,
                format!("a queue refused the message (routing key '{key}')"),
            )),
        }
    }

    /// A queue of the test's own that receives what is published to
    /// `exchange` with a routing key that matches `binding_key`: what the
    /// code under test published. The exchange must exist.
    pub fn capture(&self, exchange: &str, binding_key: &str) -> Result<Captured> {
        let captured = self.capture_queue()?;
        captured
            .channel
            .bind_queue(&captured.queue, exchange, binding_key, &Headers::new())
            .map_err(refused(&format!(
                "binding of a captured queue to exchange '{exchange}'"
            )))?;
        Ok(captured)
    }

    /// A queue of the test's own, bound to nothing: give its name as a
    /// request's `reply_to` to receive the reply.
    pub fn capture_queue(&self) -> Result<Captured> {
        let conn = self.broker.connect();
        let channel = conn.open_channel();
        let (queue, _, _) = channel
            .declare_queue("", false, true, true, &Headers::new(), false)
            .map_err(refused("a captured queue"))?;
        let rx = channel
            .consume(&queue, "capture", true, true)
            .map_err(refused("a captured queue"))?;
        Ok(Captured {
            _conn: conn,
            channel,
            queue,
            rx,
        })
    }

    /// The number of ready messages in `queue`, if it exists.
    pub fn ready(&self, queue: &str) -> Option<u32> {
        self.broker.queue_counts(queue).map(|(ready, _)| ready)
    }

    /// Closes every connection to the broker, as a network cut would:
    /// the code under test recovers as it would from a real one. Returns
    /// how many were cut besides the test's own (which
    /// [`publish`](Self::publish) opens again).
    pub fn cut_connections(&self) -> usize {
        let own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        let was_open = usize::from(own.0.is_open());
        self.broker.cut_connections() - was_open
    }
}

/// The test's own connection and a channel on it.
fn open(broker: &MemoryBroker) -> (MemoryConnection, MemoryChannel) {
    let conn = broker.connect();
    let channel = conn.open_channel();
    (conn, channel)
}

/// Messages a queue of the test's own received, in order.
#[derive(Debug)]
pub struct Captured {
    _conn: MemoryConnection,
    channel: MemoryChannel,
    queue: String,
    rx: mpsc::UnboundedReceiver<Event>,
}

impl Captured {
    /// The queue's name (server-named, exclusive to the test).
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The next message, waiting at most `timeout` for it.
    pub async fn next(&mut self, timeout: Duration) -> Result<MemoryDelivery> {
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some(Event::Delivery(d))) => Ok(*d),
            Ok(_) => Err(Error::new(
                ErrorKind::Closed,
                format!("captured queue '{}' is gone", self.queue),
            )),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "nothing arrived on captured queue '{}' within {timeout:?}",
                    self.queue
                ),
            )),
        }
    }

    /// The next message if one has arrived, without waiting.
    pub fn try_next(&mut self) -> Option<MemoryDelivery> {
        match self.rx.try_recv() {
            Ok(Event::Delivery(d)) => Some(*d),
            _ => None,
        }
    }
}
