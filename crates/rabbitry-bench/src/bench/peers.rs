//! The peers scenario: the same end-to-end work (publish, consume, ack;
//! publisher and consumer on connections of their own) with rabbitry, with
//! raw amqprs and, when Node is installed, with Node's amqplib, in one
//! sitting, round by round interleaved, so that the ratios compare like
//! with like. amqplib's side is this team's script
//! (`crates/rabbitry-bench/peers/amqplib_end_to_end.js`), run by `node`
//! after `npm install amqplib` into a folder of the benchmark's own.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rabbitry::{Error, ErrorKind, Result};

use super::{BenchOptions, Progress, Rounds, ScenarioResult, Sides};

/// The amqplib side's script.
const AMQPLIB_SCRIPT: &str = include_str!("../../peers/amqplib_end_to_end.js");

/// The amqplib major version the script is written for.
const AMQPLIB: &str = "amqplib@0.10";

/// Runs the peers: one scenario per peer, rabbitry against it. amqplib's
/// is left out, with the reason printed, when Node or the package is
/// missing.
pub(crate) async fn run_peers(
    opts: &BenchOptions,
    progress: Progress<'_>,
) -> Result<Vec<ScenarioResult>> {
    let node = match prepare_node().await {
        Ok(dir) => Some(dir),
        Err(why) => {
            eprintln!("\npeers: amqplib left out: {why}");
            None
        }
    };
    let sides = Sides::open(&opts.url, "peers", false).await?;
    let n = opts.messages;
    let mut vs_raw = Rounds::default();
    let mut vs_amqplib = Rounds::default();
    for round in 1..=opts.rounds.max(1) {
        progress(&format!("peers: rabbitry, round {round}"));
        let cpu = super::cpu_time();
        let took = sides.end_to_end(n, true).await?;
        let cpu = super::cpu_time().saturating_sub(cpu);
        vs_raw.record(true, n, took, cpu);
        vs_amqplib.record(true, n, took, cpu);
        sides.purge().await?;
        progress(&format!("peers: raw amqprs, round {round}"));
        vs_raw.measure(false, n, sides.end_to_end(n, false)).await?;
        sides.purge().await?;
        if let Some(dir) = &node {
            progress(&format!("peers: amqplib, round {round}"));
            let (took, cpu) = amqplib_round(dir, &opts.url, &sides.queue, n).await?;
            vs_amqplib.record(false, n, took, cpu);
            sides.purge().await?;
        }
    }
    sides.close().await;
    let mut results = vec![vs_raw.result("peers_end_to_end_rabbitry_vs_raw_amqprs")];
    if node.is_some() {
        results.push(vs_amqplib.result("peers_end_to_end_rabbitry_vs_amqplib"));
    }
    Ok(results)
}

/// A folder with the script and amqplib installed (once, then reused).
async fn prepare_node() -> std::result::Result<PathBuf, String> {
    let version = tokio::process::Command::new("node")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("node is not installed ({e})"))?;
    if !version.status.success() {
        return Err("node --version failed".into());
    }
    let dir = std::env::temp_dir().join("rabbitry-bench-peers");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(dir.join("amqplib_end_to_end.js"), AMQPLIB_SCRIPT)
        .map_err(|e| format!("writing the script: {e}"))?;
    if !dir.join("node_modules/amqplib").exists() {
        let out = tokio::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .arg(AMQPLIB)
            .output()
            .await
            .map_err(|e| format!("npm is not installed ({e})"))?;
        if !out.status.success() {
            return Err(format!(
                "npm install {AMQPLIB} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ));
        }
    }
    Ok(dir)
}

/// One amqplib round: its time from the first publish to the last ack, and
/// its CPU time, as the script measures them.
async fn amqplib_round(
    dir: &Path,
    url: &str,
    queue: &str,
    n: usize,
) -> Result<(Duration, Duration)> {
    let out = tokio::process::Command::new("node")
        .arg(dir.join("amqplib_end_to_end.js"))
        .args([url, queue, &n.to_string()])
        .current_dir(dir)
        .output()
        .await
        .map_err(|e| Error::new(ErrorKind::Invalid, "running node").with_source(e))?;
    let fail = |why: String| Error::new(ErrorKind::Invalid, format!("the amqplib round: {why}"));
    if !out.status.success() {
        return Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()));
    }
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| fail(format!("its report is not JSON ({e})")))?;
    let ms = |k: &str| {
        report[k]
            .as_f64()
            .map(|v| Duration::from_secs_f64(v / 1000.0))
            .ok_or_else(|| fail(format!("its report has no {k}")))
    };
    Ok((ms("ms")?, ms("cpu_ms")?))
}
