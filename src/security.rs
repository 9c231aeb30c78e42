//! Security settings of `stevedore serve`: tokens, TLS and mTLS, the deploy policy,
//! and the rule that a server without tokens listens on loopback only.
//!
//! TLS uses rustls 0.23 with the `ring` provider only (tonic's `tls-ring`); every
//! config here names that provider explicitly, so no process-wide default is needed
//! and a second provider can never make rustls panic.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::api::auth::Authenticator;
use crate::api::policy::DeployPolicy;

/// `stevedore serve` security flags; each has a `STEVEDORE_…` environment fallback.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SecurityConfig {
    /// TOML file of named tokens (`[[token]] name, sha256, scopes`). With it, every
    /// Deployer call needs `authorization: Bearer <token>`. Re-read on SIGHUP.
    #[arg(long, env = "STEVEDORE_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a tokens file (anyone who
    /// can connect can then run any image on the host).
    #[arg(long, env = "STEVEDORE_INSECURE_NO_AUTH")]
    pub(crate) insecure_no_auth: bool,
    /// PEM certificate chain: serve gRPC and HTTP over TLS.
    #[arg(long, env = "STEVEDORE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "STEVEDORE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): require client certificates signed by it (mTLS).
    #[arg(long, env = "STEVEDORE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Image prefix deployments may use (repeatable), e.g. `registry.example:5000` or
    /// `busybox` (= docker.io/library/busybox). When set, other images are refused.
    #[arg(
        long = "allow-registry",
        env = "STEVEDORE_ALLOW_REGISTRY",
        value_delimiter = ','
    )]
    pub allow_registries: Vec<String>,
    /// Allow publishing host ports below 1024.
    #[arg(long, env = "STEVEDORE_ALLOW_PRIVILEGED_PORTS")]
    pub allow_privileged_ports: bool,
    /// Allow deploys from `file://` URLs and local paths (git then reads this host's
    /// disk as the server's user).
    #[arg(long, env = "STEVEDORE_ALLOW_LOCAL_GIT")]
    pub allow_local_git: bool,
}

impl SecurityConfig {
    /// The authenticator of `--tokens-file`, if given.
    pub(crate) fn authenticator(&self) -> Result<Option<Authenticator>> {
        match &self.tokens_file {
            None => Ok(None),
            Some(path) => {
                let auth = Authenticator::load(path)?;
                Ok(Some(auth))
            }
        }
    }

    pub(crate) fn policy(&self) -> DeployPolicy {
        DeployPolicy::new(&self.allow_registries, self.allow_privileged_ports)
            .with_local_git(self.allow_local_git)
    }

    /// Without tokens, only loopback addresses, unless `--insecure-no-auth`.
    pub(crate) fn check_listen(&self, addrs: &[(&str, SocketAddr)]) -> Result<()> {
        if self.tokens_file.is_some() {
            return Ok(());
        }
        for (what, addr) in addrs {
            if addr.ip().is_loopback() {
                continue;
            }
            if self.insecure_no_auth {
                tracing::warn!(listen = %addr, "{what} listens on a non-loopback address WITHOUT authentication (--insecure-no-auth): anyone who can connect can run any image on this host");
            } else {
                return Err(anyhow!(
                    "refusing to listen on {addr} ({what}) without authentication: give --tokens-file, listen on a loopback address, or pass --insecure-no-auth"
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn tls_enabled(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// rustls settings of both listeners, gRPC and HTTP (one certificate, one client
    /// CA). Both terminate TLS in [`TlsListener`], so every refused handshake is logged.
    pub(crate) fn tls_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_error(cert, e))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let builder = match &self.tls_client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| pem_error(ca, e))? {
                    roots.add(c.map_err(|e| pem_error(ca, e))?)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes of one listener in progress at once.
const MAX_HANDSHAKES: usize = 64;

fn pem_error(path: &Path, e: rustls_pki_types::pem::Error) -> anyhow::Error {
    anyhow!("{}: {e}", path.display())
}

/// A listener that serves TLS, for the gRPC side (as a stream of connections, see
/// [`TlsListener::into_incoming`]) and for axum: connections are accepted and their
/// handshakes run in a background task (each under a timeout, a bounded number at
/// once), so a slow or failing client never holds up the others. A refused handshake
/// is logged with the peer and rustls' reason (an X.509 v1 client certificate, an
/// unknown CA, no client certificate, plain text to a TLS port …).
pub(crate) struct TlsListener {
    connections: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    pub(crate) fn new(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let (tx, connections) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::debug!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = handshakes.clone().acquire_owned().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::warn!(
                            peer = %peer,
                            listener = %local_addr,
                            reason = %e,
                            "tls handshake refused"
                        ),
                        Err(_) => tracing::warn!(
                            peer = %peer,
                            listener = %local_addr,
                            reason = "no handshake within the time limit",
                            "tls handshake refused"
                        ),
                    }
                });
            }
        });
        Ok(Self {
            connections,
            local_addr,
        })
    }
}

impl TlsListener {
    /// The accepted connections as a stream, for tonic's `serve_with_incoming`.
    pub(crate) fn into_incoming(
        self,
    ) -> impl futures_util::Stream<Item = std::io::Result<TlsStream<TcpStream>>> {
        tokio_stream::wrappers::ReceiverStream::new(self.connections).map(|(tls, _)| Ok(tls))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(c) => c,
            // The accept task stopped (shutdown): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
