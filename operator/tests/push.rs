//! The push step against real data-plane admin listeners (the `airouter` library's own server,
//! in process) on two loopback addresses standing in for two pods, plus one that is down.

use std::{sync::Arc, time::Duration};

use airouter::{
    app::App,
    config::RouterConfig,
    server::{self, Role},
};
use airouter_operator::router_pool::push::{client, push, PodOutcome, PodTarget};

const TOKEN: &str = "adm-push-test";

fn config(rpm: u32) -> String {
    format!(
        "server: {{master_key: sk-m, admin_port: 9090, admin_token: {TOKEN}}}\n\
         credentials: [{{name: c, type: mock, rpm: {rpm}}}]\n"
    )
}

/// Starts the admin API of a data plane on `ip`, returns (pod, app).
async fn stand_in(ip: &str, name: &str) -> (PodTarget, Arc<App>) {
    let loaded = RouterConfig::from_yaml(&config(10), &|_| None).unwrap();
    let app = App::new(loaded.config, None);
    let listener = server::bind(ip, 0).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(server::serve(
        listener,
        app.clone(),
        Role::Admin,
        std::future::pending(),
    ));
    (
        PodTarget {
            name: name.into(),
            ip: ip.into(),
            port,
        },
        app,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_every_pod_and_report_per_pod() {
    let (a, app_a) = stand_in("127.0.0.2", "router-a").await;
    let (b, app_b) = stand_in("127.0.0.3", "router-b").await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        PodTarget {
            name: "router-down".into(),
            ip: "127.0.0.1".into(),
            port: l.local_addr().unwrap().port(),
        }
    };
    let pods = vec![a, b, down];
    let http = client();

    let document = config(20);
    let want = RouterConfig::from_yaml(&document, &|_| None)
        .unwrap()
        .config
        .hash();
    let report = push(&http, &pods, &document, TOKEN, Duration::from_secs(2)).await;
    assert_eq!(report.synced(&want), 2, "{report:?}");
    assert_eq!(app_a.current().hash, want);
    assert_eq!(app_b.current().hash, want);
    assert!(
        matches!(report.pods[2].1, PodOutcome::Unreachable { .. }),
        "{report:?}"
    );
    assert!(report.first_failure().unwrap().contains("router-down"));

    // An invalid document is refused by every pod, which keeps serving the last good config.
    let report = push(
        &http,
        &pods[..2],
        "server: {port: 0}\n",
        TOKEN,
        Duration::from_secs(2),
    )
    .await;
    for (_, outcome) in &report.pods {
        assert!(
            matches!(outcome, PodOutcome::Rejected { status: 422, .. }),
            "{report:?}"
        );
    }
    let failure = report.first_failure().unwrap();
    for field in ["server.port", "server.master_key", "credentials"] {
        assert!(
            failure.contains(&format!("{field}: ")),
            "names {field}: {failure}"
        );
    }
    assert_eq!(app_a.current().hash, want);

    // A wrong token is refused and changes nothing.
    let report = push(
        &http,
        &pods[..1],
        &config(30),
        "wrong",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(report.pods[0].1, PodOutcome::Rejected { status: 401, .. }),
        "{report:?}"
    );
    assert_eq!(app_a.current().hash, want);
    assert!(
        !report.first_failure().unwrap().contains("sk-m"),
        "no secret in failure messages"
    );
}
