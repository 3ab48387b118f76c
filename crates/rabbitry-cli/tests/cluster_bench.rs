//! The command line against the local cluster of `scripts/cluster`:
//! `rabbitry bench --only cluster`, which starts and stops the cluster
//! itself, and `amqps://` URLs as the README writes them. A test binary of
//! its own: it kills cluster nodes (never the main broker). Its tests
//! share the cluster and run one at a time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use rabbitry_test_support::cluster;

static SERIAL: Mutex<()> = Mutex::new(());

fn rabbitry(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(args)
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "error")
        .output()
        .expect("run rabbitry")
}

#[test]
fn the_command_line_speaks_amqps_with_the_readmes_url_keys() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let _cluster = cluster::start();
    let ca = cluster::tls_file("ca.pem").display().to_string();
    let queue = rabbitry_test_support::unique("cli.tls");
    let url = cluster::tls_url(1, "localhost", &format!("cacertfile={ca}"));
    // Over TLS: declare a queue, publish to it and read the message back.
    let dir = std::env::temp_dir().join(rabbitry_test_support::unique("cli.tls.cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("tls.toml");
    std::fs::write(&config, format!("[consumers.c]\nqueue = \"{queue}\"\n")).unwrap();
    let config = config.to_str().unwrap();
    for args in [
        vec!["--url", &url, "-c", config, "declare"],
        vec![
            "--url",
            &url,
            "publish",
            "--routing-key",
            &queue,
            "over TLS",
        ],
    ] {
        let out = rabbitry(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = rabbitry(&["--url", &url, "consume", &queue, "--count", "1", "--ack"]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("over TLS"), "{line}");
    // Another CA: refused, and the reason is printed.
    let other = cluster::tls_url(
        1,
        "localhost",
        &format!("cacertfile={}", cluster::tls_file("other-ca.pem").display()),
    );
    let out = rabbitry(&["--url", &other, "queues", &queue]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("certificate not trusted"), "{err}");
}

#[test]
fn the_cluster_bench_reports_quorum_throughput_and_failover_times() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/cluster");
    // The bench starts the cluster when it is down, and stops it after.
    let _ = Command::new(&script).arg("stop").status();
    let out = Command::new(env!("CARGO_BIN_EXE_rabbitry"))
        .args(["bench", "--json", "--only", "cluster", "--messages", "500"])
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
        .expect("run rabbitry bench");
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
