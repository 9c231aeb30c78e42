//! `stevedore deploy`'s flags and `-f FILE` into one `DeployRequest`.
//!
//! The file holds a whole `DeployRequest` in the proto3 JSON mapping (`snake_case` or
//! `lowerCamelCase` names, durations as `"60s"`), or the same names in TOML. Flags
//! override it: a scalar flag replaces the file's value, `--env`/`--label` entries
//! replace the file's entries of the same key, and a list flag given at least once
//! (`--port`, `--cmd`, `--milestone`, `--hook`) replaces the file's list.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use super::proto::{
    self, DeployRequest, HealthCheck, Hook, Milestone, PortMapping, RegistryAuth, health_check,
};

#[derive(Args, Debug, Default, Clone)]
pub(crate) struct DeployRequestArgs {
    /// App name: `[a-z0-9][a-z0-9-]{0,62}`.
    #[arg(required_unless_present = "file")]
    pub(crate) app: Option<String>,
    /// Image reference, by tag or digest.
    #[arg(required_unless_present = "file")]
    pub(crate) image: Option<String>,
    /// A whole DeployRequest as proto JSON or TOML (same names); flags override it.
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    pub(crate) file: Option<PathBuf>,
    /// Publish a container port (repeatable): `8080` on any free host port,
    /// `9000:8080` on host port 9000; `/udp` for UDP.
    #[arg(short = 'p', long = "port", value_name = "[HOST:]CONTAINER[/udp]")]
    pub(crate) ports: Vec<String>,
    /// Environment variable for the container (repeatable).
    #[arg(short = 'e', long = "env", value_name = "K=V")]
    pub(crate) env: Vec<String>,
    /// File of `K=V` lines (`#` comments; a bare `K` takes this shell's value).
    #[arg(long = "env-file", value_name = "FILE")]
    pub(crate) env_files: Vec<PathBuf>,
    /// Container label (repeatable).
    #[arg(long = "label", value_name = "K=V")]
    pub(crate) labels: Vec<String>,
    /// Command overriding the image's CMD; takes the rest of the line, so put it last.
    #[arg(long = "cmd", num_args = 1.., allow_hyphen_values = true, value_name = "ARG")]
    pub(crate) cmd: Vec<String>,
    /// Readiness check: `http:PORT[/PATH]`, `tcp:PORT`, `log:REGEX`, `docker` or `none`.
    #[arg(long, value_name = "CHECK")]
    pub(crate) health: Option<String>,
    /// How long the readiness check may take (e.g. `90s`).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) health_timeout: Option<Duration>,
    /// Upper bound for the whole deployment on the server (e.g. `10m`).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) deadline: Option<Duration>,
    /// With a proxy (`serve --proxy-socket`) and a fixed host port: how long
    /// connections open to the previous version may stay open after the switch
    /// before they are closed and it stops (e.g. `10s`; default 30s, at most 1h).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) drain_timeout: Option<Duration>,
    /// Log milestone (repeatable): a regex on the container's output, the health
    /// check's progress it stands for (0–1; negative counts matches), and a message.
    #[arg(long = "milestone", value_name = "PATTERN=PROGRESS[:DESCRIPTION]")]
    pub(crate) milestones: Vec<String>,
    /// Command run with `sh -c` inside the new container once it is healthy, before
    /// the switch (repeatable, in order).
    #[arg(long = "hook", value_name = "NAME=COMMAND")]
    pub(crate) hooks: Vec<String>,
    /// Run the hooks with a TTY (progress bars draw as on a terminal).
    #[arg(long)]
    pub(crate) hook_tty: bool,
    /// User name for a private registry.
    #[arg(long, value_name = "USER")]
    pub(crate) registry_user: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "registry_user")]
    pub(crate) registry_password_stdin: bool,
    /// A retried deploy with the same key (and app) returns the same deployment.
    #[arg(long, value_name = "KEY")]
    pub(crate) idempotency_key: Option<String>,
    /// Tasks of the app's service (a server with `--target swarm`; the docker target
    /// refuses more than 1).
    #[arg(long, value_name = "N")]
    pub(crate) replicas: Option<u32>,
    /// Swarm update order: `stop-first` or `start-first`.
    #[arg(long, value_name = "ORDER")]
    pub(crate) update_order: Option<String>,
    /// Swarm update: tasks updated at once.
    #[arg(long, value_name = "N")]
    pub(crate) update_parallelism: Option<u32>,
    /// Swarm update: how long each updated task is watched for failure (e.g. `10s`).
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub(crate) update_monitor: Option<Duration>,
}

impl DeployRequestArgs {
    /// The request: the file (if any), then the flags over it. `Err` is a usage error
    /// that names the flag or file.
    pub(crate) fn build(&self) -> Result<DeployRequest, String> {
        let mut req = match &self.file {
            Some(path) => read_file(path)?,
            None => DeployRequest::default(),
        };
        if let Some(app) = &self.app {
            req.app = app.clone();
        }
        if let Some(image) = &self.image {
            req.image = image.clone();
        }
        if !self.ports.is_empty() {
            req.ports = self
                .ports
                .iter()
                .map(|p| parse_port(p).map_err(|e| format!("--port {p}: {e}")))
                .collect::<Result<_, _>>()?;
        }
        self.apply_env_and_labels(&mut req)?;
        if !self.cmd.is_empty() {
            req.command = self.cmd.clone();
        }
        self.apply_health(&mut req)?;
        if let Some(d) = self.deadline {
            req.deadline = Some(d.into());
        }
        if let Some(d) = self.drain_timeout {
            req.drain_timeout = Some(d.into());
        }
        if !self.milestones.is_empty() {
            req.milestones = self
                .milestones
                .iter()
                .map(|m| parse_milestone(m).map_err(|e| format!("--milestone {m}: {e}")))
                .collect::<Result<_, _>>()?;
        }
        self.apply_hooks(&mut req)?;
        if let Some(user) = &self.registry_user {
            req.registry_auth = Some(self.registry_auth(user)?);
        }
        if let Some(key) = &self.idempotency_key {
            req.idempotency_key = key.clone();
        }
        self.apply_swarm(&mut req);
        if req.app.is_empty() {
            return Err("no app: give APP or `app` in the file".into());
        }
        if req.image.is_empty() {
            return Err("no image: give IMAGE or `image` in the file".into());
        }
        Ok(req)
    }

    /// `--replicas` and the `--update-*` flags (the server validates them).
    fn apply_swarm(&self, req: &mut DeployRequest) {
        if let Some(n) = self.replicas {
            req.replicas = n;
        }
        let policy = (self.update_order.is_some()
            || self.update_parallelism.is_some()
            || self.update_monitor.is_some())
        .then(|| req.update_policy.get_or_insert_with(Default::default));
        if let Some(p) = policy {
            if let Some(o) = &self.update_order {
                p.order = o.clone();
            }
            if let Some(n) = self.update_parallelism {
                p.parallelism = n;
            }
            if let Some(d) = self.update_monitor {
                p.monitor = Some(d.into());
            }
        }
    }

    /// `--env-file`, then `--env`, then `--label`: each entry replaces the same key.
    fn apply_env_and_labels(&self, req: &mut DeployRequest) -> Result<(), String> {
        for path in &self.env_files {
            for (k, v) in read_env_file(path)? {
                req.env.insert(k, v);
            }
        }
        for kv in &self.env {
            let (k, v) = match kv.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                // docker's `-e NAME`: this shell's value
                None => (kv.clone(), std::env::var(kv).unwrap_or_default()),
            };
            if k.is_empty() {
                return Err(format!("--env {kv}: expected K=V"));
            }
            req.env.insert(k, v);
        }
        for kv in &self.labels {
            let (k, v) = key_value(kv).ok_or_else(|| format!("--label {kv}: expected K=V"))?;
            req.labels.insert(k, v);
        }
        Ok(())
    }

    /// `--health` and `--health-timeout` over the file's health check.
    fn apply_health(&self, req: &mut DeployRequest) -> Result<(), String> {
        if let Some(h) = &self.health {
            let check = parse_health(h).map_err(|e| format!("--health {h}: {e}"))?;
            req.health_check.get_or_insert_with(Default::default).check = check;
        }
        if let Some(t) = self.health_timeout {
            req.health_check
                .get_or_insert_with(HealthCheck::default)
                .timeout = Some(t.into());
        }
        Ok(())
    }

    /// `--hook` replaces the file's hooks; `--hook-tty` alone gives the file's a TTY.
    fn apply_hooks(&self, req: &mut DeployRequest) -> Result<(), String> {
        if !self.hooks.is_empty() {
            req.hooks = self
                .hooks
                .iter()
                .map(|h| {
                    let (name, command) =
                        key_value(h).ok_or_else(|| format!("--hook {h}: expected NAME=COMMAND"))?;
                    Ok(Hook {
                        name,
                        command: vec!["sh".into(), "-c".into(), command],
                        tty: self.hook_tty,
                        timeout: None,
                    })
                })
                .collect::<Result<_, String>>()?;
        } else if self.hook_tty {
            for hook in &mut req.hooks {
                hook.tty = true;
            }
        }
        Ok(())
    }

    /// `--registry-user`, with the password from stdin when `--registry-password-stdin`.
    fn registry_auth(&self, user: &str) -> Result<RegistryAuth, String> {
        let password = if self.registry_password_stdin {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| format!("--registry-password-stdin: {e}"))?;
            s.trim_end_matches(['\n', '\r']).to_owned()
        } else {
            String::new()
        };
        Ok(RegistryAuth {
            username: user.to_owned(),
            password,
            identity_token: String::new(),
        })
    }
}

/// A `DeployRequest` from a proto-JSON or TOML file (TOML when the name ends in
/// `.toml`, or when the text is not a JSON object).
pub(crate) fn read_file(path: &Path) -> Result<DeployRequest, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("-f {shown}: {e}"))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml") || !text.trim().starts_with('{');
    let value: serde_json::Value = if is_toml {
        let table: toml::Table = toml::from_str(&text).map_err(|e| format!("-f {shown}: {e}"))?;
        serde_json::to_value(table).map_err(|e| format!("-f {shown}: {e}"))?
    } else {
        serde_json::from_str(&text).map_err(|e| format!("-f {shown}: {e}"))?
    };
    serde_json::from_value(value).map_err(|e| format!("-f {shown}: {e}"))
}

fn key_value(s: &str) -> Option<(String, String)> {
    let (k, v) = s.split_once('=')?;
    (!k.is_empty()).then(|| (k.to_owned(), v.to_owned()))
}

/// `8080`, `9000:8080`, `8080/udp`, `9000:8080/udp`, `0.0.0.0:9000:8080` (host address
/// and port first, as in docker).
fn parse_port(s: &str) -> Result<PortMapping, String> {
    let (ports, protocol) = match s.split_once('/') {
        Some((p, proto @ ("tcp" | "udp"))) => (p, proto),
        Some((_, other)) => return Err(format!("unknown protocol {other:?} (tcp or udp)")),
        None => (s, "tcp"),
    };
    let number = |p: &str| -> Result<u32, String> {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => Ok(n.into()),
            _ => Err(format!("{p:?} is not a port (1-65535)")),
        }
    };
    // From the right: container port, then host port, then host address (which may
    // itself hold colons: `[::1]:9000:8080`).
    let mut parts: Vec<&str> = ports.rsplitn(3, ':').collect();
    parts.reverse();
    let (host_ip, host_port, container_port) = match parts[..] {
        [ip, host, container] => {
            let ip = ip.trim_start_matches('[').trim_end_matches(']');
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| format!("{ip:?} is not an IP address"))?;
            (ip.to_owned(), number(host)?, number(container)?)
        }
        [host, container] => (String::new(), number(host)?, number(container)?),
        _ => (String::new(), 0, number(ports)?),
    };
    Ok(PortMapping {
        container_port,
        host_port,
        protocol: protocol.into(),
        host_ip,
    })
}

fn parse_health(s: &str) -> Result<Option<health_check::Check>, String> {
    use health_check::Check;
    let port = |p: &str| -> Result<u32, String> {
        p.parse::<u16>()
            .map(u32::from)
            .map_err(|_| format!("{p:?} is not a port"))
    };
    let check = match s.split_once(':') {
        None if s == "docker" => Check::Docker(proto::DockerHealthCheck {}),
        None if s == "none" => Check::None(proto::NoHealthCheck {}),
        Some(("tcp", p)) => Check::Tcp(proto::TcpHealthCheck { port: port(p)? }),
        Some(("http", rest)) => {
            let (p, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            Check::Http(proto::HttpHealthCheck {
                port: port(p)?,
                path: path.into(),
                expect_status: 0,
            })
        }
        Some(("log", pattern)) if !pattern.is_empty() => Check::Log(proto::LogHealthCheck {
            pattern: pattern.into(),
        }),
        _ => return Err("expected http:PORT[/PATH], tcp:PORT, log:REGEX, docker or none".into()),
    };
    Ok(Some(check))
}

/// `PATTERN=PROGRESS[:DESCRIPTION]`; the pattern may itself hold `=`: the split is at
/// the first `=` followed by a number.
fn parse_milestone(s: &str) -> Result<Milestone, String> {
    for (i, _) in s.match_indices('=') {
        let (pattern, rest) = (&s[..i], &s[i + 1..]);
        let (progress, description) = match rest.split_once(':') {
            Some((p, d)) => (p, d),
            None => (rest, ""),
        };
        if let Ok(progress) = progress.trim().parse::<f64>() {
            if pattern.is_empty() {
                return Err("empty pattern".into());
            }
            return Ok(Milestone {
                pattern: pattern.into(),
                progress,
                description: description.into(),
            });
        }
    }
    Err("expected PATTERN=PROGRESS[:DESCRIPTION], e.g. 'ready=1.0:warmed up'".into())
}

/// docker's env-file format: `K=V` lines, `#` comments, blank lines; a bare `K` takes
/// this shell's value (and is left out when it has none).
fn read_env_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--env-file {shown}: {e}"))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some(("", _)) => return Err(format!("--env-file {shown}:{}: empty name", n + 1)),
            Some((k, v)) => out.push((k.to_owned(), v.to_owned())),
            None => {
                if let Ok(v) = std::env::var(line.trim_end()) {
                    out.push((line.trim_end().to_owned(), v));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(app: &str, image: &str) -> DeployRequestArgs {
        DeployRequestArgs {
            app: Some(app.into()),
            image: Some(image.into()),
            ..Default::default()
        }
    }

    #[test]
    fn replicas_and_the_update_flags_fill_the_update_policy() {
        let req = args("web", "img:1").build().unwrap();
        assert_eq!((req.replicas, req.update_policy), (0, None));
        let req = DeployRequestArgs {
            replicas: Some(3),
            update_order: Some("start-first".into()),
            update_monitor: Some(Duration::from_secs(10)),
            ..args("web", "img:1")
        }
        .build()
        .unwrap();
        assert_eq!(req.replicas, 3);
        let p = req.update_policy.unwrap();
        assert_eq!((p.order.as_str(), p.parallelism), ("start-first", 0));
        assert_eq!(p.monitor.unwrap().seconds, 10);
    }

    #[test]
    fn ports_follow_docker_order() {
        let p = parse_port("8080").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol.as_str()),
            (0, 8080, "tcp")
        );
        let p = parse_port("9000:8080/udp").unwrap();
        assert_eq!(
            (p.host_port, p.container_port, p.protocol.as_str()),
            (9000, 8080, "udp")
        );
        assert!(parse_port("80/sctp").is_err());
        assert!(parse_port("0").is_err());
        assert!(parse_port("x:80").is_err());
        let p = parse_port("0.0.0.0:9000:8080").unwrap();
        assert_eq!(
            (p.host_ip.as_str(), p.host_port, p.container_port),
            ("0.0.0.0", 9000, 8080)
        );
        let p = parse_port("[::1]:9000:8080/udp").unwrap();
        assert_eq!((p.host_ip.as_str(), p.protocol.as_str()), ("::1", "udp"));
        assert!(parse_port("localhost:9000:8080").is_err());
    }

    #[test]
    fn health_checks_parse() {
        use health_check::Check;
        match parse_health("http:8080/ready").unwrap() {
            Some(Check::Http(h)) => assert_eq!((h.port, h.path.as_str()), (8080, "/ready")),
            other => panic!("{other:?}"),
        }
        match parse_health("http:8080").unwrap() {
            Some(Check::Http(h)) => assert_eq!(h.path, "/"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(parse_health("tcp:80"), Ok(Some(Check::Tcp(_)))));
        assert!(matches!(parse_health("log:a:b"), Ok(Some(Check::Log(l))) if l.pattern == "a:b"));
        assert!(matches!(parse_health("none"), Ok(Some(Check::None(_)))));
        assert!(matches!(parse_health("docker"), Ok(Some(Check::Docker(_)))));
        assert!(parse_health("grpc:1").is_err());
    }

    #[test]
    fn milestones_split_at_the_number() {
        let m = parse_milestone("a=b=0.5:half: way").unwrap();
        assert_eq!((m.pattern.as_str(), m.progress), ("a=b", 0.5));
        assert_eq!(m.description, "half: way");
        let m = parse_milestone("checkpoint=-1").unwrap();
        assert_eq!((m.progress, m.description.as_str()), (-1.0, ""));
        assert!(parse_milestone("no-progress").is_err());
    }

    #[test]
    fn flags_override_a_json_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.json");
        std::fs::write(
            &path,
            r#"{"app": "from-file", "image": "img:1", "env": {"A": "1", "B": "2"},
                "ports": [{"containerPort": 8080}],
                "health_check": {"http": {"port": 8080, "path": "/"}, "timeout": "30s"},
                "deadline": "120s", "drain_timeout": "60s"}"#,
        )
        .unwrap();
        let a = DeployRequestArgs {
            file: Some(path),
            app: Some("from-flag".into()),
            env: vec!["B=3".into()],
            health_timeout: Some(Duration::from_secs(5)),
            drain_timeout: Some(Duration::from_millis(2500)),
            ..Default::default()
        };
        let req = a.build().unwrap();
        assert_eq!(req.app, "from-flag");
        assert_eq!(req.image, "img:1");
        assert_eq!(req.env["A"], "1");
        assert_eq!(req.env["B"], "3");
        assert_eq!(req.ports[0].container_port, 8080);
        let hc = req.health_check.unwrap();
        assert!(matches!(hc.check, Some(health_check::Check::Http(_))));
        assert_eq!(hc.timeout.unwrap().seconds, 5);
        assert_eq!(req.deadline.unwrap().seconds, 120);
        let drain = req.drain_timeout.unwrap();
        assert_eq!((drain.seconds, drain.nanos), (2, 500_000_000));
    }

    #[test]
    fn a_toml_file_uses_the_same_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("req.toml");
        std::fs::write(
            &path,
            "app = \"web\"\nimage = \"img:1\"\ncommand = [\"sh\", \"-c\", \"x\"]\n\
             [[ports]]\ncontainer_port = 8080\nhost_port = 9000\n\
             [[milestones]]\npattern = \"ready\"\nprogress = 1.0\n",
        )
        .unwrap();
        let req = DeployRequestArgs {
            file: Some(path),
            ..Default::default()
        }
        .build()
        .unwrap();
        assert_eq!((req.app.as_str(), req.command.len()), ("web", 3));
        assert_eq!(req.ports[0].host_port, 9000);
        assert_eq!(req.milestones[0].pattern, "ready");
    }

    #[test]
    fn a_bad_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        std::fs::write(&path, r#"{"app": "x", "ports": "nope"}"#).unwrap();
        let err = DeployRequestArgs {
            file: Some(path),
            ..Default::default()
        }
        .build()
        .unwrap_err();
        assert!(err.contains("bad.json"), "{err}");
    }

    #[test]
    fn hooks_run_under_sh() {
        let mut a = args("web", "img:1");
        a.hooks = vec!["migrate=echo a=b".into()];
        a.hook_tty = true;
        let req = a.build().unwrap();
        assert_eq!(req.hooks[0].name, "migrate");
        assert_eq!(req.hooks[0].command, ["sh", "-c", "echo a=b"]);
        assert!(req.hooks[0].tty);
    }
}
