//! Deploy against a real Docker engine and a real registry.

mod common;

use common::*;
use stevedore::proto::{self, GetStatusRequest};

#[tokio::test]
async fn deploy_pulls_from_the_registry_and_serves() {
    require_docker();
    let (image, layer_sizes) = push_random_image(6);
    let app = unique_app("pull");
    let _guard = AppGuard(app.clone());
    let server = TestServer::start().await;
    let mut client = server.client().await;

    let updates = deploy(&mut client, web_request(&app, &image)).await;
    assert_well_formed(&updates);
    use proto::Phase::*;
    assert_eq!(
        phases(&updates),
        vec![
            Queued,
            Validating,
            Pulling,
            Creating,
            Starting,
            HealthCheck,
            Switching,
            Cleanup,
            Complete
        ]
    );

    // Byte-exact pull progress: the last pull detail says every byte of the layers
    // that had to be downloaded arrived; the random layer is among them.
    let pulls: Vec<_> = updates.iter().filter_map(|u| u.pull.clone()).collect();
    assert!(!pulls.is_empty(), "pull progress was reported");
    let last = pulls.last().unwrap();
    assert_eq!(last.image_current_bytes, last.image_total_bytes);
    // The base layers are already present locally (stevedore-test/web:1), so exactly
    // the random layer is downloaded: the total is its size in the registry manifest.
    let random_layer = *layer_sizes.last().unwrap();
    assert!(random_layer > 6 * 1024 * 1024, "{layer_sizes:?}");
    assert_eq!(
        last.image_total_bytes, random_layer,
        "manifest: {layer_sizes:?}"
    );
    let mut seen = 0;
    for p in &pulls {
        assert!(p.image_current_bytes >= seen, "pull bytes went back");
        seen = p.image_current_bytes;
    }

    let end = terminal(&updates);
    assert_eq!(end.phase(), Complete);
    assert_eq!(end.total_progress, 1.0);
    let result = end.result.clone().unwrap();
    assert!(result.success);
    assert!(
        result.image_digest.contains("sha256:"),
        "{}",
        result.image_digest
    );
    let url = result
        .endpoints
        .get("8080/tcp")
        .expect("endpoint for 8080/tcp");
    let (status, body) = http_get(url).await;
    assert_eq!((status, body.trim()), (200, "v1"));

    let status = client
        .get_status(GetStatusRequest {
            deployment_id: end.deployment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.state(), proto::DeploymentState::Succeeded);
    assert_eq!(status.last_sequence, end.sequence);
    assert_eq!(app_containers(&app).len(), 1);
    server.stop().await;
}
