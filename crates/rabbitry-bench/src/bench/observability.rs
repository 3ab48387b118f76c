//! What watching costs: the worker scenarios with metrics and tracing on
//! against the same scenarios with them off, in one process, rounds
//! interleaved.
//!
//! "On" is what `rabbitry worker --admin` runs with, plus tracing: the
//! Prometheus recorder, and an OpenTelemetry tracer provider whose batch
//! processor hands every span to an exporter that drops it. "Off" is no
//! recorder and no tracer provider. Both are switched per worker start:
//! the worker resolves its metric handles when it starts, and each span
//! asks the global provider, so a worker started while off records
//! nothing, and one started while on records everything.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

use rabbitry::{Error, ErrorKind, Result};

use super::worker::{worker_case, WorkerBench};
use super::*;

/// A recorder that hands out real handles only while switched on.
struct Switch<R> {
    inner: R,
    on: Arc<AtomicBool>,
}

impl<R: Recorder> Recorder for Switch<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description);
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description);
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description);
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if self.on.load(Ordering::SeqCst) {
            self.inner.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// An exporter that drops every span it is given.
#[derive(Debug)]
struct Discard;

impl SpanExporter for Discard {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        drop(batch);
        Ok(())
    }
}

/// Turns metrics and tracing on or off for what starts next.
struct Observability {
    metrics: Arc<AtomicBool>,
}

impl Observability {
    /// Installs the switched recorder; fails when the process has another.
    fn install() -> Result<Observability> {
        let recorder = rabbitry::admin::prometheus_recorder();
        rabbitry::admin::spawn_upkeep(&recorder.handle());
        let metrics = Arc::new(AtomicBool::new(false));
        metrics::set_global_recorder(Switch {
            inner: recorder,
            on: metrics.clone(),
        })
        .map_err(|_| {
            Error::new(
                ErrorKind::Invalid,
                "a metrics recorder is installed already (drop --metrics for this group)",
            )
        })?;
        Ok(Observability { metrics })
    }

    fn set(&self, on: bool) {
        self.metrics.store(on, Ordering::SeqCst);
        if on {
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(Discard)
                .build();
            opentelemetry::global::set_tracer_provider(provider);
        } else {
            opentelemetry::global::set_tracer_provider(
                opentelemetry::trace::noop::NoopTracerProvider::new(),
            );
        }
    }
}

/// The worker scenarios with observability off (reported as the `raw`
/// side) and on (the `gateway` side): the ratio is on / off.
pub(crate) async fn run_observability<Svc, RB>(
    opts: &BenchOptions,
    progress: Progress<'_>,
    service: Svc,
) -> Result<Vec<ScenarioResult>>
where
    Svc: rabbitry::worker::http::RequestService<RB>,
    RB: rabbitry::worker::http::ResponseBody,
{
    let switch = Observability::install()?;
    let bench = WorkerBench::open(opts, "observed").await?;
    let n = opts.messages;
    let mut out = Vec::new();
    for (name, native) in [
        ("observed_worker_native_handler", true),
        ("observed_worker_axum_router", false),
    ] {
        let mut rounds = Rounds::default();
        for round in 0..opts.rounds.max(1) {
            for on in [false, true] {
                let side = if on { "on" } else { "off" };
                progress(&format!(
                    "{name}: metrics and tracing {side}, round {}",
                    round + 1
                ));
                switch.set(on);
                let case = worker_case(
                    &opts.url,
                    &bench.raw_publisher,
                    &bench.queue,
                    n,
                    native,
                    service.clone(),
                );
                rounds.measure(on, n, case).await?;
                purge(&bench.raw, &bench.queue).await?;
            }
        }
        switch.set(false);
        out.push(rounds.result(name));
    }
    bench.close().await;
    Ok(out)
}
