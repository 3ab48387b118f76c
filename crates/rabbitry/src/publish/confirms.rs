//! The publishing channel: publisher confirms, returns, resend on recovery.
//!
//! A [`Publisher`] is a handle to one task that owns one channel in confirm
//! mode (the actor shape of mini-redis's client): callers send requests
//! through a bounded queue and wait on a oneshot. The task numbers each
//! message with its delivery tag and keeps it in a pending table until the
//! broker acks it. When the socket is lost, the task opens a channel on the
//! new socket and sends every pending message again, in its original order,
//! before any new message goes out; messages that arrive meanwhile wait, up
//! to the connection's recovery timeout. A message the broker nacks is
//! published again shortly after, until that same timeout has passed since
//! its first nack. The number of messages waiting for a confirm is capped
//! by a semaphore: that is the backpressure.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amqprs::BasicProperties;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio::time::Instant;

use crate::channel::{CloseReason, Returned};
use crate::connection::{close_quietly, lock, ConfirmSink, Connection};
use crate::error::{Error, ErrorKind, Result};
use crate::limits::Limits;
use crate::task::{Background, CancellationToken};
use crate::wire::{WireChannel, WireError};

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
    async fn send(&self, channel: &WireChannel) -> std::result::Result<(), WireError> {
        channel
            .publish(
                &self.exchange,
                &self.routing_key,
                self.mandatory,
                self.properties.clone(),
                self.body.clone(),
            )
            .await
    }

    /// Sends without keeping a copy (no confirms: nothing to resend).
    async fn send_owned(self, channel: &WireChannel) -> std::result::Result<(), WireError> {
        channel
            .publish(
                &self.exchange,
                &self.routing_key,
                self.mandatory,
                self.properties,
                self.body,
            )
            .await
    }

    /// A copy, for the rare case where the message is still shared.
    fn duplicate(&self) -> Outgoing {
        Outgoing {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            mandatory: self.mandatory,
            message_id: self.message_id.clone(),
            properties: self.properties.clone(),
            body: self.body.clone(),
        }
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
    /// When the broker first nacked it, if it did.
    nacked_since: Option<Instant>,
    /// When it was first sent, and when last.
    first_sent: Instant,
    sent: Instant,
}

/// How long after a nack a message is published again. A nack means the
/// broker could not take the message just then (a quorum queue electing a
/// leader, a full queue with `reject-publish`), so it is tried again soon,
/// until the connection's recovery timeout has passed since the first.
const RENACK_DELAY: Duration = Duration::from_millis(100);

/// A channel that has nacked everything, acking nothing, for this long is
/// replaced by a new one. RabbitMQ 3.10 was seen nacking every publish for
/// 20 s on a channel opened just after a quorum queue's leader died, while a
/// channel opened a moment later worked.
const NACKING_CHANNEL: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Pending {
    /// Which channel's confirms count; bumped for each new channel.
    epoch: u64,
    entries: BTreeMap<u64, Entry>,
}

impl Entry {
    fn new(message: Arc<Outgoing>, done: oneshot::Sender<Result<()>>) -> Entry {
        let now = Instant::now();
        Entry {
            message,
            done,
            returned: None,
            nacked_since: None,
            first_sent: now,
            sent: now,
        }
    }
}

/// Sleeps until `when`, or forever without one.
async fn sleep_until_some(when: Option<Instant>) {
    match when {
        Some(when) => tokio::time::sleep_until(when).await,
        None => std::future::pending().await,
    }
}

/// The pending table, shared with the channel callback.
struct Tracker {
    pending: Mutex<Pending>,
    /// Signalled when the broker closes the publishing channel.
    channel_closed: Notify,
    /// Nacked messages to publish again, each when it is due.
    nacked: Mutex<VecDeque<(Entry, Instant)>>,
    /// Signalled when a message is nacked.
    nack_arrived: Notify,
    /// How long a nacked, or unconfirmed, message is published again
    /// before it fails: the connection's recovery timeout.
    nack_bound: Duration,
    /// How long a confirm may take before the message is sent again.
    confirm_timeout: Duration,
    /// Messages sent again: after a reconnect, or after a nack.
    republished: AtomicU64,
    /// Since when the channel has nacked and not acked anything.
    nacking_since: Mutex<Option<Instant>>,
    /// The broker closed the channel over a message it did not name while
    /// several were in flight: the next channel sends them one at a time,
    /// so that the one it refuses again fails alone.
    isolate: AtomicBool,
    /// Signalled when nothing is waiting for a confirm.
    idle: Notify,
    /// What a message may be on the current channel: its frame size and
    /// the broker's body limit (read on every publish, without a lock).
    frame_max: AtomicU32,
    max_body: AtomicU64,
    /// Since when messages have waited to be sent (no channel, or
    /// suspects going one at a time), while they do.
    blocked_since: Mutex<Option<Instant>>,
    meters: crate::meters::PublishMeters,
}

impl crate::connection::Stalled for Tracker {
    fn stalled_for(&self) -> Option<Duration> {
        let oldest_pending = lock(&self.pending)
            .entries
            .values()
            .map(|e| e.first_sent)
            .min();
        let oldest_nacked = lock(&self.nacked).iter().map(|(e, _)| e.first_sent).min();
        let blocked = *lock(&self.blocked_since);
        let since = [oldest_pending, oldest_nacked, blocked]
            .into_iter()
            .flatten()
            .min()?;
        Some(since.elapsed()).filter(|waited| *waited > self.confirm_timeout)
    }
}

impl Tracker {
    /// `n` messages sent again, for [`Publisher::republished`] and the
    /// `rabbitry_republished_total` counter.
    fn count_republished(&self, n: u64) {
        self.republished.fetch_add(n, Ordering::Relaxed);
        self.meters.republished.increment(n);
    }

    fn settle(&self, epoch: u64, tag: u64, multiple: bool, acked: bool) {
        let settled: Vec<Entry> = {
            let mut p = lock(&self.pending);
            if p.epoch != epoch {
                return;
            }
            let settled: Vec<Entry> = if multiple {
                let rest = p.entries.split_off(&(tag + 1));
                std::mem::replace(&mut p.entries, rest)
                    .into_values()
                    .collect()
            } else {
                p.entries.remove(&tag).into_iter().collect()
            };
            if p.entries.is_empty() {
                self.idle.notify_one();
            }
            settled
        };
        let now = Instant::now();
        {
            let mut streak = lock(&self.nacking_since);
            if acked {
                *streak = None;
            } else {
                streak.get_or_insert(now);
            }
        }
        let settled_n = settled.len() as u64;
        if acked {
            self.meters.confirms.increment(settled_n);
            for e in &settled {
                self.meters
                    .confirm_duration
                    .record(now.duration_since(e.first_sent).as_secs_f64());
            }
        } else {
            self.meters.nacks.increment(settled_n);
        }
        for mut e in settled {
            let result = match (acked, e.returned.take()) {
                (true, None) => Ok(()),
                (true, Some(reason)) => Err(Error::new(
                    ErrorKind::Unroutable,
                    format!("{}: {reason}", e.message.describe()),
                )),
                (false, _) => {
                    let since = *e.nacked_since.get_or_insert(now);
                    if now.duration_since(since) < self.nack_bound {
                        tracing::debug!(message = %e.message.describe(), "nacked; publishing it again");
                        lock(&self.nacked).push_back((e, now + RENACK_DELAY));
                        self.nack_arrived.notify_one();
                        continue;
                    }
                    Err(Error::new(
                        ErrorKind::Nacked,
                        format!(
                            "{}: nacked by the broker each time for {:?}",
                            e.message.describe(),
                            self.nack_bound
                        ),
                    ))
                }
            };
            let _ = e.done.send(result);
        }
    }

    /// Fails every pending (or nacked, waiting to go again) entry that
    /// `keep` does not keep, with an error made by `why`.
    fn fail_where(&self, keep: impl Fn(&Outgoing) -> bool, why: impl Fn(&Outgoing) -> Error) {
        let mut failed: Vec<Entry> = {
            let mut p = lock(&self.pending);
            let (failed, kept): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut p.entries)
                .into_iter()
                .partition(|(_, e)| !keep(&e.message));
            p.entries = kept;
            failed.into_values().collect()
        };
        {
            let mut nacked = lock(&self.nacked);
            let (gone, kept): (VecDeque<_>, VecDeque<_>) = std::mem::take(&mut *nacked)
                .into_iter()
                .partition(|(e, _)| !keep(&e.message));
            *nacked = kept;
            failed.extend(gone.into_iter().map(|(e, _)| e));
        }
        for e in failed {
            let err = why(&e.message);
            let _ = e.done.send(Err(err));
        }
    }

    /// Fails what is waiting for a confirm (not what waits to be sent
    /// again after a nack).
    fn fail_pending(&self, why: impl Fn(&Outgoing) -> Error) {
        let failed = std::mem::take(&mut lock(&self.pending).entries);
        for e in failed.into_values() {
            let _ = e.done.send(Err(why(&e.message)));
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

    fn returned(&self, returned: Returned) {
        let Returned {
            message_id, text, ..
        } = returned;
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
            self.tracker.meters.returns.increment(1);
        }
    }

    fn closed(&self, reason: &CloseReason) {
        if lock(&self.tracker.pending).epoch != self.epoch {
            return;
        }
        // The broker closed the channel over one message. When its reply
        // text quotes an exchange (one that does not exist, or that the
        // user may not write to), the messages for that exchange fail and
        // the rest are sent again on a new channel. A message that was
        // alone in flight is the one refused. Otherwise the culprit is
        // unknown: the next channel sends the messages one at a time, and
        // the one refused again fails alone. Never all of them.
        let quoted = |m: &Outgoing| reason.text.contains(&format!("'{}'", m.exchange));
        let (any_match, in_flight) = {
            let p = lock(&self.tracker.pending);
            (
                p.entries.values().any(|e| quoted(&e.message)),
                p.entries.len(),
            )
        };
        let text = format!("{} ({})", reason.text, reason.code);
        let why = |m: &Outgoing| {
            Error::new(
                ErrorKind::Channel,
                format!("{}: broker said {text}", m.describe()),
            )
        };
        if any_match {
            self.tracker.fail_where(|m| !quoted(m), why);
        } else if in_flight <= 1 {
            self.tracker.fail_pending(why);
        } else {
            tracing::warn!(
                reason = %text,
                in_flight,
                "the broker closed the publishing channel without naming the message; \
                 sending them again one at a time to find it"
            );
            self.tracker.isolate.store(true, Ordering::Relaxed);
        }
        self.tracker.channel_closed.notify_one();
    }
}

/// A request to the publishing task.
struct Publish {
    message: Outgoing,
    done: oneshot::Sender<Result<()>>,
    deadline: Instant,
}

/// One confirm-mode channel that survives reconnects, owned by one task
/// (the actor); callers talk to it through a bounded queue.
pub(crate) struct Publisher {
    conn: Connection,
    /// What a confirmation says when the publisher is gone: made once,
    /// shared by every confirmation instead of formatted for each.
    closed_text: Arc<str>,
    tracker: Arc<Tracker>,
    permits: Arc<Semaphore>,
    tx: mpsc::Sender<Publish>,
    /// The actor; it ends when the publisher is dropped.
    _task: Background<()>,
}

impl Publisher {
    /// Opens the channel now (so that errors show at once) and starts the
    /// publishing task.
    pub(crate) async fn open(
        conn: &Connection,
        confirms: bool,
        max_in_flight: usize,
        confirm_timeout: Duration,
    ) -> Result<Arc<Publisher>> {
        let mut actor = Actor {
            conn: conn.clone(),
            confirms,
            tracker: Arc::new(Tracker {
                pending: Mutex::default(),
                channel_closed: Notify::new(),
                nacked: Mutex::default(),
                nack_arrived: Notify::new(),
                nack_bound: conn.settings().recovery_timeout,
                // Never a busy loop of re-publishing.
                confirm_timeout: confirm_timeout.max(crate::defaults::MIN_CONFIRM_TIMEOUT),
                republished: AtomicU64::new(0),
                nacking_since: Mutex::default(),
                isolate: AtomicBool::new(false),
                idle: Notify::new(),
                frame_max: AtomicU32::new(Limits::default().frame_max),
                max_body: AtomicU64::new(Limits::default().max_body),
                blocked_since: Mutex::default(),
                meters: crate::meters::PublishMeters::new(conn.name()),
            }),
            channel: None,
            generation: 0,
            next_tag: 1,
            waiting: VecDeque::new(),
            isolating: VecDeque::new(),
            isolation_tail: false,
            lost_at: None,
        };
        actor.install().await?;
        let (tx, rx) = mpsc::channel(max_in_flight.clamp(1, 4096));
        let tracker = actor.tracker.clone();
        conn.watch_publisher(
            Arc::downgrade(&tracker) as std::sync::Weak<dyn crate::connection::Stalled>
        );
        let task = Background::spawn(move |stop| actor.run(rx, stop));
        Ok(Arc::new(Publisher {
            conn: conn.clone(),
            closed_text: format!("publisher on connection '{}' closed", conn.name()).into(),
            tracker,
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            tx,
            _task: task,
        }))
    }

    /// The connection it publishes on.
    pub(crate) fn connection(&self) -> &Connection {
        &self.conn
    }

    /// What a message may be on the current channel.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            frame_max: self.tracker.frame_max.load(Ordering::Relaxed),
            max_body: self.tracker.max_body.load(Ordering::Relaxed),
        }
    }

    /// Queues one message for sending, in call order, and returns the wait
    /// for its confirm. Many can be submitted before any is awaited.
    pub(crate) async fn submit(&self, message: Outgoing) -> Result<Confirmation> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| self.closed())?;
        let (done, result) = oneshot::channel();
        self.tx
            .send(Publish {
                message,
                done,
                deadline: Instant::now() + self.conn.settings().recovery_timeout,
            })
            .await
            .map_err(|_| self.closed())?;
        Ok(Confirmation {
            result,
            _permit: permit,
            closed: self.closed_text.clone(),
            span: crate::telemetry::Span::default(),
        })
    }

    /// Messages sent again so far: those still unconfirmed when the
    /// connection was lost, those the broker nacked, and those whose
    /// confirm took longer than the confirm timeout.
    pub(crate) fn republished(&self) -> u64 {
        self.tracker.republished.load(Ordering::Relaxed)
    }

    fn closed(&self) -> Error {
        Error::new(ErrorKind::Closed, &*self.closed_text)
    }
}

/// The broker's answer to one submitted message, to be awaited.
pub struct Confirmation {
    result: oneshot::Receiver<Result<()>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// The error's text, should the publisher go before the confirm.
    closed: Arc<str>,
    /// The publish span, ended with the confirm.
    span: crate::telemetry::Span,
}

impl std::fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Confirmation")
    }
}

impl Confirmation {
    /// Waits for the confirm (or for the message to be handed over, without
    /// confirms).
    pub async fn wait(self) -> Result<()> {
        let Confirmation {
            result,
            closed,
            span,
            ..
        } = self;
        let result = result
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Closed, &*closed)));
        span.finish(&result);
        result
    }

    pub(crate) fn traced(mut self, span: crate::telemetry::Span) -> Confirmation {
        self.span = span;
        self
    }
}

/// The publishing task's state.
struct Actor {
    conn: Connection,
    confirms: bool,
    tracker: Arc<Tracker>,
    channel: Option<WireChannel>,
    /// The socket generation the channel is on.
    generation: u64,
    next_tag: u64,
    /// Messages that arrived while there was no channel, or while
    /// suspects are sent one at a time, in order.
    waiting: VecDeque<(Arc<Outgoing>, oneshot::Sender<Result<()>>, Instant)>,
    /// Messages in flight when the broker closed the channel without
    /// naming one: sent one at a time, each after the previous confirm.
    isolating: VecDeque<Entry>,
    /// The last of them is in flight: the rest wait for its confirm.
    isolation_tail: bool,
    /// When the channel was lost, while it is.
    lost_at: Option<Instant>,
}

/// How long the task waits for a socket before serving its queue again.
const RECOVERY_POLL: Duration = Duration::from_millis(250);

impl Actor {
    fn channel_live(&self) -> bool {
        self.channel.as_ref().is_some_and(|c| c.is_open())
            && self.conn.generation() == self.generation
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Publish>, stop: CancellationToken) {
        let mut links = self.conn.links();
        let mut tick = tokio::time::interval(RECOVERY_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let tracker = self.tracker.clone();
        loop {
            if !self.channel_live() {
                self.recover().await;
            }
            if self.channel_live() && self.nacking_too_long() {
                tracing::warn!(
                    connection = %self.conn.name(),
                    "the broker has nacked every publish on this channel for {NACKING_CHANNEL:?}; opening a new one"
                );
                if let Some(channel) = self.channel.take() {
                    close_quietly(channel).await;
                }
                continue;
            }
            let live = self.channel_live();
            if live {
                self.publish_nacked_again().await;
                self.publish_unconfirmed_again().await;
                self.isolate_next().await;
            }
            let isolating = live && self.isolation_active();
            let next_nacked = lock(&tracker.nacked).front().map(|(_, due)| *due);
            let next_timeout = self.next_confirm_timeout();
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(p) => self.handle(p).await,
                    None => return,
                },
                _ = tracker.nack_arrived.notified() => {}
                _ = tracker.idle.notified(), if isolating => {}
                _ = sleep_until_some(next_nacked), if live => {}
                _ = sleep_until_some(next_timeout), if live => {}
                _ = tracker.channel_closed.notified() => {
                    // Do not spin on a channel the broker keeps closing.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                r = links.changed() => if r.is_err() { return },
                _ = tick.tick(), if !live => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn handle(&mut self, p: Publish) {
        self.tracker.meters.publishes.increment(1);
        let message = Arc::new(p.message);
        if !self.channel_live() || self.isolation_active() {
            lock(&self.tracker.blocked_since).get_or_insert_with(Instant::now);
            self.waiting.push_back((message, p.done, p.deadline));
            return;
        }
        let Some(channel) = self.channel.clone() else {
            return;
        };
        if !self.confirms {
            let what = message.describe();
            let owned = Arc::try_unwrap(message).unwrap_or_else(|m| m.duplicate());
            let res = owned.send_owned(&channel).await.map_err(|e| {
                Error::new(ErrorKind::Disconnected, format!("{what} not sent")).with_source(e)
            });
            let _ = p.done.send(res);
            return;
        }
        self.send_tracked(&channel, Entry::new(message, p.done))
            .await;
    }

    /// Sends `entry` with the next tag; its confirm timeout counts from now,
    /// whether this is its first send or it is sent again after a nack or
    /// a timeout.
    async fn send_tracked(&mut self, channel: &WireChannel, mut entry: Entry) {
        entry.sent = Instant::now();
        let tag = self.next_tag;
        self.next_tag += 1;
        let message = entry.message.clone();
        lock(&self.tracker.pending).entries.insert(tag, entry);
        // A failed send leaves the entry pending: recovery resends it.
        let _ = message.send(channel).await;
    }

    fn nacking_too_long(&self) -> bool {
        lock(&self.tracker.nacking_since).is_some_and(|since| since.elapsed() >= NACKING_CHANNEL)
    }

    /// Publishes again the nacked messages that are due, in nack order.
    async fn publish_nacked_again(&mut self) {
        let Some(channel) = self.channel.clone() else {
            return;
        };
        let now = Instant::now();
        loop {
            let due = {
                let mut nacked = lock(&self.tracker.nacked);
                match nacked.front() {
                    Some((_, due)) if *due <= now => nacked.pop_front().map(|(e, _)| e),
                    _ => None,
                }
            };
            match due {
                Some(entry) => {
                    self.tracker.count_republished(1);
                    self.send_tracked(&channel, entry).await
                }
                None => return,
            }
        }
    }

    /// When the oldest unconfirmed message times out. Tags grow with each
    /// send, so the first entry is the one sent longest ago.
    fn next_confirm_timeout(&self) -> Option<Instant> {
        let p = lock(&self.tracker.pending);
        let (_, first) = p.entries.first_key_value()?;
        Some(first.sent + self.tracker.confirm_timeout)
    }

    /// Sends again, with new tags, the messages whose confirm is overdue:
    /// a late confirm of the old copy then settles nothing, and the new
    /// copy's settles the caller. One that has waited the whole recovery
    /// timeout fails instead.
    async fn publish_unconfirmed_again(&mut self) {
        let Some(channel) = self.channel.clone() else {
            return;
        };
        let now = Instant::now();
        let (timeout, bound) = (self.tracker.confirm_timeout, self.tracker.nack_bound);
        let overdue: Vec<Entry> = {
            let mut p = lock(&self.tracker.pending);
            let late: Vec<u64> = p
                .entries
                .iter()
                .take_while(|(_, e)| e.sent + timeout <= now)
                .map(|(tag, _)| *tag)
                .collect();
            late.iter().filter_map(|t| p.entries.remove(t)).collect()
        };
        if overdue.is_empty() {
            return;
        }
        tracing::warn!(
            connection = %self.conn.name(),
            count = overdue.len(),
            ?timeout,
            "no confirm within the confirm timeout; publishing again with the same message ids"
        );
        for entry in overdue {
            if now.duration_since(entry.first_sent) >= bound {
                let err = Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "{}: not confirmed by the broker within {bound:?}, though sent again \
                         every {timeout:?}",
                        entry.message.describe()
                    ),
                );
                let _ = entry.done.send(Err(err));
                continue;
            }
            self.tracker.count_republished(1);
            self.send_tracked(&channel, entry).await;
        }
    }

    /// With no usable channel: note when it was lost, fail what waited too
    /// long, and try to open a new one on a live socket.
    async fn recover(&mut self) {
        let now = Instant::now();
        let lost_at = *self.lost_at.get_or_insert(now);
        let timeout = self.conn.settings().recovery_timeout;
        let name = self.conn.name().to_owned();
        let gone = |m: &Outgoing, what: &str| {
            Error::new(
                ErrorKind::Disconnected,
                format!(
                    "{} {what}: connection '{name}' did not recover within {timeout:?}",
                    m.describe()
                ),
            )
        };
        while self.waiting.front().is_some_and(|(_, _, d)| *d <= now) {
            if let Some((m, done, _)) = self.waiting.pop_front() {
                let _ = done.send(Err(gone(&m, "not sent")));
            }
        }
        if self.waiting.is_empty() {
            *lock(&self.tracker.blocked_since) = None;
        }
        if now.duration_since(lost_at) >= timeout {
            self.tracker
                .fail_where(|_| false, |m| gone(m, "not confirmed"));
        }
        match tokio::time::timeout(RECOVERY_POLL, self.conn.live_link(0, RECOVERY_POLL)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if e.kind() == ErrorKind::Closed => {
                self.tracker
                    .fail_where(|_| false, |m| Error::new(ErrorKind::Closed, m.describe()));
                for (m, done, _) in self.waiting.drain(..) {
                    let _ = done.send(Err(Error::new(ErrorKind::Closed, m.describe())));
                }
                return;
            }
            _ => return,
        }
        if let Err(err) = self.install().await {
            tracing::warn!(connection = %name, error = %err, "reopening the publishing channel failed");
        }
    }

    /// Opens a channel on the current socket, resends every pending
    /// message on it in order, then the waiting ones, and makes it the
    /// channel for new messages.
    async fn install(&mut self) -> Result<()> {
        let epoch = lock(&self.tracker.pending).epoch + 1;
        let sink: Option<Arc<dyn ConfirmSink>> = self.confirms.then(|| {
            Arc::new(EpochSink {
                tracker: self.tracker.clone(),
                epoch,
            }) as Arc<dyn ConfirmSink>
        });
        let (channel, watch, generation) = self.conn.open_channel(sink).await?;
        *lock(&self.tracker.nacking_since) = None;
        if self.confirms {
            channel
                .confirm_select()
                .await
                .map_err(|e| watch.refusal(ErrorKind::Channel, "confirm.select".into(), e))?;
        }
        let limits = watch.limits();
        self.tracker
            .frame_max
            .store(limits.frame_max, Ordering::Relaxed);
        self.tracker
            .max_body
            .store(limits.max_body, Ordering::Relaxed);
        // Renumber what is pending for the new channel, keeping its order;
        // or, to find a message the broker refused without naming it, hold
        // them to be sent one at a time.
        let isolate = self.tracker.isolate.swap(false, Ordering::Relaxed);
        let resend: Vec<Arc<Outgoing>> = {
            let mut p = lock(&self.tracker.pending);
            p.epoch = epoch;
            let old = std::mem::take(&mut p.entries);
            if isolate {
                let held: Vec<Entry> = old.into_values().collect();
                for e in held.into_iter().rev() {
                    self.isolating.push_front(e);
                }
                Vec::new()
            } else {
                let mut out = Vec::with_capacity(old.len());
                let now = Instant::now();
                for (i, (_, mut e)) in old.into_iter().enumerate() {
                    e.sent = now;
                    out.push(e.message.clone());
                    p.entries.insert(i as u64 + 1, e);
                }
                out
            }
        };
        if !resend.is_empty() {
            tracing::info!(
                connection = %self.conn.name(),
                count = resend.len(),
                "resending unconfirmed messages"
            );
        }
        self.next_tag = resend.len() as u64 + 1;
        self.tracker
            .republished
            .fetch_add(resend.len() as u64, Ordering::Relaxed);
        self.tracker
            .meters
            .republished
            .increment(resend.len() as u64);
        for m in &resend {
            if let Err(e) = m.send(&channel).await {
                // Lost again already: the next recovery resends them.
                tracing::warn!(error = %e, "resend interrupted");
                break;
            }
        }
        self.channel = Some(channel.clone());
        self.generation = generation;
        self.lost_at = None;
        if !self.isolation_active() {
            self.send_waiting(&channel).await;
        }
        Ok(())
    }

    /// While suspects are held: sends the next one when nothing is waiting
    /// for a confirm, and the messages that queued behind them once the
    /// last is through.
    async fn isolate_next(&mut self) {
        if !self.isolation_active() || !lock(&self.tracker.pending).entries.is_empty() {
            return;
        }
        let Some(channel) = self.channel.clone() else {
            return;
        };
        match self.isolating.pop_front() {
            Some(entry) => {
                // The last one is through only once it is confirmed.
                self.isolation_tail = self.isolating.is_empty();
                self.tracker.count_republished(1);
                self.send_tracked(&channel, entry).await;
            }
            None => {
                self.isolation_tail = false;
                tracing::info!(connection = %self.conn.name(), "publishing in order again");
                self.send_waiting(&channel).await;
            }
        }
    }

    /// Whether suspects are being sent one at a time.
    fn isolation_active(&self) -> bool {
        !self.isolating.is_empty() || self.isolation_tail
    }

    /// Sends the messages that waited for a channel, in order.
    async fn send_waiting(&mut self, channel: &WireChannel) {
        *lock(&self.tracker.blocked_since) = None;
        let waiting: Vec<_> = self.waiting.drain(..).collect();
        for (m, done, _) in waiting {
            if self.confirms {
                self.send_tracked(channel, Entry::new(m, done)).await;
            } else {
                let res = m.send(channel).await.map_err(|e| {
                    Error::new(
                        ErrorKind::Disconnected,
                        format!("{} not sent", m.describe()),
                    )
                    .with_source(e)
                });
                let _ = done.send(res);
            }
        }
    }
}
