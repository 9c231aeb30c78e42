//! [`SwarmRuntime`] on bollard, for [`DockerRuntime`]: the same client, call timeout and
//! cap on concurrent calls as the container runtime. Specs are built whole from a
//! [`ServiceDef`] on every create and update (never from an inspect), ports are
//! published in host mode with DNSRR endpoints (the routing mesh needs IPVS, which a
//! host may lack), and images are pinned by digest here, by the client, as the docker
//! CLI does (bollard does not).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bollard::auth::DockerCredentials;
use bollard::models::{
    ContainerStatus, EndpointPortConfig, EndpointPortConfigProtocolEnum,
    EndpointPortConfigPublishModeEnum, EndpointSpec, EndpointSpecModeEnum, HealthConfig, NodeState,
    ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, ServiceSpecRollbackConfig,
    ServiceSpecRollbackConfigFailureActionEnum, ServiceSpecRollbackConfigOrderEnum,
    ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatusStateEnum, TaskSpec,
    TaskSpecContainerSpec, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};
use bollard::query_parameters::{
    ListNodesOptions, ListTasksOptionsBuilder, UpdateServiceOptionsBuilder,
};

use super::docker::DockerRuntime;
use super::swarm::{
    NOT_A_MANAGER, NodeInfo, ServiceDef, ServiceState, SwarmRuntime, TaskInfo, TaskState,
    UpdateState, version_param,
};
use super::{Runtime, RuntimeError};
use crate::model::{LABEL_DEPLOYMENT, Protocol, RegistryAuth, UpdateOrder};

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn credentials(auth: Option<&RegistryAuth>) -> Option<DockerCredentials> {
    auth.map(|a| DockerCredentials {
        username: (!a.username.is_empty()).then(|| a.username.clone()),
        password: (!a.password.is_empty()).then(|| a.password.clone()),
        identitytoken: (!a.identity_token.is_empty()).then(|| a.identity_token.clone()),
        ..Default::default()
    })
}

/// The whole service spec for `def`.
pub(crate) fn service_spec(def: &ServiceDef) -> ServiceSpec {
    let labels: HashMap<String, String> = def.labels.clone().into_iter().collect();
    let order = |o: UpdateOrder| match o {
        UpdateOrder::StopFirst => ServiceSpecUpdateConfigOrderEnum::STOP_FIRST,
        UpdateOrder::StartFirst => ServiceSpecUpdateConfigOrderEnum::START_FIRST,
    };
    let u = &def.update;
    ServiceSpec {
        name: Some(def.name.clone()),
        labels: Some(labels.clone()),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(def.image.clone()),
                labels: Some(labels),
                command: None,
                args: (!def.command.is_empty()).then(|| def.command.clone()),
                env: Some(def.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                stop_grace_period: def.stop_grace.map(nanos),
                health_check: def.health.as_ref().map(|h| HealthConfig {
                    test: Some(h.test.clone()),
                    interval: Some(nanos(h.interval)),
                    timeout: Some(nanos(h.timeout)),
                    retries: Some(i64::from(h.retries)),
                    start_period: Some(nanos(h.start_period)),
                    start_interval: None,
                }),
                ..Default::default()
            }),
            restart_policy: Some(TaskSpecRestartPolicy {
                condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                delay: Some(nanos(Duration::from_secs(1))),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::from(def.replicas)),
            }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(i64::from(u.parallelism)),
            delay: Some(0),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK),
            monitor: Some(nanos(u.monitor)),
            max_failure_ratio: Some(u.max_failure_ratio),
            order: Some(order(u.order)),
        }),
        // A rollback goes stop-first and never pauses: a paused rollback would leave
        // the service half old, half new.
        rollback_config: Some(ServiceSpecRollbackConfig {
            parallelism: Some(i64::from(u.parallelism)),
            delay: Some(0),
            failure_action: Some(ServiceSpecRollbackConfigFailureActionEnum::CONTINUE),
            monitor: Some(nanos(u.monitor)),
            max_failure_ratio: Some(1.0),
            order: Some(ServiceSpecRollbackConfigOrderEnum::STOP_FIRST),
        }),
        networks: None,
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: Some(
                def.ports
                    .iter()
                    .map(|p| EndpointPortConfig {
                        name: None,
                        protocol: Some(match p.protocol {
                            Protocol::Tcp => EndpointPortConfigProtocolEnum::TCP,
                            Protocol::Udp => EndpointPortConfigProtocolEnum::UDP,
                        }),
                        target_port: Some(i64::from(p.target)),
                        published_port: Some(i64::from(p.published)),
                        publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                    })
                    .collect(),
            ),
        }),
    }
}

fn update_state(s: ServiceUpdateStatusStateEnum) -> Option<UpdateState> {
    use ServiceUpdateStatusStateEnum as S;
    Some(match s {
        S::UPDATING => UpdateState::Updating,
        S::PAUSED => UpdateState::Paused,
        S::COMPLETED => UpdateState::Completed,
        S::ROLLBACK_STARTED => UpdateState::RollbackStarted,
        S::ROLLBACK_PAUSED => UpdateState::RollbackPaused,
        S::ROLLBACK_COMPLETED => UpdateState::RollbackCompleted,
        _ => return None,
    })
}

#[async_trait]
impl SwarmRuntime for DockerRuntime {
    fn endpoint(&self) -> &str {
        Runtime::endpoint(self)
    }

    async fn check_manager(&self) -> Result<(), RuntimeError> {
        let docker = self.client()?;
        let info = self.call("engine info", docker.info()).await?;
        let swarm = info.swarm.unwrap_or_default();
        if swarm.control_available == Some(true) {
            return Ok(());
        }
        let state = swarm
            .local_node_state
            .map(|s| s.to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "inactive".into());
        Err(RuntimeError::Call {
            op: "swarm check",
            reason: format!(
                "the docker engine at {} {NOT_A_MANAGER} (swarm state: {state}); run `docker swarm init` there, or point --docker-host at a manager",
                Runtime::endpoint(self)
            ),
        })
    }

    async fn resolve_digest(
        &self,
        image: &str,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError> {
        let docker = self.client()?;
        let found = self
            .call(
                "registry image inspection",
                docker.inspect_registry_image(image, credentials(auth)),
            )
            .await?;
        let digest = found.descriptor.digest.ok_or_else(|| RuntimeError::Call {
            op: "registry image inspection",
            reason: format!("the registry named no digest for {image}"),
        })?;
        Ok(format!("{}@{digest}", repository_of(image)))
    }

    async fn inspect_service(&self, name: &str) -> Result<Option<ServiceState>, RuntimeError> {
        let docker = self.client()?;
        let service = match self
            .call("service inspection", docker.inspect_service(name, None))
            .await
        {
            Ok(s) => s,
            Err(RuntimeError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let status = service.update_status.unwrap_or_default();
        Ok(Some(ServiceState {
            id: service.id.unwrap_or_default(),
            version: service.version.and_then(|v| v.index).unwrap_or_default(),
            update: status.state.and_then(update_state),
            update_message: status.message.unwrap_or_default(),
            // Labels and image only: the spec read back is never sent again (it lacks
            // the healthcheck, see the module doc of `swarm`).
            image: (service.spec.as_ref())
                .and_then(|s| s.task_template.as_ref())
                .and_then(|t| t.container_spec.as_ref())
                .and_then(|c| c.image.clone())
                .unwrap_or_default(),
            labels: (service.spec.and_then(|s| s.labels).unwrap_or_default())
                .into_iter()
                .collect(),
        }))
    }

    async fn create_service(
        &self,
        def: &ServiceDef,
        auth: Option<&RegistryAuth>,
    ) -> Result<String, RuntimeError> {
        let docker = self.client()?;
        let created = self
            .call(
                "create service",
                docker.create_service(service_spec(def), credentials(auth)),
            )
            .await?;
        Ok(created.id.unwrap_or_default())
    }

    async fn update_service(
        &self,
        id: &str,
        version: u64,
        def: &ServiceDef,
        auth: Option<&RegistryAuth>,
    ) -> Result<(), RuntimeError> {
        let docker = self.client()?;
        let options = UpdateServiceOptionsBuilder::default()
            .version(version_param(version)?)
            .build();
        self.call(
            "update service",
            docker.update_service(id, service_spec(def), options, credentials(auth)),
        )
        .await
        .map(|_| ())
    }

    async fn rollback_service(
        &self,
        id: &str,
        version: u64,
        body: &ServiceDef,
    ) -> Result<(), RuntimeError> {
        let docker = self.client()?;
        let options = UpdateServiceOptionsBuilder::default()
            .version(version_param(version)?)
            .rollback("previous")
            .build();
        // With rollback=previous the engine swaps in the previous spec it keeps, but it
        // converts the body first ("mismatched Runtime and *Spec fields" for an empty
        // one): a valid spec is sent, not applied.
        self.call(
            "roll back service",
            docker.update_service(id, service_spec(body), options, None),
        )
        .await
        .map(|_| ())
    }

    async fn remove_service(&self, name: &str) -> Result<(), RuntimeError> {
        let docker = self.client()?;
        match self
            .call("remove service", docker.delete_service(name))
            .await
        {
            Ok(()) | Err(RuntimeError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn tasks(&self, service_id: &str) -> Result<Vec<TaskInfo>, RuntimeError> {
        let docker = self.client()?;
        let filters = HashMap::from([("service", vec![service_id])]);
        let options = ListTasksOptionsBuilder::default().filters(&filters).build();
        let tasks = self
            .call("task list", docker.list_tasks(Some(options)))
            .await?;
        Ok(tasks
            .into_iter()
            .map(|t| {
                let status = t.status.unwrap_or_default();
                let ContainerStatus { exit_code, .. } = status.container_status.unwrap_or_default();
                let labels = (t.spec.and_then(|s| s.container_spec))
                    .and_then(|c| c.labels)
                    .unwrap_or_default();
                TaskInfo {
                    id: t.id.unwrap_or_default(),
                    slot: t.slot.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    node_id: t.node_id.unwrap_or_default(),
                    state: TaskState::parse(
                        &status.state.map(|s| s.to_string()).unwrap_or_default(),
                    ),
                    desired: TaskState::parse(
                        &t.desired_state.map(|s| s.to_string()).unwrap_or_default(),
                    ),
                    message: status.message.unwrap_or_default(),
                    err: status.err.unwrap_or_default(),
                    exit_code,
                    deployment: labels.get(LABEL_DEPLOYMENT).cloned().unwrap_or_default(),
                }
            })
            .collect())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, RuntimeError> {
        let docker = self.client()?;
        let nodes = self
            .call("node list", docker.list_nodes(None::<ListNodesOptions>))
            .await?;
        Ok(nodes
            .into_iter()
            .map(|n| {
                let status = n.status.unwrap_or_default();
                NodeInfo {
                    id: n.id.unwrap_or_default(),
                    hostname: (n.description.and_then(|d| d.hostname)).unwrap_or_default(),
                    addr: status.addr.unwrap_or_default(),
                    ready: status.state == Some(NodeState::READY),
                }
            })
            .collect())
    }
}

/// `registry:5000/name` of `registry:5000/name:tag` or `…@sha256:…`.
fn repository_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::swarm::{ServicePort, TaskHealth, UpdateConfig};

    #[test]
    fn repositories_lose_their_tag_and_digest_but_keep_the_registry_port() {
        assert_eq!(
            repository_of("127.0.0.1:5000/a/web:2"),
            "127.0.0.1:5000/a/web"
        );
        assert_eq!(
            repository_of("127.0.0.1:5000/a/web"),
            "127.0.0.1:5000/a/web"
        );
        assert_eq!(repository_of("web@sha256:ab"), "web");
    }

    #[test]
    fn the_spec_sent_has_the_healthcheck_host_ports_dnsrr_and_rollback() {
        let def = ServiceDef {
            name: "web".into(),
            image: "r/web@sha256:00".into(),
            command: vec!["httpd".into()],
            env: [("A".to_string(), "1".to_string())].into(),
            ports: vec![ServicePort {
                target: 8080,
                published: 18080,
                protocol: Protocol::Tcp,
            }],
            labels: [("io.stevedore.app".to_string(), "web".to_string())].into(),
            health: Some(TaskHealth {
                test: vec!["CMD-SHELL".into(), "true".into()],
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(2),
                retries: 3,
                start_period: Duration::from_secs(5),
            }),
            replicas: 3,
            update: UpdateConfig {
                parallelism: 1,
                order: UpdateOrder::StopFirst,
                monitor: Duration::from_secs(8),
                max_failure_ratio: 0.0,
            },
            stop_grace: None,
        };
        let spec = service_spec(&def);
        let c = spec.task_template.unwrap().container_spec.unwrap();
        assert_eq!(c.image.as_deref(), Some("r/web@sha256:00"));
        assert_eq!(c.env.unwrap(), ["A=1"]);
        assert_eq!(c.health_check.unwrap().retries, Some(3));
        let e = spec.endpoint_spec.unwrap();
        assert_eq!(e.mode, Some(EndpointSpecModeEnum::DNSRR));
        let port = &e.ports.unwrap()[0];
        assert_eq!(
            port.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
        assert_eq!(port.published_port, Some(18080));
        let u = spec.update_config.unwrap();
        assert_eq!(
            u.failure_action,
            Some(ServiceSpecUpdateConfigFailureActionEnum::ROLLBACK)
        );
        assert_eq!(u.monitor, Some(8_000_000_000));
        assert_eq!(spec.mode.unwrap().replicated.unwrap().replicas, Some(3));
    }
}
