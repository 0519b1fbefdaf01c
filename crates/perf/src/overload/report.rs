//! The lines and figures of each phase, and the verdict of the run.

use super::{Phase, PROBE_P99_TARGET_MS, RSS_MARGIN, RSS_SLACK_BYTES, RSS_WARM_S};
use crate::figure;

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// What the RSS readings of a phase say.
struct Rss {
    start: u64,
    warm: u64,
    peak: u64,
    peak_at_s: f64,
    end: u64,
    /// End minus the reading halfway through: growth in the second half.
    second_half: i64,
}

impl Rss {
    fn of(rss: &[(f64, u64)]) -> Rss {
        let at = |s: f64| rss.iter().find(|(t, _)| *t >= s).or(rss.last()).map_or(0, |r| r.1);
        let (peak_at_s, peak) = rss.iter().copied().max_by_key(|r| r.1).unwrap_or((0.0, 0));
        let end = rss.last().map_or(0, |r| r.1);
        let half = rss.last().map_or(0.0, |r| r.0) / 2.0;
        Rss {
            start: at(0.0),
            warm: at(RSS_WARM_S as f64),
            peak,
            peak_at_s,
            end,
            second_half: end as i64 - at(half) as i64,
        }
    }

    /// The bound the peak must stay under.
    fn bound(&self) -> u64 {
        self.warm + ((self.warm as f64 * RSS_MARGIN) as u64).max(RSS_SLACK_BYTES)
    }

    fn bounded(&self) -> bool {
        self.peak <= self.bound()
    }
}

impl Phase {
    /// Requests sent but neither answered nor lost with their connection.
    fn unanswered(&self) -> i64 {
        self.total.sent as i64 - self.total.answered as i64 - self.ended.1 as i64
    }

    fn overload_share(&self) -> f64 {
        self.during.overload as f64 / self.during.answered.max(1) as f64 * 100.0
    }
}

pub(super) fn report(p: &Phase, factor: f64, phase_s: f64) {
    let w = p.what;
    let per_s = |n: u64| n as f64 / phase_s;
    let c = &p.capacity;
    println!(
        "{w}: capacity {:.0}/s useful answers (closed loop of {} in flight, {} per connection: {} sent, {} \
         answered, {} overload; server {:.2} cores, load {:.2} cores)",
        c.per_s, c.in_flight, c.window, c.counts.sent, c.counts.answered, c.counts.overload, c.cores.0, c.cores.1
    );
    let d = &p.during;
    println!(
        "{w}: offered {:.0}/s ({factor:.1}x capacity) for {phase_s:.0} s: sent {:.0}/s ({:.0}/s held back by the \
         {}-in-flight window{}), answered {:.0}/s: won {}, none {}, not_running {}, opened {}, finished/expired {}, \
         overload {} ({:.1} %), other {} {:?}; server {:.2} cores, load {:.2} cores",
        p.offered_per_s,
        per_s(d.sent),
        per_s(d.held_back),
        super::WINDOW,
        if d.no_work > 0 { format!(", {} with no packet left to open", d.no_work) } else { String::new() },
        per_s(d.answered),
        d.won,
        d.none,
        d.not_running,
        d.opened,
        d.finished,
        d.overload,
        p.overload_share(),
        d.other,
        p.odd,
        p.cores.0,
        p.cores.1
    );
    let (why, lost) = &p.ended;
    println!(
        "{w}: {} requests sent over the capacity and overload steps, {} answered, {lost} lost with {} \
         connection(s) the server closed {why:?}, {} still unanswered {:?} after the phase -> {}",
        p.total.sent,
        p.total.answered,
        why.values().sum::<u64>(),
        p.left_in_flight,
        super::DRAIN_TIMEOUT,
        if p.unanswered() == 0 && p.left_in_flight == 0 { "every request answered" } else { "NOT ALL ANSWERED" }
    );
    let r = Rss::of(&p.rss);
    println!(
        "{w}: server RSS start {:.1} MiB, {:.1} MiB at {RSS_WARM_S} s, peak {:.1} MiB at {:.0} s, end {:.1} \
         MiB; change over the second half {:+.1} MiB -> {} (peak within {:.0} % or {} MiB of the level at \
         {RSS_WARM_S} s: {:.1} MiB)",
        mib(r.start),
        mib(r.warm),
        mib(r.peak),
        r.peak_at_s,
        mib(r.end),
        r.second_half as f64 / (1 << 20) as f64,
        if r.bounded() { "bounded" } else { "NOT BOUNDED" },
        RSS_MARGIN * 100.0,
        RSS_SLACK_BYTES >> 20,
        mib(r.bound())
    );
    let l = &p.probe;
    println!(
        "{w}: probe ping p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} pings ({} unanswered) -> target p99 < \
         {PROBE_P99_TARGET_MS} ms {}",
        l.ms(0.5),
        l.ms(0.99),
        l.max_ms(),
        l.us.len(),
        l.lost,
        if l.ms(0.99) < PROBE_P99_TARGET_MS { "met" } else { "NOT MET" }
    );
    if let Some((commits, ops)) = p.commits {
        println!(
            "{w}: the writer committed {:.0} operations/s in {:.1} group commits/s ({:.0} operations per commit)",
            per_s(ops),
            per_s(commits),
            ops as f64 / commits.max(1) as f64
        );
    }
    println!(
        "{w}: threads, ms per second of the phase on a CPU and runnable but waiting for one: server [{}]; load \
         process [{}]",
        p.server_threads.line(),
        p.load_threads.line()
    );
    let f = |name: &str, v: f64, unit: &str| figure(&format!("overload_{w}_{name}"), v, unit, None);
    f("capacity", p.capacity.per_s, "req/s");
    f("offered", p.offered_per_s, "req/s");
    f("sent", per_s(d.sent), "req/s");
    f("answered", per_s(d.answered), "req/s");
    f("overload_share", p.overload_share(), "%");
    f("rss_start", mib(r.start), "MiB");
    f("rss_peak", mib(r.peak), "MiB");
    f("rss_end", mib(r.end), "MiB");
    f("probe_p50", l.ms(0.5), "ms");
    f("probe_p99", l.ms(0.99), "ms");
    f("probe_max", l.max_ms(), "ms");
}

/// PASS if every phase answered every request and kept RSS bounded.
pub(super) fn verdict(phases: &[Phase]) -> anyhow::Result<()> {
    let mut failed = Vec::new();
    for p in phases {
        if p.unanswered() != 0 || p.left_in_flight != 0 {
            failed.push(format!("{}: {} requests unanswered", p.what, p.unanswered().max(p.left_in_flight as i64)));
        }
        if p.during.sent == 0 {
            failed.push(format!("{}: nothing was sent in the overload phase", p.what));
        }
        if !Rss::of(&p.rss).bounded() {
            failed.push(format!("{}: server RSS not bounded", p.what));
        }
    }
    if failed.is_empty() {
        println!("overload: PASS (every request answered, server RSS bounded in every phase)");
        return Ok(());
    }
    println!("overload: FAIL: {}", failed.join("; "));
    anyhow::bail!("overload: {}", failed.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_bounded_by_the_level_a_few_seconds_in() {
        let mib = |m: u64| m << 20;
        let flat: Vec<(f64, u64)> = (0..30).map(|s| (s as f64, mib(100) + mib(s.min(5)))).collect();
        let r = Rss::of(&flat);
        assert_eq!((r.start, r.warm, r.peak, r.end), (mib(100), mib(105), mib(105), mib(105)));
        assert!(r.bounded());
        let growing: Vec<(f64, u64)> = (0..30).map(|s| (s as f64, mib(100 + 3 * s))).collect();
        let r = Rss::of(&growing);
        assert!(!r.bounded(), "{} > {}", r.peak, r.bound());
        // From the reading at 15 s (the first past half of 29 s) to the end.
        assert_eq!(r.second_half, mib(187 - 145) as i64);
    }
}
