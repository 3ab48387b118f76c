//! The local three-node cluster of `scripts/cluster`, for the failover
//! tests: start it, kill and revive its nodes, ask where things are.

use std::path::PathBuf;
use std::process::Command;

/// The script, from the workspace root.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster")
}

/// Runs `scripts/cluster ARGS`; its stdout, or `None` when it fails.
fn run(args: &[&str]) -> Option<String> {
    let out = Command::new(script())
        .args(args)
        .output()
        .expect("run scripts/cluster");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The AMQP URLs of the three nodes, node 1 first.
pub fn urls() -> Vec<String> {
    (1..=3)
        .map(|n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", 5680 + n))
        .collect()
}

/// Starts the cluster (a no-op for nodes already up); stops it and deletes
/// its data when the guard is dropped, even when the test fails.
pub fn start() -> Stop {
    assert!(run(&["start"]).is_some(), "scripts/cluster start failed");
    Stop
}

/// Stops the cluster when dropped (see [`start`]).
#[derive(Debug)]
pub struct Stop;

impl Drop for Stop {
    fn drop(&mut self) {
        let _ = run(&["stop"]);
    }
}

/// SIGKILLs node `n` (1, 2 or 3).
pub fn kill(n: u8) {
    assert!(run(&["kill", &n.to_string()]).is_some(), "kill node {n}");
}

/// Starts node `n` again and waits until it is up.
pub fn revive(n: u8) {
    assert!(
        run(&["revive", &n.to_string()]).is_some(),
        "revive node {n}"
    );
}

/// The node that leads quorum queue `queue`.
pub fn leader(queue: &str) -> Option<u8> {
    run(&["leader", queue])?.parse().ok()
}

/// The node the connection with client-given name `name` is on.
pub fn node_of(name: &str) -> Option<u8> {
    run(&["connection", name])?.parse().ok()
}

/// A file the script made in the cluster's TLS folder: `ca.pem`,
/// `client.pem`, `client.key`, `other-ca.pem`, ...
pub fn tls_file(name: &str) -> PathBuf {
    let base = std::env::var_os("RABBITRY_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/rabbitry-cluster"));
    base.join("tls").join(name)
}

/// The `amqps://` URL of node `n` reached as `host` (the nodes'
/// certificate names `localhost` only), with `query` appended.
pub fn tls_url(n: u8, host: &str, query: &str) -> String {
    format!(
        "amqps://guest:guest@{host}:{}/%2f?{query}",
        5690 + u16::from(n)
    )
}

/// What `rabbitmqctl ARGS` prints against node `n`, or `None` when it fails.
pub fn ctl(n: u8, args: &[&str]) -> Option<String> {
    let n = n.to_string();
    let mut all = vec!["ctl", n.as_str()];
    all.extend_from_slice(args);
    run(&all)
}
