//! The deploy policy of this server: which registries images may come from, whether
//! containers may publish privileged host ports, and whether deploys from source may
//! fetch local repositories. Checked on a validated
//! [`DeploySpec`] before the engine sees it; a refusal is `PERMISSION_DENIED` naming
//! what was refused (an operator can change the policy, the caller cannot).

use tonic::Status;

use crate::model::DeploySpec;
use crate::source::git;

/// Docker Hub, as image references name it when they name no registry.
const DOCKER_HUB: &str = "docker.io";

#[derive(Clone, Debug, Default)]
pub(crate) struct DeployPolicy {
    /// Allowed image prefixes, normalized (`docker.io/library/busybox`,
    /// `registry.example:5000/team`). Empty: any registry.
    allowed_registries: Vec<String>,
    /// Whether host ports 1–1023 may be published.
    pub allow_privileged_ports: bool,
    /// Whether `source.url` may be `file://` or a local path (the server's own disk).
    pub allow_local_git: bool,
}

/// The fully qualified form of an image reference: `busybox` →
/// `docker.io/library/busybox`, `team/app:1` → `docker.io/team/app:1`,
/// `index.docker.io/x` → `docker.io/x`; references naming a registry are unchanged.
/// A first component is a registry when it has a `.` or `:` or is `localhost`.
pub(crate) fn normalize_image(image: &str) -> String {
    let (first, rest) = match image.split_once('/') {
        Some((first, rest)) => (first, Some(rest)),
        None => (image, None),
    };
    match rest {
        Some(rest) if first.contains(['.', ':']) || first == "localhost" => {
            if first == "index.docker.io" || first == "registry-1.docker.io" {
                normalize_hub(rest)
            } else {
                image.to_owned()
            }
        }
        _ => normalize_hub(image),
    }
}

fn normalize_hub(path: &str) -> String {
    if path.contains('/') {
        format!("{DOCKER_HUB}/{path}")
    } else {
        format!("{DOCKER_HUB}/library/{path}")
    }
}

/// Whether `image` (normalized) is under `prefix` (normalized): the prefix must end at
/// a boundary, so `reg:5000` allows `reg:5000/x` but not `reg:50001/x`.
fn under(image: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    match image.strip_prefix(prefix) {
        Some("") => true,
        Some(rest) => rest.starts_with(['/', ':', '@']),
        None => false,
    }
}

impl DeployPolicy {
    /// A policy allowing images under `registries` (none: any registry).
    pub(crate) fn new(registries: &[String], allow_privileged_ports: bool) -> Self {
        Self {
            allowed_registries: registries
                .iter()
                .map(|r| r.trim())
                .filter(|r| !r.is_empty())
                .map(normalize_prefix)
                .collect(),
            allow_privileged_ports,
            allow_local_git: false,
        }
    }

    /// The policy with local repositories allowed (`--allow-local-git`) or not.
    pub(crate) fn with_local_git(mut self, allow: bool) -> Self {
        self.allow_local_git = allow;
        self
    }

    #[cfg(test)]
    fn allowed_registries(&self) -> &[String] {
        &self.allowed_registries
    }

    /// `Ok` when the policy allows `spec`, else `PERMISSION_DENIED` naming the image,
    /// the port or the source URL.
    pub(crate) fn check(&self, spec: &DeploySpec) -> Result<(), Status> {
        if let Some(source) = &spec.source
            && !self.allow_local_git
            && git::validate_url(&source.url).ok() == Some(git::UrlKind::Local)
        {
            return Err(Status::permission_denied(format!(
                "source.url: {} is a local repository (file:// or a path on the server's own disk); the server allows those only with --allow-local-git",
                source.display_url()
            )));
        }
        // A deploy from source runs the image it builds (the FROM images are pulled by
        // the builder, outside this check).
        if !self.allowed_registries.is_empty() && spec.source.is_none() {
            let image = normalize_image(&spec.image);
            if !self.allowed_registries.iter().any(|p| under(&image, p)) {
                return Err(Status::permission_denied(format!(
                    "image: {} ({image}) is not from an allowed registry ({})",
                    spec.image,
                    self.allowed_registries.join(", ")
                )));
            }
        }
        if !self.allow_privileged_ports {
            for (i, p) in spec.ports.iter().enumerate() {
                if p.host_port != 0 && p.host_port < 1024 {
                    return Err(Status::permission_denied(format!(
                        "ports[{i}].host_port: {} is a privileged port (below 1024); the server allows those only with --allow-privileged-ports",
                        p.host_port
                    )));
                }
            }
        }
        Ok(())
    }
}

/// A prefix is normalized like an image when it names a path under Docker Hub
/// (`busybox`, `library/busybox`); a bare registry host stays as it is.
fn normalize_prefix(prefix: &str) -> String {
    let looks_like_host = !prefix.contains('/')
        && (prefix.contains(['.', ':']) || prefix == "localhost")
        && prefix != "docker.io";
    if looks_like_host {
        prefix.to_owned()
    } else if prefix == "docker.io" || prefix == "index.docker.io" {
        DOCKER_HUB.to_owned()
    } else {
        normalize_image(prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_normalize_like_docker() {
        assert_eq!(normalize_image("busybox"), "docker.io/library/busybox");
        assert_eq!(
            normalize_image("busybox:1.36"),
            "docker.io/library/busybox:1.36"
        );
        assert_eq!(normalize_image("team/app"), "docker.io/team/app");
        assert_eq!(
            normalize_image("index.docker.io/library/busybox"),
            "docker.io/library/busybox"
        );
        assert_eq!(
            normalize_image("127.0.0.1:5000/a/b:1"),
            "127.0.0.1:5000/a/b:1"
        );
        assert_eq!(normalize_image("localhost/a"), "localhost/a");
        assert_eq!(
            normalize_image("ghcr.io/o/a@sha256:00"),
            "ghcr.io/o/a@sha256:00"
        );
    }

    /// A host port below 1024 is refused, naming the port, unless the server allows
    /// privileged ports; 0 (any port) and 1024 are not privileged.
    #[test]
    fn privileged_host_ports_need_the_flag() {
        let spec = |host_port: u32| {
            let req = crate::proto::DeployRequest {
                app: "web".into(),
                image: "127.0.0.1:5000/stevedore-test/web:1".into(),
                ports: vec![crate::proto::PortMapping {
                    container_port: 8080,
                    host_port,
                    ..Default::default()
                }],
                ..Default::default()
            };
            crate::api::convert::deploy_spec(req, "test".into()).unwrap()
        };
        let strict = DeployPolicy::new(&[], false);
        let e = strict.check(&spec(80)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .starts_with("ports[0].host_port: 80 is a privileged port"),
            "{e:?}"
        );
        assert!(strict.check(&spec(1023)).is_err());
        assert!(strict.check(&spec(1024)).is_ok());
        assert!(strict.check(&spec(0)).is_ok());
        assert!(DeployPolicy::new(&[], true).check(&spec(80)).is_ok());
    }

    #[test]
    fn prefixes_end_at_a_boundary() {
        let p = DeployPolicy::new(&["127.0.0.1:5000".into(), "busybox".into()], false);
        assert_eq!(
            p.allowed_registries(),
            ["127.0.0.1:5000", "docker.io/library/busybox"]
        );
        let ok = |image: &str| {
            let img = normalize_image(image);
            p.allowed_registries().iter().any(|x| under(&img, x))
        };
        assert!(ok("127.0.0.1:5000/stevedore-test/web:1"));
        assert!(!ok("127.0.0.1:50001/stevedore-test/web:1"));
        assert!(ok("busybox"));
        assert!(ok("busybox:1.36"));
        assert!(ok("docker.io/library/busybox@sha256:00"));
        assert!(!ok("busyboxes"));
        assert!(!ok("evil.example/busybox"));
        assert!(!ok("alpine"));
    }

    #[test]
    fn local_repositories_need_allow_local_git() {
        let spec_of = |url: &str| {
            let req = crate::proto::DeployRequest {
                app: "app".into(),
                source: Some(crate::proto::GitSource {
                    url: url.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            crate::api::convert::deploy_spec(req, "test".into()).unwrap()
        };
        let strict = DeployPolicy::default();
        let open = DeployPolicy::default().with_local_git(true);
        for url in ["file:///srv/r.git", "/srv/r.git"] {
            let spec = spec_of(url);
            let e = strict.check(&spec).unwrap_err();
            assert_eq!(e.code(), tonic::Code::PermissionDenied);
            assert!(e.message().starts_with("source.url: "), "{}", e.message());
            assert!(e.message().contains("--allow-local-git"), "{}", e.message());
            assert!(open.check(&spec).is_ok());
        }
        assert!(
            strict
                .check(&spec_of("https://git.example.invalid/r.git"))
                .is_ok()
        );
    }
}
