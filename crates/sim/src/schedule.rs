//! When each simulated user shakes, decided from the clock alone.
//!
//! Users are numbered `0..users` across every simulator process. At a target
//! of `rate` shakes per second, every user shakes `rate / users` times in each
//! whole second, and `rate % users` of them shake once more: a window of that
//! many consecutive user numbers, starting at `(second × extra) mod users`, so
//! the extra shakes rotate fairly. Summed over all users that is exactly `rate`
//! in every second, whether or not `rate` divides `users`, and no process needs
//! to talk to another (the reference used `now % groups == user_id % groups`).
//! Within a second a user's shakes are spread evenly from a per-user phase
//! (golden-ratio hashing), so the load is smooth at the millisecond scale too.

/// Shakes user `index` makes during whole second `second`.
pub fn shakes_in_second(index: u64, users: u64, rate: u64, second: u64) -> u64 {
    if users == 0 || index >= users {
        return 0;
    }
    let base = rate / users;
    let extra = rate % users;
    let start = ((second as u128 * extra as u128) % users as u128) as u64;
    let position = (index + users - start) % users;
    base + u64::from(position < extra)
}

/// Fraction of a second (in ms, 0..1000) where user `index` starts its shakes.
fn phase_ms(index: u64) -> u64 {
    // Multiplying by 2^64/φ spreads consecutive indices evenly over [0, 1).
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    ((index.wrapping_mul(GOLDEN) >> 32) * 1000) >> 32
}

/// Millisecond offsets within the second of each of `count` shakes.
fn offsets_ms(index: u64, count: u64) -> impl Iterator<Item = u64> {
    let phase = phase_ms(index);
    (0..count).map(move |j| (phase + j * 1000 / count.max(1)) % 1000)
}

/// How long after logging in user `index` sends its first heartbeat: a
/// per-user share of the interval, in (0, heartbeat] (golden-ratio hashing,
/// as the shake phase). Users log in together in the connect phase; without
/// this they would all ping in the same few seconds, once per interval,
/// where a long-running fleet pings `users / heartbeat` times every second.
pub fn first_heartbeat(index: u64, heartbeat: std::time::Duration) -> std::time::Duration {
    const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
    let fraction = (index.wrapping_mul(GOLDEN) >> 32) as f64 / (1u64 << 32) as f64;
    heartbeat.mul_f64(1.0 - fraction)
}

/// How far ahead a user looks for its next shake before giving up (the rate
/// may change before then, which wakes it anyway).
const LOOKAHEAD_S: u64 = 3600;

/// The first shake time (Unix ms) strictly after `after_ms`, or `None` at
/// rate 0 or nothing within the look-ahead.
pub fn next_shake_ms(index: u64, users: u64, rate: u64, after_ms: u64) -> Option<u64> {
    if rate == 0 {
        return None;
    }
    let first_second = after_ms / 1000;
    for second in first_second..first_second + LOOKAHEAD_S {
        let count = shakes_in_second(index, users, rate, second);
        let best = offsets_ms(index, count).map(|o| second * 1000 + o).filter(|&t| t > after_ms).min();
        if best.is_some() {
            return best;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #[test]
    fn first_heartbeats_spread_over_the_interval() {
        let heartbeat = std::time::Duration::from_secs(720);
        let mut tenths = [0u32; 10];
        for index in 0..10_000 {
            let first = super::first_heartbeat(index, heartbeat);
            assert!(first > std::time::Duration::ZERO && first <= heartbeat, "{first:?}");
            tenths[(first.as_secs_f64() / 72.0).min(9.0) as usize] += 1;
        }
        assert!(tenths.iter().all(|&n| (900..=1_100).contains(&n)), "{tenths:?}");
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn every_second_carries_exactly_the_target(users in 1u64..5000, rate in 0u64..200_000, second in 0u64..10_000_000) {
            let total: u64 = (0..users).map(|i| shakes_in_second(i, users, rate, second)).sum();
            prop_assert_eq!(total, rate);
        }

        #[test]
        fn next_shake_is_in_the_future_and_on_schedule(users in 1u64..300, rate in 1u64..3000, index in 0u64..300, now in 0u64..1_000_000_000) {
            let index = index % users;
            if let Some(t) = next_shake_ms(index, users, rate, now) {
                prop_assert!(t > now);
                prop_assert!(shakes_in_second(index, users, rate, t / 1000) > 0);
            }
        }
    }

    /// Walks every user's own schedule through `seconds` seconds, as the
    /// simulator does, and counts shakes per second.
    fn simulate(users: u64, rate: u64, start_s: u64, seconds: u64) -> Vec<u64> {
        let mut per_second = vec![0u64; seconds as usize];
        for i in 0..users {
            let mut t = start_s * 1000 - 1;
            while let Some(next) = next_shake_ms(i, users, rate, t) {
                let s = next / 1000;
                if s >= start_s + seconds {
                    break;
                }
                per_second[(s - start_s) as usize] += 1;
                t = next;
            }
        }
        per_second
    }

    #[test]
    fn targets_that_do_not_divide_the_user_count_hold_within_one_percent() {
        for (users, rate) in [(7_000u64, 30_000u64), (10_007, 60_001), (999, 100), (3, 10)] {
            for count in simulate(users, rate, 1_700_000_000, 5) {
                let error = count.abs_diff(rate) as f64 / rate as f64;
                assert!(error <= 0.01, "users {users} rate {rate}: a second carried {count}");
            }
        }
    }

    #[test]
    fn changing_the_target_mid_run_takes_effect_the_next_second() {
        let (users, start) = (2_000u64, 1_800_000_000u64);
        let before = simulate(users, 5_000, start, 2);
        let after = simulate(users, 12_345, start + 2, 2);
        assert!(before.iter().all(|&c| c == 5_000));
        assert!(after.iter().all(|&c| c == 12_345));
    }

    #[test]
    fn shakes_within_a_second_are_spread_out() {
        let (users, rate, second) = (10_000u64, 30_000u64, 1_750_000_000u64);
        let mut per_100ms = [0u64; 10];
        for i in 0..users {
            for o in offsets_ms(i, shakes_in_second(i, users, rate, second)) {
                per_100ms[(o / 100) as usize] += 1;
            }
        }
        for c in per_100ms {
            assert!(c.abs_diff(rate / 10) <= rate / 100, "{per_100ms:?}");
        }
    }
}
