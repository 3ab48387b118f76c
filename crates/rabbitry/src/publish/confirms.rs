//! The publishing channel: publisher confirms, returns, resend on recovery.
//!
//! A [`Publisher`] owns one channel in confirm mode. Every message sent
//! waits in a pending table, keyed by delivery tag, until the broker acks
//! it. When the socket is lost, a recovery task opens a channel on the new
//! socket and sends every pending message again, in its original order,
//! before any new message goes out. The number of messages waiting for a
//! confirm is capped by a semaphore: that is the backpressure.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::channel::{BasicPublishArguments, Channel, ConfirmSelectArguments};
use amqprs::BasicProperties;
use tokio::sync::{oneshot, watch, Notify, Semaphore};
use tokio::task::JoinHandle;

use crate::connection::channel::CloseReason;
use crate::connection::{lock, ConfirmSink, Connection};
use crate::error::{Error, ErrorKind, Result};

/// A message ready for the wire.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    pub(crate) mandatory: bool,
    pub(crate) message_id: Option<String>,
    pub(crate) properties: BasicProperties,
    pub(crate) body: Vec<u8>,
}

impl Outgoing {
    async fn send(&self, channel: &Channel) -> std::result::Result<(), amqprs::error::Error> {
        let mut args = BasicPublishArguments::new(&self.exchange, &self.routing_key);
        args.mandatory = self.mandatory;
        channel
            .basic_publish(self.properties.clone(), self.body.clone(), args)
            .await
    }

    fn describe(&self) -> String {
        format!(
            "message to exchange '{}' with routing key '{}'",
            self.exchange, self.routing_key
        )
    }
}

struct Entry {
    message: Arc<Outgoing>,
    done: oneshot::Sender<Result<()>>,
    returned: Option<String>,
}

#[derive(Default)]
struct Pending {
    /// Which channel's confirms count; bumped for each new channel.
    epoch: u64,
    entries: BTreeMap<u64, Entry>,
}

/// The pending table, shared with the channel callback.
#[derive(Default)]
struct Tracker {
    pending: Mutex<Pending>,
    /// Signalled when the broker closes the publishing channel.
    channel_closed: Notify,
}

impl Tracker {
    fn settle(&self, epoch: u64, tag: u64, multiple: bool, acked: bool) {
        let settled: Vec<Entry> = {
            let mut p = lock(&self.pending);
            if p.epoch != epoch {
                return;
            }
            if multiple {
                let rest = p.entries.split_off(&(tag + 1));
                std::mem::replace(&mut p.entries, rest)
                    .into_values()
                    .collect()
            } else {
                p.entries.remove(&tag).into_iter().collect()
            }
        };
        for e in settled {
            let result = match (acked, e.returned) {
                (true, None) => Ok(()),
                (true, Some(reason)) => Err(Error::new(
                    ErrorKind::Unroutable,
                    format!("{}: {reason}", e.message.describe()),
                )),
                (false, _) => Err(Error::new(ErrorKind::Nacked, e.message.describe())),
            };
            let _ = e.done.send(result);
        }
    }

    /// Fails every pending entry with an error made by `why`.
    fn fail_where(&self, keep: impl Fn(&Outgoing) -> bool, why: impl Fn(&Outgoing) -> Error) {
        let failed: Vec<Entry> = {
            let mut p = lock(&self.pending);
            let (failed, kept): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut p.entries)
                .into_iter()
                .partition(|(_, e)| !keep(&e.message));
            p.entries = kept;
            failed.into_values().collect()
        };
        for e in failed {
            let err = why(&e.message);
            let _ = e.done.send(Err(err));
        }
    }
}

/// The confirm callback for one channel (one epoch).
struct EpochSink {
    tracker: Arc<Tracker>,
    epoch: u64,
}

impl ConfirmSink for EpochSink {
    fn ack(&self, tag: u64, multiple: bool) {
        self.tracker.settle(self.epoch, tag, multiple, true);
    }

    fn nack(&self, tag: u64, multiple: bool) {
        self.tracker.settle(self.epoch, tag, multiple, false);
    }

    fn returned(&self, message_id: Option<String>, _code: u16, text: String) {
        let Some(id) = message_id else {
            tracing::warn!(reason = %text, "a returned message has no message id; cannot match it");
            return;
        };
        let mut p = lock(&self.tracker.pending);
        if p.epoch != self.epoch {
            return;
        }
        if let Some(e) = p
            .entries
            .values_mut()
            .find(|e| e.message.mandatory && e.message.message_id.as_deref() == Some(&id))
        {
            e.returned = Some(text);
        }
    }

    fn closed(&self, reason: &CloseReason) {
        if lock(&self.tracker.pending).epoch != self.epoch {
            return;
        }
        // The broker closed the channel over one message (typically an
        // exchange that does not exist). Its reply text quotes the
        // exchange; fail the messages for that exchange and resend the
        // rest on a new channel. If nothing matches, fail them all: an
        // error is better than a guess.
        let quoted = |m: &Outgoing| reason.text.contains(&format!("'{}'", m.exchange));
        let any_match = lock(&self.tracker.pending)
            .entries
            .values()
            .any(|e| quoted(&e.message));
        let text = format!("{} ({})", reason.text, reason.code);
        self.tracker.fail_where(
            |m| any_match && !quoted(m),
            |m| {
                Error::new(
                    ErrorKind::Channel,
                    format!("{}: broker said {text}", m.describe()),
                )
            },
        );
        self.tracker.channel_closed.notify_one();
    }
}

struct SendState {
    channel: Option<Channel>,
    next_tag: u64,
}

/// One confirm-mode channel that survives reconnects.
pub(crate) struct Publisher {
    conn: Connection,
    confirms: bool,
    permits: Semaphore,
    state: tokio::sync::Mutex<SendState>,
    tracker: Arc<Tracker>,
    /// Counts channel installs, so that waiting publishers see a new one.
    installed: watch::Sender<u64>,
    recovery: Mutex<Option<JoinHandle<()>>>,
}

impl Publisher {
    /// Opens the channel now (so configuration errors show at once) and
    /// starts the recovery task.
    pub(crate) async fn open(
        conn: &Connection,
        confirms: bool,
        max_in_flight: usize,
    ) -> Result<Arc<Publisher>> {
        let publisher = Arc::new(Publisher {
            conn: conn.clone(),
            confirms,
            permits: Semaphore::new(max_in_flight.max(1)),
            state: tokio::sync::Mutex::new(SendState {
                channel: None,
                next_tag: 1,
            }),
            tracker: Arc::default(),
            installed: watch::channel(0).0,
            recovery: Mutex::new(None),
        });
        let generation = publisher.install().await?;
        let task = tokio::spawn(recover(Arc::downgrade(&publisher), generation));
        *lock(&publisher.recovery) = Some(task);
        Ok(publisher)
    }

    /// Opens a channel on the current socket, resends every pending
    /// message on it in order, and makes it the channel for new messages.
    async fn install(&self) -> Result<u64> {
        let mut st = self.state.lock().await;
        let epoch = lock(&self.tracker.pending).epoch + 1;
        let sink: Option<Arc<dyn ConfirmSink>> = self.confirms.then(|| {
            Arc::new(EpochSink {
                tracker: self.tracker.clone(),
                epoch,
            }) as Arc<dyn ConfirmSink>
        });
        let (channel, watch, generation) = self.conn.open_channel(sink).await?;
        if self.confirms {
            channel
                .confirm_select(ConfirmSelectArguments::default())
                .await
                .map_err(|e| watch.refusal(ErrorKind::Channel, "confirm.select".into(), e))?;
        }
        // Renumber what is pending for the new channel, keeping its order.
        let resend: Vec<Arc<Outgoing>> = {
            let mut p = lock(&self.tracker.pending);
            p.epoch = epoch;
            let old = std::mem::take(&mut p.entries);
            let mut out = Vec::with_capacity(old.len());
            for (i, (_, e)) in old.into_iter().enumerate() {
                out.push(e.message.clone());
                p.entries.insert(i as u64 + 1, e);
            }
            out
        };
        if !resend.is_empty() {
            tracing::info!(
                connection = %self.conn.name(),
                count = resend.len(),
                "resending unconfirmed messages"
            );
        }
        for m in &resend {
            if let Err(e) = m.send(&channel).await {
                // Lost again already: the next recovery resends them.
                tracing::warn!(error = %e, "resend interrupted");
                break;
            }
        }
        st.next_tag = resend.len() as u64 + 1;
        st.channel = Some(channel);
        drop(st);
        self.installed.send_modify(|n| *n += 1);
        Ok(generation)
    }

    /// Sends one message and, with confirms, waits for the broker's ack.
    pub(crate) async fn publish(&self, message: Outgoing) -> Result<()> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| Error::new(ErrorKind::Closed, "publisher closed"))?;
        let deadline = tokio::time::Instant::now() + self.conn.settings().recovery_timeout;
        let message = Arc::new(message);
        let confirmed = loop {
            let mut st = self.state.lock().await;
            let channel = match &st.channel {
                Some(c) if c.is_open() => c.clone(),
                _ => {
                    drop(st);
                    self.wait_for_channel(deadline, &message).await?;
                    continue;
                }
            };
            if !self.confirms {
                let sent = message.send(&channel).await;
                drop(st);
                match sent {
                    Ok(()) => return Ok(()),
                    Err(_) => {
                        self.wait_for_channel(deadline, &message).await?;
                        continue;
                    }
                }
            }
            let tag = st.next_tag;
            st.next_tag += 1;
            let (done, confirmed) = oneshot::channel();
            lock(&self.tracker.pending).entries.insert(
                tag,
                Entry {
                    message: message.clone(),
                    done,
                    returned: None,
                },
            );
            // A failed send leaves the entry pending: recovery resends it.
            let _ = message.send(&channel).await;
            break confirmed;
        };
        confirmed.await.unwrap_or_else(|_| {
            Err(Error::new(
                ErrorKind::Closed,
                format!(
                    "publisher closed before {} was confirmed",
                    message.describe()
                ),
            ))
        })
    }

    async fn wait_for_channel(
        &self,
        deadline: tokio::time::Instant,
        message: &Outgoing,
    ) -> Result<()> {
        let mut rx = self.installed.subscribe();
        let current = *rx.borrow_and_update();
        let wait = async move { rx.wait_for(|g| *g != current).await.is_ok() };
        match tokio::time::timeout_at(deadline, wait).await {
            Ok(_) => Ok(()),
            Err(_) => Err(Error::new(
                ErrorKind::Disconnected,
                format!(
                    "{} not sent: connection '{}' did not recover in time",
                    message.describe(),
                    self.conn.name()
                ),
            )),
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.recovery).take() {
            task.abort();
        }
    }
}

/// Re-installs the channel after every loss, and fails what is pending if
/// the connection stays down longer than its recovery timeout.
async fn recover(publisher: std::sync::Weak<Publisher>, mut generation: u64) {
    loop {
        let Some(p) = publisher.upgrade() else { return };
        let conn = p.conn.clone();
        let tracker = p.tracker.clone();
        let recovery_timeout = conn.settings().recovery_timeout;
        drop(p);

        // Wait for the socket to change, or the broker to close our channel.
        let mut links = conn.links();
        tokio::select! {
            ok = async { links.wait_for(|l| l.generation != generation || l.conn.is_none()).await.is_ok() } => {
                if !ok { return; }
            }
            _ = tracker.channel_closed.notified() => {
                // Do not spin on a channel the broker keeps closing.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        drop(links);

        let mut failed_pending = false;
        loop {
            match conn.live_link(0, recovery_timeout).await {
                Ok(_) => {}
                Err(err) if err.kind() == ErrorKind::Closed => {
                    tracker.fail_where(|_| false, |m| not_confirmed(m, &err));
                    return;
                }
                Err(err) => {
                    if !failed_pending {
                        tracker.fail_where(|_| false, |m| not_confirmed(m, &err));
                        failed_pending = true;
                    }
                    continue;
                }
            }
            let Some(p) = publisher.upgrade() else { return };
            match p.install().await {
                Ok(g) => {
                    generation = g;
                    break;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reopening the publishing channel failed");
                    drop(p);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
}

fn not_confirmed(m: &Outgoing, err: &Error) -> Error {
    Error::new(
        err.kind(),
        format!("{} not confirmed: {}", m.describe(), err.context()),
    )
}
