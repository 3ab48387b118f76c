//! The broker under test and its own tools.

use std::process::Command;
use std::time::Duration;

/// The broker's URL: `AMQP_URL`, else the local one.
pub fn url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `host:port` of [`url`].
pub fn address() -> String {
    let url = url();
    let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let hostport = authority.rsplit('@').next().unwrap_or(authority);
    if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:5672")
    }
}

/// Whether the broker accepts TCP connections.
pub fn port_open() -> bool {
    let Ok(addr) = address().parse() else {
        return false;
    };
    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// Runs `rabbitmqctl` with `args`; panics if it fails.
pub fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("run rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

/// Closes the broker-side connections whose client-given name is `name`,
/// with `rabbitmqctl close_connection`. Returns how many were closed.
pub fn close_connection(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| names(l, name)) {
        let pid = line.split('\t').next().unwrap_or_default().trim();
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a rabbitry test"])
            .status()
            .expect("run rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

/// Stops the broker's app (`rabbitmqctl stop_app`) and returns a guard
/// that starts it again when dropped, even when the test fails, and waits
/// for its port. Tests that use it live in test binaries of their own.
#[must_use = "the broker starts again when the guard is dropped"]
pub fn stop() -> StartAgain {
    rabbitmqctl(&["stop_app"]);
    StartAgain
}

/// Starts the broker's app again when dropped (see [`stop`]).
#[derive(Debug)]
pub struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["start_app"]).status();
        for _ in 0..300 {
            if port_open() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Whether the broker has a connection whose client-given name is `name`
/// (`rabbitmqctl list_connections`).
pub fn has_connection(name: &str) -> bool {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| names(l, name))
}

/// Whether a line of `rabbitmqctl list_connections` holds the connection
/// `name`: rabbitry shows it as `name (process, pid N)`, other clients as
/// given.
fn names(line: &str, name: &str) -> bool {
    line.contains(&format!("\"{name}\"")) || line.contains(&format!("\"{name} ("))
}

/// The full client-provided name of the broker's connection `name`
/// (`shop (worker, pid 4242)` for rabbitry's connection `shop`).
pub fn connection_name(name: &str) -> Option<String> {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let start = format!("{{\"connection_name\",\"{name}");
    let at = text.find(&start)? + start.len() - name.len();
    let rest = &text[at..];
    Some(rest[..rest.find('"')?].to_owned())
}

/// The heartbeat (seconds) the broker agreed with the connection whose
/// client-given name is `name`, as `rabbitmqctl` reports it.
pub fn connection_heartbeat(name: &str) -> Option<u32> {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "timeout", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|line| names(line, name))
        .and_then(|line| line.split_whitespace().next()?.parse().ok())
}

/// A queue's type and arguments as `rabbitmqctl list_queues` prints them
/// (`quorum`, `[{"x-queue-type","quorum"},...]`), if the queue exists.
pub fn queue_type_and_arguments(queue: &str) -> Option<(String, String)> {
    let out = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "name", "type", "arguments"])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut fields = line.split('\t');
            (fields.next()? == queue).then(|| {
                let kind = fields.next().unwrap_or_default().to_owned();
                (kind, fields.next().unwrap_or_default().to_owned())
            })
        })
}
