//! The guards' watch, on kube's mock API: a guard's delete event reaches the lifter at
//! once, with the guard as last known (its UID decides what is lifted).

use std::time::Duration;

use futures::StreamExt;
use http::{Request, Response};
use kube::client::Body;
use serde_json::json;

mod support;

#[tokio::test]
async fn a_delete_event_hands_the_last_known_guard_to_the_lifter() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let web = serde_json::to_value(support::guard(
        "web",
        3,
        json!({"selector": {}, "subjects": [{"deny": ["/x"]}]}),
    ))
    .unwrap();
    let api = tokio::spawn(async move {
        // The list, then one watch that delivers the delete; later watches are left open.
        let mut open = Vec::new();
        let mut served = 0;
        while let Some((request, send)) = handle.next_request().await {
            let query = request.uri().query().unwrap_or_default().to_owned();
            assert!(
                request.uri().path().ends_with("/janusguards"),
                "{}",
                request.uri()
            );
            let body = if !query.contains("watch=true") {
                json!({"apiVersion": "januscontroller.clustergarage.io/v1alpha1",
                       "kind": "JanusGuardList", "metadata": {"resourceVersion": "1"},
                       "items": [web]})
                .to_string()
            } else if served == 0 {
                served += 1;
                let mut gone = web.clone();
                gone["metadata"]["resourceVersion"] = json!("2");
                format!("{}\n", json!({"type": "DELETED", "object": gone}))
            } else {
                open.push(send);
                continue;
            };
            send.send_response(
                Response::builder()
                    .body(Body::from(body.into_bytes()))
                    .unwrap(),
            );
        }
    });
    let (store, events, mut deleted) = janus_controller::watch_guards(client);
    let driver = tokio::spawn(events.for_each(|_| async {}));
    let guard = tokio::time::timeout(Duration::from_secs(1), deleted.recv())
        .await
        .expect("the delete reached the lifter within a second")
        .expect("the channel is open");
    assert_eq!(guard.metadata.name.as_deref(), Some("web"));
    assert_eq!(guard.metadata.uid.as_deref(), Some("uid-web"));
    assert!(
        store.state().is_empty(),
        "the store still holds the deleted guard"
    );
    driver.abort();
    api.abort();
}
