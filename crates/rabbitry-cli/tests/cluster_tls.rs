//! The command line against the local cluster of `scripts/cluster`:
//! `amqps://` URLs as the README writes them. A test binary of its own: it
//! starts the cluster (never touching the main broker).

use std::process::Command;

use rabbitry_test_support::cluster;

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
