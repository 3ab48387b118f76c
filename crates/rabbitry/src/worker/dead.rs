//! Dead letters: list them with their error headers, replay them to where
//! they came from with the attempts reset, or purge them.
//!
//! These read `<queue>.dead` with `basic.get`, one message at a time, on a
//! channel of their own; listing never removes anything (the messages go
//! back when the channel closes).

use serde::Serialize;

use super::retry;
use crate::channel::ChannelWatch;
use crate::connection::{close_quietly, Connection};
use crate::error::{ErrorKind, Result};
use crate::message::{HeaderValue, Properties};
use crate::publish::{Producer, ProducerSettings};
use crate::telemetry::{Link, Parent};
use crate::wire::WireChannel;

/// One dead-lettered message.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Why it failed (`x-rabbitry-error`).
    pub error: Option<String>,
    /// How many attempts were made (`x-rabbitry-attempts`).
    pub attempts: Option<i64>,
    /// Where it was first published (`x-rabbitry-original-exchange`).
    pub original_exchange: Option<String>,
    /// With which key (`x-rabbitry-original-routing-key`).
    pub original_routing_key: Option<String>,
    /// When it was dead-lettered (`x-rabbitry-failed-at`).
    pub failed_at: Option<String>,
    /// All its properties.
    pub properties: Properties,
    /// The body's size in bytes.
    pub body_len: usize,
    /// The body as text (invalid UTF-8 replaced), its first
    /// 4 KiB.
    pub body: String,
}

/// How much of a dead letter's body [`DeadLetter::body`] shows.
pub(crate) const BODY_PREVIEW: usize = 4096;

/// The dead-letter queue of `queue`: `<queue>.dead`, or `queue` itself
/// when it is one (ends in `.dead`), as every function of this module
/// takes either. The one public name of a consumer's dead-letter queue.
pub fn dead_queue_of(queue: &str) -> String {
    if queue.ends_with(".dead") {
        queue.to_owned()
    } else {
        retry::dead_queue(queue)
    }
}

fn header_str(p: &Properties, k: &str) -> Option<String> {
    p.headers
        .get(k)
        .and_then(HeaderValue::as_str)
        .map(str::to_owned)
}

/// A dead-letter queue read one message at a time on a channel of its own;
/// what is not acked goes back to the queue when it closes.
struct Reader {
    channel: WireChannel,
    watch: ChannelWatch,
    dead: String,
}

impl Reader {
    async fn open(conn: &Connection, queue: &str) -> Result<Reader> {
        let dead = dead_queue_of(queue);
        crate::limits::check_short("dead-letter queue name", &dead)?;
        let (channel, watch, _) = conn.open_channel(None).await?;
        Ok(Reader {
            channel,
            watch,
            dead,
        })
    }

    /// The next letter: its delivery tag, properties and body.
    async fn next(&self) -> Result<Option<(u64, Properties, Vec<u8>)>> {
        let got = self.channel.get(&self.dead).await.map_err(|e| {
            self.watch
                .refusal(ErrorKind::Channel, format!("queue '{}'", self.dead), e)
        })?;
        Ok(got.map(|m| (m.delivery_tag, m.properties, m.body.into())))
    }

    /// Removes the letter `tag` from the queue.
    async fn ack(&self, tag: u64) -> Result<()> {
        self.channel.ack(tag, false).await.map_err(|e| {
            self.watch
                .refusal(ErrorKind::Channel, format!("ack on '{}'", self.dead), e)
        })
    }

    async fn close(self) {
        close_quietly(self.channel).await;
    }
}

/// Lists up to `limit` dead letters of `queue` without removing them.
pub async fn list(conn: &Connection, queue: &str, limit: usize) -> Result<Vec<DeadLetter>> {
    let reader = Reader::open(conn, queue).await?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some((_, p, body)) = reader.next().await? else {
            break;
        };
        out.push(DeadLetter {
            error: retry::dead_reason(&p),
            attempts: p
                .headers
                .get(crate::headers::ATTEMPTS)
                .and_then(HeaderValue::as_i64),
            original_exchange: header_str(&p, crate::headers::ORIGINAL_EXCHANGE),
            original_routing_key: header_str(&p, crate::headers::ORIGINAL_ROUTING_KEY),
            failed_at: header_str(&p, crate::headers::FAILED_AT),
            properties: p,
            body_len: body.len(),
            body: String::from_utf8_lossy(&body[..body.len().min(BODY_PREVIEW)]).into_owned(),
        });
    }
    // Unacked: closing the channel returns every message to the queue.
    reader.close().await;
    Ok(out)
}

/// Publishes up to `limit` dead letters of `queue` back to their original
/// exchange and routing key (confirmed), with attempts reset, acking each
/// only after its confirm. Returns how many were replayed.
pub async fn replay(conn: &Connection, queue: &str, limit: usize) -> Result<usize> {
    replay_matching(conn, queue, limit, |_| true).await
}

/// Sends the dead letters of `queue` whose message ids are in `ids` back
/// to their queue, like [`replay`]; the others stay where they are.
pub async fn replay_ids(conn: &Connection, queue: &str, ids: &[String]) -> Result<usize> {
    replay_matching(conn, queue, ids.len(), |p| {
        p.message_id.as_ref().is_some_and(|id| ids.contains(id))
    })
    .await
}

/// Replays up to `limit` dead letters that `wanted` picks. A letter not
/// picked (or without its original route) is left unacknowledged, so it
/// returns to its place when the channel closes.
async fn replay_matching(
    conn: &Connection,
    queue: &str,
    limit: usize,
    wanted: impl Fn(&Properties) -> bool,
) -> Result<usize> {
    let reader = Reader::open(conn, queue).await?;
    let dead = reader.dead.clone();
    let producer = Producer::new(
        conn,
        ProducerSettings {
            name: "dead-replay".into(),
            auto_declare: false,
            message_ids: false,
            ..ProducerSettings::default()
        },
    )
    .await?;
    let mut n = 0;
    while n < limit {
        let Some((tag, properties, body)) = reader.next().await? else {
            break;
        };
        if !wanted(&properties) {
            continue;
        }
        // Like a retry, a replay starts a new trace linked to the old one.
        let link = Link::from_headers(&properties.headers);
        let Some(message) = retry::for_replay(body, properties) else {
            tracing::warn!(queue = %dead, "a dead letter without its original route was left in place");
            continue;
        };
        match producer.publish_with(message, &Parent::Linked(link)).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Invalid => {
                // It cannot go back as it is (a route past a protocol
                // limit): it stays, and the others go on.
                tracing::warn!(queue = %dead, error = %e, "a dead letter that cannot be replayed was left in place");
                continue;
            }
            Err(e) => return Err(e),
        }
        reader.ack(tag).await?;
        n += 1;
    }
    reader.close().await;
    Ok(n)
}

/// Deletes every dead letter of `queue`; returns how many.
pub async fn purge(conn: &Connection, queue: &str) -> Result<u32> {
    conn.purge(&dead_queue_of(queue)).await
}

/// Deletes the `count` oldest dead letters of `queue` (fewer if there are
/// fewer); returns how many.
pub async fn purge_oldest(conn: &Connection, queue: &str, count: usize) -> Result<usize> {
    let reader = Reader::open(conn, queue).await?;
    let mut n = 0;
    while n < count {
        let Some((tag, _, _)) = reader.next().await? else {
            break;
        };
        reader.ack(tag).await?;
        n += 1;
    }
    reader.close().await;
    Ok(n)
}
