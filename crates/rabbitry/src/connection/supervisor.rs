//! The supervisor task: notices a lost socket and makes a new one.

use std::sync::atomic::Ordering;
use std::sync::Weak;
use std::time::Duration;

use amqprs::callbacks::ConnectionCallback;
use amqprs::connection::{Connection as AmqpConnection, OpenConnectionArguments};
use amqprs::security::SecurityCredentials;
use amqprs::Close;

use super::backoff::Backoff;
use super::{
    close_quietly, AuthMechanism, ChannelWatch, ConnectionSettings, Endpoint, Peer, Shared,
};
use crate::error::{Error, ErrorKind, Result};
use crate::task::CancellationToken;
use crate::topology::Topology;
use crate::wire::{self, WireChannel, WireConnection};

/// How long one TCP connect plus AMQP handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tries each endpoint once, in a new random order each time unless the
/// settings keep the given order; returns the first that connects, or the
/// last error.
pub(super) async fn connect_any(
    settings: &ConnectionSettings,
    endpoints: &[Endpoint],
) -> Result<(WireConnection, Peer)> {
    let mut order: Vec<&Endpoint> = endpoints.iter().collect();
    if !settings.keep_url_order {
        shuffle(&mut order);
    }
    let mut last = None;
    for ep in order {
        match connect(settings, ep).await {
            Ok(conn) => return Ok((conn, Peer::of(ep))),
            Err(err) => {
                tracing::warn!(connection = %settings.name, %ep, error = %err, "connect failed");
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::config("no broker URL given")))
}

async fn connect(settings: &ConnectionSettings, ep: &Endpoint) -> Result<WireConnection> {
    #[cfg(feature = "testing")]
    if ep.in_memory {
        return Ok(WireConnection::in_memory(&ep.host));
    }
    let credentials = match ep.options.auth_mechanism.unwrap_or(AuthMechanism::Plain) {
        AuthMechanism::Plain => SecurityCredentials::new_plain(&ep.user, &ep.password),
        AuthMechanism::AmqPlain => SecurityCredentials::new_amqplain(&ep.user, &ep.password),
        AuthMechanism::External => SecurityCredentials::new_external(),
    };
    let mut args = OpenConnectionArguments::new(&ep.host, ep.port, &ep.user, &ep.password);
    args.virtual_host(&ep.vhost)
        .credentials(credentials)
        .heartbeat(ep.options.heartbeat.unwrap_or(settings.heartbeat))
        .connection_name(&client_provided_name(&settings.name));
    #[cfg(feature = "tls")]
    let handshake = if ep.tls {
        let handshake = super::tls::Handshake::new(&settings.tls.with_url(&ep.options), ep)?;
        args.tls_adaptor(handshake.adaptor.clone());
        Some(handshake)
    } else {
        None
    };
    let failed = |err: amqprs::error::Error| {
        #[cfg(feature = "tls")]
        if let Some(handshake) = &handshake {
            if let Some(err) = handshake.rejected(ep) {
                return err;
            }
            if let Some(explained) = super::tls::explain(ep, &err.to_string()) {
                return explained.with_source(err);
            }
        }
        classify(ep, err)
    };
    let timeout = ep.options.connection_timeout.unwrap_or(CONNECT_TIMEOUT);
    let conn = match tokio::time::timeout(timeout, AmqpConnection::open(&args)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            let err = failed(err);
            if !ep.tls && err.kind() == ErrorKind::AccessRefused && !speaks_amqp(ep).await {
                return Err(Error::new(
                    ErrorKind::Connect,
                    format!(
                        "{}: the port does not answer in plain AMQP; if it is a TLS port \
                         (usually 5671), use amqps://",
                        ep.address()
                    ),
                )
                .with_source(err));
            }
            return Err(err);
        }
        Err(_) => {
            return Err(Error::new(
                ErrorKind::Connect,
                format!("{}: no answer within {timeout:?}", ep.address()),
            ))
        }
    };
    conn.register_callback(Logger {
        name: settings.name.clone(),
    })
    .await
    .map_err(failed)?;
    let server = conn.server_properties();
    tracing::info!(
        connection = %settings.name,
        node = %ep,
        server = %format_args!("{} {}", server.product(), server.version()),
        "connected to node"
    );
    Ok(WireConnection::Amqp(conn))
}

/// Whether `ep`'s port answers an AMQP protocol header with an AMQP frame.
/// Asked when the socket closed during the handshake, which a broker does
/// both to a refused login and, on a TLS port, to a client that does not
/// speak TLS.
async fn speaks_amqp(ep: &Endpoint) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut socket = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port)).await?;
        socket.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut first = [0u8; 1];
        socket.read_exact(&mut first).await?;
        // 1 is an AMQP method frame (connection.start); a TLS port sends
        // an alert record (21) or closes.
        Ok::<_, std::io::Error>(first[0] == 1)
    };
    // Unsure means yes: the login error stands.
    (tokio::time::timeout(Duration::from_secs(2), probe).await).map_or(true, |r| r.unwrap_or(false))
}

/// The name the broker shows for a connection: the connection's own name,
/// then the process's name and id, so that `rabbitmqctl list_connections`
/// and the management UI tell the processes of a deployment apart.
pub(crate) fn client_provided_name(name: &str) -> String {
    let process = std::env::current_exe()
        .ok()
        .and_then(|path| Some(path.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "rabbitry".to_owned());
    format!("{name} ({process}, pid {})", std::process::id())
}

/// Names the host and says plainly what happened.
fn classify(ep: &Endpoint, err: amqprs::error::Error) -> Error {
    let text = err.to_string();
    let lower = text.to_ascii_lowercase();
    if lower.contains("access_refused")
        || lower.contains("access refused")
        || lower.contains("authentication")
        || lower.contains("login was refused")
    {
        Error::new(
            ErrorKind::AccessRefused,
            format!(
                "{} refused user '{}' on vhost '{}' (access refused)",
                ep.address(),
                ep.user,
                ep.vhost
            ),
        )
        .with_source(err)
    } else if lower.contains("not_allowed") || lower.contains("vhost") {
        Error::new(
            ErrorKind::AccessRefused,
            format!(
                "{} refused vhost '{}' (access refused)",
                ep.address(),
                ep.vhost
            ),
        )
        .with_source(err)
    } else if lower.contains("reset by peer")
        || lower.contains("peer shutdown")
        || lower.contains("unexpected eof")
        || lower.contains("broken pipe")
    {
        // RabbitMQ answers a failed login by dropping the socket, since
        // this client does not ask for `authentication_failure_close`.
        Error::new(
            ErrorKind::AccessRefused,
            format!(
                "{} closed the connection during login (access refused: check user '{}', the password and vhost '{}')",
                ep.address(),
                ep.user,
                ep.vhost
            ),
        )
        .with_source(err)
    } else if lower.contains("refused") {
        Error::new(
            ErrorKind::Connect,
            format!("{}: connection refused", ep.address()),
        )
        .with_source(err)
    } else {
        Error::new(
            ErrorKind::Connect,
            format!("{}: cannot connect", ep.address()),
        )
        .with_source(err)
    }
}

/// Logs what the broker tells the connection.
struct Logger {
    name: String,
}

#[async_trait::async_trait]
impl ConnectionCallback for Logger {
    async fn close(
        &mut self,
        _c: &AmqpConnection,
        close: Close,
    ) -> std::result::Result<(), amqprs::error::Error> {
        tracing::warn!(
            connection = %self.name,
            code = close.reply_code(),
            reason = %close.reply_text(),
            "broker closed the connection"
        );
        Ok(())
    }

    async fn blocked(&mut self, _c: &AmqpConnection, reason: String) {
        tracing::warn!(connection = %self.name, %reason, "broker blocked publishing");
    }

    async fn unblocked(&mut self, _c: &AmqpConnection) {
        tracing::info!(connection = %self.name, "broker unblocked publishing");
    }

    async fn secret_updated(&mut self, _c: &AmqpConnection) {}
}

/// Shuffles `items` with the process's random hasher keys: spreading the
/// clients of a cluster over its nodes needs no stronger randomness.
fn shuffle<T>(items: &mut [T]) {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    for i in (1..items.len()).rev() {
        let j = (state.hash_one(i) % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

/// Declares the remembered topology on a fresh socket, before anyone else
/// uses it, entity by entity: one the broker refuses (its home node is
/// down, a conflicting declaration) is logged and returned, and the rest is
/// declared all the same, so one unavailable queue does not keep every
/// other consumer of the connection down. Fails only when the socket does.
async fn redeclare(conn: &WireConnection, name: &str, topology: &Topology) -> Result<Topology> {
    let mut refused = Topology::default();
    let mut open: Option<(WireChannel, ChannelWatch)> = None;
    for entity in topology.entities() {
        let (channel, watch) = match open.take() {
            Some(c) => c,
            None => recovery_channel(conn).await?,
        };
        match wire::declare(&channel, &watch, &entity).await {
            Ok(_) => open = Some((channel, watch)),
            Err(err) if err.kind() == ErrorKind::Disconnected => {
                close_quietly(channel).await;
                return Err(err);
            }
            Err(err) => {
                // The broker closed this channel; the next entity gets a
                // new one.
                tracing::warn!(connection = %name, error = %err, "declaration refused during recovery; retrying it on its own");
                refused.merge(&entity);
            }
        }
    }
    if let Some((channel, _)) = open {
        close_quietly(channel).await;
    }
    Ok(refused)
}

async fn recovery_channel(conn: &WireConnection) -> Result<(WireChannel, ChannelWatch)> {
    conn.open_channel(None).await.map_err(|e| {
        Error::new(ErrorKind::Disconnected, "opening a channel for recovery").with_source(e)
    })
}

/// Declares what the broker refused during a recovery again, with backoff,
/// until it is all declared or the socket goes (the next recovery then
/// declares everything again).
fn retry_refused(conn: WireConnection, name: String, mut refused: Topology, mut backoff: Backoff) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(backoff.next_delay()).await;
            if !conn.is_open() {
                return;
            }
            match redeclare(&conn, &name, &refused).await {
                Ok(still) if still.is_empty() => {
                    tracing::info!(connection = %name, "refused declarations are declared now");
                    return;
                }
                Ok(still) => refused = still,
                Err(_) => return,
            }
        }
    });
}

pub(super) async fn run(shared: Weak<Shared>, stop: CancellationToken) {
    loop {
        let Some(s) = shared.upgrade() else { return };
        let name = s.settings.name.clone();
        let (conn, generation) = {
            let link = s.link.borrow();
            (link.conn.clone(), link.generation)
        };
        drop(s);
        let Some(conn) = conn else { return };

        let stopping = tokio::select! {
            _ = conn.lost() => false,
            _ = stop.cancelled() => true,
        };
        if stopping {
            // Bounded: a close the broker does not answer must not hang.
            if tokio::time::timeout(CONNECT_TIMEOUT, conn.close())
                .await
                .is_err()
            {
                tracing::warn!(connection = %name, "close got no answer; dropping the socket");
            }
            if let Some(s) = shared.upgrade() {
                s.link.send_modify(|l| {
                    l.conn = None;
                    l.closed = true;
                });
            }
            tracing::info!(connection = %name, "closed");
            return;
        }
        drop(conn);
        let Some(s) = shared.upgrade() else { return };
        s.link.send_modify(|l| l.conn = None);
        s.meters.up.set(0.0);
        tracing::warn!(connection = %name, generation, "connection lost; recovering");
        let mut backoff = Backoff::new(s.settings.backoff_initial, s.settings.backoff_max);
        drop(s);

        loop {
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => {
                    if let Some(s) = shared.upgrade() {
                        s.link.send_modify(|l| l.closed = true);
                    }
                    return;
                }
            }
            let Some(s) = shared.upgrade() else { return };
            let remembered = super::lock(&s.topology).clone();
            let attempt = match connect_any(&s.settings, &s.endpoints).await {
                Ok((conn, peer)) => match redeclare(&conn, &name, &remembered).await {
                    Ok(refused) => Ok((conn, peer, refused)),
                    Err(err) => {
                        let _ = conn.close().await;
                        Err(err)
                    }
                },
                Err(err) => Err(err),
            };
            match attempt {
                Ok((conn, peer, refused)) => {
                    if !refused.is_empty() {
                        let n = refused.entities().len() as u64;
                        s.refused_declarations.fetch_add(n, Ordering::Relaxed);
                        s.meters.declarations_refused.increment(n);
                        retry_refused(
                            conn.clone(),
                            name.clone(),
                            refused,
                            Backoff::new(s.settings.backoff_initial, s.settings.backoff_max),
                        );
                    }
                    s.link.send_modify(|l| {
                        l.generation += 1;
                        l.conn = Some(conn);
                        l.peer = Some(peer);
                    });
                    s.meters.up.set(1.0);
                    s.meters.reconnects.increment(1);
                    tracing::info!(connection = %name, generation = generation + 1, "recovered");
                    break;
                }
                Err(err) => {
                    tracing::warn!(connection = %name, error = %err, ?delay, "recovery attempt failed");
                }
            }
        }
    }
}
