//! `rabbitry-bench` as a process against the local broker: its report,
//! and its refusal of bad flags.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rabbitry-bench"))
        .args(args)
        .env_remove("AMQP_URL")
        .env("RABBITRY_LOG", "error")
        .output()
        .expect("run rabbitry-bench")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bench_json_reports_medians_spreads_and_cpu_per_scenario() {
    let out = bench(&[
        "--json",
        "--only",
        "core,http,observability",
        "--messages",
        "300",
        "--rounds",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scenarios = report["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 7, "{report}");
    for name in [
        "worker_http_dispatch_keep_alive",
        "observed_worker_native_handler",
        "observed_worker_axum_router",
    ] {
        assert!(
            scenarios.iter().any(|s| s["name"] == name),
            "{name}: {report}"
        );
    }
    for s in scenarios {
        for key in [
            "raw_msgs_per_s",
            "gateway_msgs_per_s",
            "ratio",
            "raw_spread",
            "gateway_spread",
            "raw_cpu_s_per_100k",
            "gateway_cpu_s_per_100k",
        ] {
            assert!(s[key].as_f64().is_some_and(|v| v >= 0.0), "{key}: {s}");
        }
        assert_eq!(s["rounds"], 3);
        assert!(s["stable"].is_boolean(), "{s}");
        assert!(s["raw_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
}

#[test]
fn bad_flags_are_usage_errors_that_name_the_flag() {
    for (args, names) in [
        (vec!["--only", "nope"], "nope"),
        (vec!["--rounds", "0"], "--rounds"),
        (vec!["--messages", "0"], "--messages"),
        // The observability group compares with and without metrics.
        (vec!["--metrics"], "--metrics"),
    ] {
        let out = bench(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
}

#[test]
fn instructions_are_counted_per_message_for_both_sides() {
    // valgrind's callgrind counts a small workload twice per side; the
    // difference per message is reported, raw and gateway.
    let out = bench(&["--instructions", "--json", "--messages", "200"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let counts = report["instructions"].as_array().unwrap();
    let names: Vec<&str> = counts.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["publish_persistent_confirms", "end_to_end_two_connections"]
    );
    for c in counts {
        let (raw, gateway) = (
            c["raw_per_message"].as_u64().unwrap(),
            c["gateway_per_message"].as_u64().unwrap(),
        );
        assert!(raw > 0 && gateway > 0, "{c}");
        let ratio = c["ratio"].as_f64().unwrap();
        assert!((ratio - gateway as f64 / raw as f64).abs() < 0.01, "{c}");
        assert_eq!(c["messages"], 200);
    }
    assert!(report["scenarios"].as_array().unwrap().is_empty());
}

#[test]
fn the_peers_scenario_compares_rabbitry_with_raw_amqprs_and_amqplib() {
    let out = bench(&[
        "--only",
        "peers",
        "--json",
        "--messages",
        "300",
        "--rounds",
        "1",
    ]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = report["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names[0], "peers_end_to_end_rabbitry_vs_raw_amqprs");
    // amqplib runs where Node and its package are; otherwise the run says
    // why it left it out.
    match names.get(1) {
        Some(name) => assert_eq!(*name, "peers_end_to_end_rabbitry_vs_amqplib"),
        None => assert!(err.contains("amqplib left out"), "{err}"),
    }
    for s in report["scenarios"].as_array().unwrap() {
        assert!(s["raw_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["gateway_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
    }
}

#[test]
fn in_memory_bench_measures_the_memory_broker_through_rabbitry_and_alone() {
    // No RabbitMQ: the URL points nowhere, and the memory group never
    // connects to it.
    let out = Command::new(env!("CARGO_BIN_EXE_rabbitry-bench"))
        .args([
            "--json",
            "--only",
            "memory",
            "--messages",
            "2000",
            "--rounds",
            "2",
        ])
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("RABBITRY_LOG", "error")
        .output()
        .expect("run rabbitry-bench");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scenarios = report["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 1, "{report}");
    let s = &scenarios[0];
    assert_eq!(s["name"], "in_memory_end_to_end_confirms_acks_256B");
    assert!(s["raw_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["gateway_msgs_per_s"].as_f64().unwrap() > 0.0, "{s}");
}
