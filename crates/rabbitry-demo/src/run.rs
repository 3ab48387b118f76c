//! Running the demo: the parent process (front door and supervisor) and
//! the parts it starts as separate OS processes.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rabbitry::outbox::{Outbox, RelayOptions};
use rabbitry::{Connection, ConnectionSettings, Error, ErrorKind, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{watch, Mutex};

use crate::door::{self, Backends};
use crate::names::Names;
use crate::{db, web, worker};

/// The sites of the picture.
pub const SITES: [&str; 2] = ["a", "b"];

/// Web processes per site.
pub const WEB_PROCESSES: usize = 2;

/// The environment variable that carries the PostgreSQL URL to the parts.
pub const DATABASE_ENV: &str = "RABBITRY_DEMO_DATABASE";

/// What every part needs to know.
#[derive(Debug, Clone)]
pub struct Common {
    /// The broker.
    pub amqp_url: String,
    /// PostgreSQL instead of SQLite (one schema per site).
    pub database: Option<String>,
    /// Where the SQLite files live.
    pub data_dir: PathBuf,
    /// Prefix of queue names and routing keys.
    pub instance: String,
}

impl Common {
    fn names(&self) -> Arc<Names> {
        Arc::new(Names::new(&self.instance))
    }

    fn site_url(&self, site: &str) -> String {
        db::site_url(self.database.as_deref(), &self.data_dir, site)
    }

    /// A part's flags. Nothing secret goes here (`ps` shows it): the broker
    /// URL and the database URL travel in the environment ([`Common::env`]).
    fn args(&self) -> Vec<String> {
        vec![
            "--instance".to_owned(),
            self.instance.clone(),
            "--data-dir".to_owned(),
            self.data_dir.display().to_string(),
            "--watch-stdin".to_owned(),
        ]
    }

    /// A part's environment: the broker URL and the database URL, which may
    /// hold passwords.
    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("AMQP_URL", self.amqp_url.clone())];
        if let Some(d) = &self.database {
            env.push((DATABASE_ENV, d.clone()));
        }
        env
    }
}

/// One process of the picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A site's web process.
    Web {
        /// `a` or `b`.
        site: String,
    },
    /// A site's dedicated worker.
    Worker {
        /// `a` or `b`.
        site: String,
    },
    /// The PDF service.
    Service,
}

impl Part {
    fn label(&self, n: usize) -> String {
        match self {
            Part::Web { site } => format!("site-{site} web {n}"),
            Part::Worker { site } => format!("site-{site} worker"),
            Part::Service => "pdf service".into(),
        }
    }

    fn args(&self) -> Vec<String> {
        match self {
            Part::Web { site } => vec!["web".into(), "--site".into(), site.clone()],
            Part::Worker { site } => vec!["worker".into(), "--site".into(), site.clone()],
            Part::Service => vec!["service".into()],
        }
    }
}

async fn connect(common: &Common, name: &str) -> Result<Connection> {
    let mut s = ConnectionSettings::new(&common.amqp_url).name(name);
    s.backoff_max = Duration::from_secs(5);
    Connection::open(s).await
}

/// Runs one part until `shutdown` resolves. A web process prints
/// `LISTENING <port>` on stdout once it serves.
pub async fn run_part(
    part: Part,
    common: Common,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let names = common.names();
    match part {
        Part::Web { site } => {
            let database = db::open(&common.site_url(&site), &site).await?;
            let outbox = Outbox::with_database(database.clone(), &common.site_url(&site));
            let conn = connect(&common, &format!("demo.site-{site}.web")).await?;
            let relay = outbox.spawn_relay(&conn, RelayOptions::default()).await?;
            // Stopping ends the pages' event streams first, then the server.
            let (stop_tx, stopping) = watch::channel(false);
            tokio::spawn(async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            });
            let mut server_stop = stopping.clone();
            let app = web::router(web::Site {
                site: site.clone(),
                db: database,
                outbox,
                names,
                conn: conn.clone(),
                stopping,
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| {
                    Error::new(ErrorKind::Connect, "binding the web port").with_source(e)
                })?;
            let port = listener
                .local_addr()
                .map_err(|e| Error::new(ErrorKind::Connect, "web port").with_source(e))?
                .port();
            println!("LISTENING {port}");
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = server_stop.wait_for(|stop| *stop).await;
                })
                .await
                .map_err(|e| Error::new(ErrorKind::Closed, "web server").with_source(e))?;
            relay.stop().await?;
            conn.close().await;
            Ok(())
        }
        Part::Worker { site } => {
            let database = db::open(&common.site_url(&site), &site).await?;
            let outbox = Outbox::with_database(database.clone(), &common.site_url(&site));
            let others: Vec<&str> = SITES.iter().copied().filter(|s| *s != site).collect();
            let conn = connect(&common, &format!("demo.site-{site}.worker")).await?;
            let state = worker::SiteWorker {
                site: site.clone(),
                db: database,
                names,
                write: Arc::new(Mutex::new(())),
                job_delay: Duration::from_millis(300),
            };
            let result = worker::site_worker(&conn, state, &others)
                .with_outbox(outbox)
                .run(shutdown)
                .await;
            conn.close().await;
            result
        }
        Part::Service => {
            let conn = connect(&common, "demo.service").await?;
            let result = worker::service_worker(&conn, &names, &common.data_dir)
                .run(shutdown)
                .await;
            conn.close().await;
            result
        }
    }
}

/// Starts every part as its own process (`exe demo-part ...`), restarts a
/// part that dies, serves the front door on `listen`, and stops everything
/// cleanly when `shutdown` resolves. `ready` gets the front door's address.
pub async fn run_demo(
    exe: PathBuf,
    common: Common,
    listen: SocketAddr,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<()> {
    std::fs::create_dir_all(&common.data_dir).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("data dir {}", common.data_dir.display()),
        )
        .with_source(e)
    })?;
    // The front door's address first: a port that is taken is said before
    // anything is created or declared.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::new(ErrorKind::Connect, format!("binding {listen}")).with_source(e))?;
    // Create the schemas once, before the processes race to.
    for site in SITES {
        db::open(&common.site_url(site), site).await?;
    }
    // Declare every exchange, queue and binding before any part runs, so
    // that nothing published early is unroutable.
    declare_topology(&common).await?;
    let backends: Backends = Arc::new(RwLock::new(
        SITES
            .iter()
            .map(|s| ((*s).to_owned(), vec![None; WEB_PROCESSES]))
            .collect(),
    ));
    let (stop, stop_rx) = watch::channel(false);
    let mut supervisors = Vec::new();
    let mut parts = vec![(Part::Service, 0)];
    for site in SITES {
        parts.push((Part::Worker { site: site.into() }, 0));
        for n in 0..WEB_PROCESSES {
            parts.push((Part::Web { site: site.into() }, n));
        }
    }
    for (part, n) in parts {
        supervisors.push(tokio::spawn(supervise(
            exe.clone(),
            common.clone(),
            part,
            n,
            backends.clone(),
            stop_rx.clone(),
        )));
    }
    // Wait until every web process serves before opening the door.
    let wait_ready = async {
        loop {
            let all = backends
                .read()
                .map(|b| b.values().all(|v| v.iter().all(Option::is_some)))
                .unwrap_or(false);
            if all {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), wait_ready)
        .await
        .is_err()
    {
        stop.send_replace(true);
        return Err(Error::new(
            ErrorKind::Timeout,
            "the web processes did not start within 60 s",
        ));
    }
    // The status page of rabbitry's admin routes, for the demo's queues:
    // dead letters can be read and replayed there. Made before the demo
    // says it is ready: from then on, a signal must find the demo
    // listening for it.
    rabbitry::admin::install_prometheus();
    let status_conn = connect(&common, "demo.status").await?;
    let token = std::env::var("RABBITRY_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let admin = status_admin(&common, &status_conn, &token).await?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::new(ErrorKind::Connect, "front door").with_source(e))?;
    ready(addr);
    println!("status: http://{addr}/admin/status (Replay and Purge need the token {token})");
    let mut door_stop = stop_rx.clone();
    let server = tokio::spawn(async move {
        let app = door::router(backends).nest("/admin", admin.router());
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = door_stop.wait_for(|s| *s).await;
            })
            .await;
    });
    shutdown.await;
    eprintln!("demo: stopping every process...");
    stop.send_replace(true);
    for s in supervisors {
        let _ = s.await;
    }
    let _ = server.await;
    status_conn.close().await;
    eprintln!("demo: stopped");
    Ok(())
}

/// The admin routes for the demo's queues (each watched as consumed
/// elsewhere: the parts are other processes) and the sites' outboxes.
async fn status_admin(
    common: &Common,
    conn: &Connection,
    token: &str,
) -> Result<rabbitry::admin::Admin> {
    let names = common.names();
    let mut admin = rabbitry::admin::Admin::new()
        .token(token)
        .connection(conn)
        .queue("pdf service", &names.service_queue(), conn);
    for site in SITES {
        admin = admin
            .queue(
                &format!("site {site} results"),
                &names.results_queue(site),
                conn,
            )
            .queue(&format!("site {site} jobs"), &names.jobs_queue(site), conn)
            .queue(&format!("site {site} feed"), &names.feed_queue(site), conn);
        let url = common.site_url(site);
        admin = admin.outbox(&Outbox::with_database(db::open(&url, site).await?, &url));
    }
    Ok(admin)
}

/// Declares what the parts consume, from the same settings they use.
async fn declare_topology(common: &Common) -> Result<()> {
    let names = common.names();
    let conn = connect(common, "demo.setup").await?;
    let mut consumers = vec![worker::service_consumer(&names)];
    for site in SITES {
        let others: Vec<&str> = SITES.iter().copied().filter(|s| *s != site).collect();
        consumers.extend(worker::site_consumers(&names, site, &others));
    }
    conn.declare_once(&worker::topology(&consumers)).await?;
    conn.close().await;
    Ok(())
}

/// Keeps one part running: starts it, forwards its log lines with a
/// label, records a web process's port, restarts it when it dies, and
/// stops it with SIGTERM (then SIGKILL after 40 s) at shutdown.
async fn supervise(
    exe: PathBuf,
    common: Common,
    part: Part,
    n: usize,
    backends: Backends,
    mut stop: watch::Receiver<bool>,
) {
    let label = part.label(n + 1);
    loop {
        if *stop.borrow() {
            return;
        }
        let mut cmd = tokio::process::Command::new(&exe);
        // The part watches its stdin: when this process dies, even by
        // SIGKILL, the pipe closes and the part stops itself.
        cmd.arg("demo-part")
            .args(part.args())
            .args(common.args())
            .envs(common.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("[{label}] cannot start: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let pid = child.id();
        let _parent_alive = child.stdin.take();
        if let Some(out) = child.stdout.take() {
            let backends = backends.clone();
            let part = part.clone();
            let label = label.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match (line.strip_prefix("LISTENING "), &part) {
                        (Some(port), Part::Web { site }) => {
                            if let (Ok(port), Ok(mut b)) =
                                (port.trim().parse::<u16>(), backends.write())
                            {
                                if let Some(slot) = b.get_mut(site).and_then(|v| v.get_mut(n)) {
                                    *slot = Some(port);
                                }
                            }
                        }
                        _ => eprintln!("[{label}] {line}"),
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let label = label.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("[{label}] {line}");
                }
            });
        }
        let status = tokio::select! {
            s = child.wait() => Some(s),
            _ = stop.wait_for(|s| *s) => None,
        };
        if let Part::Web { site } = &part {
            if let Ok(mut b) = backends.write() {
                if let Some(slot) = b.get_mut(site).and_then(|v| v.get_mut(n)) {
                    *slot = None;
                }
            }
        }
        match status {
            None => {
                // Shutdown: SIGTERM, then wait for a clean exit.
                if let Some(pid) = pid {
                    let _ = tokio::process::Command::new("kill")
                        .args(["-TERM", &pid.to_string()])
                        .status()
                        .await;
                }
                if tokio::time::timeout(Duration::from_secs(40), child.wait())
                    .await
                    .is_err()
                {
                    eprintln!("[{label}] did not stop within 40 s; killing it");
                    let _ = child.kill().await;
                }
                return;
            }
            Some(s) => {
                eprintln!(
                    "[{label}] exited ({}); restarting in 1 s",
                    s.map(|s| s.to_string()).unwrap_or_default()
                );
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}
