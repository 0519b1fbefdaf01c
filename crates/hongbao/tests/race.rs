//! One packet of count K opened by 10 × K concurrent clients over real TCP
//! connections: exactly K opens, amounts summing to the packet, no user twice,
//! and `hongbao audit` passes.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_packet_opened_by_ten_times_its_count_in_parallel() {
    const K: u32 = 25;
    let server = Server::dev(&[]);
    let packet = race_a_group_packet(&server, K, 20_000, "race-1").await;

    let detail = server.get(&format!("/v1/packets/{packet}")).await.ok().unwrap();
    assert_eq!(detail["status"], "finished");
    assert_eq!(detail["claims"].as_array().unwrap().len(), K as usize);
    let (passed, report) = audit(&server.data);
    assert!(passed, "{report}");
}
