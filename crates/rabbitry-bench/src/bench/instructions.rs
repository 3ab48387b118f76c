//! A measure that does not drift: instructions per message, counted by
//! valgrind's callgrind on a fixed small workload, for the raw client and
//! for the gateway, so that a change of a few percent shows where timings
//! move by 30 % between runs.
//!
//! The benchmark runs itself as a child under callgrind, once with `n`
//! messages and once with `2n`; the difference divided by `n` is the cost
//! of a message, without the connection and declaration around it. Every
//! thread of the process counts (the client's I/O tasks included); the
//! broker, another process, does not.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use super::publishing::publish_case;
use super::{Progress, Sides};
use rabbitry::{Error, ErrorKind, Result};

/// The workloads counted: each scenario, raw and through the gateway.
pub(crate) const WORKLOADS: [&str; 2] =
    ["publish_persistent_confirms", "end_to_end_two_connections"];

/// One scenario's instructions per message on each side.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstructionCount {
    /// The scenario.
    pub name: String,
    /// Instructions per message, raw client.
    pub raw_per_message: u64,
    /// Instructions per message, through the gateway.
    pub gateway_per_message: u64,
    /// gateway / raw.
    pub ratio: f64,
    /// Messages in the smaller run (the larger has twice as many).
    pub messages: usize,
}

/// Counts every workload on both sides: four callgrind runs per scenario.
pub(crate) fn run_instructions(
    url: &str,
    messages: usize,
    progress: Progress<'_>,
) -> Result<Vec<InstructionCount>> {
    let version = Command::new("valgrind").arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        return Err(Error::new(
            ErrorKind::NotFound,
            "valgrind is not installed (Debian: apt-get install valgrind); instruction counts need its callgrind",
        ));
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::new(ErrorKind::Invalid, "the benchmark's own path").with_source(e))?;
    let mut counts = Vec::new();
    for name in WORKLOADS {
        let mut per_message = [0u64; 2];
        for (i, side) in ["raw", "gateway"].into_iter().enumerate() {
            progress(&format!(
                "instructions: {name}, {side} ({messages} messages)"
            ));
            let small = callgrind(&exe, url, side, name, messages)?;
            progress(&format!(
                "instructions: {name}, {side} ({} messages)",
                2 * messages
            ));
            let large = callgrind(&exe, url, side, name, 2 * messages)?;
            per_message[i] = large.saturating_sub(small) / messages.max(1) as u64;
        }
        counts.push(InstructionCount {
            name: name.to_owned(),
            raw_per_message: per_message[0],
            gateway_per_message: per_message[1],
            ratio: per_message[1] as f64 / per_message[0].max(1) as f64,
            messages,
        });
    }
    Ok(counts)
}

/// The instructions one child run executes: `--workload side:name`.
fn callgrind(exe: &Path, url: &str, side: &str, name: &str, messages: usize) -> Result<u64> {
    let out = std::env::temp_dir().join(format!(
        "rabbitry-bench-callgrind-{}-{side}-{name}-{messages}.out",
        std::process::id()
    ));
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(exe)
        .args(["--url", url, "--workload"])
        .arg(format!("{side}:{name}"))
        .args(["--messages", &messages.to_string()])
        .env("RABBITRY_LOG", "error")
        .output()
        .map_err(|e| Error::new(ErrorKind::Invalid, "running valgrind").with_source(e))?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if !run.status.success() {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "the {side} {name} workload under callgrind failed: {}",
                String::from_utf8_lossy(&run.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ),
        ));
    }
    total(&text).ok_or_else(|| {
        Error::new(
            ErrorKind::Invalid,
            format!("callgrind's output for the {side} {name} workload has no total"),
        )
    })
}

/// The `summary:` (or `totals:`) line of a callgrind output file: the
/// instructions of the whole run.
fn total(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// The child's side: one run of workload `which` (`raw:NAME` or
/// `gateway:NAME`) with `n` messages, on a queue of its own.
pub(crate) async fn workload(url: &str, which: &str, n: usize) -> Result<()> {
    let (side, name) = which
        .split_once(':')
        .filter(|(s, n)| matches!(*s, "raw" | "gateway") && WORKLOADS.contains(n))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Invalid,
                format!("--workload {which}: expected raw:NAME or gateway:NAME, NAME one of {WORKLOADS:?}"),
            )
        })?;
    let gateway = side == "gateway";
    let sides = Sides::open(url, "instructions", false).await?;
    let result = match name {
        "publish_persistent_confirms" => {
            publish_case(&sides.raw, &sides.gw, &sides.queue, n, gateway, true).await
        }
        _ => sides.end_to_end(n, gateway).await,
    };
    let _ = sides.purge().await;
    sides.close().await;
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_callgrind_output() {
        let text = "version: 1\ncmd: x\nevents: Ir\nsummary: 123456789\ntotals: 1\n";
        assert_eq!(total(text), Some(123_456_789));
        assert_eq!(total("events: Ir\ntotals: 42\n"), Some(42));
        assert_eq!(total("events: Ir\n"), None);
    }
}
