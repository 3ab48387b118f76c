//! `rabbitry-bench --only cluster` against the local cluster of
//! `scripts/cluster`, which it starts and stops itself. A test binary of
//! its own: it kills cluster nodes (never the main broker).

use std::path::PathBuf;
use std::process::Command;

#[test]
fn the_cluster_bench_reports_quorum_throughput_and_failover_times() {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster");
    // The bench starts the cluster when it is down, and stops it after.
    let _ = Command::new(&script).arg("stop").status();
    let out = Command::new(env!("CARGO_BIN_EXE_rabbitry-bench"))
        .args(["--json", "--only", "cluster", "--messages", "500"])
        .args([
            "--rounds",
            "1",
            "--failover-rounds",
            "2",
            "--cluster-script",
        ])
        .arg(&script)
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "error")
        .output()
        .expect("run rabbitry-bench");
    let status = Command::new(&script).arg("status").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "cluster_quorum_publish_persistent_confirms_1000_in_flight",
            "cluster_quorum_end_to_end_two_connections"
        ]
    );
    for s in report["scenarios"].as_array().unwrap() {
        assert!(s["raw_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["gateway_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
    let failovers = report["failovers"].as_array().unwrap();
    assert_eq!(failovers.len(), 2, "{report}");
    for f in failovers {
        assert_eq!(f["rounds"], 2, "{f}");
        let (median, worst) = (
            f["median_ms"].as_f64().unwrap(),
            f["worst_ms"].as_f64().unwrap(),
        );
        assert!(median > 0.0 && worst >= median, "{f}");
    }
    // It stopped the cluster it started.
    let status = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.matches("down").count(), 3, "{status}");
}
