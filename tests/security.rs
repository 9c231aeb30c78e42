//! Security against a real server: token scopes on every RPC, token revocation on
//! SIGHUP, TLS and mTLS on both listeners, limits, the deploy policy, and registry
//! credentials that must appear nowhere.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use stevedore::limits::Rejection;
use stevedore::proto::{
    self, CancelRequest, DeployRequest, GetStatusRequest, ListDeploymentsRequest, RegistryAuth,
    WatchRequest,
};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

// ---------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------

/// A request carrying `authorization: Bearer <secret>` when a secret is given.
fn authed<T>(msg: T, secret: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(s) = secret {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {s}").parse().unwrap());
    }
    r
}

/// `stevedore token new NAME --scope SCOPE`: (secret, tokens-file entry).
fn cli_token(name: &str, scope: &str) -> (String, String) {
    let out = Command::new(binary())
        .args(["token", "new", name, "--scope", scope])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // SIGHUP reloads only a server started with a tokens file: the hint says so.
    assert!(
        text.contains("start the server with --tokens-file"),
        "{text}"
    );
    let secret = text
        .lines()
        .find(|l| l.starts_with("stv_"))
        .expect("the token is printed")
        .to_owned();
    let entry = &text[text.find("[[token]]").expect("the entry is printed")..];
    assert!(!entry.contains(&secret), "the entry never holds the secret");
    (secret, entry.to_owned())
}

/// A deployment that stays in HEALTH_CHECK until cancelled: the image's HEALTHCHECK
/// stays `starting` for an hour.
fn holding_request(app: &str) -> DeployRequest {
    DeployRequest {
        app: app.into(),
        image: "stevedore-test/slowhealth:1".into(),
        health_check: Some(proto::HealthCheck {
            check: Some(proto::health_check::Check::Docker(
                proto::DockerHealthCheck {},
            )),
            timeout: Some(pbjson_types::Duration {
                seconds: 1800,
                nanos: 0,
            }),
            interval: None,
        }),
        deadline: Some(pbjson_types::Duration {
            seconds: 3600,
            nanos: 0,
        }),
        ..Default::default()
    }
}

/// Starts a deployment and returns its ID and open stream.
async fn start_deploy(
    client: &mut Client,
    req: tonic::Request<DeployRequest>,
) -> (String, Updates) {
    let raw = client
        .deploy(req)
        .await
        .expect("deploy accepted")
        .into_inner();
    let mut stream = Updates::new(raw, 0);
    let first = stream.next_update().await;
    (first.deployment_id, stream)
}

fn code_of<T>(r: Result<T, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// A test certificate authority (rcgen).
struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Self { issuer }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A leaf certificate for `names` (DNS names or IPs): (cert PEM, key PEM).
    fn leaf(&self, names: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Every file under `dir`, read as (lossy) text.
fn all_files_text(dir: &Path) -> String {
    let mut out = String::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push_str(&String::from_utf8_lossy(&bytes));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// tokens and scopes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn every_rpc_answers_by_token_scope() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let (deploy_secret, deploy_entry) = cli_token("ci", "deploy");
    let (read_secret, read_entry) = cli_token("reader", "read");
    let (admin_secret, admin_entry) = cli_token("root", "admin");
    let (unknown_secret, _) = cli_token("stranger", "admin");
    let tokens = write(
        dir.path(),
        "tokens.toml",
        &format!("{deploy_entry}\n{read_entry}\n{admin_entry}"),
    );
    let server = BinaryServer::spawn(dir.path(), &["--tokens-file", tokens.to_str().unwrap()]);
    let mut client = connect(server.grpc_addr).await;

    // Health stays open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "stevedore.v1.Deployer".into(),
        })
        .await
        .expect("health answers without a token")
        .into_inner();
    assert_eq!(serving.status, 1, "SERVING");

    // The deploy token deploys (a deployment that holds in HEALTH_CHECK).
    let app = unique_app("scope");
    let _guard = AppGuard(app.clone());
    let (id, deploy_stream) = start_deploy(
        &mut client,
        authed(holding_request(&app), Some(&deploy_secret)),
    )
    .await;
    drop(deploy_stream);

    let none: Option<&str> = None;
    let unknown = Some(unknown_secret.as_str());
    let read = Some(read_secret.as_str());
    let deploy = Some(deploy_secret.as_str());
    let admin = Some(admin_secret.as_str());
    use Code::*;

    // Read RPCs.
    let table: [(Option<&str>, Code); 5] = [
        (none, Unauthenticated),
        (unknown, Unauthenticated),
        (read, Ok),
        (deploy, Ok),
        (admin, Ok),
    ];
    for (secret, expected) in table {
        let status = client
            .get_status(authed(
                GetStatusRequest {
                    deployment_id: id.clone(),
                },
                secret,
            ))
            .await;
        assert_eq!(code_of(status), expected, "GetStatus");
        let list = client
            .list_deployments(authed(ListDeploymentsRequest::default(), secret))
            .await;
        assert_eq!(code_of(list), expected, "ListDeployments");
        let watch = client
            .watch_deployment(authed(
                WatchRequest {
                    deployment_id: id.clone(),
                    after_sequence: 0,
                },
                secret,
            ))
            .await;
        match watch {
            Result::Ok(s) => {
                assert_eq!(expected, Ok, "WatchDeployment");
                let first = Updates::new(s.into_inner(), 0).next_update().await;
                assert_eq!(first.sequence, 1);
            }
            Err(e) => assert_eq!(e.code(), expected, "WatchDeployment: {e:?}"),
        }
    }

    // Deploy RPCs refused below the deploy scope: nothing is started.
    let refused_app = unique_app("refused");
    let _refused_guard = AppGuard(refused_app.clone());
    let table: [(Option<&str>, Code); 3] = [
        (none, Unauthenticated),
        (unknown, Unauthenticated),
        (read, PermissionDenied),
    ];
    for (secret, expected) in table {
        let r = client
            .deploy(authed(holding_request(&refused_app), secret))
            .await;
        assert_eq!(code_of(r), expected, "Deploy");
        let r = client
            .cancel_deployment(authed(
                CancelRequest {
                    deployment_id: id.clone(),
                },
                secret,
            ))
            .await;
        assert_eq!(code_of(r), expected, "CancelDeployment");
    }
    assert!(
        app_containers(&refused_app).is_empty(),
        "a refused Deploy created a container"
    );
    let all = client
        .list_deployments(authed(ListDeploymentsRequest::default(), admin))
        .await
        .unwrap()
        .into_inner();
    assert!(all.deployments.iter().all(|d| d.app != refused_app));
    assert_eq!(all.deployments.len(), 1);

    // Each refusal is counted once, by kind, on /metrics: no or an unknown token ×
    // (3 read RPCs + Deploy + Cancel), and the read token × (Deploy + Cancel).
    let (_, metrics) = http_get(&format!("http://{}/metrics", server.http_addr)).await;
    for (limit, count) in [("unauthenticated", 10), ("permission_denied", 2)] {
        let line = format!("stevedore_rejections_total{{limit=\"{limit}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // The caller's token name is recorded, never the secret.
    let status = client
        .get_status(authed(
            GetStatusRequest {
                deployment_id: id.clone(),
            },
            read,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.requested_by, "ci");

    // The deploy token cancels (the deployment was running, so this is allowed and works).
    let cancelled = client
        .cancel_deployment(authed(
            CancelRequest {
                deployment_id: id.clone(),
            },
            deploy,
        ))
        .await
        .expect("deploy token cancels")
        .into_inner();
    assert_eq!(
        cancelled.status.unwrap().state(),
        proto::DeploymentState::Cancelled
    );

    // The audit log has every refusal: no or an unknown token × 5 methods, and the
    // read token × Deploy and Cancel.
    let log = server.log_text();
    let refusals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stevedore::audit") && l.contains("call refused"))
        .collect();
    assert_eq!(
        refusals.len(),
        12,
        "audit refusals:\n{}",
        refusals.join("\n")
    );
    for method in ["Deploy", "CancelDeployment"] {
        assert!(
            refusals
                .iter()
                .any(|l| l.contains(&format!("method=\"{method}\""))
                    && l.contains("caller=\"reader\"")
                    && l.contains("PermissionDenied")),
            "{method} refusal of reader audited:\n{}",
            refusals.join("\n")
        );
    }
    assert!(
        log.contains("requested_by=ci"),
        "the caller's name is logged"
    );

    // The audit log (DATA_DIR/audit.log) has the same refusals, in its chain, and
    // the accepted deployment as requested by the token's name.
    let audit_path = dir.path().join("audit.log");
    let records: Vec<serde_json::Value> =
        eventually(STATE_LIMIT, "12 refusals in the audit log", || {
            let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
            let records: Vec<serde_json::Value> = text
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (records.iter().filter(|r| r["event"] == "refused").count() >= 12).then_some(records)
        })
        .await;
    let refused: Vec<_> = records.iter().filter(|r| r["event"] == "refused").collect();
    assert_eq!(refused.len(), 12, "{refused:#?}");
    assert!(refused.iter().any(|r| r["method"] == "Deploy"
        && r["requested_by"] == "reader"
        && r["code"] == "PermissionDenied"));
    assert_eq!(
        refused
            .iter()
            .filter(|r| r["requested_by"] == "anonymous" && r["code"] == "Unauthenticated")
            .count(),
        10,
        "no or an unknown token × 5 methods"
    );
    assert!(records.iter().any(|r| r["event"] == "accepted"
        && r["app"] == app.as_str()
        && r["requested_by"] == "ci"));
    let verify = Command::new(binary())
        .args(["audit", "verify"])
        .arg(&audit_path)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let audit_text = std::fs::read_to_string(&audit_path).unwrap();
    for secret in [&deploy_secret, &read_secret, &admin_secret, &unknown_secret] {
        assert!(!log.contains(secret.as_str()), "a token secret was logged");
        assert!(
            !audit_text.contains(secret.as_str()),
            "a token secret was audited"
        );
    }
}

#[tokio::test]
async fn a_removed_token_ends_its_streams_on_sighup_and_a_bad_file_keeps_the_tokens() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let (deploy_secret, deploy_entry) = cli_token("ci", "deploy");
    let (watch_secret, watch_entry) = cli_token("watcher", "read");
    let (gone_secret, gone_entry) = cli_token("gone", "deploy");
    let tokens = write(
        dir.path(),
        "tokens.toml",
        &format!("{deploy_entry}\n{watch_entry}\n{gone_entry}"),
    );
    let server = BinaryServer::spawn(dir.path(), &["--tokens-file", tokens.to_str().unwrap()]);
    let mut client = connect(server.grpc_addr).await;

    let app = unique_app("revoke");
    let _guard = AppGuard(app.clone());
    let (id, _deploy_stream) = start_deploy(
        &mut client,
        authed(holding_request(&app), Some(&deploy_secret)),
    )
    .await;
    let watch = client
        .watch_deployment(authed(
            WatchRequest {
                deployment_id: id.clone(),
                after_sequence: 0,
            },
            Some(&watch_secret),
        ))
        .await
        .expect("watcher may watch")
        .into_inner();
    let mut watch = Updates::new(watch, 0);
    assert_eq!(watch.next_update().await.sequence, 1);
    // A Deploy stream of a token that goes too (another app: it runs at once).
    let other_app = unique_app("revoke-deploy");
    let _other_guard = AppGuard(other_app.clone());
    let (other_id, mut gone_stream) = start_deploy(
        &mut client,
        authed(holding_request(&other_app), Some(&gone_secret)),
    )
    .await;

    // Remove the watcher's and the other deployer's tokens and tell the server.
    std::fs::write(&tokens, &deploy_entry).unwrap();
    server.hangup();

    // The deployment holds for half an hour: only the revocation can end this stream
    // (the timeout turns a missing revocation into a failure instead of a hang).
    let until_error = async {
        loop {
            match watch.next().await {
                Ok(Some(u)) => assert!(u.result.is_none(), "the deployment ended: {u:?}"),
                Ok(None) => panic!("the stream ended without an error"),
                Err(e) => break e,
            }
        }
    };
    let end = tokio::time::timeout(Duration::from_secs(120), until_error)
        .await
        .expect("the removed token's stream was not closed");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(end.message().contains("watcher"), "{end:?}");
    // The Deploy stream of the removed token is closed the same way.
    let (_, end) = tokio::time::timeout(Duration::from_secs(120), gone_stream.drain())
        .await
        .expect("the removed token's Deploy stream was not closed");
    let end = end.expect("the Deploy stream ends with a status");
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(end.message().contains("gone"), "{end:?}");

    // The removed token is refused from now on; the kept one still works.
    let r = client
        .get_status(authed(
            GetStatusRequest {
                deployment_id: id.clone(),
            },
            Some(&watch_secret),
        ))
        .await;
    assert_eq!(code_of(r), Code::Unauthenticated);
    client
        .cancel_deployment(authed(
            CancelRequest {
                deployment_id: id.clone(),
            },
            Some(&deploy_secret),
        ))
        .await
        .expect("the kept token still works");
    assert!(server.log_text().contains("tokens file reloaded"));

    // A broken tokens file on SIGHUP keeps the tokens in force.
    std::fs::write(&tokens, "this is [not a tokens file").unwrap();
    server.hangup();
    eventually(STATE_LIMIT, "the refused reload in the log", || {
        server
            .log_text()
            .contains("tokens file not reloaded")
            .then_some(())
    })
    .await;
    client
        .cancel_deployment(authed(
            CancelRequest {
                deployment_id: other_id.clone(),
            },
            Some(&deploy_secret),
        ))
        .await
        .expect("the kept token still works after a bad reload");
    let r = client
        .get_status(authed(
            GetStatusRequest { deployment_id: id },
            Some(&watch_secret),
        ))
        .await;
    assert_eq!(
        code_of(r),
        Code::Unauthenticated,
        "the removed one stays removed"
    );
}

#[test]
fn without_tokens_only_loopback_unless_insecure() {
    let dir = tempfile::tempdir().unwrap();
    // Neither the gRPC nor the HTTP side (metrics, health) starts on a non-loopback
    // address without tokens; the refusal names the address.
    for (grpc, http) in [("0.0.0.0:0", "127.0.0.1:0"), ("127.0.0.1:0", "0.0.0.0:0")] {
        let out = Command::new(binary())
            .args(["serve", "--listen", grpc, "--http-listen", http])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "a server without tokens started with --listen {grpc} --http-listen {http}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("refusing to listen on 0.0.0.0:0"), "{err}");
    }

    // With --insecure-no-auth it starts, and warns.
    let log = dir.path().join("insecure.log");
    let mut child = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--http-listen",
            "127.0.0.1:0",
            "--insecure-no-auth",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("NO_COLOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut text = String::new();
    for _ in 0..400 {
        text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("stevedore listening") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("stevedore listening"), "{text}");
    assert!(text.contains("WITHOUT authentication"), "{text}");
}

// ---------------------------------------------------------------------------
// TLS and mTLS
// ---------------------------------------------------------------------------

#[tokio::test]
async fn mtls_admits_only_clients_with_a_cert_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("stevedore test ca");
    let other_ca = TestCa::new("some other ca");
    let (server_cert, server_key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let (client_cert, client_key) = ca.leaf(&["client-ci"]);
    let (wrong_cert, wrong_key) = other_ca.leaf(&["client-ci"]);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "server.pem", &server_cert);
    let key_path = write(dir.path(), "server.key", &server_key);
    let client_cert_path = write(dir.path(), "client.pem", &client_cert);
    let client_key_path = write(dir.path(), "client.key", &client_key);

    let server = TestServer::start_with(
        |c| {
            c.security.tls_cert = Some(cert_path.clone());
            c.security.tls_key = Some(key_path.clone());
            c.security.tls_client_ca = Some(ca_path.clone());
        },
        Default::default(),
    )
    .await;
    let url = format!("https://{}", server.grpc_addr);

    /// Lists over `url`; an error says whether the connection or the call failed.
    async fn list_with(url: &str, tls: Option<ClientTlsConfig>) -> Result<(), String> {
        let mut endpoint = Channel::from_shared(url.to_owned()).unwrap();
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        proto::deployer_client::DeployerClient::new(channel)
            .list_deployments(ListDeploymentsRequest::default())
            .await
            .map(drop)
            .map_err(|e| format!("call: {e:?}"))
    }
    let tls = |identity: Option<(&str, &str)>| {
        let mut t = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca.pem()))
            .domain_name("localhost");
        if let Some((c, k)) = identity {
            t = t.identity(Identity::from_pem(c, k));
        }
        t
    };

    list_with(&url, Some(tls(Some((&client_cert, &client_key)))))
        .await
        .expect("a client with a cert from the CA is served");
    // Each refusal is the TLS listener's, after a TCP connection was made (not a
    // server that cannot be reached): plaintext is hung up on, the TLS alerts name
    // the reason.
    let plaintext = list_with(&format!("http://{}", server.grpc_addr), None)
        .await
        .expect_err("plaintext was served");
    assert!(
        plaintext.starts_with("call: ") && plaintext.contains("transport error"),
        "{plaintext}"
    );
    let wrong = list_with(&url, Some(tls(Some((&wrong_cert, &wrong_key)))))
        .await
        .expect_err("a cert from another CA was accepted");
    assert!(wrong.contains("UnknownCA"), "{wrong}");
    let no_cert = list_with(&url, Some(tls(None)))
        .await
        .expect_err("a client without a cert was accepted");
    assert!(no_cert.contains("CertificateRequired"), "{no_cert}");

    // The HTTP listener takes the same settings.
    let healthz = format!("https://localhost:{}/healthz", server.http_addr.port());
    // curl runs as an async child: the in-process server shares this test's runtime.
    let port = server.http_addr.port();
    let curl = async |extra: &[&str], url: &str| {
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--resolve"])
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(&ca_path)
            .args(extra)
            .arg(url)
            .output()
            .await
            .unwrap()
    };
    let ok = curl(
        &[
            "--cert",
            client_cert_path.to_str().unwrap(),
            "--key",
            client_key_path.to_str().unwrap(),
        ],
        &healthz,
    )
    .await;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("ok"));
    // Without a client cert: a TLS failure once connected (35 SSL connect error, 55
    // send or 56 receive failure), not 7 (cannot connect) or 28 (timeout).
    let no_cert = curl(&[], &healthz).await;
    assert!(
        matches!(no_cert.status.code(), Some(35 | 55 | 56)),
        "HTTP without a client cert: {:?} {}",
        no_cert.status,
        String::from_utf8_lossy(&no_cert.stderr)
    );
    // Plain HTTP gets the TLS listener's alert bytes back, which curl reads as a
    // malformed (HTTP/0.9) answer: the listener was reached and spoke only TLS.
    let plain = curl(&[], &format!("http://127.0.0.1:{port}/healthz")).await;
    let plain_err = String::from_utf8_lossy(&plain.stderr);
    assert!(
        plain.status.code() == Some(1) && plain_err.contains("HTTP/0.9"),
        "plaintext HTTP: {:?} {plain_err}",
        plain.status
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// limits
// ---------------------------------------------------------------------------

#[tokio::test]
async fn over_limit_deploys_and_watches_get_resource_exhausted_at_once() {
    require_docker();
    let server = TestServer::start_with(
        |c| {
            c.limits.max_in_flight = 1;
            c.limits.max_queued = 1;
            c.limits.max_watch_streams = 1;
        },
        Default::default(),
    )
    .await;
    let mut client = server.client().await;
    let app = unique_app("limit-a");
    let other = unique_app("limit-b");
    let _guards = (AppGuard(app.clone()), AppGuard(other.clone()));

    let (first, _s1) = start_deploy(&mut client, authed(holding_request(&app), None)).await;
    let (queued, _s2) = start_deploy(&mut client, authed(holding_request(&app), None)).await;

    // A third for the same app would queue beyond the cap; another app would be a
    // second in flight. Both are refused at once, not left hanging.
    let guard = Duration::from_secs(60);
    for (req, limit) in [
        (holding_request(&app), "queued"),
        (holding_request(&other), "apps are already deploying"),
    ] {
        let r = tokio::time::timeout(guard, client.deploy(req))
            .await
            .expect("a refused deploy returns instead of hanging");
        let e = r.expect_err("refused");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains(limit), "{e:?}");
    }
    assert!(app_containers(&other).is_empty());

    // One watch stream is allowed, the second is refused.
    let watch = |id: &str| WatchRequest {
        deployment_id: id.to_owned(),
        after_sequence: 0,
    };
    let _w1 = client
        .watch_deployment(watch(&first))
        .await
        .expect("first watch");
    let e = client
        .watch_deployment(watch(&first))
        .await
        .expect_err("second watch refused");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");

    let rejections = server.server.as_ref().unwrap().engine.rejections().clone();
    assert_eq!(rejections.get(Rejection::Queued), 1);
    assert_eq!(rejections.get(Rejection::InFlight), 1);
    assert_eq!(rejections.get(Rejection::WatchStreams), 1);
    let snapshot = rejections.snapshot();
    assert!(
        snapshot.contains(&("deployments_queued", 1)),
        "{snapshot:?}"
    );
    // …and exported as a metric per limit.
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    for limit in [
        "deployments_queued",
        "deployments_in_flight",
        "watch_streams",
    ] {
        let line = format!("stevedore_rejections_total{{limit=\"{limit}\"}} 1");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    for id in [queued, first] {
        client
            .cancel_deployment(CancelRequest { deployment_id: id })
            .await
            .unwrap();
    }
    // With both ended, a deployment of the other app is admitted again (the place is
    // freed when the deployment's task returns, just after its terminal update).
    let mut attempts = 0;
    let s3 = loop {
        match client.deploy(holding_request(&other)).await {
            Ok(s) => break s.into_inner(),
            Err(e) if e.code() == Code::ResourceExhausted && attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("not admitted after the others ended: {e:?}"),
        }
    };
    let next = Updates::new(s3, 0).next_update().await.deployment_id;
    client
        .cancel_deployment(CancelRequest {
            deployment_id: next,
        })
        .await
        .unwrap();
    server.stop().await;
}

/// A relay on a unix socket in front of the Docker socket that counts the engine API
/// requests waiting for their answer (sent, no byte of the response back yet): what
/// `--max-docker-calls` caps, seen on the wire. Streams the server does not count as
/// calls (a pull, a followed log, an exec's output, a build) are relayed uncounted,
/// and so is whatever follows them on their connection.
///
/// To make overlaps happen rather than hope for them, each counted request is held
/// until another one waits too, or for `HOLD` at most.
struct EngineTap {
    path: PathBuf,
    waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    counted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl EngineTap {
    const HOLD: Duration = Duration::from_millis(250);

    fn start(dir: &Path) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        let path = dir.join("engine-tap.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (waiting, peak, counted) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (w, p, c) = (waiting.clone(), peak.clone(), counted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (w, p, c) = (w.clone(), p.clone(), c.clone());
                tokio::spawn(async move {
                    let Ok(engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (er, ew) = engine.into_split();
                    let awaiting = Arc::new(std::sync::atomic::AtomicBool::new(false));
                    tokio::join!(
                        Self::requests(cr, ew, awaiting.clone(), w.clone(), p, c),
                        Self::answers(er, cw, awaiting, w),
                    );
                });
            }
        });
        Self {
            path,
            waiting,
            peak,
            counted,
            _task: task,
        }
    }

    /// Whether a request (its request line) is one of the streams the server does not
    /// run as a capped call.
    fn is_stream(request_line: &str) -> bool {
        let target = request_line.split(' ').nth(1).unwrap_or_default();
        target.contains("/images/create")
            || target.contains("/build")
            || target.contains("/attach")
            || (target.contains("/exec/") && target.contains("/start"))
            || (target.contains("/logs") && target.contains("follow=true"))
    }

    /// Client to engine: finds each request's head, counts it and holds it.
    async fn requests(
        mut from: tokio::net::unix::OwnedReadHalf,
        mut to: tokio::net::unix::OwnedWriteHalf,
        awaiting: std::sync::Arc<std::sync::atomic::AtomicBool>,
        waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
        counted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        // Bytes of the current request's body still to relay as they come.
        let mut body = 0usize;
        let mut raw = false;
        loop {
            let n = match from.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            loop {
                if raw {
                    if to.write_all(&buf).await.is_err() {
                        return;
                    }
                    buf.clear();
                    break;
                }
                if body > 0 {
                    let take = body.min(buf.len());
                    if to.write_all(&buf[..take]).await.is_err() {
                        return;
                    }
                    buf.drain(..take);
                    body -= take;
                    if body > 0 || buf.is_empty() {
                        break;
                    }
                }
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    break;
                };
                let head: Vec<u8> = buf.drain(..end + 4).collect();
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let request_line = text.lines().next().unwrap_or_default().to_owned();
                let header = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                };
                body = header("content-length:")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                raw = Self::is_stream(&request_line)
                    || header("transfer-encoding:").is_some_and(|v| v.contains("chunked"))
                    || header("upgrade:").is_some();
                if !raw {
                    counted.fetch_add(1, SeqCst);
                    awaiting.store(true, SeqCst);
                    let now = waiting.fetch_add(1, SeqCst) + 1;
                    peak.fetch_max(now, SeqCst);
                    let held = tokio::time::Instant::now();
                    while waiting.load(SeqCst) < 2 && held.elapsed() < Self::HOLD {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                if to.write_all(&head).await.is_err() {
                    return;
                }
            }
        }
        let _ = to.shutdown().await;
    }

    /// Engine to client: the first byte of an answer ends its request's wait.
    async fn answers(
        mut from: tokio::net::unix::OwnedReadHalf,
        mut to: tokio::net::unix::OwnedWriteHalf,
        awaiting: std::sync::Arc<std::sync::atomic::AtomicBool>,
        waiting: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if awaiting.swap(false, SeqCst) {
                waiting.fetch_sub(1, SeqCst);
            }
            if to.write_all(&chunk[..n]).await.is_err() {
                break;
            }
        }
        if awaiting.swap(false, SeqCst) {
            waiting.fetch_sub(1, SeqCst);
        }
        let _ = to.shutdown().await;
    }

    /// (most requests waiting at once, requests counted) since the last call.
    fn take(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        let peak = self.peak.swap(self.waiting.load(SeqCst), SeqCst);
        (peak, self.counted.swap(0, SeqCst))
    }
}

/// Deploys one app each for `apps` at once on a server started with `args` whose engine
/// is behind `tap`; every deploy must succeed. Returns the tap's (peak, counted).
async fn deploy_at_once_through(tap: &EngineTap, args: &[&str], apps: usize) -> (usize, usize) {
    let data = tempfile::tempdir().unwrap();
    let host = format!("unix://{}", tap.path.display());
    let mut all = vec!["--docker-host", host.as_str()];
    all.extend_from_slice(args);
    let server = BinaryServer::spawn(data.path(), &all);
    let client = connect(server.grpc_addr).await;
    tap.take();
    let names: Vec<String> = (0..apps).map(|_| unique_app("dockercalls")).collect();
    let _guards: Vec<AppGuard> = names.iter().map(|a| AppGuard(a.clone())).collect();
    let runs = names.iter().map(|app| {
        let mut client = client.clone();
        let req = web_request(app, "stevedore-test/web:1");
        async move { deploy(&mut client, req).await }
    });
    for updates in futures_util::future::join_all(runs).await {
        let end = terminal(&updates);
        assert_eq!(
            end.phase(),
            proto::Phase::Complete,
            "{}\nserver log:\n{}",
            end.message,
            server.log_text()
        );
    }
    tap.take()
}

/// `--max-docker-calls 1` on the binary, against the real engine: three deploys at once
/// (each a dozen or more engine calls, each held at the tap until another comes or
/// 250 ms pass) never have two engine calls waiting for an answer at once. The same
/// deploys with the default cap (32) do, so the tap sees overlaps when they happen.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_docker_calls_caps_the_engine_calls_in_progress() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let tap = EngineTap::start(dir.path());

    let (peak, counted) = deploy_at_once_through(&tap, &["--max-docker-calls", "1"], 3).await;
    assert!(counted >= 3 * 5, "the tap saw the engine calls: {counted}");
    assert_eq!(
        peak, 1,
        "--max-docker-calls 1: at most one engine call in progress at a time ({counted} calls)"
    );

    let (peak, counted) = deploy_at_once_through(&tap, &[], 3).await;
    assert!(
        peak >= 2,
        "without the cap the same deploys overlap at the engine ({counted} calls, peak {peak})"
    );
}

#[tokio::test]
async fn an_oversized_request_gets_a_clear_error() {
    let server = TestServer::start_with(
        |c| c.limits.max_request_bytes = 64 * 1024,
        Default::default(),
    )
    .await;
    let mut client = server.client().await;
    let mut req = web_request(&unique_app("big"), "stevedore-test/web:1");
    req.labels.insert("big".into(), "x".repeat(100 * 1024));
    let e = client.deploy(req).await.expect_err("refused");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("too large") && e.message().contains("65536"),
        "{e:?}"
    );
    // The refusal is counted, and exported per limit.
    let rejections = server.server.as_ref().unwrap().engine.rejections().clone();
    assert_eq!(rejections.get(Rejection::MessageSize), 1);
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains(r#"stevedore_rejections_total{limit="message_size"} 1"#),
        "{metrics}"
    );
    // A request under the limit is decoded (and then validated as usual).
    let mut req = web_request("", "stevedore-test/web:1");
    req.labels.insert("small".into(), "x".repeat(1024));
    let e = client.deploy(req).await.expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    server.stop().await;
}

/// `--max-response-bytes`: a message over it fails the call with OUT_OF_RANGE naming
/// the limit; smaller answers on the same server are served.
#[tokio::test]
async fn an_answer_over_max_response_bytes_fails_with_out_of_range() {
    require_docker();
    let server =
        TestServer::start_with(|c| c.limits.max_response_bytes = 1024, Default::default()).await;
    let mut client = server.client().await;
    let app = unique_app("biganswer");
    let _guard = AppGuard(app.clone());
    // The first update lists the env keys: 40 keys of 40 bytes make it over 1 KiB. The
    // image does not exist, so the deployment ends on its own in PULLING.
    let image = format!(
        "{}/stevedore-test/missing-{}:1",
        registry(),
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    );
    let mut req = web_request(&app, &image);
    for i in 0..40 {
        req.env.insert(format!("KEY_{i:036}"), "v".into());
    }
    let mut stream = client.deploy(req).await.expect("accepted").into_inner();
    let e = tokio::time::timeout(Duration::from_secs(60), stream.message())
        .await
        .expect("the stream answers")
        .expect_err("an update over the limit was sent");
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("1024"), "{e:?}");
    let listed = client
        .list_deployments(ListDeploymentsRequest {
            app: app.clone(),
            ..Default::default()
        })
        .await
        .expect("a small answer is served")
        .into_inner();
    assert_eq!(listed.deployments.len(), 1);
    server.stop().await;
}

/// The HTTP/2 flags reach the wire: the server's SETTINGS announce
/// `--max-concurrent-streams`, and with `--keepalive-interval` / `--keepalive-timeout`
/// a client that completes the handshake but never answers a PING is pinged, then
/// disconnected.
#[tokio::test]
async fn http2_limits_reach_the_wire_and_a_client_that_never_answers_pings_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(
        |c| {
            c.limits.max_concurrent_streams = 7;
            c.limits.keepalive_interval = Duration::from_secs(1);
            c.limits.keepalive_timeout = Duration::from_secs(1);
        },
        Default::default(),
    )
    .await;
    let mut tcp = tokio::net::TcpStream::connect(server.grpc_addr)
        .await
        .unwrap();
    // The connection preface and an empty SETTINGS frame; nothing else, ever.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read_all = async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    // 20 s: far above the 2 s the flags give, below the 40 s of the defaults (so a
    // server that ignored the flags fails here).
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("the server closed the connection of a client that does not answer pings");
    // Walk the frames: a 9-byte header (length, type, flags, stream), then the payload.
    let mut frames: Vec<(u8, u8, &[u8])> = Vec::new();
    let mut at = 0;
    while at + 9 <= received.len() {
        let len = u32::from_be_bytes([0, received[at], received[at + 1], received[at + 2]]);
        let end = (at + 9 + len as usize).min(received.len());
        frames.push((received[at + 3], received[at + 4], &received[at + 9..end]));
        at = end;
    }
    let kinds: Vec<(u8, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
    // The server's own SETTINGS (type 4, not an ACK): 6-byte (id, value) pairs;
    // SETTINGS_MAX_CONCURRENT_STREAMS is id 3.
    let settings = frames
        .iter()
        .find(|f| f.0 == 4 && f.1 & 1 == 0)
        .unwrap_or_else(|| panic!("no SETTINGS among the frames (type, flags) {kinds:?}"));
    let params: Vec<(u16, u32)> = settings
        .2
        .chunks_exact(6)
        .map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
        .collect();
    assert!(params.contains(&(3, 7)), "SETTINGS {params:?}");
    // A PING (type 6) without the ACK flag was sent before the hang-up.
    assert!(
        kinds.iter().any(|&(t, flags)| t == 6 && flags & 1 == 0),
        "no PING among the frames (type, flags) {kinds:?}"
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// deploy policy
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_refused_registry_or_privileged_port_gets_permission_denied() {
    let server = TestServer::start_with(
        |c| c.security.allow_registries = vec![registry()],
        Default::default(),
    )
    .await;
    let mut client = server.client().await;
    let app = unique_app("policy");
    let _guard = AppGuard(app.clone());

    let e = client
        .deploy(web_request(&app, "busybox"))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("docker.io/library/busybox"), "{e:?}");

    let e = client
        .deploy(web_request(&app, "127.0.0.1:50001/stevedore-test/web:1"))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    let mut req = web_request(&app, &format!("{}/stevedore-test/web:1", registry()));
    req.ports[0].host_port = 80;
    let e = client.deploy(req).await.expect_err("refused");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().starts_with("ports[0].host_port"), "{e:?}");

    let rejections = server.server.as_ref().unwrap().engine.rejections().clone();
    assert_eq!(rejections.get(Rejection::Policy), 3);
    let (_, metrics) = http_get(&server.http_url("/metrics")).await;
    assert!(
        metrics.contains(r#"stevedore_rejections_total{limit="policy"} 3"#),
        "{metrics}"
    );
    assert!(app_containers(&app).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn registry_credentials_appear_nowhere() {
    require_docker();
    let image = private_image();
    let dir = tempfile::tempdir().unwrap();
    // Env values and the webhook secret must not appear anywhere either.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let secrets = [
        AUTH_USER.to_owned(),
        AUTH_PASSWORD.to_owned(),
        format!("idtok-{tag}"),
        format!("envval-{tag}"),
        format!("hooksecret-{tag}"),
    ];
    let server = BinaryServer::spawn_with_env(
        dir.path(),
        &[
            "--allow-registry",
            &registry(),
            "--allow-registry",
            &auth_registry(),
            "--webhook",
            "http://127.0.0.1:9/hook",
            "--webhook-secret",
            &secrets[4],
        ],
        &[("RUST_LOG", "debug")],
    );
    let mut client = connect(server.grpc_addr).await;
    let app = unique_app("creds");
    let _guard = AppGuard(app.clone());

    // The registry wants credentials: without them the pull fails, and says why.
    let without = deploy(&mut client, web_request(&app, &image)).await;
    assert_well_formed(&without);
    let end = terminal(&without);
    assert_eq!(end.phase(), proto::Phase::Failed, "{end:?}");
    let why = end.message.to_lowercase();
    assert!(
        [
            "unauthorized",
            "authentication required",
            "no basic auth credentials"
        ]
        .iter()
        .any(|s| why.contains(s)),
        "the failure names the missing credentials: {}",
        end.message
    );

    // With them (sent to the engine, never stored) the same image is pulled.
    let mut req = web_request(&app, &image);
    req.env
        .insert("DATABASE_PASSWORD".into(), secrets[3].clone());
    req.registry_auth = Some(RegistryAuth {
        username: secrets[0].clone(),
        password: secrets[1].clone(),
        identity_token: String::new(),
    });
    let updates = deploy(&mut client, req).await;
    assert_well_formed(&updates);
    let end = terminal(&updates);
    assert_eq!(end.phase(), proto::Phase::Complete, "{end:?}");
    assert!(
        updates.iter().any(|u| u.pull.is_some()),
        "the image was pulled with the credentials"
    );
    let _ = Command::new("docker").args(["rmi", "-f", &image]).output();

    // A second deployment with an identity token (refused by the policy first: the
    // refusal is audited, and must not name the token either).
    let mut req = web_request(&app, "busybox");
    req.registry_auth = Some(RegistryAuth {
        username: String::new(),
        password: String::new(),
        identity_token: secrets[2].clone(),
    });
    assert_eq!(code_of(client.deploy(req).await), Code::PermissionDenied);

    let id = end.deployment_id.clone();
    let status = client
        .get_status(GetStatusRequest {
            deployment_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let list = client
        .list_deployments(ListDeploymentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let replayed = watch(&mut client, &id, 0).await.unwrap();
    let container = end.result.as_ref().unwrap().container_id.clone();
    let inspect = docker(&["inspect", &container]);

    // The refusal reaches the audit log (written in the background).
    let audit_path = dir.path().join("audit.log");
    eventually(STATE_LIMIT, "the refusal in the audit log", || {
        std::fs::read_to_string(&audit_path)
            .unwrap_or_default()
            .contains("\"refused\"")
            .then_some(())
    })
    .await;
    let audit = std::fs::read_to_string(&audit_path).unwrap();
    assert!(
        audit.contains("\"refused\"") && audit.contains("\"accepted\""),
        "{audit}"
    );

    let log = server.log_text();
    assert!(log.contains("DEBUG"), "the server logged at debug level");
    assert!(log.contains("stevedore::audit"), "the refusal was audited");
    let places = [
        ("server log (debug) and audit events", log),
        ("audit log", audit),
        ("data dir (store, audit log)", all_files_text(dir.path())),
        ("updates", format!("{updates:?}")),
        ("replayed updates", format!("{replayed:?}")),
        ("GetStatus", format!("{status:?}")),
        ("ListDeployments", format!("{list:?}")),
    ];
    for (place, text) in &places {
        for secret in &secrets {
            assert!(!text.contains(secret.as_str()), "{secret} found in {place}");
        }
    }
    // The container has its env value (it was sent), and nothing else of these.
    assert!(
        inspect.contains(&secrets[3]),
        "the env value reached the container"
    );
    for secret in secrets.iter().filter(|s| **s != secrets[3]) {
        assert!(
            !inspect.contains(secret.as_str()),
            "{secret} found in the container"
        );
    }
}

/// A refused TLS handshake is diagnosable from the server's end: on both listeners the
/// log names the peer and rustls' reason (here: a client with no certificate where
/// mTLS requires one, and plain text sent to a TLS port).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tls_handshake_is_logged_with_peer_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("stevedore test ca");
    let (server_cert, server_key) = ca.leaf(&["localhost", "127.0.0.1"]);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "server.pem", &server_cert);
    let key_path = write(dir.path(), "server.key", &server_key);
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let server = BinaryServer::spawn(
        &data,
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--tls-client-ca",
            ca_path.to_str().unwrap(),
        ],
    );

    // gRPC: a TLS client without a certificate.
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca.pem()))
        .domain_name("localhost");
    let refused = async {
        let channel = Channel::from_shared(format!("https://{}", server.grpc_addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await?;
        proto::deployer_client::DeployerClient::new(channel)
            .list_deployments(ListDeploymentsRequest::default())
            .await
            .map(drop)
            .map_err(|e| e.into())
    }
    .await;
    let refused: Result<(), Box<dyn std::error::Error>> = refused;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    // HTTP: plain text to the TLS port.
    let plain = Command::new("curl")
        .args([
            "-sS",
            "-m",
            "5",
            &format!("http://{}/healthz", server.http_addr),
        ])
        .output()
        .unwrap();
    assert!(
        !plain.status.success(),
        "plain HTTP was served on the TLS port"
    );

    let grpc_line = format!("listener={}", server.grpc_addr);
    let http_line = format!("listener={}", server.http_addr);
    eventually(
        Duration::from_secs(30),
        "both refused handshakes in the server log",
        || {
            let log = server.log_text();
            let refused: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("tls handshake refused") && l.contains("peer=127.0.0.1:"))
                .collect();
            let both = refused
                .iter()
                .any(|l| l.contains(&grpc_line) && l.contains("reason="))
                && refused
                    .iter()
                    .any(|l| l.contains(&http_line) && l.contains("reason="));
            both.then_some(())
        },
    )
    .await;
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(&grpc_line) && l.to_lowercase().contains("certificate")),
        "the gRPC refusal names the missing client certificate:\n{log}"
    );
}

/// Issue 17: SIGHUP to a server started without --tokens-file is not ignored without
/// a word: it logs that authentication is off and nothing was reloaded, and the server
/// keeps serving.
#[tokio::test]
async fn sighup_without_a_tokens_file_says_nothing_was_reloaded() {
    require_docker();
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::spawn(dir.path(), &[]);
    server.hangup();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !server.log_text().contains("SIGHUP: nothing reloaded") {
        assert!(
            std::time::Instant::now() < deadline,
            "no word about SIGHUP; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(server.log_text().contains("authentication is off"));
    assert!(server.child.try_wait().unwrap().is_none(), "still running");
}
