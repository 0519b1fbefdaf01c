//! The cluster admin over two real SETs: each an engine on a temporary
//! SQLite store (SET 0 and SET 1 of 2) behind its own admin API on port 0,
//! talked to over real sockets, as an operator's curl would.

use std::net::SocketAddr;
use std::time::Duration;

use hongbao_boundary::TokenSigner;
use hongbao_core::ids::set_of;
use hongbao_core::sets::SetMap;
use hongbao_shard::{Engine, EngineConfig};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{cluster_task_id, split_task_id, ClusterAdminConfig, TASK_SET_SHIFT};
use crate::tests::{call, http, Resp, KEY};
use crate::{start, AdminConfig, AdminLimits};

/// One SET: its engine and its own admin API.
struct Set {
    addr: SocketAddr,
    engine: Engine,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    _tmp: tempfile::TempDir,
}

impl Set {
    async fn start(set: u8, sets: u8, api_key: Option<&str>) -> Set {
        let tmp = tempfile::tempdir().unwrap();
        let config = EngineConfig { set: SetMap::new(set, sets).unwrap(), ..EngineConfig::default() };
        let engine = Engine::open(config, tmp.path()).await.unwrap();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle();
        let (stop, rx) = watch::channel(false);
        let config = AdminConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            api_key: api_key.map(str::to_owned),
            dev: api_key.is_none(),
            limits: AdminLimits::default(),
            ws_addr: None,
            dependency: None,
        };
        let signer = TokenSigner::new(b"0123456789abcdef0123456789abcdef".to_vec());
        let live = hongbao_watch::Live::new();
        let (addr, task) = start(config, engine.clone(), signer, prometheus, live, rx).await.unwrap();
        Set { addr, engine, stop, task, _tmp: tmp }
    }

    /// Its admin API stops (connections to it are refused from then on).
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
        self.engine.shutdown().await;
    }
}

struct Cluster {
    sets: Vec<Set>,
    addr: SocketAddr,
    _stop: watch::Sender<bool>,
}

impl Cluster {
    /// Two SETs and the cluster admin over them, all with `api_key`.
    async fn start(api_key: Option<&str>) -> Cluster {
        Cluster::start_with(api_key, None).await
    }

    /// … with the gateway directory in the Redis at `redis`.
    async fn start_with(api_key: Option<&str>, redis: Option<String>) -> Cluster {
        let sets = vec![Set::start(0, 2, api_key).await, Set::start(1, 2, api_key).await];
        let addrs = sets.iter().map(|s| s.addr).collect();
        let mut config = ClusterAdminConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            api_key.map(str::to_owned),
            api_key.is_none(),
            addrs,
        );
        config.set_timeout = Duration::from_secs(5);
        config.redis = redis;
        let (stop, rx) = watch::channel(false);
        let (addr, _task) = super::start(config, None, rx).await.unwrap();
        Cluster { sets, addr, _stop: stop }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(self.addr, method, path, body).await
    }

    /// The same request straight to SET `set`'s own admin API.
    async fn on_set(&self, set: usize, method: &str, path: &str, body: Option<Value>) -> Resp {
        call(self.sets[set].addr, method, path, body).await
    }
}

fn ok(r: &Resp, status: u16) -> &Value {
    assert_eq!(r.status, status, "{}", r.text);
    &r.body
}

#[tokio::test]
async fn each_request_reaches_the_set_that_owns_it() {
    let c = Cluster::start(Some(KEY)).await;

    // Money: user 3 is homed on SET 1, user 2 on SET 0.
    let r = c.call("POST", "/v1/accounts/3/deposit", Some(json!({"amount_fen": 700, "key": "d3"}))).await;
    assert_eq!(ok(&r, 200), &json!({"user": 3, "amount_fen": 700, "balance_fen": 700, "repeat": false}));
    let r = c.call("POST", "/v1/accounts/2/deposit", Some(json!({"amount_fen": 500, "key": "d2"}))).await;
    assert_eq!(ok(&r, 200)["balance_fen"], 500);
    assert_eq!(ok(&c.call("GET", "/v1/accounts/3", None).await, 200), &json!({"user": 3, "balance_fen": 700}));
    assert_eq!(ok(&c.on_set(1, "GET", "/v1/accounts/3", None).await, 200)["balance_fen"], 700);
    // SET 0 refuses user 3 outright: the deposit cannot have landed there.
    assert_eq!(c.on_set(0, "GET", "/v1/accounts/3", None).await.status, 400);
    let r = c.call("POST", "/v1/accounts/3/withdraw", Some(json!({"amount_fen": 200, "key": "w3"}))).await;
    assert_eq!(ok(&r, 200)["balance_fen"], 500);
    // A SET's refusal passes through as it is.
    let r = c.call("POST", "/v1/accounts/3/withdraw", Some(json!({"amount_fen": 9999, "key": "w3b"}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (409, json!("insufficient_funds")));
    let r = c.call("POST", "/v1/accounts/x/deposit", Some(json!({"amount_fen": 1, "key": "k"}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (400, json!("invalid_request")));

    // Stats: every figure summed, each SET's own listed.
    let r = c.call("GET", "/v1/stats", None).await;
    let stats = ok(&r, 200);
    assert_eq!(stats["deposits_minus_withdrawals_fen"], 1_000, "{stats}");
    assert_eq!(stats["user_balances_fen"], 1_000);
    assert_eq!(stats["shards"], 8);
    let sets = stats["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    assert_eq!((sets[0]["set"].clone(), sets[0]["deposits_minus_withdrawals_fen"].clone()), (json!(0), json!(500)));
    assert_eq!((sets[1]["set"].clone(), sets[1]["deposits_minus_withdrawals_fen"].clone()), (json!(1), json!(500)));
    assert!(stats.get("set").is_none());

    // Groups: a change reaches every SET; a read is SET 0's.
    let r = c.call("PUT", "/v1/groups/9", Some(json!({"members": [2, 3, 4, 5]}))).await;
    assert_eq!(ok(&r, 200), &json!({"group": 9, "members": [2, 3, 4, 5]}));
    for set in 0..2 {
        assert_eq!(ok(&c.on_set(set, "GET", "/v1/groups/9", None).await, 200)["members"], json!([2, 3, 4, 5]));
    }
    let r = c.call("POST", "/v1/groups/9/members", Some(json!({"add": [7], "remove": [4]}))).await;
    assert_eq!(ok(&r, 200)["members"], json!([2, 3, 5, 7]));
    for set in 0..2 {
        assert_eq!(ok(&c.on_set(set, "GET", "/v1/groups/9", None).await, 200)["members"], json!([2, 3, 5, 7]));
    }
    assert_eq!(ok(&c.call("GET", "/v1/groups/9", None).await, 200)["members"], json!([2, 3, 5, 7]));
    // Refused by SET 0 (too many members): nothing changed anywhere.
    let many: Vec<u64> = (1..=501).collect();
    assert_eq!(c.call("PUT", "/v1/groups/9", Some(json!({"members": many}))).await.status, 400);
    assert_eq!(ok(&c.on_set(1, "GET", "/v1/groups/9", None).await, 200)["members"], json!([2, 3, 5, 7]));
    assert_eq!(c.call("GET", "/v1/groups/404", None).await.status, 404);

    // Push: split by home SET (a SET refuses a push naming another's user).
    let notice = |target: Value, persistent: bool| json!({"target": target, "persistent": persistent, "topic": "t", "text": "hi"});
    let r = c.call("POST", "/v1/push", Some(notice(json!({"users": [2, 3, 4, 5, 3]}), true))).await;
    assert_eq!(ok(&r, 200), &json!({"targets": 4, "delivered": 0, "stored": 4}));
    let r = c.call("POST", "/v1/push", Some(notice(json!({"group": 9}), false))).await;
    assert_eq!(ok(&r, 200), &json!({"targets": 4, "delivered": 0, "stored": 0}));
    let r = c.call("POST", "/v1/push", Some(notice(json!({"user": 3}), false))).await;
    assert_eq!(ok(&r, 200)["targets"], 1);
    assert_eq!(c.call("POST", "/v1/push", Some(notice(json!({"group": 404}), false))).await.status, 404);
    assert_eq!(c.call("POST", "/v1/push", Some(notice(json!({"users": [0]}), false))).await.status, 400);
    let r = c.call("POST", "/v1/push", Some(json!({"target": {"user": 3}, "topic": "t"}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (400, json!("invalid_request")));

    // Packets: sent on the sender's home SET, read on the SET in the id.
    let send = json!({"sender": 3, "amount_fen": 100, "count": 1, "kind": "fixed", "to": {"user": 5}, "key": "p1"});
    let r = c.call("POST", "/v1/packets", Some(send)).await;
    let packet = ok(&r, 201)["packet"].as_u64().unwrap();
    assert_eq!(set_of(packet), 1);
    let r = c.call("GET", &format!("/v1/packets/{packet}"), None).await;
    assert_eq!((ok(&r, 200)["sender"].clone(), r.body["amount_fen"].clone()), (json!(3), json!(100)));
    let elsewhere = packet & !(0x1f << 48) | (5 << 48);
    assert_eq!(c.call("GET", &format!("/v1/packets/{elsewhere}"), None).await.status, 404);
    let r = c.call("POST", "/v1/packets", Some(json!({"nope": 1}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (400, json!("invalid_request")));

    // Tokens: SET 0 signs with the cluster's secret.
    let r = c.call("POST", "/v1/tokens", Some(json!({"user": 3, "ttl_s": 60}))).await;
    assert!(ok(&r, 200)["token"].as_str().unwrap().starts_with("v1.3."));

    // Campaigns: a body without a funder goes to SET 0, which refuses it.
    let r = c.call("POST", "/v1/campaigns", Some(json!({}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (400, json!("invalid_request")));
    // Not a route here (the live figures are each SET's).
    assert_eq!(c.call("GET", "/v1/live/now", None).await.status, 404);
    assert_eq!(c.call("DELETE", "/v1/stats", None).await.status, 405);

    let r = http(c.addr, "GET", "/health", &[], "").await;
    assert_eq!((ok(&r, 200)["status"].clone(), r.body["sets"][1]["status"].clone()), (json!("ok"), json!("ok")));
}

#[tokio::test]
async fn broadcasts_start_on_every_set_and_tasks_name_theirs() {
    let c = Cluster::start(Some(KEY)).await;
    let r = c.call("POST", "/v1/broadcast", Some(json!({"topic": "all", "text": "新年快乐"}))).await;
    let started = ok(&r, 202);
    let tasks = started["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 2, "{started}");
    let ids: Vec<u64> = tasks.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![1, (1 << TASK_SET_SHIFT) + 1]);
    assert_eq!((tasks[0]["set"].clone(), tasks[1]["set"].clone()), (json!(0), json!(1)));

    let r = c.call("GET", "/v1/tasks", None).await;
    let listed = ok(&r, 200).as_array().unwrap();
    assert_eq!(
        listed.iter().map(|t| (t["set"].as_u64().unwrap(), t["id"].as_u64().unwrap())).collect::<Vec<_>>(),
        vec![(0, ids[0]), (1, ids[1])]
    );
    let r = c.call("GET", &format!("/v1/tasks/{}", ids[1]), None).await;
    assert_eq!((ok(&r, 200)["id"].clone(), r.body["set"].clone()), (json!(ids[1]), json!(1)));
    let r = c.call("POST", &format!("/v1/tasks/{}/stop", ids[1]), None).await;
    assert_eq!(ok(&r, 200)["set"], 1);
    // SET 1's own id for it is 1.
    assert_eq!(ok(&c.on_set(1, "GET", "/v1/tasks/1", None).await, 200)["id"], 1);
    for unknown in [2u64, (1 << TASK_SET_SHIFT) + 2, 2 << TASK_SET_SHIFT | 1, 1 << TASK_SET_SHIFT, 0] {
        let r = c.call("GET", &format!("/v1/tasks/{unknown}"), None).await;
        assert_eq!((r.status, r.body["error"]["code"].clone()), (404, json!("not_found")), "{unknown}");
    }
}

#[test]
fn cluster_task_ids_carry_their_set() {
    assert_eq!(cluster_task_id(0, 7), Some(7));
    assert_eq!(cluster_task_id(31, 7), Some(31 << 32 | 7));
    assert_eq!(cluster_task_id(1, 1 << 32), None);
    assert_eq!(split_task_id(31 << 32 | 7), Some((31, 7)));
    assert_eq!(split_task_id(7), Some((0, 7)));
    assert_eq!(split_task_id(u64::MAX), None);
    // Safe as a JSON number.
    assert!(cluster_task_id(31, (1 << 32) - 1).unwrap() < 1 << 53);
}

#[tokio::test]
async fn a_set_down_is_named_and_the_other_goes_on() {
    let mut c = Cluster::start(Some(KEY)).await;
    let one = c.sets.pop().unwrap();
    let down = one.addr;
    one.stop().await;

    let r = http(c.addr, "GET", "/health", &[], "").await;
    assert_eq!((r.status, r.body["status"].clone()), (503, json!("unavailable")), "{}", r.text);
    assert_eq!(r.body["sets"][0]["status"], "ok");
    assert_eq!(r.body["sets"][1]["set"], 1);
    assert_eq!(r.body["sets"][1]["admin"], down.to_string());
    assert!(r.body["sets"][1]["status"].as_str().unwrap().starts_with("unreachable: "), "{}", r.text);

    let r = c.call("GET", "/v1/stats", None).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (503, json!("unavailable")), "{}", r.text);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("SET 1"), "{}", r.text);
    assert_eq!(r.body["sets_failed"][0]["set"], 1);

    // SET 0's users are served; SET 1's are told which SET is missing.
    let r = c.call("POST", "/v1/accounts/2/deposit", Some(json!({"amount_fen": 100, "key": "d2"}))).await;
    assert_eq!(ok(&r, 200)["balance_fen"], 100);
    let r = c.call("POST", "/v1/accounts/3/deposit", Some(json!({"amount_fen": 100, "key": "d3"}))).await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (503, json!("unavailable")));
    assert!(r.body["error"]["message"].as_str().unwrap().contains(&format!("SET 1 ({down})")), "{}", r.text);

    // A group change reaches SET 0 only: 502, saying where it is.
    let r = c.call("PUT", "/v1/groups/9", Some(json!({"members": [2, 3]}))).await;
    assert_eq!(r.status, 502, "{}", r.text);
    assert_eq!((r.body["sets_done"].clone(), r.body["sets_failed"][0]["set"].clone()), (json!([0]), json!(1)));
    assert!(r.body["error"]["message"].as_str().unwrap().contains("retry"), "{}", r.text);
    assert_eq!(ok(&c.on_set(0, "GET", "/v1/groups/9", None).await, 200)["members"], json!([2, 3]));

    // A push for SET 0's users alone goes; one that needs SET 1 too is 502.
    let notice = |users: Value| json!({"target": {"users": users}, "topic": "t", "text": "hi"});
    assert_eq!(ok(&c.call("POST", "/v1/push", Some(notice(json!([2, 4])))).await, 200)["targets"], 2);
    let r = c.call("POST", "/v1/push", Some(notice(json!([2, 3])))).await;
    assert_eq!((r.status, r.body["sets_done"].clone()), (502, json!([0])), "{}", r.text);
    // Only SET 1's user: SET 1's failure, as it is.
    assert_eq!(c.call("POST", "/v1/push", Some(notice(json!([3])))).await.status, 503);

    assert_eq!(c.call("GET", "/v1/tasks", None).await.status, 503);
    let r = c.call("POST", "/v1/broadcast", Some(json!({"topic": "t", "text": "x"}))).await;
    assert_eq!((r.status, r.body["tasks"][0]["set"].clone()), (502, json!(0)), "{}", r.text);
}

#[tokio::test]
async fn the_key_is_checked_here_and_sent_on() {
    let c = Cluster::start(Some(KEY)).await;
    for headers in [vec![], vec![("authorization", "Bearer nope")], vec![("x-api-key", "nope")]] {
        let r = http(c.addr, "GET", "/v1/stats", &headers, "").await;
        assert_eq!((r.status, r.body["error"]["code"].clone()), (401, json!("bad_token")), "{headers:?}");
    }
    assert_eq!(http(c.addr, "GET", "/v1/stats", &[("x-api-key", KEY)], "").await.status, 200);
    // The SETs got the key from the cluster admin, not from the caller.
    let bearer = format!("Bearer {KEY}");
    let r = http(c.addr, "GET", "/v1/accounts/3", &[("authorization", &bearer)], "").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(http(c.addr, "GET", "/health", &[], "").await.status, 200);
}

#[tokio::test]
async fn dev_mode_is_open() {
    let c = Cluster::start(None).await;
    let r = http(c.addr, "GET", "/v1/stats", &[], "").await;
    assert_eq!(ok(&r, 200)["sets"].as_array().unwrap().len(), 2);
    let r = http(c.addr, "POST", "/v1/accounts/3/deposit", &[], r#"{"amount_fen": 5, "key": "k"}"#).await;
    assert_eq!(ok(&r, 200)["balance_fen"], 5);
}

#[tokio::test]
async fn a_set_that_does_not_answer_is_a_timeout_naming_it() {
    // Accepts connections (the kernel's backlog) and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let mut config = ClusterAdminConfig::new("127.0.0.1:0".parse().unwrap(), None, true, vec![silent_addr]);
    config.set_timeout = Duration::from_millis(300);
    let (_stop, rx) = watch::channel(false);
    let (addr, _task) = super::start(config, None, rx).await.unwrap();

    let r = http(addr, "GET", "/v1/accounts/1", &[], "").await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (504, json!("unavailable")), "{}", r.text);
    let message = r.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("SET 0 ({silent_addr}): no answer within 300 ms")), "{message}");
    let r = http(addr, "GET", "/health", &[], "").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body["sets"][0]["status"], "unreachable: no answer within 300 ms", "{}", r.text);
    drop(silent);
}

#[tokio::test]
async fn the_gateway_list_is_public_least_loaded_first_and_503_while_redis_is_away() {
    use hongbao_cluster::directory::{now_ms, Directory, GatewayEntry};
    let mut redis = hongbao_harness::RedisServer::start().unwrap();
    let c = Cluster::start_with(Some(KEY), Some(redis.url())).await;
    let get = || http(c.addr, "GET", "/v1/gateways", &[], "");
    assert_eq!(ok(&get().await, 200), &json!({"gateways": []}), "no key needed");
    let directory = Directory::new(&redis.url()).unwrap();
    for (id, connections) in [("10.0.0.1:7000", 9), ("10.0.0.2:7000", 2)] {
        let entry = GatewayEntry {
            id: id.into(),
            tcp: id.into(),
            ws: id.replace(":7000", ":7001"),
            pid: 1,
            connections,
            started_ms: now_ms(),
        };
        directory.register(&entry, 60_000).await.unwrap();
    }
    let r = get().await;
    let listed = ok(&r, 200)["gateways"].as_array().unwrap().clone();
    let ids: Vec<&str> = listed.iter().map(|g| g["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["10.0.0.2:7000", "10.0.0.1:7000"]);
    assert_eq!(listed[0]["ws"], "10.0.0.2:7001");
    assert_eq!(listed[0]["connections"], 2);
    // Other `/v1` routes still need the key.
    assert_eq!(http(c.addr, "GET", "/v1/stats", &[], "").await.status, 401);

    redis.kill9().unwrap();
    let r = get().await;
    assert_eq!((r.status, r.body["error"]["code"].clone()), (503, json!("unavailable")), "{}", r.text);
    redis.restart().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = get().await;
        if r.status == 200 {
            assert_eq!(r.body["gateways"].as_array().unwrap().len(), 2, "kept by the append-only file");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still {}: {}", r.status, r.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn without_a_directory_the_gateway_list_is_404() {
    let c = Cluster::start(None).await;
    let r = http(c.addr, "GET", "/v1/gateways", &[], "").await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("no gateway directory"), "{}", r.text);
}

/// A campaign through the cluster admin: created on the funder's home SET
/// (split: SET 0 keeps its part and funds SET 1's through its outbox),
/// started on every SET once SET 1's part is funded (the start waits for
/// it), read whole, stopped everywhere.
#[tokio::test]
async fn a_campaign_is_created_on_its_funders_set_started_everywhere_and_read_whole() {
    let c = Cluster::start(Some(KEY)).await;
    let r = c.call("POST", "/v1/accounts/4/deposit", Some(json!({"amount_fen": 5_000, "key": "d4"}))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let spec = |rate: u32, key: &str| json!({"funder": 4, "total_fen": 1_001, "rule": {"count": {"packets": 41}}, "rate_per_s": rate, "key": key});
    let r = c.call("POST", "/v1/campaigns", Some(spec(1, "starving"))).await;
    assert_eq!(r.status, 400, "a rate that leaves a SET without packets: {:?}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("2 SETs"), "{:?}", r.body);
    let r = c.call("POST", "/v1/campaigns", Some(spec(11, "c"))).await;
    let part = ok(&r, 201).clone();
    let id = part["id"].as_u64().unwrap();
    assert_eq!(hongbao_core::ids::campaign_set(id), 0, "the funder's home SET");
    assert_eq!((part["total_fen"].clone(), part["rate_per_s"].clone()), (json!(501), json!(6)), "{part}");
    let r = c.call("GET", &format!("/v1/campaigns/{id}"), None).await;
    assert_eq!(ok(&r, 200)["sets_unfunded"], json!([1]), "SET 1's fund is in flight");

    // The transport (the relay, in a cluster) carries SET 0's outbox while
    // the start waits for SET 1's part.
    let (zero, one) = (c.sets[0].engine.clone(), c.sets[1].engine.clone());
    let carry = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for m in zero.cross_unpublished(10).await.unwrap() {
            assert!(one.apply_cross(m).await.unwrap());
        }
    });
    let r = c.call("POST", &format!("/v1/campaigns/{id}/start"), None).await;
    carry.await.unwrap();
    let whole = ok(&r, 200).clone();
    assert_eq!(
        (whole["status"].clone(), whole["total_fen"].clone(), whole["rate_per_s"].clone()),
        (json!("running"), json!(1_001), json!(11)),
        "{whole}"
    );
    assert_eq!(whole["rule"], json!({"count": {"packets": 41}}));
    assert_eq!((whole["sets"].clone(), whole["sets_unfunded"].clone()), (json!([0, 1]), json!([])));
    let r = c.on_set(1, "GET", &format!("/v1/campaigns/{id}"), None).await;
    assert_eq!((r.body["status"].clone(), r.body["total_fen"].clone()), (json!("running"), json!(500)));
    let r = c.call("GET", "/v1/campaigns", None).await;
    let list = ok(&r, 200).as_array().unwrap().clone();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0]["id"].as_u64(), list[0]["total_fen"].clone()), (Some(id), json!(1_001)));

    let r = c.call("POST", &format!("/v1/campaigns/{id}/stop"), None).await;
    let whole = ok(&r, 200).clone();
    assert_eq!((whole["status"].clone(), whole["escrow_fen"].clone()), (json!("stopped"), json!(0)), "{whole}");
    assert_eq!(whole["won_fen"].as_i64().unwrap() + whole["refunded_fen"].as_i64().unwrap(), 1_001);
    // A part whose fund never arrives: the start waits 5 s for it, then
    // names the SET not done (the home SET's part did start).
    let r = c.call("POST", "/v1/campaigns", Some(spec(11, "never carried"))).await;
    let unfunded = ok(&r, 201)["id"].as_u64().unwrap();
    let r = c.call("POST", &format!("/v1/campaigns/{unfunded}/start"), None).await;
    assert_eq!((r.status, r.body["sets_done"].clone()), (502, json!([0])), "{:?}", r.body);
    assert_eq!(r.body["sets_failed"][0]["set"], json!(1));
    assert_eq!(r.body["sets_failed"][0]["status"], json!(404));
    for missing in [unfunded + 1, (5 << 48) | 1, 0] {
        assert_eq!(c.call("POST", &format!("/v1/campaigns/{missing}/start"), None).await.status, 404, "{missing}");
        assert_eq!(c.call("GET", &format!("/v1/campaigns/{missing}"), None).await.status, 404, "{missing}");
    }
}
