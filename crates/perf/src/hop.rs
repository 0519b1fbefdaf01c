//! `perf hop`: the cost of one request and its reply between a gateway and
//! a SET, over the two roads a cluster could use — hongbao's own link (TCP,
//! batched by one writer task per side) and NATS request/reply (through a
//! real `nats-server`) — measured back to back in one run.
//!
//! Both sides run in this process, the SET side answering every request at
//! once (no engine), so what differs is only the road: framing, syscalls,
//! the broker's hop. The same number of requests is kept in flight on each.
//! CPU is this process's plus, for NATS, the server's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use hongbao_boundary::{Backend, GateView, LinkedEngine, Outbox, Responder};
use hongbao_client::procfs;
use hongbao_harness::NatsServer;
use hongbao_link::{LinkListener, LinkTarget};
use hongbao_proto::{Reply, Request, ShakeResult};
use tokio::sync::watch;

#[derive(Debug, clap::Args)]
pub struct HopArgs {
    /// Seconds each road is measured.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Requests kept in flight (one per simulated connection).
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// One second each.
    #[arg(long)]
    quick: bool,
}

/// What one road did.
struct Outcome {
    requests: u64,
    elapsed_s: f64,
    cpu_s: f64,
    /// Microseconds, sorted.
    latencies_us: Vec<u32>,
}

impl Outcome {
    fn per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed_s
    }
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_s * 1e6 / self.requests.max(1) as f64
    }
    fn percentile_us(&self, p: f64) -> f64 {
        let n = self.latencies_us.len();
        if n == 0 {
            return 0.0;
        }
        f64::from(self.latencies_us[((n as f64 * p) as usize).min(n - 1)])
    }
}

/// The SET side of the link road: every request answered at once.
#[derive(Clone)]
struct Echo {
    gates: Arc<watch::Sender<u64>>,
}

impl LinkedEngine for Echo {
    type Registration = ();
    fn answer_inline(&self, _user: u64, _req: &Request) -> Option<Reply> {
        None
    }
    fn submit(&self, _user: u64, _req: Request, responder: Responder) {
        responder.send(Reply::Balance { balance_fen: 0 });
    }
    fn register(
        &self,
        _user: u64,
        _outbox: Outbox,
    ) -> impl std::future::Future<Output = Result<(), hongbao_boundary::EngineError>> + Send {
        std::future::ready(Ok(()))
    }
    fn gate_view(&self) -> GateView {
        GateView::default()
    }
    fn gate_changes(&self) -> watch::Receiver<u64> {
        self.gates.subscribe()
    }
    fn count_remote_shakes(&self, _result: &ShakeResult, _n: u64) {}
}

pub fn run(args: HopArgs) -> anyhow::Result<()> {
    let seconds = if args.quick { 1 } else { args.seconds.max(1) };
    let window = Duration::from_secs(seconds);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async move {
        let nats = NatsServer::start().context("cannot start nats-server (scripts/test.sh installs it)")?;
        println!(
            "perf hop: one request and its reply, {} in flight for {seconds} s on each road; the SET side answers at once",
            args.inflight
        );
        let link = over_link(args.inflight, window).await?;
        let broker = over_nats(&nats, args.inflight, window).await?;
        report("link", &link, None);
        report("nats", &broker, Some(&link));
        anyhow::Ok(())
    })
}

fn report(road: &str, outcome: &Outcome, baseline: Option<&Outcome>) {
    crate::figure(&format!("hop-{road}-requests-per-s"), outcome.per_s(), "req/s", baseline.map(Outcome::per_s));
    crate::figure(
        &format!("hop-{road}-cpu-per-request"),
        outcome.cpu_us_per_request(),
        "us",
        baseline.map(Outcome::cpu_us_per_request),
    );
    crate::figure(&format!("hop-{road}-p50"), outcome.percentile_us(0.5), "us", baseline.map(|b| b.percentile_us(0.5)));
    crate::figure(
        &format!("hop-{road}-p99"),
        outcome.percentile_us(0.99),
        "us",
        baseline.map(|b| b.percentile_us(0.99)),
    );
}

fn cpu_now(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|pid| procfs::cpu_s(*pid)).sum()
}

async fn over_link(inflight: usize, window: Duration) -> anyhow::Result<Outcome> {
    let (stop_tx, stop) = watch::channel(false);
    let echo = Echo { gates: Arc::new(watch::channel(0).0) };
    let listener = LinkListener::bind_tcp("127.0.0.1:0".parse()?, "hop".into(), echo).await?;
    let addr = listener.tcp_addr().context("a TCP listener")?;
    let server = listener.start(stop);
    let (engine, mut link) =
        hongbao_link::connect_resilient(LinkTarget::Tcp(addr.to_string()), "hop".into(), "hop".into());
    anyhow::ensure!(link.wait_up(Duration::from_secs(5)).await, "the link did not come up");
    let pids = [std::process::id()];
    let cpu_before = cpu_now(&pids);
    let started = Instant::now();
    let deadline = started + window;
    let mut tasks = Vec::with_capacity(inflight);
    for user in 0..inflight as u64 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let (outbox, mut replies) = Outbox::new(16);
            let conn = engine.connect(user, outbox.clone()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut latencies = Vec::new();
            let mut id = 0;
            while Instant::now() < deadline {
                id += 1;
                let sent = Instant::now();
                engine.submit(
                    &conn,
                    user,
                    Request::Balance,
                    Responder::Client { outbox: outbox.clone(), request_id: id },
                );
                let frames = replies.recv(16).await.map_err(|_| anyhow::anyhow!("outbox overflow"))?;
                anyhow::ensure!(frames.len() == 1, "one reply per request");
                latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            anyhow::Ok(latencies)
        }));
    }
    let outcome = gather(tasks, started, cpu_before, &pids).await?;
    link.close().await;
    let _ = stop_tx.send(true);
    server.wait().await;
    Ok(outcome)
}

async fn over_nats(nats: &NatsServer, inflight: usize, window: Duration) -> anyhow::Result<Outcome> {
    // Two connections, as a gateway process and a SET process would have.
    let asking = async_nats::connect(nats.url()).await?;
    let answering = async_nats::connect(nats.url()).await?;
    let mut requests = answering.subscribe("hop").await?;
    answering.flush().await?;
    let responder = tokio::spawn(async move {
        let reply = bytes_of_reply();
        while let Some(message) = requests.next().await {
            if let Some(to) = message.reply {
                let _ = answering.publish(to, reply.clone().into()).await;
            }
        }
    });
    let mut pids = vec![std::process::id()];
    pids.extend(nats.pid());
    let cpu_before = cpu_now(&pids);
    let started = Instant::now();
    let deadline = started + window;
    let request = postcard::to_stdvec(&Request::Balance)?;
    let mut tasks = Vec::with_capacity(inflight);
    for _ in 0..inflight {
        let (asking, request) = (asking.clone(), request.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let sent = Instant::now();
                asking.request("hop", request.clone().into()).await?;
                latencies.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            anyhow::Ok(latencies)
        }));
    }
    let outcome = gather(tasks, started, cpu_before, &pids).await?;
    responder.abort();
    Ok(outcome)
}

fn bytes_of_reply() -> Vec<u8> {
    postcard::to_stdvec(&Reply::Balance { balance_fen: 0 }).expect("a reply encodes")
}

async fn gather(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Vec<u32>>>>,
    started: Instant,
    cpu_before: f64,
    pids: &[u32],
) -> anyhow::Result<Outcome> {
    let mut latencies_us = Vec::new();
    for task in tasks {
        latencies_us.extend(task.await??);
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let cpu_s = cpu_now(pids) - cpu_before;
    latencies_us.sort_unstable();
    Ok(Outcome { requests: latencies_us.len() as u64, elapsed_s, cpu_s, latencies_us })
}
