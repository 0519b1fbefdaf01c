//! One kind of work through its two steps: capacity (closed loop), then
//! the paced overload phase with the RSS watch and the probe, then the
//! drain that lets every request in flight be answered.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::ensure;
use tokio::runtime::Runtime;

use super::lean::{Fleet, Work, WINDOW};
use super::probe::Probe;
use super::{cores, cpu, open_setup, sched, Capacity, Phase, Plan, Waits, DRAIN_TIMEOUT, PROBE_USER, SENDERS, WARMUP};
use crate::server::ServerChild;

/// Open packets prepared beyond the measured capacity, so the phase never
/// runs out of packets to open.
const OPEN_SHARES_MARGIN: f64 = 1.3;
/// Senders of the packets sent after the capacity is known.
const SENDERS_LATER: u64 = SENDERS + 500_000;

/// The paced phase at `plan.factor` times the capacity, with the RSS watch
/// and the probe, then the drain. `earlier` is what the connections of the
/// capacity steps ended with, when the phase has connections of its own.
pub(super) fn overload(
    rt: &Runtime,
    server: &ServerChild,
    plan: &Plan,
    fleet: &Fleet,
    capacity: Capacity,
    earlier: Option<Ended>,
) -> anyhow::Result<Phase> {
    let what = fleet.work().name();
    let capacity_per_s = capacity.per_s;
    let offered_per_s = plan.factor * capacity_per_s;
    let probe = Probe::start(server.tcp, PROBE_USER)?;
    let me = [std::process::id()];
    let (sched_server, sched_load) = (sched(&server.pids()), sched(&me));
    let commits_before = commits(server);
    let (before, cpu_a, start) = (fleet.tally.counts(), cpu(server), Instant::now());
    let until = start + plan.phase;
    let rss = rt.block_on(async {
        let ((), rss) = tokio::join!(fleet.paced(offered_per_s, until), watch(server, fleet, start, until));
        rss
    });
    let (after, cpu_b, took) = (fleet.tally.counts(), cpu(server), start.elapsed());
    let commits = commits(server).zip(commits_before).map(|(a, b)| (a.0 - b.0, a.1 - b.1));
    let server_threads = Waits::between(&sched_server, &sched(&server.pids()), took);
    let load_threads = Waits::between(&sched_load, &sched(&me), took);
    let probe = probe.finish()?;
    let left_in_flight = rt.block_on(fleet.drain(DRAIN_TIMEOUT));
    Ok(Phase {
        what,
        capacity,
        offered_per_s,
        during: after.since(&before),
        cores: cores(cpu_a, cpu_b, took),
        total: fleet.tally.counts(),
        left_in_flight,
        ended: merge(fleet.ended(), earlier),
        odd: fleet.tally.odd(),
        rss,
        probe,
        server_threads,
        load_threads,
        commits,
    })
}

/// The writer's group commits and the operations in them so far, from the
/// admin API's stats (`None` if it did not answer).
fn commits(server: &ServerChild) -> Option<(u64, u64)> {
    let stats = server.admin().get("/v1/stats").ok()?.ok().ok()?;
    Some((stats["commits"].as_u64()?, stats["committed_ops"].as_u64()?))
}

/// Connections the server closed, by reason, and the requests lost with them.
pub(super) type Ended = (BTreeMap<String, u64>, u64);

fn merge(mut a: Ended, b: Option<Ended>) -> Ended {
    if let Some((why, lost)) = b {
        for (k, v) in why {
            *a.0.entry(k).or_default() += v;
        }
        a.1 += lost;
    }
    a
}

/// The most useful answers per second of closed loops at a few levels of
/// concurrency (every answer making room for the next request): every
/// connection's window full, then about `CAPACITY_IN_FLIGHT` requests in
/// flight in all. Too few in flight leaves the server waiting for round
/// trips; too many makes it shed load (`overload`), and answering those
/// costs what the useful work needed.
pub(super) fn capacity(rt: &Runtime, server: &ServerChild, plan: &Plan, fleet: &Fleet) -> anyhow::Result<Capacity> {
    let what = fleet.work().name();
    let mut best: Option<Capacity> = None;
    for window in windows(fleet.len(), plan.sweep) {
        fleet.closed_loop(window);
        std::thread::sleep(WARMUP);
        let (c0, cpu0, t0) = (fleet.tally.counts(), cpu(server), Instant::now());
        std::thread::sleep(plan.capacity);
        let (c1, cpu1, dt) = (fleet.tally.counts(), cpu(server), t0.elapsed());
        fleet.idle();
        rt.block_on(fleet.drain(DRAIN_TIMEOUT));
        let counts = c1.since(&c0);
        let per_s = counts.useful() as f64 / dt.as_secs_f64();
        ensure!(
            fleet.work() != Work::Open || fleet.queued() > 0,
            "open: the packets ran out during a capacity step ({per_s:.0} opens/s counted): raise --open-guess-per-s \
             above the capacity"
        );
        let in_flight = u64::from(window) * fleet.len() as u64;
        eprintln!(
            "  {what}: closed loop of {in_flight} in flight ({window} per connection): {per_s:.0} useful/s, {counts:?}"
        );
        let step = Capacity { per_s, counts, cores: cores(cpu0, cpu1, dt), window, in_flight };
        if best.as_ref().is_none_or(|b| step.per_s > b.per_s) {
            best = Some(step);
        }
    }
    let best = best.expect("a step ran");
    ensure!(best.per_s > 0.0, "{what}: no useful answer in the capacity steps: {:?}", best.counts);
    Ok(best)
}

/// Total requests in flight of the capacity steps after the one with every
/// window full.
const CAPACITY_IN_FLIGHT: [u64; 4] = [512, 4_096, 16_384, 65_536];

/// Requests in flight per connection of each capacity step, for
/// `connections` connections: distinct, at most `WINDOW`; only the first
/// without `sweep`.
pub(super) fn windows(connections: usize, sweep: bool) -> Vec<u32> {
    let mut w = vec![WINDOW];
    for total in CAPACITY_IN_FLIGHT.into_iter().filter(|_| sweep) {
        let per = total.div_ceil(connections as u64).clamp(1, u64::from(WINDOW)) as u32;
        if !w.contains(&per) {
            w.push(per);
        }
    }
    w
}

/// Sends enough packets for the overload phase of opens (each open that
/// takes a share uses one up, and about the capacity take one a second;
/// the rest are answered `overload` and tried again later), given what is
/// left in each user's queue; returns each user's new packets.
pub(super) fn more_packets(
    rt: &Runtime,
    server: &ServerChild,
    plan: &Plan,
    users: &[u64],
    queues: &[VecDeque<u64>],
    capacity_per_s: f64,
) -> anyhow::Result<Vec<VecDeque<u64>>> {
    let n = users.len() as u64;
    let need_per_user = (capacity_per_s * plan.phase.as_secs_f64() * OPEN_SHARES_MARGIN / n as f64).ceil() as u64;
    let have_per_user = queues.iter().map(VecDeque::len).min().unwrap_or(0) as u64;
    let per_block = need_per_user.saturating_sub(have_per_user);
    if per_block == 0 {
        return Ok(vec![VecDeque::new(); users.len()]);
    }
    open_setup(rt, server, users, per_block, SENDERS_LATER)
}

/// Every second until `until`: the server's RSS (all its processes) and
/// what was sent and answered that second, on stderr; returns the RSS
/// readings (seconds into the phase, bytes), the first at the start.
async fn watch(server: &ServerChild, fleet: &Fleet, start: Instant, until: Instant) -> Vec<(f64, u64)> {
    let mut rss = Vec::new();
    let mut last = fleet.tally.counts();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let t = start.elapsed().as_secs_f64();
        let Ok(memory) = server.memory() else { break };
        rss.push((t, memory.rss()));
        let now = fleet.tally.counts();
        let d = now.since(&last);
        last = now;
        eprintln!(
            "  t={t:4.1} s: sent {}, answered {} (useful {}, overload {}), held back {}, in flight {}, server RSS \
             {:.1} MiB",
            d.sent,
            d.answered,
            d.useful(),
            d.overload,
            d.held_back,
            fleet.in_flight(),
            memory.rss() as f64 / (1 << 20) as f64
        );
        if Instant::now() >= until {
            break;
        }
    }
    rss
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_steps_go_from_full_windows_to_a_few_in_flight_in_all() {
        assert_eq!(windows(256, true), vec![64, 2, 16]);
        assert_eq!(windows(2_000, true), vec![64, 1, 3, 9, 33]);
        assert_eq!(windows(100, true), vec![64, 6, 41]);
        assert_eq!(windows(2_000, false), vec![64]);
    }
}
