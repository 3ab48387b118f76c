//! A TCP proxy to the broker under test, for cutting connections for real.

use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
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
}

impl Proxy {
    /// Listens on a free loopback port.
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream_addr = broker::address();
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let tracked = conns.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let upstream_addr = upstream_addr.clone();
                let task = tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(&upstream_addr).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
                tracked.lock().unwrap().push(task);
            }
        });
        Proxy {
            port,
            conns,
            accept,
        }
    }

    /// The AMQP URL through the proxy (guest/guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
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
