//! The swarm test environment itself (`bash scripts/swarm-env.sh up`, docs/SWARM.md):
//! three ready nodes with one manager, every node pulls from the registry, and a
//! host-mode service runs one task per node that the host reaches at each node's
//! address. A broken environment fails here first, with a message that says what.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigPublishModeEnum, EndpointSpec, EndpointSpecModeEnum,
    LocalNodeState, ServiceSpec, ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec,
    TaskSpecContainerSpec,
};
use bollard::query_parameters::{CreateImageOptionsBuilder, RemoveImageOptions};
use common::swarm::{self, ServiceGuard, call};
use futures_util::TryStreamExt;

#[tokio::test]
async fn the_swarm_has_three_ready_nodes_and_one_manager() {
    let env = swarm::env();
    let manager = swarm::manager().await;
    let nodes = swarm::nodes(&manager).await;

    assert_eq!(nodes.len(), 3, "the swarm has 3 nodes: {nodes:#?}");
    assert!(
        nodes.iter().all(|n| n.ready),
        "every node is Ready: {nodes:#?}"
    );
    let managers: Vec<_> = nodes.iter().filter(|n| n.manager).collect();
    assert_eq!(managers.len(), 1, "one manager: {nodes:#?}");
    assert!(managers[0].leader, "the manager leads: {nodes:#?}");
    assert_eq!(
        managers[0].addr, env.nodes[0],
        "the manager is the first node"
    );
    let addrs: BTreeSet<_> = nodes.iter().map(|n| n.addr.clone()).collect();
    let expected: BTreeSet<_> = env.nodes.iter().cloned().collect();
    assert_eq!(
        addrs, expected,
        "the nodes' addresses are STEVEDORE_TEST_SWARM_NODES"
    );

    // Each node's own engine answers on its socket and is in this swarm.
    for socket in &env.sockets {
        let docker = swarm::connect(socket).await;
        let info = call(&format!("info of {socket}"), docker.info()).await;
        let s = info.swarm.unwrap_or_default();
        assert_eq!(
            s.local_node_state,
            Some(LocalNodeState::ACTIVE),
            "{socket} is in the swarm"
        );
        let id = s.node_id.unwrap_or_default();
        assert!(
            nodes.iter().any(|n| n.id == id),
            "{socket}'s node {id} is one of the manager's nodes"
        );
    }
}

#[tokio::test]
async fn every_node_pulls_an_image_the_host_pushed() {
    let env = swarm::env();
    // A unique image, pushed by the host engine to 127.0.0.1:5000 and removed there:
    // no node can have it unless its pull goes through its registry relay.
    let (image, _) = common::push_random_image(1);
    for socket in &env.sockets {
        let docker = swarm::connect(socket).await;
        let options = CreateImageOptionsBuilder::default()
            .from_image(&image)
            .build();
        call(
            &format!("{socket} pulls {image}"),
            docker
                .create_image(Some(options), None, None)
                .try_collect::<Vec<_>>(),
        )
        .await;
        let inspect = call(
            &format!("{socket} has {image}"),
            docker.inspect_image(&image),
        )
        .await;
        assert!(inspect.id.is_some(), "{socket} holds {image}");
        call(
            &format!("{socket} removes {image}"),
            docker.remove_image(&image, None::<RemoveImageOptions>, None),
        )
        .await;
    }
}

#[tokio::test]
async fn a_host_mode_service_runs_a_task_on_each_node_and_each_node_serves() {
    let env = swarm::env();
    let manager = swarm::manager().await;
    let tag = common::unique_app("swarm-env");
    let _guard = ServiceGuard::label(&env, swarm::TEST_LABEL, &tag);
    let port = swarm::unused_port(&manager).await;

    // dnsrr with a host-mode port: the only way to publish here (no IPVS in this
    // kernel, so no routing mesh and no VIP).
    let spec = ServiceSpec {
        name: Some(tag.clone()),
        labels: Some(HashMap::from([(swarm::TEST_LABEL.into(), tag.clone())])),
        task_template: Some(TaskSpec {
            container_spec: Some(TaskSpecContainerSpec {
                image: Some(env.images.web_v1.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated { replicas: Some(3) }),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            mode: Some(EndpointSpecModeEnum::DNSRR),
            ports: Some(vec![EndpointPortConfig {
                target_port: Some(8080),
                published_port: Some(i64::from(port)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    };
    call("create service", manager.create_service(spec, None)).await;

    let tasks = swarm::wait_tasks(
        &manager,
        &tag,
        Duration::from_secs(120),
        "3 running tasks",
        |tasks| tasks.iter().filter(|t| t.running()).count() == 3,
    )
    .await;
    let on: BTreeSet<_> = tasks
        .iter()
        .filter(|t| t.running())
        .map(|t| t.node_addr.clone())
        .collect();
    let expected: BTreeSet<_> = env.nodes.iter().cloned().collect();
    assert_eq!(on, expected, "one task on each node: {tasks:#?}");
    for t in tasks.iter().filter(|t| t.running()) {
        assert_eq!(
            t.node_port(8080),
            Some(port),
            "task {} publishes {port}",
            t.id
        );
    }

    let bodies =
        swarm::wait_all_nodes_serve(&env, port, "/", Duration::from_secs(60), |b| b == "v1\n")
            .await;
    assert_eq!(bodies, vec!["v1\n"; 3]);
}
