//! Who may call what: bearer tokens from a TOML file, each with scopes, checked on
//! every call of the Deployer service (streams included) by a tower layer in front of
//! the gRPC routes. Reflection and health are other services and stay open.
//!
//! The file holds only the SHA-256 of each secret. A presented token is hashed and
//! compared with every entry in constant time. The file is re-read on SIGHUP
//! ([`Authenticator::reload`]); streams opened with a token that is no longer in the
//! file end with `UNAUTHENTICATED` ([`Caller::revoked`]).
//!
//! Never logged: the presented token. Logged and recorded: the token's name.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tonic::{Code, Status};
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::events::ObserverRegistry;
use crate::limits::{Rejection, Rejections};
use crate::model::Refusal;

/// What a token allows. Each scope includes the ones before it.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// GetStatus, ListDeployments, WatchDeployment, ListApps.
    Read,
    /// Deploy, CancelDeployment and RemoveApp, plus read.
    Deploy,
    /// Everything.
    Admin,
}

impl Scope {
    /// Every scope, lowest first.
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Deploy, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Deploy => "deploy",
            Scope::Admin => "admin",
        }
    }
}

/// The scope a Deployer method needs. Methods not listed need `admin`: a new RPC is
/// closed until someone decides who may call it.
pub(crate) fn required_scope(method: &str) -> Scope {
    match method {
        // WhoAmI: the HTTP API's `GET /v1/whoami` (any valid token).
        "GetStatus" | "ListDeployments" | "WatchDeployment" | "ListApps" | "WhoAmI" => Scope::Read,
        "Deploy" | "CancelDeployment" | "RemoveApp" => Scope::Deploy,
        _ => Scope::Admin,
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("cannot read tokens file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("tokens file {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<TokenEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: String,
    sha256: String,
    scopes: Vec<Scope>,
}

struct Token {
    name: String,
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

impl Token {
    fn grants(&self, needed: Scope) -> bool {
        self.scopes.iter().any(|s| *s >= needed)
    }
}

/// The tokens of one version of the file.
#[derive(Default)]
pub(crate) struct TokenSet {
    tokens: Vec<Token>,
}

fn digest_of(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl TokenSet {
    /// Parses the TOML text of a tokens file; `path` names it in errors.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Self, AuthError> {
        let invalid = |reason: String| AuthError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let file: TokenFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut names = HashSet::new();
        let mut tokens = Vec::with_capacity(file.token.len());
        for (i, t) in file.token.into_iter().enumerate() {
            if t.name.is_empty() {
                return Err(invalid(format!("token[{i}].name: empty")));
            }
            if !names.insert(t.name.clone()) {
                return Err(invalid(format!(
                    "token[{i}].name: {:?} is listed twice",
                    t.name
                )));
            }
            let mut digest = [0u8; 32];
            hex::decode_to_slice(t.sha256.trim(), &mut digest).map_err(|_| {
                invalid(format!(
                    "token[{i}].sha256: not 64 hex digits (the SHA-256 of the secret)"
                ))
            })?;
            if t.scopes.is_empty() {
                return Err(invalid(format!("token[{i}].scopes: empty")));
            }
            tokens.push(Token {
                name: t.name,
                digest,
                scopes: t.scopes,
            });
        }
        Ok(Self { tokens })
    }

    pub(crate) fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|e| AuthError::Read {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The token whose digest matches. Compares with every entry in constant time, so
    /// the time taken says nothing about how close a guess was.
    fn find(&self, digest: &[u8; 32]) -> Option<&Token> {
        let mut found = None;
        for t in &self.tokens {
            if bool::from(t.digest.ct_eq(digest)) {
                found = Some(t);
            }
        }
        found
    }
}

/// The authenticated caller of one call, put in the request's extensions by the layer.
#[derive(Clone)]
pub struct Caller {
    /// The token's name (never its secret).
    pub name: String,
    /// The scopes the token grants, the ones its scopes imply included (`deploy`
    /// implies `read`), lowest first.
    pub scopes: Vec<Scope>,
    digest: [u8; 32],
    tokens: watch::Receiver<Arc<TokenSet>>,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller").field("name", &self.name).finish()
    }
}

impl Caller {
    /// Resolves once this caller's token is no longer in the tokens file (after a
    /// reload). Never resolves while it is.
    pub(crate) async fn revoked(&mut self) {
        loop {
            if self.tokens.changed().await.is_err() {
                // The authenticator is gone (server stopping): shutdown ends streams.
                return std::future::pending().await;
            }
            let still_there = self
                .tokens
                .borrow_and_update()
                .find(&self.digest)
                .is_some_and(|t| t.name == self.name);
            if !still_there {
                return;
            }
        }
    }
}

/// Checks bearer tokens against the current tokens file.
#[derive(Clone)]
pub(crate) struct Authenticator {
    path: PathBuf,
    tokens: Arc<watch::Sender<Arc<TokenSet>>>,
}

impl Authenticator {
    pub(crate) fn load(path: &Path) -> Result<Self, AuthError> {
        let set = TokenSet::load(path)?;
        Ok(Self {
            path: path.to_owned(),
            tokens: Arc::new(watch::Sender::new(Arc::new(set))),
        })
    }

    /// Re-reads the file. On error the previous tokens stay in force. Returns the
    /// number of tokens now in force.
    pub(crate) fn reload(&self) -> Result<usize, AuthError> {
        let set = TokenSet::load(&self.path)?;
        let n = set.len();
        self.tokens.send_replace(Arc::new(set));
        Ok(n)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Authenticates an `authorization` header value and checks it grants `needed`.
    pub(crate) fn check(
        &self,
        authorization: Option<&str>,
        needed: Scope,
    ) -> Result<Caller, Denied> {
        let Some(value) = authorization else {
            return Err(Denied::unauthenticated(
                "missing authorization: send `authorization: Bearer <token>`",
            ));
        };
        let secret = match value.split_once(' ') {
            Some((scheme, secret)) if scheme.eq_ignore_ascii_case("bearer") => secret.trim(),
            _ => {
                return Err(Denied::unauthenticated(
                    "authorization: expected `Bearer <token>`",
                ));
            }
        };
        let digest = digest_of(secret);
        let set = self.tokens.borrow().clone();
        let Some(token) = set.find(&digest) else {
            return Err(Denied::unauthenticated("unknown token"));
        };
        if !token.grants(needed) {
            return Err(Denied {
                code: Code::PermissionDenied,
                caller: Some(token.name.clone()),
                reason: format!(
                    "token {:?} lacks scope {:?} (has {})",
                    token.name,
                    needed.as_str(),
                    token
                        .scopes
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        Ok(Caller {
            name: token.name.clone(),
            scopes: (Scope::ALL.into_iter())
                .filter(|s| token.grants(*s))
                .collect(),
            digest,
            tokens: self.tokens.subscribe(),
        })
    }
}

/// Why the authenticator turned a call away.
#[derive(Debug, Clone)]
pub(crate) struct Denied {
    pub(crate) code: Code,
    /// The token's name when the token was known.
    pub(crate) caller: Option<String>,
    pub(crate) reason: String,
}

impl Denied {
    fn unauthenticated(reason: &str) -> Self {
        Self {
            code: Code::Unauthenticated,
            caller: None,
            reason: reason.to_owned(),
        }
    }

    pub(crate) fn status(&self) -> Status {
        Status::new(self.code, self.reason.clone())
    }
}

/// Where the gRPC layer reports the calls it turns away: the rejection counters
/// (owned by the wiring, exported at `/metrics`), and for refusals by auth or the
/// deploy policy the `stevedore::audit` tracing event and the observers (the audit
/// log records them in its chain).
#[derive(Clone, Default)]
pub(crate) struct Refusals {
    rejections: Arc<Rejections>,
    observers: ObserverRegistry,
}

impl Refusals {
    pub(crate) fn new(rejections: Arc<Rejections>, observers: ObserverRegistry) -> Self {
        Self {
            rejections,
            observers,
        }
    }

    /// Counts a call turned away by a limit (not audited).
    pub(crate) fn count(&self, limit: Rejection) {
        self.rejections.record(limit);
    }

    /// Counts, logs and publishes a call refused by auth or the deploy policy.
    pub(crate) fn refuse(&self, limit: Rejection, refusal: Refusal) {
        self.rejections.record(limit);
        tracing::warn!(
            target: "stevedore::audit",
            event = "refused",
            method = refusal.method,
            caller = refusal.caller.as_deref().unwrap_or("anonymous"),
            peer = %refusal.peer.map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
            code = refusal.code,
            reason = refusal.reason,
            "call refused"
        );
        self.observers.publish_refusal(refusal);
    }
}

/// The refusal event of a call to `method` answered with `code` and `reason`.
pub(crate) fn refusal(
    method: &str,
    caller: Option<String>,
    peer: Option<SocketAddr>,
    code: Code,
    reason: &str,
) -> Refusal {
    Refusal {
        time: std::time::SystemTime::now(),
        method: method.to_owned(),
        caller,
        peer,
        code: format!("{code:?}"),
        reason: reason.to_owned(),
    }
}

/// The peer address tonic records in a request's extensions (plain or TLS).
pub(crate) fn peer_of(extensions: &http::Extensions) -> Option<SocketAddr> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    extensions
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr())
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The path prefix of the Deployer service's methods.
fn deployer_prefix() -> String {
    format!("/{}/", crate::proto::deployer_server::SERVICE_NAME)
}

/// Checks the bearer token in `headers` for a call of the Deployer method `method`:
/// the caller, or the refusal (counted, audited and published) as a status. The gRPC
/// layer and the HTTP API both call this.
pub(crate) fn authorize(
    auth: &Authenticator,
    refusals: &Refusals,
    method: &str,
    headers: &http::HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<Caller, Status> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match auth.check(header, required_scope(method)) {
        Ok(caller) => {
            tracing::debug!(method, caller = %caller.name, "call authorized");
            Ok(caller)
        }
        Err(denied) => {
            let limit = match denied.code {
                Code::PermissionDenied => Rejection::PermissionDenied,
                _ => Rejection::Unauthenticated,
            };
            let event = refusal(
                method,
                denied.caller.clone(),
                peer,
                denied.code,
                &denied.reason,
            );
            refusals.refuse(limit, event);
            Err(denied.status())
        }
    }
}

/// The layer that authenticates and authorizes every Deployer call, as a
/// `tower_http` request validator: a refused call is answered with its status (as a
/// gRPC response) and never reaches the service; an allowed one carries its
/// [`Caller`] in the request's extensions. With no authenticator (no tokens file) it
/// lets every call through.
pub(crate) fn auth_layer(
    auth: Option<Authenticator>,
    refusals: Refusals,
) -> ValidateRequestHeaderLayer<AuthValidator> {
    ValidateRequestHeaderLayer::custom(AuthValidator {
        auth,
        refusals,
        prefix: deployer_prefix().into(),
    })
}

/// See [`auth_layer`].
#[derive(Clone)]
pub(crate) struct AuthValidator {
    auth: Option<Authenticator>,
    refusals: Refusals,
    prefix: Arc<str>,
}

impl<B> ValidateRequest<B> for AuthValidator {
    type ResponseBody = tonic::body::Body;

    fn validate(
        &mut self,
        req: &mut http::Request<B>,
    ) -> Result<(), http::Response<Self::ResponseBody>> {
        if let Some(auth) = &self.auth
            && let Some(method) = req.uri().path().strip_prefix(&*self.prefix)
        {
            let peer = peer_of(req.extensions());
            let caller = authorize(auth, &self.refusals, method, req.headers(), peer)
                .map_err(|status| status.into_http())?;
            req.extensions_mut().insert(caller);
        }
        Ok(())
    }
}

/// A new random token (`stv_` + 64 hex digits) and the SHA-256 hex to put in the file.
pub fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source works");
    let secret = format!("stv_{}", hex::encode(bytes));
    let digest = hex::encode(digest_of(&secret));
    (secret, digest)
}

/// The `[[token]]` entry of a tokens file for `name` with `scopes` and `digest`.
pub fn token_entry(name: &str, digest: &str, scopes: &[Scope]) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{:?}", s.as_str())).collect();
    format!(
        "[[token]]\nname = {:?}\nsha256 = \"{digest}\"\nscopes = [{}]\n",
        name,
        scopes.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(entries: &[(&str, &str, &[Scope])]) -> String {
        entries
            .iter()
            .map(|(n, secret, scopes)| token_entry(n, &hex::encode(digest_of(secret)), scopes))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn auth_with(text: &str) -> (tempfile::NamedTempFile, Authenticator) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        let a = Authenticator::load(f.path()).unwrap();
        (f, a)
    }

    #[test]
    fn scopes_nest_and_unknown_methods_need_admin() {
        let (_f, a) = auth_with(&file(&[
            ("r", "secret-r", &[Scope::Read]),
            ("d", "secret-d", &[Scope::Deploy]),
            ("a", "secret-a", &[Scope::Admin]),
        ]));
        let code = |secret: Option<&str>, method: &str| {
            let header = secret.map(|s| format!("Bearer {s}"));
            match a.check(header.as_deref(), required_scope(method)) {
                Ok(c) => Ok(c.name),
                Err(r) => Err(r.code),
            }
        };
        assert_eq!(code(None, "GetStatus"), Err(Code::Unauthenticated));
        assert_eq!(code(Some("nope"), "GetStatus"), Err(Code::Unauthenticated));
        assert_eq!(code(Some("secret-r"), "GetStatus"), Ok("r".into()));
        assert_eq!(
            code(Some("secret-r"), "Deploy"),
            Err(Code::PermissionDenied)
        );
        assert_eq!(code(Some("secret-d"), "Deploy"), Ok("d".into()));
        assert_eq!(code(Some("secret-d"), "WatchDeployment"), Ok("d".into()));
        assert_eq!(
            code(Some("secret-d"), "Future"),
            Err(Code::PermissionDenied)
        );
        assert_eq!(code(Some("secret-a"), "Future"), Ok("a".into()));
        assert!(matches!(
            a.check(Some("Basic secret-a"), Scope::Read),
            Err(Denied {
                code: Code::Unauthenticated,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_removed_token_is_revoked_on_reload() {
        let (f, a) = auth_with(&file(&[
            ("keep", "k", &[Scope::Read]),
            ("drop", "d", &[Scope::Read]),
        ]));
        let mut keep = a.check(Some("Bearer k"), Scope::Read).unwrap();
        let mut gone = a.check(Some("Bearer d"), Scope::Read).unwrap();
        std::fs::write(f.path(), file(&[("keep", "k", &[Scope::Read])])).unwrap();
        assert_eq!(a.reload().unwrap(), 1);
        gone.revoked().await;
        assert!(
            futures_util::FutureExt::now_or_never(keep.revoked()).is_none(),
            "a kept token is not revoked"
        );
        assert!(a.check(Some("Bearer d"), Scope::Read).is_err());
    }

    #[test]
    fn bad_files_are_refused_with_the_field() {
        let p = Path::new("t.toml");
        let err = |t: &str| TokenSet::parse(t, p).err().unwrap().to_string();
        assert!(
            err("[[token]]\nname = \"a\"\nsha256 = \"xyz\"\nscopes = [\"read\"]\n")
                .contains("token[0].sha256")
        );
        assert!(
            err("[[token]]\nname = \"a\"\nsha256 = \"00\"\nscopes = [\"root\"]\n")
                .contains("t.toml")
        );
        let ok = file(&[("a", "x", &[Scope::Read])]);
        assert!(err(&format!("{ok}\n{ok}")).contains("listed twice"));
    }

    #[test]
    fn new_tokens_are_random_and_match_their_entry() {
        let (s1, d1) = new_token();
        let (s2, _) = new_token();
        assert_ne!(s1, s2);
        assert_eq!(s1.len(), 4 + 64);
        let entry = token_entry("ci", &d1, &[Scope::Deploy]);
        let set = TokenSet::parse(&entry, Path::new("x")).unwrap();
        assert_eq!(set.find(&digest_of(&s1)).unwrap().name, "ci");
        assert!(!entry.contains(&s1), "the file never holds the secret");
    }
}
