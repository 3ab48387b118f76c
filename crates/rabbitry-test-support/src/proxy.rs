//! A TCP proxy to the broker under test, for cutting connections for real.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::broker;

/// A TCP proxy to the broker (the host and port of `AMQP_URL`, else
/// 127.0.0.1:5672). [`Proxy::cut`] drops every connection through it, as a
/// network failure would.
#[derive(Debug)]
pub struct Proxy {
    /// The port it listens on (loopback).
    pub port: u16,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    held: watch::Sender<bool>,
}

impl Proxy {
    /// Listens on a free loopback port.
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream_addr = broker::address();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = conns.clone();
        let (held, holding) = watch::channel(false);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream_addr = upstream_addr.clone();
                let mut holding = holding.clone();
                let task = tokio::spawn(async move {
                    let Ok(upstream) = TcpStream::connect(&upstream_addr).await else {
                        return;
                    };
                    let (mut from_client, mut to_client) = client.split();
                    let (mut from_broker, mut to_broker) = upstream.into_split();
                    let up = tokio::io::copy(&mut from_client, &mut to_broker);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = from_broker.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<_, std::io::Error>(());
                            }
                            // Held: keep the bytes until released.
                            let _ = holding.wait_for(|held| !*held).await;
                            to_client.write_all(&buf[..n]).await?;
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                    }
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Proxy {
            port,
            conns,
            accept,
            held,
        }
    }

    /// The AMQP URL through the proxy (guest/guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Holds back everything the broker sends through the proxy until
    /// [`Proxy::release`]; the clients' bytes still reach the broker.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Lets the held bytes, and what follows, through again.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// Cuts every connection open through the proxy; returns how many.
    pub fn cut(&self) -> usize {
        let tasks: Vec<_> = self.conns.lock().unwrap().drain(..).collect();
        let n = tasks.len();
        for t in tasks {
            t.abort();
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
