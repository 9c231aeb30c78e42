//! An app's stable address through `stevedore proxy` (see `docs/PROXY.md`): which port
//! of a deployment the proxy serves ([`RoutedPort`]), the switch of the app's route at
//! SWITCHING and the drain of the previous version ([`switch`], [`drain`]), and the
//! reconciliation of the proxy's routes with the store ([`Engine::reconcile_routes`]).
//!
//! With a proxy, the first TCP port of a deployment with a fixed `host_port` is not
//! published on that port: the container publishes it on an ephemeral loopback port
//! (the backend) and carries its public address in labels, so the route of any
//! container can be rebuilt from the engine alone after a crash. The proxy binds the
//! public port. Without a proxy nothing here runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use super::Engine;
use super::deployment::{Extra, Reporter};
use super::run::Failure;
use crate::model::{
    AppName, DeploySpec, LABEL_ROUTE_LISTEN, LABEL_ROUTE_PORT, Level, Phase, PortSpec, Protocol,
};
use crate::proxy::client::{ClientError, ProxyClient};
use crate::proxy::routes::{Route, SetRoute};
use crate::runtime::PublishedPort;

/// How often the drain of the previous version is polled (and reported).
const DRAIN_POLL: Duration = Duration::from_secs(1);
/// How long past its drain timeout the proxy may take to cut the last connections
/// before the previous version is stopped anyway.
const DRAIN_SLACK: Duration = Duration::from_secs(5);

/// A container port served through the proxy at a public address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RoutedPort {
    /// What the proxy binds: `host_ip:host_port` of the request.
    pub(super) listen: SocketAddr,
    pub(super) container_port: u16,
}

impl RoutedPort {
    /// The port of `spec` the proxy serves: its first TCP port with a fixed host port
    /// (published on `publish_ip` when the request names no host address).
    pub(super) fn of_spec(spec: &DeploySpec, publish_ip: IpAddr) -> Option<Self> {
        let p = (spec.ports.iter()).find(|p| p.protocol == Protocol::Tcp && p.host_port != 0)?;
        Some(Self {
            listen: SocketAddr::new(p.host_ip.unwrap_or(publish_ip), p.host_port),
            container_port: p.container_port,
        })
    }

    /// The container's publication of this port: an ephemeral loopback port.
    pub(super) fn backend_port(&self, port: &PortSpec) -> PortSpec {
        PortSpec {
            host_port: 0,
            host_ip: Some(Ipv4Addr::LOCALHOST.into()),
            ..*port
        }
    }

    /// Whether `port` (of the request) is this one.
    pub(super) fn is(&self, port: &PortSpec) -> bool {
        port.protocol == Protocol::Tcp
            && port.container_port == self.container_port
            && port.host_port == self.listen.port()
    }

    /// The labels that record it on the container.
    pub(super) fn labels(&self) -> [(String, String); 2] {
        [
            (LABEL_ROUTE_LISTEN.into(), self.listen.to_string()),
            (LABEL_ROUTE_PORT.into(), self.container_port.to_string()),
        ]
    }

    /// Read back from a container's labels; `None` for a container not served through
    /// the proxy.
    pub(super) fn from_labels(labels: &BTreeMap<String, String>) -> Option<Self> {
        Some(Self {
            listen: labels.get(LABEL_ROUTE_LISTEN)?.parse().ok()?,
            container_port: labels.get(LABEL_ROUTE_PORT)?.parse().ok()?,
        })
    }

    /// Where the proxy reaches the container: the host address its port is published on.
    pub(super) fn backend(&self, ports: &[PublishedPort]) -> Option<SocketAddr> {
        let p = (ports.iter())
            .find(|p| p.container_port == self.container_port && p.protocol == Protocol::Tcp)?;
        let ip = match p.host_ip.parse::<IpAddr>() {
            Ok(ip) if !ip.is_unspecified() => ip,
            _ => Ipv4Addr::LOCALHOST.into(),
        };
        Some(SocketAddr::new(ip, p.host_port))
    }

    /// `ports` with this port at its public address: the result's endpoints.
    pub(super) fn public_ports(&self, ports: &[PublishedPort]) -> Vec<PublishedPort> {
        let mut out: Vec<PublishedPort> = ports.to_vec();
        for p in out.iter_mut() {
            if p.container_port == self.container_port && p.protocol == Protocol::Tcp {
                p.host_port = self.listen.port();
                p.host_ip = self.listen.ip().to_string();
            }
        }
        out
    }
}

/// SWITCHING with a proxy: points the app's route at `backend`, the new container.
/// From the proxy's answer on, new connections go to the new version. Returns the
/// previous backend, whose open connections now drain (see [`drain`]). A refusal (or
/// a proxy that does not answer) fails the step; the route is then put back if it
/// might have moved, so the previous version keeps serving.
pub(super) async fn switch(
    rep: &mut Reporter,
    proxy: &ProxyClient,
    routed: RoutedPort,
    backend: SocketAddr,
    version: &str,
) -> Result<Option<SocketAddr>, Failure> {
    let deployment = rep.deployment().clone();
    let app = deployment.spec.app.as_str();
    let step = "switching the route";
    let fail = |e: ClientError| {
        Failure::new(
            Phase::Switching,
            step,
            format!(
                "pointing the route of {} at the new version failed: {e}",
                routed.listen
            ),
        )
    };
    let previous = proxy.get_route(app).await.map_err(fail)?;
    let drain_timeout = deployment.spec.drain_timeout;
    let set = SetRoute {
        route: Route {
            listen: routed.listen,
            backend,
            deployment_id: Some(deployment.id.to_string()),
            version: Some(version.to_owned()),
        },
        drain_timeout_ms: Some(drain_timeout.as_millis() as u64),
    };
    let status = match proxy.set_route(app, &set).await {
        Ok(status) => status,
        Err(e) => {
            // Refused: nothing changed. Otherwise the change may have been made.
            if !matches!(e, ClientError::Refused { .. })
                && let Some(p) = &previous
            {
                let back = SetRoute {
                    route: p.route.clone(),
                    drain_timeout_ms: None,
                };
                if let Err(e) = proxy.set_route(app, &back).await {
                    tracing::warn!(error = %e, "could not put the route back on the previous version");
                }
            }
            return Err(fail(e));
        }
    };
    let old = previous
        .map(|p| p.route.backend)
        .filter(|old| *old != backend);
    let open = old
        .and_then(|o| status.drain_of(o))
        .map_or(0, |d| d.open_connections);
    let mut message = format!(
        "route {} now points at the new version ({backend}): new connections go to it",
        routed.listen
    );
    let mut extra = Extra::meta([
        ("route_listen", routed.listen.to_string()),
        ("route_backend", backend.to_string()),
        ("draining_connections", open.to_string()),
        ("drain_timeout_ms", drain_timeout.as_millis().to_string()),
    ]);
    if let Some(old) = old {
        message.push_str(&format!(
            "; {open} connection(s) open to the previous version ({old}) drain for up to {}s",
            drain_timeout.as_secs_f64()
        ));
        extra
            .metadata
            .insert("previous_backend".into(), old.to_string());
    }
    rep.progress(0.1, Level::Info, message, extra);
    Ok(old)
}

/// After a switch: waits until no connection to the previous backend `old` is open
/// (or the drain timeout ended and the proxy cut them), reporting each second the
/// connections still open and the seconds left over `[base, base + span]` of the
/// phase. The previous version is stopped after this: stopping it earlier would cut
/// its connections.
pub(super) async fn drain(
    rep: &mut Reporter,
    proxy: &ProxyClient,
    old: SocketAddr,
    (base, span): (f64, f64),
) {
    let deployment = rep.deployment().clone();
    let app = deployment.spec.app.as_str();
    let timeout = deployment.spec.drain_timeout;
    let started = Instant::now();
    loop {
        let draining = match proxy.get_route(app).await {
            Ok(route) => route.and_then(|r| r.drain_of(old).cloned()),
            Err(e) => {
                let message = format!(
                    "cannot follow the drain of the previous version: {e}; stopping it now"
                );
                rep.progress(base + span, Level::Warning, message, Extra::default());
                return;
            }
        };
        let Some(d) = draining else {
            let message = format!(
                "previous version ({old}) drained: no connection to it is open after {:.1}s",
                started.elapsed().as_secs_f64()
            );
            let extra = Extra::meta([
                ("draining_connections", "0".into()),
                ("drain_seconds_left", "0".into()),
            ]);
            rep.progress(base + span, Level::Info, message, extra);
            return;
        };
        if started.elapsed() >= timeout + DRAIN_SLACK {
            let message = format!(
                "{} connection(s) to the previous version ({old}) still open after the drain timeout; stopping it now",
                d.open_connections
            );
            rep.progress(base + span, Level::Warning, message, Extra::default());
            return;
        }
        let waited = started.elapsed().as_secs_f64() / timeout.as_secs_f64().max(0.001);
        rep.progress(
            base + span * waited.min(1.0) * 0.95,
            Level::Info,
            format!(
                "draining the previous version ({old}): {} connection(s) still open, {:.0}s left",
                d.open_connections,
                d.seconds_left.ceil()
            ),
            Extra::meta([
                ("draining_connections", d.open_connections.to_string()),
                (
                    "drain_seconds_left",
                    format!("{:.0}", d.seconds_left.ceil()),
                ),
            ]),
        );
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// What [`Engine::reconcile_routes`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RoutesReconciled {
    /// Routes set or moved to their app's current version.
    pub set: usize,
    /// Routes of apps that no longer exist (or no longer have a routed port) removed.
    pub removed: usize,
}

impl Engine {
    /// The proxy the server talks to (`--proxy-socket`), if any.
    pub fn proxy(&self) -> Option<&ProxyClient> {
        self.0.config.proxy.as_ref()
    }

    /// Makes the proxy's routes agree with the store (at start after recovery, and in
    /// the reconciler): each app's route points at its current version's container
    /// (the last succeeded deployment's), as that container's labels and published
    /// port say; routes of apps that no longer exist (removed, unknown) or whose
    /// current version has no routed port are removed. Apps with a live deployment, and
    /// apps whose current container cannot be inspected or is not running, are left
    /// alone. Without a proxy it does nothing.
    pub async fn reconcile_routes(&self) -> Result<RoutesReconciled, ClientError> {
        let mut done = RoutesReconciled::default();
        let Some(proxy) = self.proxy().cloned() else {
            return Ok(done);
        };
        // Before the store is read: an app not live now has its last end on disk.
        let busy = self.busy_apps();
        let routes = proxy.routes().await?;
        let apps = match self.apps().await {
            Ok(apps) => apps,
            Err(e) => {
                tracing::warn!(error = %e, "routes not reconciled: the store cannot be read");
                return Ok(done);
            }
        };
        let mut keep: HashSet<String> = busy.iter().map(|a| a.to_string()).collect();
        let mut want: HashMap<String, SetRoute> = HashMap::new();
        for view in apps.iter().filter(|v| !busy.contains(&v.app)) {
            let Some(container) = (view.current.as_ref())
                .and_then(|c| c.result.as_ref())
                .map(|r| r.container_id.clone())
                .filter(|c| !c.is_empty())
            else {
                continue;
            };
            let state = match self.0.runtime.inspect(&container).await {
                Ok(state) if state.running => state,
                _ => {
                    keep.insert(view.app.to_string());
                    continue;
                }
            };
            let Some(routed) = RoutedPort::from_labels(&state.labels) else {
                continue;
            };
            let Some(backend) = routed.backend(&state.ports) else {
                keep.insert(view.app.to_string());
                continue;
            };
            let current = view.current.as_ref().expect("checked above");
            let route = Route {
                listen: routed.listen,
                backend,
                deployment_id: Some(current.id.to_string()),
                version: Some(current.image.clone()),
            };
            want.insert(
                view.app.to_string(),
                SetRoute {
                    route,
                    drain_timeout_ms: None,
                },
            );
        }
        for (app, set) in &want {
            let now = routes.iter().find(|r| &r.app == app);
            if now.is_some_and(|r| {
                r.route.backend == set.route.backend && r.route.listen == set.route.listen
            }) || self.is_busy(app)
            {
                continue;
            }
            let from = now.map(|r| r.route.backend.to_string()).unwrap_or_default();
            proxy.set_route(app, set).await?;
            done.set += 1;
            tracing::warn!(%app, from = %from, to = %set.route.backend, listen = %set.route.listen, "route reconciled: it now points at the app's current version");
        }
        for r in &routes {
            if want.contains_key(&r.app) || keep.contains(&r.app) || self.is_busy(&r.app) {
                continue;
            }
            proxy.remove_route(&r.app).await?;
            done.removed += 1;
            tracing::warn!(app = %r.app, listen = %r.route.listen, "route reconciled: removed (the app no longer exists or has no routed port)");
        }
        Ok(done)
    }

    /// Apps with a live deployment or removal.
    fn busy_apps(&self) -> HashSet<AppName> {
        (self.live().deployments.values())
            .map(|d| d.spec.app.clone())
            .collect()
    }

    fn is_busy(&self, app: &str) -> bool {
        (self.live().deployments.values()).any(|d| d.spec.app.as_str() == app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published(container_port: u16, host_ip: &str, host_port: u16) -> PublishedPort {
        PublishedPort {
            container_port,
            protocol: Protocol::Tcp,
            host_port,
            host_ip: host_ip.into(),
        }
    }

    #[test]
    fn a_routed_port_round_trips_through_labels_and_names_its_backend() {
        let routed = RoutedPort {
            listen: "0.0.0.0:8080".parse().unwrap(),
            container_port: 80,
        };
        let labels: BTreeMap<String, String> = routed.labels().into_iter().collect();
        assert_eq!(RoutedPort::from_labels(&labels), Some(routed));
        assert_eq!(RoutedPort::from_labels(&BTreeMap::new()), None);
        let ports = [published(80, "127.0.0.1", 49153), published(9000, "", 1)];
        assert_eq!(
            routed.backend(&ports),
            Some("127.0.0.1:49153".parse().unwrap())
        );
        let wildcard = [published(80, "0.0.0.0", 49153)];
        assert_eq!(
            routed.backend(&wildcard),
            Some("127.0.0.1:49153".parse().unwrap())
        );
        assert_eq!(routed.backend(&ports[1..]), None);
        let public = routed.public_ports(&ports);
        assert_eq!(public[0], published(80, "0.0.0.0", 8080));
        assert_eq!(public[1], ports[1]);
    }

    #[test]
    fn the_first_fixed_tcp_port_is_routed() {
        let mut spec = super::super::tests::spec("web", "img");
        let port = |container_port, host_port, protocol| PortSpec {
            container_port,
            host_port,
            protocol,
            host_ip: None,
        };
        spec.ports = vec![port(53, 5353, Protocol::Udp), port(80, 0, Protocol::Tcp)];
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        assert_eq!(RoutedPort::of_spec(&spec, ip), None);
        spec.ports.push(port(8080, 9090, Protocol::Tcp));
        let routed = RoutedPort::of_spec(&spec, ip).unwrap();
        assert_eq!(routed.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(routed.container_port, 8080);
        assert!(routed.is(&spec.ports[2]) && !routed.is(&spec.ports[1]));
        let backend = routed.backend_port(&spec.ports[2]);
        assert_eq!((backend.host_port, backend.host_ip), (0, Some(ip)));
    }
}
