//! The connection to a server: address, token, TLS; and the one place that turns an
//! RPC error into an exit code and a one-line message naming the address (with the
//! likely cause of a refused TLS handshake).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

use super::Exit;
use super::proto::deployer_client::DeployerClient;

pub(crate) const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Where the server is and how to prove who we are.
#[derive(Args, Clone)]
pub(crate) struct ConnectArgs {
    /// Server address (`http://HOST:PORT`, `https://…` for TLS; a bare `HOST:PORT` is
    /// `http://`, or `https://` with --ca/--cert).
    #[arg(long, env = "STEVEDORE_ADDR", default_value = DEFAULT_SERVER)]
    pub(crate) server: String,
    /// API token, sent as `authorization: Bearer …`.
    #[arg(long, env = "STEVEDORE_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// PEM CA certificate(s) to verify the server with (TLS).
    #[arg(long, env = "STEVEDORE_CA", value_name = "PEM")]
    pub(crate) ca: Option<PathBuf>,
    /// PEM client certificate (mTLS); needs --key.
    #[arg(long, env = "STEVEDORE_CERT", requires = "key", value_name = "PEM")]
    pub(crate) cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "STEVEDORE_KEY", requires = "cert", value_name = "PEM")]
    pub(crate) key: Option<PathBuf>,
}

/// Never shows the token.
impl std::fmt::Debug for ConnectArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectArgs")
            .field("server", &self.server)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

pub(crate) type Client = DeployerClient<InterceptedService<Channel, Auth>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub(crate) struct Auth(Option<MetadataValue<Ascii>>);

impl Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A command that cannot go on: what to print (one line) and the exit code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) exit: Exit,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Failure {
            exit: Exit::Usage,
            message: message.into(),
        }
    }

    /// Prints the message on stderr and gives the exit code.
    pub(crate) fn report(self) -> Exit {
        eprintln!("stevedore: {}", self.message);
        self.exit
    }
}

impl ConnectArgs {
    fn tls(&self) -> bool {
        self.server.starts_with("https://")
            || (!self.server.contains("://") && (self.ca.is_some() || self.cert.is_some()))
    }

    /// The address with its scheme.
    pub(crate) fn url(&self) -> String {
        if self.server.contains("://") {
            self.server.clone()
        } else if self.tls() {
            format!("https://{}", self.server)
        } else {
            format!("http://{}", self.server)
        }
    }

    /// The connection flags to repeat in a printed command (empty for the defaults).
    pub(crate) fn flags_for_hint(&self) -> String {
        if self.server == DEFAULT_SERVER {
            String::new()
        } else {
            format!(" --server {}", self.server)
        }
    }

    /// Connects now, so an unreachable server or a refused handshake is reported at
    /// once; the channel reconnects by itself later.
    pub(crate) async fn connect(&self) -> Result<Client, Failure> {
        let url = self.url();
        if url.starts_with("http://") && (self.ca.is_some() || self.cert.is_some()) {
            return Err(Failure::usage(format!(
                "--ca/--cert need TLS, but --server {url} is plain http://: use https://"
            )));
        }
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| Failure::usage(format!("--server {url}: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        if self.tls() {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.ca {
                Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca, "--ca")?)),
                None => tls.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "--cert")?,
                    read(key, "--key")?,
                ));
            }
            endpoint = endpoint.tls_config(tls).map_err(|e| {
                let cause = chain(&e);
                match self.tls_cause(&cause) {
                    Some(why) => Failure::usage(format!("TLS settings: {why} ({cause})")),
                    None => Failure::usage(format!("TLS settings: {cause}")),
                }
            })?;
        }
        let auth = match &self.token {
            None => Auth(None),
            Some(t) => {
                Auth(Some(format!("Bearer {}", t.trim()).parse().map_err(
                    |_| Failure::usage("--token: not a valid header value"),
                )?))
            }
        };
        let channel = endpoint.connect().await.map_err(|e| Failure {
            exit: Exit::Rpc,
            message: self.unreachable(&chain(&e)),
        })?;
        Ok(DeployerClient::with_interceptor(channel, auth))
    }

    fn unreachable(&self, cause: &str) -> String {
        let url = self.url();
        match self.tls_cause(cause) {
            Some(why) => format!("TLS handshake with the server at {url} failed: {why} ({cause})"),
            None if url.starts_with("http://") && looks_like_tls_server(cause) => format!(
                "cannot talk to the server at {url}: {cause} (does it serve TLS? use https:// and --ca)"
            ),
            None => format!("cannot reach the server at {url}: {cause}"),
        }
    }

    /// The likely cause of a failed TLS handshake, from the error chain's text and the
    /// client certificate.
    fn tls_cause(&self, cause: &str) -> Option<String> {
        if !self.url().starts_with("https://") {
            return None;
        }
        let has = |s: &str| cause.contains(s);
        let client_cert = || {
            self.cert.as_ref().filter(|p| is_x509_v1(p)).map(|p| {
                format!(
                    "the client certificate {} is X.509 v1 (made without extensions), which \
                         rustls refuses; re-issue it as v3 (e.g. `openssl x509 -req … -extfile` \
                         with basicConstraints and extendedKeyUsage=clientAuth)",
                    p.display()
                )
            })
        };
        if has("UnsupportedCertVersion") {
            if let Some(why) = client_cert() {
                return Some(why);
            }
            return Some(
                "the server's certificate is X.509 v1 (made without extensions), which rustls \
                 refuses; re-issue it as v3 with a subjectAltName"
                    .into(),
            );
        }
        if has("UnknownIssuer") {
            return Some(
                "unknown CA: the server's certificate is not signed by the CA given with --ca"
                    .into(),
            );
        }
        if has("NotValidForName") {
            return Some(format!(
                "the server's certificate is not valid for the host in {} (check its subjectAltName)",
                self.url()
            ));
        }
        if has("Expired") {
            return Some("a certificate has expired (or is not yet valid)".into());
        }
        if has("CertificateRequired") {
            return Some("the server requires a client certificate: give --cert and --key".into());
        }
        if has("BadCertificate")
            || has("UnsupportedCertificate")
            || has("UnknownCA")
            || has("DecryptError")
            || has("CertificateUnknown")
        {
            return Some(client_cert().unwrap_or_else(|| {
                "the server refused the client certificate (signed by a CA it does not trust?)"
                    .into()
            }));
        }
        if has("InvalidContentType") || has("CorruptMessage") {
            return Some("the server does not answer in TLS (use http://?)".into());
        }
        // TLS 1.3 reports a refused client certificate only after the handshake: the
        // first call then sees a reset, a broken pipe or a closed connection.
        if has("broken pipe") || has("reset") || has("closed") || has("unexpected EOF") {
            return Some(match (&self.cert, client_cert()) {
                (_, Some(why)) => why,
                (Some(_), None) => "the server closed the connection after the handshake: it \
                                    likely refused the client certificate (signed by a CA it \
                                    does not trust?)"
                    .into(),
                (None, None) => "the server closed the connection after the handshake: it \
                                 likely requires a client certificate (give --cert and --key)"
                    .into(),
            });
        }
        None
    }

    /// An RPC error as an exit code and one line naming the address. `what` names
    /// the deployment when there is one (`deployment 6f0e…`).
    pub(crate) fn failure(&self, status: &Status) -> Failure {
        let url = self.url();
        let msg = status.message();
        let (exit, message) = match status.code() {
            Code::NotFound => (Exit::NotFound, format!("not found: {msg}")),
            Code::InvalidArgument => (
                Exit::Usage,
                format!("the server at {url} refused the request: {msg}"),
            ),
            Code::Unauthenticated if self.token.is_none() => (
                Exit::Rpc,
                format!("the server at {url} requires a token (--token or STEVEDORE_TOKEN): {msg}"),
            ),
            Code::Unauthenticated => (
                Exit::Rpc,
                format!("the server at {url} refused the token: {msg}"),
            ),
            Code::PermissionDenied => (
                Exit::Rpc,
                format!("the server at {url} refused permission: {msg}"),
            ),
            Code::OutOfRange => (
                Exit::Rpc,
                format!("OUT_OF_RANGE from the server at {url}: {msg}"),
            ),
            _ if is_transport(status) => {
                let chain = chain_of(status);
                let cause = if chain.contains(msg) {
                    chain
                } else {
                    format!("{msg}: {chain}")
                };
                (Exit::Rpc, self.unreachable(&cause))
            }
            code => (
                Exit::Rpc,
                format!("the server at {url} answered {}: {msg}", code_name(code)),
            ),
        };
        Failure { exit, message }
    }
}

/// True when the error came from the connection, not from the server's answer.
fn is_transport(status: &Status) -> bool {
    std::error::Error::source(status).is_some()
        && matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Internal | Code::Cancelled
        )
}

fn looks_like_tls_server(cause: &str) -> bool {
    cause.contains("frame with invalid size")
        || cause.contains("connection closed")
        || cause.contains("broken pipe")
        || cause.contains("reset")
        || cause.contains("invalid HTTP")
}

fn chain_of(status: &Status) -> String {
    match std::error::Error::source(status) {
        Some(e) => chain(e),
        None => String::new(),
    }
}

/// An error and its sources as one line, without repeats.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !text.is_empty() && text != "transport error" && !parts.iter().any(|p| p.contains(&text))
        {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// `Unavailable` → `UNAVAILABLE`, as the gRPC docs and grpcurl spell codes.
pub(crate) fn code_name(code: Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| Failure::usage(format!("{flag} {}: {e}", path.display())))
}

/// True when the first certificate in the PEM file is X.509 v1 (its TBSCertificate
/// has no `[0] EXPLICIT version`), which rustls does not accept.
pub(crate) fn is_x509_v1(path: &std::path::Path) -> bool {
    let Some(Ok(der)) = CertificateDer::pem_file_iter(path)
        .ok()
        .and_then(|mut it| it.next())
    else {
        return false;
    };
    der_is_v1(der.as_ref())
}

fn der_is_v1(der: &[u8]) -> bool {
    // (tag, header length) of a DER element.
    fn header(b: &[u8]) -> Option<(u8, usize)> {
        let tag = *b.first()?;
        let len = *b.get(1)?;
        let header = if len < 0x80 {
            2
        } else {
            2 + usize::from(len & 0x7f)
        };
        Some((tag, header))
    }
    let Some((0x30, h)) = header(der) else {
        return false;
    };
    let tbs = &der[h..];
    let Some((0x30, h2)) = header(tbs) else {
        return false;
    };
    tbs.get(h2).is_some_and(|&first| first != 0xa0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_are_upper_snake() {
        assert_eq!(code_name(Code::Unavailable), "UNAVAILABLE");
        assert_eq!(code_name(Code::OutOfRange), "OUT_OF_RANGE");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }

    #[test]
    fn v1_and_v3_certificates_are_told_apart() {
        // SEQUENCE { SEQUENCE { [0] { INTEGER 2 } … } }: v3
        let v3 = [0x30, 0x08, 0x30, 0x06, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x00];
        // SEQUENCE { SEQUENCE { INTEGER serial … } }: v1
        let v1 = [0x30, 0x05, 0x30, 0x03, 0x02, 0x01, 0x05];
        assert!(!der_is_v1(&v3));
        assert!(der_is_v1(&v1));
        assert!(!der_is_v1(&[0x02, 0x01]));
    }

    #[test]
    fn bare_addresses_get_a_scheme() {
        let mut a = ConnectArgs {
            server: "10.0.0.1:50051".into(),
            token: None,
            ca: None,
            cert: None,
            key: None,
        };
        assert_eq!(a.url(), "http://10.0.0.1:50051");
        a.ca = Some("ca.pem".into());
        assert_eq!(a.url(), "https://10.0.0.1:50051");
    }
}
