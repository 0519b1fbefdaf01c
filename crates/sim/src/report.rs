//! The report folder's per-second CSV and PNG plots, and the summary table
//! printed at the end of a run.
//!
//! The CSV and the plots read only the run's timeline (`TimelineRow`s, one
//! per elapsed second); the table reads only the `Summary`.
//! The CSV is written by hand (one header line, then one line per row). The plots
//! are drawn with plotters' bitmap backend; text needs a TrueType font read from
//! disk (`HONGBAO_FONT`, then DejaVu Sans, then Liberation Sans). Without one the
//! plots are still drawn, only without any caption, axis label or legend.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use crate::bench::Summary;
use crate::stats::LatencySummary;
use crate::timeline::TimelineRow;

/// Size of every plot, in pixels.
const PLOT_SIZE: (u32, u32) = (1000, 500);

/// Environment variable naming a TrueType font file to draw text with.
pub const FONT_ENV: &str = "HONGBAO_FONT";

const FONT_CANDIDATES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("report i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("plot: {0}")]
    Plot(String),
}

impl ReportError {
    fn plot(what: &str, e: impl std::fmt::Display) -> ReportError {
        ReportError::Plot(format!("{what}: {e}"))
    }
}

// ---------------------------------------------------------------------------
// CSV

const CSV_COLUMNS: [&str; 30] = [
    "elapsed_s",
    "phase",
    "target_rate",
    "connected",
    "shakes_sent",
    "shakes_answered",
    "won",
    "none",
    "overload",
    "not_running",
    "shake_errors",
    "amount_won_fen",
    "pushes",
    "grabs",
    "opens",
    "amount_opened_fen",
    "open_rejects",
    "conn_errors",
    "reconnects",
    "backlogged",
    "broadcasts",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "server_connections",
    "server_shakes_per_s",
    "server_shake_wins_per_s",
    "server_opens_per_s",
    "server_released_per_s",
];

/// Quotes a CSV field if it holds a comma, a quote or a line break (RFC 4180).
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s.into()
    }
}

fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// A server rate; empty when not a number.
fn rate(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        String::new()
    }
}

fn csv_line(r: &TimelineRow) -> String {
    let c = &r.client;
    let mut cells: Vec<String> = Vec::with_capacity(CSV_COLUMNS.len());
    cells.push(r.elapsed_s.to_string());
    cells.push(csv_field(&r.phase).into_owned());
    cells.push(r.target_rate.to_string());
    cells.push(c.connected.to_string());
    for v in [c.shakes_sent, c.shakes_answered, c.won, c.none, c.overload, c.not_running, c.shake_errors] {
        cells.push(v.to_string());
    }
    cells.push(c.amount_won_fen.to_string());
    for v in [c.pushes, c.grabs, c.opens] {
        cells.push(v.to_string());
    }
    cells.push(c.amount_opened_fen.to_string());
    for v in [c.open_rejects, c.conn_errors, c.reconnects, c.backlogged, c.broadcasts] {
        cells.push(v.to_string());
    }
    // No latency at all in a second (nothing answered) is an empty cell, not 0 ms.
    let l: &LatencySummary = &c.latency_us;
    for v in [l.p50, l.p90, l.p99, l.max] {
        cells.push(if l.count == 0 { String::new() } else { ms(v) });
    }
    match &r.server {
        Some(s) => {
            cells.push(s.connections.to_string());
            for v in [s.shakes_per_s, s.shake_wins_per_s, s.opens_per_s, s.released_per_s] {
                cells.push(rate(v));
            }
        }
        None => cells.extend(std::iter::repeat_n(String::new(), 5)),
    }
    debug_assert_eq!(cells.len(), CSV_COLUMNS.len());
    cells.join(",")
}

/// Writes one CSV row per second (header first) to `path`.
pub fn write_csv(path: &Path, rows: &[TimelineRow]) -> Result<(), ReportError> {
    let mut out = BufWriter::new(File::create(path)?);
    writeln!(out, "{}", CSV_COLUMNS.join(","))?;
    for r in rows {
        writeln!(out, "{}", csv_line(r))?;
    }
    out.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// The summary table

/// Bytes as `1,234 B` (signed: memory may shrink).
fn bytes(b: i64) -> String {
    let digits = b.unsigned_abs().to_string();
    let mut grouped = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(d);
    }
    format!("{}{grouped} B", if b < 0 { "-" } else { "" })
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// The summary as a table for the terminal.
pub fn summary_table(s: &Summary, out: &Path) -> String {
    let mut t = String::new();
    let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<38} {v}\n"));
    row("users (workers)", format!("{} ({})", s.users, s.workers));
    row("duration", format!("{:.1} s", s.duration_s));
    row("connect time / connections held", format!("{:.1} s / {}", s.connect_s, s.connections_held));
    row("heartbeat interval", format!("{} s", s.plan.heartbeat_s));
    row("shakes sent / answered", format!("{} / {}", s.shakes_sent, s.shakes_answered));
    row(
        "  won / none / overload / not_running",
        format!(
            "{} / {} / {} / {}",
            s.shake_results.won, s.shake_results.none, s.shake_results.overload, s.shake_results.not_running
        ),
    );
    row("achieved shakes/s (max second)", s.achieved_qps_max.to_string());
    for p in s.phases.iter().filter(|p| p.name.starts_with("shake")) {
        row(
            &format!("{} target {}/s", p.name, p.target_rate),
            format!(
                "median {:.0}/s answered, p50 {:.2} ms, p99 {:.2} ms{}",
                p.answered_per_s_median,
                p.latency_ms.p50,
                p.latency_ms.p99,
                match (p.server_cpu_us_per_shake, p.server_cpu_cores) {
                    (Some(us), Some(cores)) => format!(", server {us:.1} µs CPU/shake ({cores:.2} cores)"),
                    _ => String::new(),
                } + &match (p.sim_cpu_us_per_shake, p.sim_cpu_cores) {
                    (Some(us), Some(cores)) => format!(", simulator {us:.1} µs ({cores:.2} cores)"),
                    _ => String::new(),
                }
            ),
        );
    }
    row("campaign packets released / won", format!("{} / {}", s.packets_released, s.packets_won));
    row("amount won (client / server)", format!("{} / {} fen", s.amount_won_fen, s.server_amount_won_fen));
    row("group packets sent / opens", format!("{} / {}", s.group_packets_sent, s.group_opens));
    row("group amount opened", format!("{} fen", s.group_amount_opened_fen));
    row(
        "shake latency p50 / p99 / max",
        format!("{:.2} / {:.2} / {:.2} ms", s.latency_ms.p50, s.latency_ms.p99, s.latency_ms.max),
    );
    let b = &s.broadcast;
    let ms = |v: Option<f64>| v.map(|v| format!("{v:.0} ms")).unwrap_or_else(|| "-".to_owned());
    row(
        "broadcast received / connected",
        format!(
            "{} / {}; last {} after the POST (p50 {}, p99 {})",
            b.received,
            b.connected,
            ms(b.last_ms),
            ms(b.p50_ms),
            ms(b.p99_ms)
        ),
    );
    row("simulator memory per user", format!("{} B", s.sim_rss_bytes_per_user));
    let m = &s.memory;
    if let (Some(before), Some(after), Some(per)) =
        (m.server_rss_before_bytes, m.server_rss_after_connect_bytes, m.server_rss_bytes_per_conn)
    {
        row(
            "server memory per connection",
            format!(
                "{} ({} -> {} over {} process(es), {} connections, settled {:.1} s)",
                bytes(per),
                mib(before),
                mib(after),
                m.server_processes,
                m.connections,
                m.settle_s
            ),
        );
    }
    if let (Some(end), Some(per)) = (m.server_rss_end_of_idle_bytes, m.server_rss_bytes_per_conn_end_of_idle) {
        row("  at the end of the idle hold", format!("{} ({})", bytes(per), mib(end)));
    }
    if let Some(k) = &m.kernel {
        row(
            "kernel memory per connection",
            format!(
                "slab {} (reclaimable {}, unreclaimable {}); TCP buffers (sockstat) {}; {:.2} TCP sockets per \
                 connection: per client + server pair, both on this machine{}",
                bytes(k.slab_bytes_per_conn),
                bytes(k.slab_reclaimable_bytes_per_conn),
                bytes(k.slab_unreclaimable_bytes_per_conn),
                bytes(k.sockstat_bytes_per_conn),
                k.tcp_inuse_per_conn,
                // Each connection adds exactly two sockets; more or fewer
                // means other work opened or closed some meanwhile.
                if (k.tcp_inuse_per_conn - 2.0).abs() > 0.05 {
                    " (not 2.00: other work on the machine moved these figures)"
                } else {
                    ""
                }
            ),
        );
    }
    if let Some(idle) = &s.idle {
        let drift = |d: &Option<crate::memory::Drift>| match d {
            Some(d) => format!("{} ({:+.2}%) from {:.0} s to {:.0} s", bytes(d.bytes), d.pct, d.from_s, d.to_s),
            None => "-".to_owned(),
        };
        row(
            "idle hold",
            format!(
                "{:.0} s, {} samples; {} connected at the end, {} reconnects",
                idle.duration_s,
                idle.samples.len(),
                idle.connected_end,
                idle.reconnects
            ),
        );
        row("  server memory drift", drift(&idle.server_rss_drift));
        row("  simulator memory drift", drift(&idle.sim_rss_drift));
        match (&idle.probe, &idle.probe_error) {
            (Some(p), _) => row(
                "  probe ping p50 / p99 / max",
                format!(
                    "{:.2} / {:.2} / {:.2} ms ({} pings, {} lost; target p99 < {} ms: {})",
                    p.p50_ms,
                    p.p99_ms,
                    p.max_ms,
                    p.pings,
                    p.lost,
                    p.target_p99_ms,
                    if p.p99_ms < p.target_p99_ms { "met" } else { "not met" }
                ),
            ),
            (None, e) => row("  probe", e.clone().unwrap_or_else(|| "none".to_owned())),
        }
    }
    row("connection errors / reconnects", format!("{} / {}", s.conn_errors, s.reconnects));
    t.push_str("checks:\n");
    for c in &s.checks {
        t.push_str(&format!("  {} {:<44} {}\n", if c.pass { "PASS" } else { "FAIL" }, c.name, c.detail));
    }
    t.push_str(&format!("{}  report: {}\n", if s.pass { "PASS" } else { "FAIL" }, out.display()));
    t
}

// ---------------------------------------------------------------------------
// Fonts

/// Registers a font under "sans-serif" once; true when one could be loaded.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let from_env = std::env::var_os(FONT_ENV).map(PathBuf::from);
        for path in from_env.into_iter().chain(FONT_CANDIDATES.iter().map(PathBuf::from)) {
            let Ok(bytes) = std::fs::read(&path) else { continue };
            // plotters keeps `&'static` font bytes; this happens at most once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

// ---------------------------------------------------------------------------
// Plots

const BLUE_: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN_: RGBColor = RGBColor(44, 160, 44);
const RED_: RGBColor = RGBColor(214, 39, 40);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const GREY: RGBColor = RGBColor(150, 150, 150);
const PHASE_GREY: RGBColor = RGBColor(110, 110, 110);

/// One line of a chart: points in (elapsed second, value), broken into
/// segments wherever a value is missing.
struct Series {
    name: &'static str,
    color: RGBColor,
    dashed: bool,
    width: u32,
    segments: Vec<Vec<(f64, f64)>>,
}

impl Series {
    /// `value` returns `None` for a second without a value (the line breaks there).
    fn new(
        name: &'static str,
        color: RGBColor,
        rows: &[TimelineRow],
        value: impl Fn(&TimelineRow) -> Option<f64>,
    ) -> Series {
        let mut segments = Vec::new();
        let mut current: Vec<(f64, f64)> = Vec::new();
        for r in rows {
            match value(r).filter(|v| v.is_finite()) {
                Some(v) => current.push((r.elapsed_s as f64, v)),
                None if !current.is_empty() => segments.push(std::mem::take(&mut current)),
                None => {}
            }
        }
        if !current.is_empty() {
            segments.push(current);
        }
        Series { name, color, dashed: false, width: 2, segments }
    }

    fn dashed(mut self) -> Series {
        self.dashed = true;
        self.width = 1;
        self
    }

    /// The simulator's own lines are drawn wider than the server's, so both
    /// stay visible where they coincide.
    fn wide(mut self) -> Series {
        self.width = 3;
        self
    }

    fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.segments.iter().flatten().map(|&(_, y)| y)
    }
}

/// One chart (a whole image or one panel of it).
struct Panel {
    title: &'static str,
    y_desc: &'static str,
    log_y: bool,
    series: Vec<Series>,
}

/// Where the phase changes: (first second of the phase, phase name).
fn phase_starts(rows: &[TimelineRow]) -> Vec<(f64, &str)> {
    let mut out: Vec<(f64, &str)> = Vec::new();
    let mut last: Option<&str> = None;
    for r in rows {
        if last != Some(r.phase.as_str()) {
            out.push((r.elapsed_s as f64, r.phase.as_str()));
            last = Some(r.phase.as_str());
        }
    }
    out
}

fn x_range(rows: &[TimelineRow]) -> Range<f64> {
    let lo = rows.iter().map(|r| r.elapsed_s).min().unwrap_or(0) as f64;
    let hi = rows.iter().map(|r| r.elapsed_s).max().unwrap_or(0) as f64;
    lo..(hi.max(lo + 1.0))
}

/// 0 to above the largest value (room for the legend), at least 0..1.
fn linear_y_range(panel: &Panel) -> Range<f64> {
    let max = panel.series.iter().flat_map(Series::values).fold(0.0f64, f64::max);
    0.0..(max * 1.25).max(1.0)
}

/// Whole decades around the positive values, at least one decade.
fn log_y_range(panel: &Panel) -> Range<f64> {
    let positive = || panel.series.iter().flat_map(Series::values).filter(|v| *v > 0.0);
    let min = positive().fold(f64::INFINITY, f64::min);
    let max = positive().fold(0.0f64, f64::max);
    if !min.is_finite() || max <= 0.0 {
        return 0.1..10.0;
    }
    let lo = 10f64.powf(min.log10().floor());
    let hi = 10f64.powf(max.log10().ceil());
    lo..if hi > lo { hi } else { lo * 10.0 }
}

fn fmt_tick(v: &f64) -> String {
    if v.abs() >= 1000.0 || *v == v.round() {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn draw_panel(area: &Area<'_>, panel: &Panel, rows: &[TimelineRow], text: bool) -> Result<(), ReportError> {
    let x = x_range(rows);
    if panel.log_y {
        let y = log_y_range(panel);
        let mut b = ChartBuilder::on(area);
        configure_builder(&mut b, panel, text);
        let chart = b.build_cartesian_2d(x, y.clone().log_scale()).map_err(|e| ReportError::plot(panel.title, e))?;
        fill_chart(chart, panel, rows, y, text)
    } else {
        let y = linear_y_range(panel);
        let mut b = ChartBuilder::on(area);
        configure_builder(&mut b, panel, text);
        let chart = b.build_cartesian_2d(x, y.clone()).map_err(|e| ReportError::plot(panel.title, e))?;
        fill_chart(chart, panel, rows, y, text)
    }
}

fn configure_builder(b: &mut ChartBuilder<'_, '_, BitMapBackend<'_>>, panel: &Panel, text: bool) {
    b.margin(12);
    if text {
        b.caption(panel.title, ("sans-serif", 20)).x_label_area_size(40).y_label_area_size(70);
    }
}

fn fill_chart<'a, Y>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, Y>>,
    panel: &Panel,
    rows: &[TimelineRow],
    y: Range<f64>,
    text: bool,
) -> Result<(), ReportError>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let err = |e: DrawingAreaErrorKind<_>| ReportError::plot(panel.title, e);
    {
        let mut mesh = chart.configure_mesh();
        mesh.light_line_style(WHITE.mix(0.0)).bold_line_style(BLACK.mix(0.08));
        if text {
            mesh.x_desc("elapsed (s)")
                .y_desc(panel.y_desc)
                .x_label_formatter(&fmt_tick)
                .y_label_formatter(&fmt_tick)
                .label_style(("sans-serif", 13));
        }
        mesh.draw().map_err(err)?;
    }

    // Phase boundaries: thin grey vertical lines, the phase's name at the top.
    let phases = phase_starts(rows);
    let y_top = y.end;
    for (i, &(px, name)) in phases.iter().enumerate() {
        if i > 0 {
            chart
                .draw_series(DashedLineSeries::new(vec![(px, y.start), (px, y_top)], 5, 3, PHASE_GREY.stroke_width(1)))
                .map_err(err)?;
        }
        if text {
            chart
                .draw_series(std::iter::once(Text::new(
                    format!(" {name}"),
                    (px, y_top),
                    ("sans-serif", 12).into_font().color(&GREY),
                )))
                .map_err(err)?;
        }
    }

    for s in &panel.series {
        let style = s.color.stroke_width(s.width);
        // A series without any point still gets its (empty) line, for the legend.
        let empty = [Vec::new()];
        let segments = if s.segments.is_empty() { &empty[..] } else { &s.segments[..] };
        for (i, seg) in segments.iter().enumerate() {
            let anno = if s.dashed {
                chart.draw_series(DashedLineSeries::new(seg.clone(), 6, 4, style)).map_err(err)?
            } else {
                chart.draw_series(LineSeries::new(seg.clone(), style)).map_err(err)?
            };
            if text && i == 0 {
                anno.label(s.name).legend(move |(lx, ly)| PathElement::new(vec![(lx, ly), (lx + 20, ly)], style));
            }
            if let [lone] = seg[..] {
                // A lone point draws no line; mark it.
                chart.draw_series(std::iter::once(Circle::new(lone, 2, style.filled()))).map_err(err)?;
            }
        }
    }

    if text && !panel.series.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    Ok(())
}

/// Draws one image of one or more panels side by side into `path`.
fn draw_image(path: &Path, panels: &[Panel], rows: &[TimelineRow], text: bool) -> Result<(), ReportError> {
    let what = path.display().to_string();
    let root = BitMapBackend::new(path, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| ReportError::plot(&what, e))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    for (area, panel) in areas.iter().zip(panels) {
        draw_panel(area, panel, rows, text)?;
    }
    root.present().map_err(|e| ReportError::plot(&what, e))?;
    Ok(())
}

fn server(row: &TimelineRow, f: impl Fn(&crate::timeline::ServerSecond) -> f64) -> Option<f64> {
    row.server.as_ref().map(f)
}

/// The images: file name and the panels in it.
fn images(rows: &[TimelineRow]) -> Vec<(&'static str, Vec<Panel>)> {
    let latency = |pick: fn(&LatencySummary) -> u64| {
        move |r: &TimelineRow| {
            let l = &r.client.latency_us;
            (l.count > 0).then(|| pick(l) as f64 / 1000.0).filter(|v| *v > 0.0)
        }
    };
    vec![
        (
            "requests.png",
            vec![Panel {
                title: "Shake requests per second",
                y_desc: "requests / s",
                log_y: false,
                series: vec![
                    Series::new("target rate", GREY, rows, |r| Some(r.target_rate as f64)).dashed(),
                    Series::new("client shakes sent", BLUE_, rows, |r| Some(r.client.shakes_sent as f64)).wide(),
                    Series::new("client shakes answered", ORANGE, rows, |r| Some(r.client.shakes_answered as f64))
                        .wide(),
                    Series::new("server shakes", GREEN_, rows, |r| server(r, |s| s.shakes_per_s)),
                ],
            }],
        ),
        (
            "wins.png",
            vec![
                Panel {
                    title: "Shake wins per second",
                    y_desc: "wins / s",
                    log_y: false,
                    series: vec![
                        Series::new("client wins", BLUE_, rows, |r| Some(r.client.won as f64)).wide(),
                        Series::new("server shake wins", GREEN_, rows, |r| server(r, |s| s.shake_wins_per_s)),
                    ],
                },
                Panel {
                    title: "Group packet opens per second",
                    y_desc: "opens / s",
                    log_y: false,
                    series: vec![
                        Series::new("client opens", BLUE_, rows, |r| Some(r.client.opens as f64)).wide(),
                        Series::new("server opens", GREEN_, rows, |r| server(r, |s| s.opens_per_s)),
                    ],
                },
            ],
        ),
        (
            "released.png",
            vec![Panel {
                title: "Campaign packets released per second (server)",
                y_desc: "packets / s",
                log_y: false,
                series: vec![Series::new("server released", PURPLE, rows, |r| server(r, |s| s.released_per_s))],
            }],
        ),
        (
            "latency.png",
            vec![Panel {
                title: "Shake latency per second (client)",
                y_desc: "latency (ms, log)",
                log_y: true,
                series: vec![
                    Series::new("p50", BLUE_, rows, latency(|l| l.p50)),
                    Series::new("p90", GREEN_, rows, latency(|l| l.p90)),
                    Series::new("p99", ORANGE, rows, latency(|l| l.p99)),
                    Series::new("max", RED_, rows, latency(|l| l.max)),
                ],
            }],
        ),
        (
            "connections.png",
            vec![Panel {
                title: "Connections",
                y_desc: "connections",
                log_y: false,
                series: vec![
                    Series::new("client connected users", BLUE_, rows, |r| Some(r.client.connected as f64)).wide(),
                    Series::new("server connections", GREEN_, rows, |r| server(r, |s| s.connections as f64)),
                ],
            }],
        ),
    ]
}

/// Draws the PNG plots into `dir`, returns the files written.
///
/// Files: `requests.png`, `wins.png`, `released.png`, `latency.png`,
/// `connections.png` (1000x500 each). Text is drawn only when a font was found.
pub fn write_plots(dir: &Path, rows: &[TimelineRow]) -> Result<Vec<PathBuf>, ReportError> {
    write_plots_with(dir, rows, font_available())
}

fn write_plots_with(dir: &Path, rows: &[TimelineRow], text: bool) -> Result<Vec<PathBuf>, ReportError> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, panels) in images(rows) {
        let path = dir.join(name);
        draw_image(&path, &panels, rows, text)?;
        written.push(path);
    }
    Ok(written)
}

/// Whether the plots will carry text (a font was found), e.g. to log a hint.
pub fn plot_text_enabled() -> bool {
    font_available()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::SecondRow;
    use crate::timeline::ServerSecond;

    const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

    fn rows() -> Vec<TimelineRow> {
        (0..3u64)
            .map(|i| TimelineRow {
                elapsed_s: i,
                phase: if i < 2 { "shake-1".into() } else { "group".into() },
                target_rate: 1000,
                client: SecondRow {
                    second: i,
                    connected: 10,
                    shakes_sent: 900 + i,
                    shakes_answered: 890,
                    won: 20 + i,
                    opens: i,
                    latency_us: LatencySummary { count: 890, p50: 1_500, p90: 4_000, p99: 12_345, max: 80_000 },
                    ..SecondRow::default()
                },
                server: (i != 1).then_some(ServerSecond {
                    connections: 10,
                    shakes_per_s: 889.5,
                    shake_wins_per_s: 21.0,
                    opens_per_s: i as f64,
                    released_per_s: 20.0,
                }),
            })
            .collect()
    }

    #[test]
    fn csv_has_header_and_one_line_per_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("timeline.csv");
        let mut rows = rows();
        rows[2].phase = "odd,\"phase\"".into();
        write_csv(&path, &rows).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].split(',').count(), CSV_COLUMNS.len());
        assert!(lines[0].contains(",backlogged,broadcasts,p50_ms,"));
        assert!(lines[0].starts_with("elapsed_s,phase,target_rate,connected,"));
        assert!(lines[0].ends_with(",max_ms,server_connections,server_shakes_per_s,server_shake_wins_per_s,server_opens_per_s,server_released_per_s"));
        for l in &lines[1..3] {
            assert_eq!(l.split(',').count(), CSV_COLUMNS.len(), "{l}");
        }
        assert!(lines[1].contains(",1.500,4.000,12.345,80.000,10,889.500,"));
        assert!(lines[2].ends_with(",80.000,,,,,"), "{}", lines[2]);
        // The quoted phase holds one comma of its own.
        assert!(lines[3].starts_with("2,\"odd,\"\"phase\"\"\",1000,"));
        assert_eq!(lines[3].split(',').count(), CSV_COLUMNS.len() + 1);
    }

    #[test]
    fn bytes_are_grouped_in_thousands_and_signed() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(999), "999 B");
        assert_eq!(bytes(1_512), "1,512 B");
        assert_eq!(bytes(-1_234_567), "-1,234,567 B");
    }

    #[test]
    fn csv_of_no_rows_is_just_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        write_csv(&path, &[]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
    }

    fn assert_pngs(files: &[PathBuf]) {
        let names: Vec<_> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["requests.png", "wins.png", "released.png", "latency.png", "connections.png"]);
        for f in files {
            let bytes = std::fs::read(f).unwrap();
            assert!(bytes.len() > PNG_SIGNATURE.len(), "{}", f.display());
            assert_eq!(bytes[..8], PNG_SIGNATURE, "{}", f.display());
        }
    }

    #[test]
    fn plots_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        assert_pngs(&write_plots(dir.path(), &rows()).unwrap());
    }

    #[test]
    fn plots_without_a_font_are_pngs() {
        let dir = tempfile::tempdir().unwrap();
        assert_pngs(&write_plots_with(dir.path(), &rows(), false).unwrap());
    }

    #[test]
    fn plots_of_no_rows_and_of_zeros_do_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        for text in [true, false] {
            assert_pngs(
                &write_plots_with(&dir.path().join(format!("empty-{text}")), &[], text && font_available()).unwrap(),
            );
            let zeros = vec![
                TimelineRow { elapsed_s: 5, phase: "connect".into(), ..TimelineRow::default() },
                TimelineRow {
                    elapsed_s: 6,
                    phase: "connect".into(),
                    server: Some(ServerSecond::default()),
                    ..TimelineRow::default()
                },
            ];
            assert_pngs(
                &write_plots_with(&dir.path().join(format!("zeros-{text}")), &zeros, text && font_available()).unwrap(),
            );
            let one = vec![TimelineRow {
                server: Some(ServerSecond { shakes_per_s: f64::NAN, ..ServerSecond::default() }),
                ..rows()[0].clone()
            }];
            assert_pngs(
                &write_plots_with(&dir.path().join(format!("one-{text}")), &one, text && font_available()).unwrap(),
            );
        }
    }
}
