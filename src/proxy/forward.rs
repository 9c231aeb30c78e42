//! The forwarding core: one listener per app's public port, one task per client
//! connection copying bytes both ways to the backend that was current when the
//! connection was accepted. A switch only changes which backend the *next* connection
//! gets; connections already open stay on their backend (a "generation") until they
//! close, or until the drain timeout of the switch that retired it cuts them.
//!
//! Invariants:
//! - a public port is never unbound by a switch: the listener is the same before and
//!   after, so no client ever sees a refused connection because of a switch;
//! - the state file is written before a change takes effect: a change that cannot be
//!   persisted is refused and changes nothing;
//! - after a hand-over ([`Frozen::hand_over`]) this process changes nothing and writes
//!   nothing: the listening sockets and the state file belong to the new proxy.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::{AppMetrics, ProxyMetrics};
use super::routes::{
    DrainStatus, Route, RouteError, RouteStatus, RouteTable, SetRoute, overlaps, validate,
};
use super::state;

/// Time limit of connecting to a backend (a loopback port: it answers at once or not).
const BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A state file write slower than this is logged.
const SLOW_STATE_WRITE: Duration = Duration::from_millis(500);
/// Wait between two attempts to bind a public port that is taken.
const REBIND_INTERVAL: Duration = Duration::from_secs(1);

/// Settings of the forwarding core.
#[derive(Clone, Debug)]
pub(crate) struct ProxySettings {
    pub(crate) state_file: PathBuf,
    pub(crate) drain_timeout: Duration,
    pub(crate) allow_privileged_ports: bool,
}

/// The live routes. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    settings: ProxySettings,
    /// Held across a whole change (bind, persist, apply): changes are serialized.
    apps: tokio::sync::Mutex<BTreeMap<String, AppEntry>>,
    metrics: Arc<ProxyMetrics>,
    /// Every connection task, so shutdown can wait for them.
    connections: TaskTracker,
    /// Every listener task: shutdown waits for them to stop accepting before it waits
    /// for the connections, so no connection accepted in the meantime is dropped.
    listeners: TaskTracker,
    /// Cancelled at shutdown: listeners stop.
    shutdown: CancellationToken,
    /// Set once the listening sockets were handed to a new proxy: every admin call is
    /// refused from then on, and a listener that ends leaves its queue to the new proxy.
    handed_over: AtomicBool,
}

struct AppEntry {
    route: Route,
    shared: Arc<AppShared>,
    /// Stops this app's listener.
    listener: CancellationToken,
}

/// What an app's listener and connection tasks share with the admin side.
struct AppShared {
    app: String,
    current: RwLock<Arc<Generation>>,
    draining: Mutex<Vec<Draining>>,
    listen_error: Mutex<Option<String>>,
    /// The public listener while its accept loop runs (what a hand-over sends).
    bound: Mutex<Option<Arc<TcpListener>>>,
    metrics: AppMetrics,
}

/// One backend as long as it is routed to or drained: its open connections.
struct Generation {
    backend: SocketAddr,
    label: Mutex<(Option<String>, Option<String>)>,
    open: watch::Sender<u64>,
    /// Cancelled when the drain timeout ends: its connections are closed.
    cut: CancellationToken,
}

struct Draining {
    generation: Arc<Generation>,
    deadline: Instant,
}

impl Generation {
    fn new(route: &Route) -> Arc<Self> {
        Arc::new(Self {
            backend: route.backend,
            label: Mutex::new((route.deployment_id.clone(), route.version.clone())),
            open: watch::Sender::new(0),
            cut: CancellationToken::new(),
        })
    }

    fn open_connections(&self) -> u64 {
        *self.open.borrow()
    }

    fn label(&self) -> (Option<String>, Option<String>) {
        self.label.lock().unwrap().clone()
    }
}

impl AppShared {
    fn current(&self) -> Arc<Generation> {
        self.current.read().unwrap().clone()
    }

    fn status(&self, route: &Route) -> RouteStatus {
        let now = Instant::now();
        let listen_error = self.listen_error.lock().unwrap().clone();
        RouteStatus {
            app: self.app.clone(),
            route: route.clone(),
            listening: listen_error.is_none(),
            listen_error,
            open_connections: self.current().open_connections(),
            draining: self
                .draining
                .lock()
                .unwrap()
                .iter()
                .map(|d| {
                    let (deployment_id, version) = d.generation.label();
                    DrainStatus {
                        backend: d.generation.backend,
                        deployment_id,
                        version,
                        open_connections: d.generation.open_connections(),
                        seconds_left: d.deadline.saturating_duration_since(now).as_secs_f64(),
                    }
                })
                .collect(),
        }
    }

    /// Takes `generation` out of the draining list; false if it was not there (drained
    /// already, or routed to again).
    fn take_draining(&self, generation: &Arc<Generation>) -> bool {
        let mut draining = self.draining.lock().unwrap();
        let before = draining.len();
        draining.retain(|d| !Arc::ptr_eq(&d.generation, generation));
        draining.len() != before
    }
}

impl Proxy {
    /// Restores the routes of the state file and starts their listeners. A route whose
    /// port cannot be bound now is kept and retried every second.
    pub(crate) async fn restore(
        settings: ProxySettings,
        metrics: Arc<ProxyMetrics>,
    ) -> Result<Self, String> {
        let table = state::load(&settings.state_file)?;
        let (proxy, pending) = Self::with_routes(settings, metrics, table, BTreeMap::new()).await;
        proxy.start_listeners(pending);
        Ok(proxy)
    }

    /// The proxy of `table`, its listeners not started yet ([`Self::start_listeners`]).
    /// A route listens on its `adopted` listener (handed over by the previous proxy)
    /// if it has one, else on a port bound here (retried every second while taken).
    pub(crate) async fn with_routes(
        settings: ProxySettings,
        metrics: Arc<ProxyMetrics>,
        table: RouteTable,
        mut adopted: BTreeMap<String, TcpListener>,
    ) -> (Self, PendingListeners) {
        let proxy = Self {
            inner: Arc::new(Inner {
                settings,
                apps: tokio::sync::Mutex::new(BTreeMap::new()),
                metrics,
                connections: TaskTracker::new(),
                listeners: TaskTracker::new(),
                shutdown: CancellationToken::new(),
                handed_over: AtomicBool::new(false),
            }),
        };
        let mut pending = PendingListeners(Vec::new());
        let mut apps = proxy.inner.apps.lock().await;
        for (app, mut route) in table.routes {
            let shared = proxy.new_shared(&app, &route);
            let listener = CancellationToken::new();
            match validate(&app, &route, proxy.inner.settings.allow_privileged_ports) {
                Ok(()) => {
                    let bound = match adopted.remove(&app) {
                        Some(l) => {
                            tracing::info!(app, listen = %route.listen, "public listener taken over");
                            Ok(l)
                        }
                        None => TcpListener::bind(route.listen).await,
                    };
                    match &bound {
                        Ok(l) => route.listen = l.local_addr().unwrap_or(route.listen),
                        Err(e) => {
                            tracing::error!(app, listen = %route.listen, error = %e, "cannot bind the route's public port; retrying every second");
                            *shared.listen_error.lock().unwrap() =
                                Some(format!("cannot bind {}: {e}", route.listen));
                        }
                    }
                    pending
                        .0
                        .push((route.listen, bound.ok(), shared.clone(), listener.clone()));
                }
                Err(e) => {
                    tracing::error!(app, error = %e, "route not served");
                    *shared.listen_error.lock().unwrap() = Some(e.to_string());
                    // No listener runs: setting the route again binds one.
                    listener.cancel();
                }
            }
            tracing::info!(app, listen = %route.listen, backend = %route.backend, "route restored");
            apps.insert(
                app,
                AppEntry {
                    route,
                    shared,
                    listener,
                },
            );
        }
        proxy.inner.metrics.set_routes(apps.len());
        drop(apps);
        (proxy, pending)
    }

    /// Starts accepting on the listeners [`Self::with_routes`] prepared.
    pub(crate) fn start_listeners(&self, pending: PendingListeners) {
        for (addr, bound, shared, stop) in pending.0 {
            self.spawn_listener(addr, bound, shared, stop);
        }
    }

    /// Holds every route change until the returned guard is dropped or handed over;
    /// `Err` once this proxy has handed over already.
    pub(crate) async fn freeze(&self) -> Result<Frozen<'_>, RouteError> {
        let apps = self.inner.apps.lock().await;
        self.check_not_handed_over()?;
        Ok(Frozen {
            inner: &self.inner,
            apps,
        })
    }

    fn check_not_handed_over(&self) -> Result<(), RouteError> {
        if self.inner.handed_over.load(Ordering::SeqCst) {
            return Err(RouteError::HandedOver);
        }
        Ok(())
    }

    fn new_shared(&self, app: &str, route: &Route) -> Arc<AppShared> {
        Arc::new(AppShared {
            app: app.to_owned(),
            current: RwLock::new(Generation::new(route)),
            draining: Mutex::new(Vec::new()),
            listen_error: Mutex::new(None),
            bound: Mutex::new(None),
            metrics: self.inner.metrics.app(app),
        })
    }

    /// Client connections being forwarded now.
    pub(crate) fn open_connections(&self) -> usize {
        self.inner.connections.len()
    }

    pub(crate) fn metrics(&self) -> &Arc<ProxyMetrics> {
        &self.inner.metrics
    }

    pub(crate) async fn routes(&self) -> Result<Vec<RouteStatus>, RouteError> {
        let apps = self.inner.apps.lock().await;
        self.check_not_handed_over()?;
        Ok(apps.values().map(|e| e.shared.status(&e.route)).collect())
    }

    pub(crate) async fn route(&self, app: &str) -> Result<RouteStatus, RouteError> {
        let apps = self.inner.apps.lock().await;
        self.check_not_handed_over()?;
        apps.get(app)
            .map(|e| e.shared.status(&e.route))
            .ok_or_else(|| RouteError::NotFound(app.to_owned()))
    }

    /// Sets or switches `app`'s route: new connections go to the new backend as soon as
    /// this returns; connections open to the previous one drain.
    pub(crate) async fn set_route(
        &self,
        app: &str,
        set: SetRoute,
    ) -> Result<RouteStatus, RouteError> {
        let settings = &self.inner.settings;
        let mut route = set.route;
        validate(app, &route, settings.allow_privileged_ports)?;
        let drain_timeout = set
            .drain_timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(settings.drain_timeout);
        let mut apps = self.inner.apps.lock().await;
        self.check_not_handed_over()?;
        port_free(&apps, app, &route)?;
        let listener = bind_public(apps.get(app), &mut route).await?;
        self.persist(&apps, Some((app, &route))).await?;

        let rebind = listener.is_some();
        let entry = match apps.remove(app) {
            None => {
                let shared = self.new_shared(app, &route);
                tracing::info!(app, listen = %route.listen, backend = %route.backend, deployment_id = route.deployment_id.as_deref(), version = route.version.as_deref(), "route added");
                AppEntry {
                    route: route.clone(),
                    shared,
                    listener: CancellationToken::new(),
                }
            }
            Some(entry) => self.update_entry(entry, app, &route, drain_timeout, rebind),
        };
        if let Some(l) = listener {
            *entry.shared.listen_error.lock().unwrap() = None;
            self.spawn_listener(
                route.listen,
                Some(l),
                entry.shared.clone(),
                entry.listener.clone(),
            );
        }
        let status = entry.shared.status(&entry.route);
        apps.insert(app.to_owned(), entry);
        self.inner.metrics.set_routes(apps.len());
        Ok(status)
    }

    /// `entry` set to `route`: switched when the backend changed, its listener replaced
    /// when `rebind`.
    fn update_entry(
        &self,
        mut entry: AppEntry,
        app: &str,
        route: &Route,
        drain_timeout: Duration,
        rebind: bool,
    ) -> AppEntry {
        if entry.route.backend != route.backend {
            self.switch(&entry, route, drain_timeout);
        } else {
            *entry.shared.current().label.lock().unwrap() =
                (route.deployment_id.clone(), route.version.clone());
        }
        if rebind {
            tracing::info!(app, from = %entry.route.listen, to = %route.listen, "public address moved");
            entry.listener.cancel();
            entry.listener = CancellationToken::new();
        }
        entry.route = route.clone();
        entry
    }

    /// Moves new connections to `route.backend`; the previous generation drains.
    fn switch(&self, entry: &AppEntry, route: &Route, drain_timeout: Duration) {
        let shared = &entry.shared;
        // Back to a backend still being drained (v1 → v2 → v1): its connections are
        // current again and are no longer cut.
        let revived = {
            let draining = shared.draining.lock().unwrap();
            draining
                .iter()
                .find(|d| d.generation.backend == route.backend)
                .map(|d| d.generation.clone())
        }
        .filter(|g| shared.take_draining(g));
        let next = match revived {
            Some(g) => {
                *g.label.lock().unwrap() = (route.deployment_id.clone(), route.version.clone());
                g
            }
            None => Generation::new(route),
        };
        let previous = std::mem::replace(&mut *shared.current.write().unwrap(), next);
        shared.metrics.switches.increment(1);
        let (from_deployment, from_version) = previous.label();
        tracing::info!(
            app = %shared.app,
            from = %previous.backend,
            to = %route.backend,
            from_deployment = from_deployment.as_deref(),
            to_deployment = route.deployment_id.as_deref(),
            from_version = from_version.as_deref(),
            to_version = route.version.as_deref(),
            open_connections = previous.open_connections(),
            drain_timeout = ?drain_timeout,
            "route switched"
        );
        self.drain(shared.clone(), previous, drain_timeout);
    }

    /// Lets `generation`'s connections finish, and cuts those still open after `timeout`.
    fn drain(&self, shared: Arc<AppShared>, generation: Arc<Generation>, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        shared.draining.lock().unwrap().push(Draining {
            generation: generation.clone(),
            deadline,
        });
        tokio::spawn(async move {
            let mut open = generation.open.subscribe();
            let closed = tokio::select! {
                _ = open.wait_for(|n| *n == 0) => true,
                _ = tokio::time::sleep_until(deadline) => false,
            };
            if !shared.take_draining(&generation) {
                return; // routed to again
            }
            if closed {
                tracing::info!(app = %shared.app, backend = %generation.backend, "drained: no connection open to the previous backend");
            } else {
                let n = generation.open_connections();
                generation.cut.cancel();
                shared.metrics.cut.increment(n);
                tracing::warn!(app = %shared.app, backend = %generation.backend, connections = n, "drain timeout ended: closing the connections still open to the previous backend");
            }
        });
    }

    /// Unbinds `app`'s public port; connections open to its backend drain.
    pub(crate) async fn remove_route(&self, app: &str) -> Result<RouteStatus, RouteError> {
        let mut apps = self.inner.apps.lock().await;
        self.check_not_handed_over()?;
        if !apps.contains_key(app) {
            return Err(RouteError::NotFound(app.to_owned()));
        }
        let mut rest = BTreeMap::new();
        for (name, e) in apps.iter().filter(|(name, _)| *name != app) {
            rest.insert(name.clone(), e.route.clone());
        }
        self.write_state(RouteTable { routes: rest }).await?;
        let entry = apps.remove(app).expect("checked above");
        entry.listener.cancel();
        self.drain(
            entry.shared.clone(),
            entry.shared.current(),
            self.inner.settings.drain_timeout,
        );
        tracing::info!(app, listen = %entry.route.listen, backend = %entry.route.backend, "route removed");
        self.inner.metrics.set_routes(apps.len());
        Ok(entry.shared.status(&entry.route))
    }

    async fn persist(
        &self,
        apps: &BTreeMap<String, AppEntry>,
        change: Option<(&str, &Route)>,
    ) -> Result<(), RouteError> {
        let mut routes: BTreeMap<String, Route> = apps
            .iter()
            .map(|(k, e)| (k.clone(), e.route.clone()))
            .collect();
        if let Some((app, route)) = change {
            routes.insert(app.to_owned(), route.clone());
        }
        self.write_state(RouteTable { routes }).await
    }

    /// Writes the state file off the runtime's threads (an fsync can take seconds on a
    /// busy disk; forwarding must not wait for it).
    async fn write_state(&self, table: RouteTable) -> Result<(), RouteError> {
        let path = self.inner.settings.state_file.clone();
        let started = Instant::now();
        let written = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || state::save(&path, &table))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let took = started.elapsed();
        if took > SLOW_STATE_WRITE {
            tracing::warn!(took = ?took, state_file = %path.display(), "slow state file write (fsync)");
        }
        written.map_err(|source| RouteError::State {
            path: path.display().to_string(),
            source,
        })
    }

    fn spawn_listener(
        &self,
        addr: SocketAddr,
        bound: Option<TcpListener>,
        shared: Arc<AppShared>,
        stop: CancellationToken,
    ) {
        let proxy = self.clone();
        self.inner.listeners.spawn(async move {
            let shutdown = proxy.inner.shutdown.clone();
            let ended = async {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = shutdown.cancelled() => {}
                }
            };
            proxy.listen(addr, bound, shared, ended).await;
        });
    }

    /// Binds (or takes `bound`) and forwards what it accepts until `ended`. Then the
    /// connections the kernel already completed are accepted and forwarded before the
    /// listener closes: closing it with them queued would reset them. After a
    /// hand-over they are left in the queue: the new proxy accepts them on the same
    /// socket.
    async fn listen(
        &self,
        addr: SocketAddr,
        bound: Option<TcpListener>,
        shared: Arc<AppShared>,
        ended: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(ended);
        let listener = match bound {
            Some(l) => l,
            None => loop {
                let bind = tokio::select! {
                    r = TcpListener::bind(addr) => r,
                    _ = &mut ended => return,
                };
                match bind {
                    Ok(l) => {
                        *shared.listen_error.lock().unwrap() = None;
                        tracing::info!(app = %shared.app, listen = %addr, "public port bound");
                        break l;
                    }
                    Err(e) => {
                        *shared.listen_error.lock().unwrap() =
                            Some(format!("cannot bind {addr}: {e}"));
                        tokio::time::sleep(REBIND_INTERVAL).await;
                    }
                }
            },
        };
        let listener = Arc::new(listener);
        *shared.bound.lock().unwrap() = Some(listener.clone());
        loop {
            // `ended` first: a listener told to stop never accepts again.
            let accepted = tokio::select! {
                biased;
                _ = &mut ended => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((client, _peer)) => self.forward_accepted(client, &shared),
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(app = %shared.app, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        {
            let mut bound = shared.bound.lock().unwrap();
            if bound.as_ref().is_some_and(|b| Arc::ptr_eq(b, &listener)) {
                *bound = None;
            }
        }
        if self.inner.handed_over.load(Ordering::SeqCst) {
            return;
        }
        while let Some(Ok((client, _peer))) = listener.accept().now_or_never() {
            self.forward_accepted(client, &shared);
        }
    }

    fn forward_accepted(&self, client: TcpStream, shared: &AppShared) {
        // Counted before the task runs, so a switch right now sees it open.
        let open = OpenGuard::new(shared.current(), shared.metrics.clone());
        self.inner.connections.spawn(forward(client, open));
    }

    /// Stops every listener (the public ports are free for a new proxy at once), then
    /// waits up to `grace` for the open connections to close.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        // A listener may be forwarding what it accepted just before the cancel: wait
        // until every one has stopped (they stop at once), so that connection is
        // counted below and not dropped when this process exits (a reset).
        self.inner.listeners.close();
        if tokio::time::timeout(grace, self.inner.listeners.wait())
            .await
            .is_err()
        {
            tracing::warn!("a listener did not stop within the grace");
        }
        self.inner.connections.close();
        let open = self.inner.connections.len();
        if open > 0 {
            tracing::info!(connections = open, grace = ?grace, "waiting for open connections to close");
        }
        if tokio::time::timeout(grace, self.inner.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = self.inner.connections.len(),
                "connections still open at the end of the grace: closing them"
            );
        }
    }
}

/// Listeners prepared by [`Proxy::with_routes`], not accepting yet.
pub(crate) struct PendingListeners(
    Vec<(
        SocketAddr,
        Option<TcpListener>,
        Arc<AppShared>,
        CancellationToken,
    )>,
);

/// The routes held still for a hand-over: no change is made while this lives.
pub(crate) struct Frozen<'a> {
    inner: &'a Inner,
    apps: tokio::sync::MutexGuard<'a, BTreeMap<String, AppEntry>>,
}

impl Frozen<'_> {
    /// The routes, as the state file has them.
    pub(crate) fn table(&self) -> RouteTable {
        RouteTable {
            routes: (self.apps.iter())
                .map(|(app, e)| (app.clone(), e.route.clone()))
                .collect(),
        }
    }

    /// A copy of each public listening socket, by app (routes not listening now have
    /// none).
    pub(crate) fn listeners(&self) -> std::io::Result<Vec<(String, OwnedFd)>> {
        let mut out = Vec::new();
        for (app, entry) in self.apps.iter() {
            if entry.listener.is_cancelled() {
                continue;
            }
            let bound = entry.shared.bound.lock().unwrap().clone();
            if let Some(l) = bound {
                out.push((app.clone(), l.as_fd().try_clone_to_owned()?));
            }
        }
        Ok(out)
    }

    /// Marks the proxy handed over: every change waiting for the routes, and every
    /// later admin call, is refused (the caller sends it again, to the new proxy).
    pub(crate) fn hand_over(self) {
        self.inner.handed_over.store(true, Ordering::SeqCst);
    }
}

/// `Err` when another app's public address overlaps `route`'s.
fn port_free(
    apps: &BTreeMap<String, AppEntry>,
    app: &str,
    route: &Route,
) -> Result<(), RouteError> {
    match apps
        .iter()
        .find(|(other, e)| *other != app && overlaps(e.route.listen, route.listen))
    {
        Some((other, _)) => Err(RouteError::PortTaken {
            port: route.listen.port(),
            app: other.clone(),
        }),
        None => Ok(()),
    }
}

/// A listener on `route.listen` when the app has none there yet (`route.listen` then
/// gets the bound port), else `None`. Port 0 asks for a free port once; setting the
/// route again keeps the one it got (while it is served: a refused restored port is
/// not kept).
async fn bind_public(
    existing: Option<&AppEntry>,
    route: &mut Route,
) -> Result<Option<TcpListener>, RouteError> {
    if let Some(e) = existing
        && route.listen.port() == 0
        && route.listen.ip() == e.route.listen.ip()
        && !e.listener.is_cancelled()
    {
        route.listen = e.route.listen;
    }
    let rebind =
        existing.is_none_or(|e| e.route.listen != route.listen || e.listener.is_cancelled());
    if !rebind {
        return Ok(None);
    }
    let l = TcpListener::bind(route.listen)
        .await
        .map_err(|source| RouteError::Bind {
            addr: route.listen,
            source,
        })?;
    route.listen = l.local_addr().map_err(|source| RouteError::Bind {
        addr: route.listen,
        source,
    })?;
    Ok(Some(l))
}

/// Counts a generation's open connection while alive.
struct OpenGuard {
    generation: Arc<Generation>,
    metrics: AppMetrics,
}

impl OpenGuard {
    fn new(generation: Arc<Generation>, metrics: AppMetrics) -> Self {
        generation.open.send_modify(|n| *n += 1);
        metrics.open.increment(1.0);
        Self {
            generation,
            metrics,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.generation.open.send_modify(|n| *n -= 1);
        self.metrics.open.decrement(1.0);
    }
}

/// One client connection: connect to the generation's backend, copy both ways until
/// either side closes or the generation is cut.
async fn forward(client: TcpStream, open: OpenGuard) {
    let (generation, metrics) = (&open.generation, &open.metrics);
    metrics.connections.increment(1);
    let backend = match tokio::time::timeout(
        BACKEND_CONNECT_TIMEOUT,
        TcpStream::connect(generation.backend),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            metrics.connect_failures.increment(1);
            tracing::warn!(backend = %generation.backend, error = %e, "backend refused a connection");
            return;
        }
        Err(_) => {
            metrics.connect_failures.increment(1);
            tracing::warn!(backend = %generation.backend, "backend did not accept a connection in time");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    let mut client = Counted {
        inner: client,
        read: metrics.bytes_in.clone(),
        written: metrics.bytes_out.clone(),
    };
    let mut backend = backend;
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut backend) => {
            if let Err(e) = r {
                tracing::debug!(backend = %generation.backend, error = %e, "connection ended with an error");
            }
        }
        _ = generation.cut.cancelled() => {}
    }
}

/// A stream that counts the bytes read from and written to it as they pass (so a
/// long-lived connection shows in the byte counters before it closes).
struct Counted<S> {
    inner: S,
    read: metrics::Counter,
    written: metrics::Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.read.increment((buf.filled().len() - before) as u64);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            this.written.increment(n as u64);
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn counted_stream_counts_both_directions() {
        let (a, mut b) = tokio::io::duplex(64);
        let recorder = ProxyMetrics::new();
        let m = recorder.app("web");
        let mut counted = Counted {
            inner: a,
            read: m.bytes_in.clone(),
            written: m.bytes_out.clone(),
        };
        b.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        counted.read_exact(&mut buf).await.unwrap();
        counted.write_all(b"hi!").await.unwrap();
        let text = recorder.render();
        assert!(text.contains(r#"direction="in"} 5"#), "{text}");
        assert!(text.contains(r#"direction="out"} 3"#), "{text}");
    }
}
