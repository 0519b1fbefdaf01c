//! Alerts as the operator sees them (`GET /v1/alerts`): the ones firing and
//! the last `CLEARED_KEPT` cleared, and the two metrics that mirror them,
//! `hongbao_alerts_fired_total{op,signal}` and `hongbao_alerts_firing`.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Cleared alerts kept for `/v1/alerts`: a bad evening's worth (an alert
/// that flaps every few minutes for hours), in a few tens of KB.
pub const CLEARED_KEPT: usize = 100;

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    /// Requests per second: is the work getting done? Judged low only.
    Count,
    /// Share of requests the server did: is the work getting done? Low only.
    SuccessRatio,
    /// 99th percentile latency: are users happy? High only.
    P99,
    /// The money totals do not balance.
    Money,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Count => "count",
            Signal::SuccessRatio => "success_ratio",
            Signal::P99 => "p99",
            Signal::Money => "money",
        }
    }

    /// Work not done and money page someone; slowness is a ticket.
    pub fn severity(self) -> Severity {
        match self {
            Signal::Count | Signal::SuccessRatio | Signal::Money => Severity::Page,
            Signal::P99 => Severity::Ticket,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Work not done, or money: wake someone.
    Page,
    /// Users unhappy (slow): look at it in working hours.
    Ticket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Firing,
    Cleared,
}

/// Which expectation the value was judged against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The exponentially weighted mean and spread of the recent past.
    Ewma,
    /// The same minutes 24 hours earlier.
    Yesterday,
}

impl Baseline {
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Baseline::Ewma => "EWMA band",
            Baseline::Yesterday => "same time yesterday",
        }
    }
}

/// One alert (docs/api.md, "Alert").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Alert {
    pub id: u64,
    /// The operation (`shake`, `open`, …), or `money`.
    pub op: String,
    pub signal: Signal,
    pub state: AlertState,
    pub severity: Severity,
    /// Unix ms of the first second out of band.
    pub since_ms: u64,
    pub cleared_ms: Option<u64>,
    /// The latest value judged (while firing), or the last one before it
    /// cleared.
    pub value: f64,
    /// What the baseline expected, and its band.
    pub expected: f64,
    pub low: f64,
    pub high: f64,
    pub baseline: Baseline,
    pub message: String,
}

/// The alerts the sampler keeps: firing ones (one per detector at most,
/// so bounded by the detectors) and the last `CLEARED_KEPT` cleared.
#[derive(Default)]
pub struct AlertBook {
    next_id: u64,
    firing: Vec<Alert>,
    cleared: VecDeque<Alert>,
}

impl AlertBook {
    /// Opens an alert (`id` is assigned here) and counts it; returns its id.
    pub(crate) fn fire(&mut self, mut alert: Alert) -> u64 {
        self.next_id += 1;
        alert.id = self.next_id;
        alert.state = AlertState::Firing;
        alert.cleared_ms = None;
        tracing::warn!(id = alert.id, op = %alert.op, signal = alert.signal.as_str(), message = %alert.message, "alert firing");
        metrics::counter!("hongbao_alerts_fired_total", "op" => alert.op.clone(), "signal" => alert.signal.as_str())
            .increment(1);
        self.firing.push(alert);
        self.firing_gauge();
        self.next_id
    }

    /// A firing alert's latest judgement: value, band, baseline and message
    /// (`since_ms`, `id` and the rest stay).
    pub(crate) fn update(&mut self, judged: Alert) {
        if let Some(a) = self.firing.iter_mut().find(|a| a.id == judged.id) {
            a.value = judged.value;
            a.expected = judged.expected;
            a.low = judged.low;
            a.high = judged.high;
            a.baseline = judged.baseline;
            a.message = judged.message;
        }
    }

    pub(crate) fn clear(&mut self, id: u64, at_ms: u64, message: String) {
        let Some(i) = self.firing.iter().position(|a| a.id == id) else { return };
        let mut alert = self.firing.remove(i);
        alert.state = AlertState::Cleared;
        alert.cleared_ms = Some(at_ms);
        alert.message = message;
        tracing::info!(id, op = %alert.op, signal = alert.signal.as_str(), message = %alert.message, "alert cleared");
        if self.cleared.len() == CLEARED_KEPT {
            self.cleared.pop_back();
        }
        self.cleared.push_front(alert);
        self.firing_gauge();
    }

    pub fn firing(&self) -> usize {
        self.firing.len()
    }

    /// Firing first (newest first), then cleared (most recent first).
    pub fn list(&self) -> Vec<Alert> {
        self.firing.iter().rev().chain(self.cleared.iter()).cloned().collect()
    }

    fn firing_gauge(&self) {
        metrics::gauge!("hongbao_alerts_firing").set(self.firing.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(op: &str) -> Alert {
        Alert {
            id: 0,
            op: op.into(),
            signal: Signal::Count,
            state: AlertState::Firing,
            severity: Severity::Page,
            since_ms: 1,
            cleared_ms: None,
            value: 0.0,
            expected: 10.0,
            low: 5.0,
            high: 15.0,
            baseline: Baseline::Ewma,
            message: String::new(),
        }
    }

    #[test]
    fn firing_first_then_the_last_cleared_and_no_more() {
        let mut book = AlertBook::default();
        for i in 0..(CLEARED_KEPT + 5) {
            let id = book.fire(alert(&format!("op{i}")));
            book.clear(id, 10 + i as u64, "ok".into());
        }
        let a = book.fire(alert("shake"));
        let b = book.fire(alert("open"));
        book.update(Alert { id: a, value: 3.0, message: "three".into(), ..alert("ignored") });
        let list = book.list();
        assert_eq!(list.len(), 2 + CLEARED_KEPT);
        assert_eq!((list[0].id, list[1].id), (b, a));
        assert_eq!((list[1].value, list[1].message.as_str()), (3.0, "three"));
        assert_eq!(list[2].op, format!("op{}", CLEARED_KEPT + 4));
        assert_eq!(list[2].state, AlertState::Cleared);
        assert_eq!(list[2].cleared_ms, Some(10 + CLEARED_KEPT as u64 + 4));
        assert_eq!(book.firing(), 2);
        let json = serde_json::to_value(&list[0]).unwrap();
        assert_eq!(json["signal"], "count");
        assert_eq!(json["state"], "firing");
        assert_eq!(json["severity"], "page");
        assert_eq!(json["baseline"], "ewma");
        assert!(json["cleared_ms"].is_null());
    }
}
