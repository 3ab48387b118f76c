//! The broker tests' own helpers: connections to the broker under test.
//! What every test binary shares is in `rabbitry-test-support`.

use std::time::Duration;

use rabbitry::{Connection, ConnectionSettings};
pub(crate) use rabbitry_test_support::broker::{close_connection, url};
pub(crate) use rabbitry_test_support::db::{pg_url, sqlite_url};
pub(crate) use rabbitry_test_support::{eventually, unique, Proxy};

/// Settings for `url` with a quick backoff, named `name`.
pub(crate) fn settings(url: &str, name: &str) -> ConnectionSettings {
    let mut s = ConnectionSettings::new(url).name(name);
    s.backoff_initial = Duration::from_millis(100);
    s.backoff_max = Duration::from_secs(1);
    s
}

/// A connection to the broker under test.
pub(crate) async fn connect() -> Connection {
    Connection::open(settings(&url(), &unique("conn")))
        .await
        .expect("connect to the broker")
}
