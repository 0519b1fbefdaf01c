//! Alerts on the work, against the real binary: a shake load over TCP, cut
//! off at once, must page (`/v1/alerts`, `/metrics`) within the configured
//! seconds, and clear when the load comes back. And every metric the
//! Prometheus rules and the Grafana dashboard in docs/ read must exist in a
//! real scrape.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use hongbao_proto::Request;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bounds every wait for a condition (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(60);

/// Shakers that shake every 50 ms while `running` is true.
struct Load {
    running: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Load {
    async fn start(server: &Server, campaign: u64, users: std::ops::Range<u64>) -> Load {
        let (running, rx) = watch::channel(true);
        let mut tasks = Vec::new();
        for user in users {
            let client = server.client(user).await;
            let mut rx = rx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    if !*rx.borrow_and_update() {
                        if rx.changed().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    // Any answer will do: the load is what is measured.
                    let _ = client.request(Request::Shake { campaign, key: None }).await;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        Load { running, tasks }
    }

    fn pause(&self) {
        self.running.send_replace(false);
    }

    fn resume(&self) {
        self.running.send_replace(true);
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

async fn campaign(server: &Server, funder: u64, key: &str) -> u64 {
    server.deposit(funder, 10_000_000).await;
    let body = json!({"funder": funder, "total_fen": 10_000_000, "rule": {"count": {"packets": 100_000}},
                      "rate_per_s": 50, "win_cap_per_user": 1000, "key": key});
    let id = server.post("/v1/campaigns", body).await.ok().unwrap()["id"].as_u64().unwrap();
    server.post(&format!("/v1/campaigns/{id}/start"), json!({})).await.ok().unwrap();
    id
}

/// Polls `/v1/alerts` until `pick` finds an alert; returns it.
async fn wait_for_alert(server: &Server, what: &str, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let alerts = server.get("/v1/alerts").await.ok().unwrap();
        if let Some(a) = alerts["alerts"].as_array().unwrap().iter().find(|a| pick(a)) {
            return a.clone();
        }
        assert!(Instant::now() < deadline, "no alert {what} in time: {alerts}\nlog:\n{}", server.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_shake_count(a: &Value) -> bool {
    a["op"] == "shake" && a["signal"] == "count"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_cut_off_pages_and_its_return_clears_the_alert() {
    let server = Server::dev(&["--alert-warmup-s", "5", "--alert-fire-after-s", "3", "--alert-clear-after-s", "3"]);
    let campaign = campaign(&server, 1, "alerts-c1").await;
    // 20 shakers, one shake per 50 ms each: ~400 shakes/s.
    let load = Load::start(&server, campaign, 100..120).await;

    // Past the warm-up with the load on: ten seconds with shakes.
    let deadline = Instant::now() + PATIENCE;
    let mut loaded_seconds = BTreeSet::new();
    while loaded_seconds.len() < 10 {
        let now = server.get("/v1/live/now").await;
        if now.status == 200 && now.body["ops"]["shake"]["count"].as_u64().unwrap_or(0) >= 50 {
            loaded_seconds.insert(now.body["seq"].as_u64().unwrap());
        }
        assert!(Instant::now() < deadline, "the load did not reach the server: {}", now.body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Whether the load itself stayed in band is the detector's unit tests'
    // business (a steady load on these two shared cores may stall): here,
    // what matters is that cutting it off pages and its return clears.

    // The load stops at once: the shake count pages.
    load.pause();
    let alert = wait_for_alert(&server, "shake count firing", |a| is_shake_count(a) && a["state"] == "firing").await;
    assert_eq!(alert["severity"], "page", "{alert}");
    assert_eq!(alert["baseline"], "ewma", "{alert}");
    assert!(alert["cleared_ms"].is_null(), "{alert}");
    assert!(alert["value"].as_f64().unwrap() < alert["low"].as_f64().unwrap(), "{alert}");
    assert!(alert["expected"].as_f64().unwrap() >= 50.0, "{alert}");
    assert!(alert["message"].as_str().unwrap().starts_with("shake requests "), "{alert}");
    let id = alert["id"].as_u64().unwrap();
    assert!(metric(&server, "hongbao_alerts_fired_total", &["op=\"shake\"", "signal=\"count\""]).await >= 1.0);
    assert!(metric(&server, "hongbao_alerts_firing", &[]).await >= 1.0);
    assert!(server.get("/v1/live/now").await.body["alerts_firing"].as_u64().unwrap() >= 1);

    // The load comes back: the alert clears.
    load.resume();
    let cleared = wait_for_alert(&server, "shake count cleared", |a| a["id"] == id && a["state"] == "cleared").await;
    assert!(cleared["cleared_ms"].as_u64().unwrap() > cleared["since_ms"].as_u64().unwrap(), "{cleared}");
    assert!(cleared["message"].as_str().unwrap().ends_with("back in band"), "{cleared}");
    // `/metrics` agrees with `/v1/alerts` on how many fire (polled: either
    // may move between the two reads).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let alerts = server.get("/v1/alerts").await.ok().unwrap();
        let firing = alerts["alerts"].as_array().unwrap().iter().filter(|a| a["state"] == "firing").count();
        let gauge = metric(&server, "hongbao_alerts_firing", &[]).await;
        if gauge == firing as f64
            && !alerts["alerts"].as_array().unwrap().iter().any(|a| is_shake_count(a) && a["state"] == "firing")
        {
            break;
        }
        assert!(Instant::now() < deadline, "gauge {gauge} vs {alerts}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Wins moved money all along; it balanced at every second.
    let alerts = server.get("/v1/alerts").await.ok().unwrap();
    assert!(!alerts["alerts"].as_array().unwrap().iter().any(|a| a["signal"] == "money"), "{alerts}");
    load.stop();
    let mut server = server;
    assert!(server.terminate().success());
}

/// Names of raw metrics (`hongbao_…`, not the `hongbao:…` recording rules)
/// in a file.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("hongbao_") {
        let start = i + at;
        let preceded = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(text.len() - start);
        if !preceded {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_rules_and_the_dashboard_read_is_in_a_real_scrape() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let mut wanted = BTreeSet::new();
    for file in ["prometheus-rules.yml", "prometheus-rules.test.yml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(docs.join(file)).unwrap();
        let names = metric_names(&text);
        assert!(!names.is_empty(), "{file} names no metric");
        wanted.extend(names);
    }
    // The HONGBAO_ environment variables the rules' comments may name are
    // not metrics.
    wanted.retain(|n| !n.chars().any(|c| c.is_ascii_uppercase()));

    // A server that has done some of everything: shakes with wins, a group
    // packet opened, an overload-free load.
    let server = Server::dev(&[]);
    let campaign = campaign(&server, 1, "names-c1").await;
    let load = Load::start(&server, campaign, 100..105).await;
    server.deposit(2, 10_000).await;
    server.put("/v1/groups/7", json!({"members": [2, 3, 4]})).await.ok().unwrap();
    let sender = server.client(2).await;
    let packet = send_to_group(&sender, 300, 2, 7, "names-p1").await;
    for user in [3, 4] {
        let c = server.client(user).await;
        c.request(Request::Open { packet }).await.unwrap();
    }
    // Wait until the latency summaries and the commit figures are there.
    let deadline = Instant::now() + PATIENCE;
    let scrape = loop {
        let text = server.get("/metrics").await.body.as_str().unwrap_or_default().to_owned();
        let present: BTreeSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|n| !present.contains(*n)).collect();
        if missing.is_empty() {
            break text;
        }
        assert!(Instant::now() < deadline, "missing from /metrics: {missing:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(scrape.contains("hongbao_request_seconds{op=\"shake\",quantile=\"0.99\"}"), "{scrape}");
    load.stop();
}
