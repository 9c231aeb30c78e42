//! The admin API's vocabulary: what a route is, what the proxy reports about it, and the
//! checks a route must pass before anything is bound. Shared by the proxy and its client.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::model::AppName;

/// Where an app's public port forwards to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// The public address the proxy binds (`host_ip:public_port`). Port 0 binds a free
    /// port once; the route then records the port it got, and keeps it.
    pub listen: SocketAddr,
    /// The current version's container, published on a loopback port.
    pub backend: SocketAddr,
    /// Which deployment the backend belongs to (for reports and logs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    /// Which version (image, tag) the backend runs (for reports and logs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Body of `PUT /routes/{app}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetRoute {
    #[serde(flatten)]
    pub route: Route,
    /// How long connections already open to the previous backend may stay open after a
    /// switch (default: the proxy's `--drain-timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_ms: Option<u64>,
}

/// What `GET /routes/{app}` (and every change) answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    pub app: String,
    #[serde(flatten)]
    pub route: Route,
    /// Whether the public port is bound now. It is not while the address is taken by
    /// something else after a restart; the proxy then retries every second.
    pub listening: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_error: Option<String>,
    /// Connections open to the current backend.
    pub open_connections: u64,
    /// Previous backends whose connections are still open after a switch.
    #[serde(default)]
    pub draining: Vec<DrainStatus>,
}

impl RouteStatus {
    /// The drain of `backend`, while connections to it are still open after a switch
    /// (`None` once it is over: every connection closed, or cut at the drain timeout).
    pub fn drain_of(&self, backend: SocketAddr) -> Option<&DrainStatus> {
        self.draining.iter().find(|d| d.backend == backend)
    }
}

/// A previous backend being drained: its open connections are cut when `seconds_left`
/// reaches 0; the entry disappears once they are all closed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DrainStatus {
    pub backend: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) deployment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub open_connections: u64,
    pub seconds_left: f64,
}

/// Every error answer of the admin API: `{"error": "..."}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
}

/// The state file: every route, by app.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RouteTable {
    pub(crate) routes: BTreeMap<String, Route>,
}

/// Why a route was refused (or could not be served).
#[derive(Debug, thiserror::Error)]
pub(crate) enum RouteError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(
        "listen port {port} is privileged (below 1024): start the proxy with --allow-privileged-ports to bind it"
    )]
    PrivilegedPort { port: u16 },
    #[error("listen port {port} is already bound by app {app:?}")]
    PortTaken { port: u16, app: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no route for app {0:?}")]
    NotFound(String),
    #[error(
        "this proxy handed its sockets over to a new proxy and is stopping: send the call again"
    )]
    HandedOver,
    #[error("cannot write the state file {path}: {source}")]
    State {
        path: String,
        source: std::io::Error,
    },
}

/// The checks of a route that need nothing but the route: a valid app name, a backend
/// with a port, a listen port that is not privileged unless allowed.
pub(crate) fn validate(
    app: &str,
    route: &Route,
    allow_privileged_ports: bool,
) -> Result<(), RouteError> {
    AppName::parse(app).map_err(|e| RouteError::InvalidArgument(format!("app: {e}")))?;
    if route.backend.port() == 0 {
        return Err(RouteError::InvalidArgument(
            "backend: port 0 is not an address to connect to".into(),
        ));
    }
    if route.backend.ip().is_unspecified() {
        return Err(RouteError::InvalidArgument(format!(
            "backend: {} is not an address to connect to",
            route.backend.ip()
        )));
    }
    let port = route.listen.port();
    if port != 0 && port < 1024 && !allow_privileged_ports {
        return Err(RouteError::PrivilegedPort { port });
    }
    Ok(())
}

/// Whether two listen addresses would fight over the same port: same port, and the same
/// IP or either one the wildcard.
pub(crate) fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(listen: &str, backend: &str) -> Route {
        Route {
            listen: listen.parse().unwrap(),
            backend: backend.parse().unwrap(),
            deployment_id: None,
            version: None,
        }
    }

    #[test]
    fn privileged_ports_are_refused_unless_allowed() {
        let r = route("0.0.0.0:80", "127.0.0.1:40000");
        let err = validate("web", &r, false).unwrap_err();
        assert!(matches!(err, RouteError::PrivilegedPort { port: 80 }));
        assert!(err.to_string().contains("port 80"), "{err}");
        validate("web", &r, true).unwrap();
        validate("web", &route("0.0.0.0:1024", "127.0.0.1:1"), false).unwrap();
        validate("web", &route("127.0.0.1:0", "127.0.0.1:1"), false).unwrap();
    }

    #[test]
    fn bad_app_names_and_backends_are_refused() {
        let r = route("127.0.0.1:8080", "127.0.0.1:40000");
        assert!(
            validate("Web/x", &r, false)
                .unwrap_err()
                .to_string()
                .starts_with("app: ")
        );
        let err = validate("web", &route("127.0.0.1:8080", "127.0.0.1:0"), false).unwrap_err();
        assert!(err.to_string().starts_with("backend: "), "{err}");
        let err = validate("web", &route("127.0.0.1:8080", "0.0.0.0:80"), false).unwrap_err();
        assert!(err.to_string().starts_with("backend: "), "{err}");
    }

    #[test]
    fn overlapping_listen_addresses() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(overlaps(a("0.0.0.0:8080"), a("127.0.0.1:8080")));
        assert!(overlaps(a("127.0.0.1:8080"), a("127.0.0.1:8080")));
        assert!(!overlaps(a("127.0.0.1:8080"), a("127.0.0.2:8080")));
        assert!(!overlaps(a("127.0.0.1:8080"), a("127.0.0.1:8081")));
        assert!(!overlaps(a("127.0.0.1:0"), a("127.0.0.1:0")));
    }

    #[test]
    fn set_route_json_is_flat() {
        let body = r#"{"listen":"0.0.0.0:8080","backend":"127.0.0.1:49153","version":"web:2","drain_timeout_ms":5000}"#;
        let set: SetRoute = serde_json::from_str(body).unwrap();
        assert_eq!(set.route.listen.port(), 8080);
        assert_eq!(set.route.version.as_deref(), Some("web:2"));
        assert_eq!(set.drain_timeout_ms, Some(5000));
        assert_eq!(serde_json::to_string(&set).unwrap(), body);
    }
}
