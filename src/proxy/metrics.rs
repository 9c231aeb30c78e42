//! The proxy's Prometheus metrics, on its own registry (no global recorder), served at
//! `GET /metrics` on `--metrics-listen`. Labelled by app: a proxy routes few apps.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `stevedore_proxy_connections_total` | counter | `app` |
//! | `stevedore_proxy_connections_open` | gauge | `app` |
//! | `stevedore_proxy_bytes_total` | counter | `app`, `direction` = in (client to app), out |
//! | `stevedore_proxy_switches_total` | counter | `app` |
//! | `stevedore_proxy_backend_connect_failures_total` | counter | `app` |
//! | `stevedore_proxy_connections_cut_total` | counter | `app` (open when a drain timed out) |
//! | `stevedore_proxy_routes` | gauge | |

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "stevedore_proxy_connections_total",
        "Client connections accepted on an app's public port.",
    ),
    (
        "stevedore_proxy_connections_open",
        "Client connections open now (to the current backend or one being drained).",
    ),
    (
        "stevedore_proxy_bytes_total",
        "Bytes forwarded: in = from clients to the app, out = from the app to clients.",
    ),
    (
        "stevedore_proxy_switches_total",
        "Times an app's route moved to another backend.",
    ),
    (
        "stevedore_proxy_backend_connect_failures_total",
        "Client connections closed because the backend did not accept a connection.",
    ),
    (
        "stevedore_proxy_connections_cut_total",
        "Connections to a previous backend closed by the proxy when the drain timeout ended.",
    ),
    ("stevedore_proxy_routes", "Routes the proxy holds."),
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// The proxy's metric registry.
pub(crate) struct ProxyMetrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

/// One app's series, registered once per route.
#[derive(Clone)]
pub(crate) struct AppMetrics {
    pub(crate) connections: Counter,
    pub(crate) open: Gauge,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) switches: Counter,
    pub(crate) connect_failures: Counter,
    pub(crate) cut: Counter,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    pub(crate) fn new() -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        for (name, help) in DESCRIPTIONS {
            let help = SharedString::const_str(help);
            if name.ends_with("_total") {
                recorder.describe_counter((*name).into(), None, help);
            } else {
                recorder.describe_gauge((*name).into(), None, help);
            }
        }
        Self { recorder, handle }
    }

    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels
            .iter()
            .map(|(k, v)| Label::new(*k, v.to_string()))
            .collect();
        Key::from_parts(name, labels)
    }

    fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        let counter = self
            .recorder
            .register_counter(&Self::key(name, labels), &METADATA);
        // Present from the start, so a scrape shows 0 rather than nothing.
        counter.increment(0);
        counter
    }

    /// The series of `app` (the same handles each time it is asked).
    pub(crate) fn app(&self, app: &str) -> AppMetrics {
        let l = [("app", app)];
        AppMetrics {
            connections: self.counter("stevedore_proxy_connections_total", &l),
            open: self.recorder.register_gauge(
                &Self::key("stevedore_proxy_connections_open", &l),
                &METADATA,
            ),
            bytes_in: self.counter(
                "stevedore_proxy_bytes_total",
                &[("app", app), ("direction", "in")],
            ),
            bytes_out: self.counter(
                "stevedore_proxy_bytes_total",
                &[("app", app), ("direction", "out")],
            ),
            switches: self.counter("stevedore_proxy_switches_total", &l),
            connect_failures: self.counter("stevedore_proxy_backend_connect_failures_total", &l),
            cut: self.counter("stevedore_proxy_connections_cut_total", &l),
        }
    }

    pub(crate) fn set_routes(&self, n: usize) {
        self.recorder
            .register_gauge(&Self::key("stevedore_proxy_routes", &[]), &METADATA)
            .set(n as f64);
    }

    /// The text exposition (format 0.0.4).
    pub(crate) fn render(&self) -> String {
        self.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_series_render_with_their_labels() {
        let m = ProxyMetrics::new();
        let web = m.app("web");
        web.connections.increment(2);
        web.bytes_out.increment(10);
        m.app("web").connections.increment(1);
        m.set_routes(1);
        let text = m.render();
        assert!(
            text.contains(r#"stevedore_proxy_connections_total{app="web"} 3"#),
            "{text}"
        );
        assert!(
            text.contains(r#"stevedore_proxy_bytes_total{app="web",direction="out"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(r#"stevedore_proxy_switches_total{app="web"} 0"#),
            "{text}"
        );
        assert!(text.contains("stevedore_proxy_routes 1"), "{text}");
        assert!(
            text.contains("# HELP stevedore_proxy_switches_total"),
            "{text}"
        );
    }
}
