//! The unit of work: publishes (and an ack) that happen at commit, or not
//! at all.
//!
//! This is Zope's transaction applied to messaging, as in collective.zamqp:
//! code registers messages while it works; [`UnitOfWork::commit`] sends them
//! in order, each confirmed, and only then acknowledges the delivery the
//! work came from. After [`UnitOfWork::abort`], or when the unit is dropped
//! without a commit, nothing is sent. The worker runs every handler inside
//! one; [`PublishOnSuccessLayer`](crate::web::PublishOnSuccessLayer) runs
//! every web request inside one.
//!
//! For messages that must survive a crash after the database commit, use
//! the outbox instead: it writes them in the same database transaction.

use std::sync::{Arc, Mutex};

use crate::connection::lock;
use crate::consume::{Delivery, Outcome};
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::publish::Producer;

#[derive(Default)]
struct Pending {
    messages: Vec<(Producer, Message)>,
    done: bool,
}

/// Messages to publish at commit. Cheap to clone; clones share the unit.
#[derive(Clone, Default)]
pub struct UnitOfWork {
    pending: Arc<Mutex<Pending>>,
}

impl std::fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = lock(&self.pending);
        f.debug_struct("UnitOfWork")
            .field("messages", &p.messages.len())
            .field("done", &p.done)
            .finish()
    }
}

impl UnitOfWork {
    /// An empty unit of work.
    pub fn new() -> Self {
        UnitOfWork::default()
    }

    /// Registers `message` to be published through `producer` at commit.
    /// Fails once the unit has been committed or aborted.
    pub fn publish(&self, producer: &Producer, mut message: Message) -> Result<()> {
        // Published later, at commit, as a child of the code that asked.
        crate::telemetry::capture(&mut message.properties);
        let mut p = lock(&self.pending);
        if p.done {
            return Err(Error::new(
                ErrorKind::Closed,
                "unit of work already committed or aborted",
            ));
        }
        p.messages.push((producer.clone(), message));
        Ok(())
    }

    /// How many messages are registered.
    pub fn len(&self) -> usize {
        lock(&self.pending).messages.len()
    }

    /// Whether no message is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publishes every registered message in order, each confirmed, then
    /// acks `delivery` if one is given. Stops at the first failure, which
    /// is returned (the delivery is then not acked).
    pub async fn commit(&self, delivery: Option<&Delivery>) -> Result<usize> {
        let messages = {
            let mut p = lock(&self.pending);
            p.done = true;
            std::mem::take(&mut p.messages)
        };
        let n = messages.len();
        for (producer, message) in messages {
            producer.publish(message).await?;
        }
        if let Some(d) = delivery {
            d.settle(Outcome::Ack).await?;
        }
        Ok(n)
    }

    /// Discards every registered message.
    pub fn abort(&self) {
        let mut p = lock(&self.pending);
        p.done = true;
        p.messages.clear();
    }
}
