//! The publisher and consumer tasks and their shared status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;
use hongbao_boundary::EngineError;
use hongbao_core::sets::{SetId, SetMap};
use hongbao_shard::{CrossKey, CrossMessage, Engine};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The JetStream stream every SET of a cluster shares.
pub const STREAM: &str = "HONGBAO_CROSS";
/// Outbox rows published per round (one read of the outbox, one commit
/// marking them published).
pub const PUBLISH_BATCH_MAX: usize = 1024;
/// Messages applied per round (as they arrive, at most this many); the
/// consumer lets at most twice as many be delivered and not yet acknowledged.
pub const APPLY_BATCH_MAX: usize = 1024;
/// JetStream drops a message whose id it saw this recently; beyond it the
/// receiving SET's key check catches a repeat.
const DEDUP_WINDOW: Duration = Duration::from_secs(120);
/// Bytes the stream may hold while a SET is away; past it a publish is
/// refused and the rows wait in the outbox (on the sender's disk).
/// (JetStream reserves it when the stream is made, and refuses a stream
/// larger than the disk it has: 256 MiB is ~1 million messages.)
const STREAM_BYTES_MAX: i64 = 256 << 20;
/// How long a delivered message may stay unacknowledged before JetStream
/// delivers it again (an apply is one commit: milliseconds).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// An empty outbox (or one whose rows are all on their way) is looked at
/// again after this long.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// The server's heartbeat on an idle pull: a lost NATS shows as missed
/// heartbeats within two of these.
const HEARTBEAT: Duration = Duration::from_secs(5);
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The subject of messages for `set`.
pub fn subject(set: SetId) -> String {
    format!("hongbao.cross.{set}")
}

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// `nats://host:port` (several, comma-separated, for a NATS cluster).
    pub nats_url: String,
    pub set: SetMap,
    /// JetStream replicas of the stream: 1 on one NATS server, 3 on a NATS
    /// cluster.
    pub replicas: usize,
}

/// Which task an error belongs to: each clears only its own.
#[derive(Clone, Copy, Debug)]
enum Side {
    /// The stream and the publisher.
    Out = 0,
    /// The consumer and the applying.
    In = 1,
}

fn side_of(stage: &'static str) -> Side {
    match stage {
        "stream" | "publish" => Side::Out,
        _ => Side::In,
    }
}

/// What the relay is doing, for `/health` and the metrics.
#[derive(Debug, Default)]
pub struct RelayStatus {
    connected: AtomicBool,
    /// The last error of each side (`Side`), until that side succeeds again.
    errors: Mutex<[Option<String>; 2]>,
    /// Each side has an error set: a success clears it (without these
    /// flags every apply would take the lock).
    failing: [AtomicBool; 2],
}

impl RelayStatus {
    /// Whether the NATS connection is up now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// The errors of the sides that have not succeeded since, joined.
    pub fn last_error(&self) -> Option<String> {
        let errors = hongbao_boundary::sync::lock(&self.errors);
        let set: Vec<&str> = errors.iter().flatten().map(String::as_str).collect();
        (!set.is_empty()).then(|| set.join("; "))
    }
    /// Why the relay cannot carry messages now, for `/health`: NATS away,
    /// or an error of a side that has not succeeded since.
    pub fn failure(&self) -> Option<String> {
        let last = self.last_error();
        if !self.connected() {
            return Some(match last {
                Some(e) => format!("NATS unreachable ({e}); cross-SET messages wait in the outbox"),
                None => "NATS unreachable; cross-SET messages wait in the outbox".to_owned(),
            });
        }
        last.map(|e| format!("cross-SET relay: {e}"))
    }

    fn failed(&self, stage: &'static str, error: impl std::fmt::Display) {
        metrics::counter!("hongbao_relay_errors_total", "stage" => stage).increment(1);
        let side = side_of(stage);
        let message = format!("{stage}: {error}");
        let mut errors = hongbao_boundary::sync::lock(&self.errors);
        if errors[side as usize].as_deref() != Some(message.as_str()) {
            tracing::warn!(stage, %error, "cross-SET relay");
            errors[side as usize] = Some(message);
        }
        self.failing[side as usize].store(true, Ordering::Release);
    }

    fn succeeded(&self, side: Side) {
        if !self.failing[side as usize].swap(false, Ordering::AcqRel) {
            return;
        }
        let mut errors = hongbao_boundary::sync::lock(&self.errors);
        if errors[side as usize].take().is_some() {
            tracing::info!(side = ?side, "cross-SET relay working again");
        }
    }
}

/// The running relay.
pub struct Relay {
    pub status: Arc<RelayStatus>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Waits for both tasks after the stop signal (they stop at their next
    /// await; an apply in progress finishes first).
    pub async fn wait(self) {
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Connects (in the background: a NATS that is down is dialled until it
/// answers) and starts the publisher and the consumer of `engine`'s SET.
pub async fn start(
    config: RelayConfig,
    engine: Engine,
    stop: watch::Receiver<bool>,
) -> Result<Relay, async_nats::Error> {
    let status = Arc::new(RelayStatus::default());
    let events = status.clone();
    let client = async_nats::ConnectOptions::new()
        .name(format!("hongbao-set-{}", config.set.set()))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let status = events.clone();
            async move {
                let up = match event {
                    async_nats::Event::Connected => true,
                    async_nats::Event::Disconnected => false,
                    _ => return,
                };
                status.connected.store(up, Ordering::Relaxed);
                metrics::gauge!("hongbao_relay_connected").set(if up { 1.0 } else { 0.0 });
                tracing::info!(connected = up, "NATS");
            }
        })
        .connect(config.nats_url.as_str())
        .await?;
    let js = jetstream::new(client);
    let publisher =
        tokio::spawn(publish_loop(js.clone(), config.clone(), engine.clone(), status.clone(), stop.clone()));
    let consumer = tokio::spawn(consume_loop(js, config, engine, status.clone(), stop));
    Ok(Relay { status, tasks: vec![publisher, consumer] })
}

/// The stream, created if it does not exist yet.
async fn ensure_stream(js: &jetstream::Context, config: &RelayConfig) -> Result<stream::Stream, async_nats::Error> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: STREAM.to_owned(),
            subjects: vec!["hongbao.cross.>".to_owned()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            duplicate_window: DEDUP_WINDOW,
            max_bytes: STREAM_BYTES_MAX,
            discard: stream::DiscardPolicy::New,
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await?;
    Ok(stream)
}

/// Sleeps `pause` unless stopped first; `true` when stopped.
async fn pause_or_stop(pause: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(pause) => {}
        _ = stop.wait_for(|s| *s) => return true,
    }
    *stop.borrow()
}

fn next_retry(retry: Duration) -> Duration {
    (retry * 2).min(RETRY_MAX)
}

async fn publish_loop(
    js: jetstream::Context,
    config: RelayConfig,
    engine: Engine,
    status: Arc<RelayStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let mut retry = RETRY_MIN;
    let mut stream_ready = false;
    let marking: Marking = Arc::default();
    loop {
        if *stop.borrow() {
            return;
        }
        if !stream_ready {
            match ensure_stream(&js, &config).await {
                Ok(_) => stream_ready = true,
                Err(e) => {
                    status.failed("stream", e);
                    if pause_or_stop(retry, &mut stop).await {
                        return;
                    }
                    retry = next_retry(retry);
                    continue;
                }
            }
        }
        // The backlog is kept in memory by the writer: an outbox with
        // nothing new (empty, or all of it on its way) costs no read.
        let on_the_way = hongbao_boundary::sync::lock(&marking).len() as u64;
        let backlog = engine.cross_backlog();
        if backlog <= on_the_way {
            if backlog == 0 {
                // Nothing to send and the stream is there: this side works.
                status.succeeded(Side::Out);
            }
            if pause_or_stop(IDLE_POLL, &mut stop).await {
                return;
            }
            continue;
        }
        match publish_batch(&js, &engine, &status, &marking).await {
            Ok(true) => {
                status.succeeded(Side::Out);
                retry = RETRY_MIN;
            }
            // Everything unpublished is already on its way (its marks are
            // being committed): look again shortly.
            Ok(false) => {
                if pause_or_stop(IDLE_POLL, &mut stop).await {
                    return;
                }
            }
            Err(e) => {
                status.failed("publish", e);
                if pause_or_stop(retry, &mut stop).await {
                    return;
                }
                retry = next_retry(retry);
            }
        }
    }
}

/// Keys JetStream has and whose "published" mark is being committed: the
/// next round reads past them instead of waiting for that commit. Bounded by
/// `MARKING_MAX`.
type Marking = Arc<Mutex<std::collections::HashSet<CrossKey>>>;

/// Rows whose marks may be in flight at once (one round more than a batch).
const MARKING_MAX: usize = 2 * PUBLISH_BATCH_MAX;
const _: () = assert!(PUBLISH_BATCH_MAX + MARKING_MAX <= hongbao_core::limits::CROSS_MESSAGES_PER_CALL_MAX);

/// One round: the oldest unpublished rows not already on their way go out,
/// each awaited until JetStream stored it; then their "published" marks are
/// committed in the background while the next round reads on. `Ok(false)`:
/// nothing new to send.
async fn publish_batch(
    js: &jetstream::Context,
    engine: &Engine,
    status: &Arc<RelayStatus>,
    marking: &Marking,
) -> Result<bool, String> {
    let in_flight = hongbao_boundary::sync::lock(marking).len();
    if in_flight >= MARKING_MAX {
        // The marks lag behind (storage slow): let them catch up.
        return Ok(false);
    }
    let rows = engine.cross_unpublished(PUBLISH_BATCH_MAX + in_flight).await.map_err(|e| e.to_string())?;
    let batch: Vec<CrossMessage> = {
        let on_the_way = hongbao_boundary::sync::lock(marking);
        rows.into_iter().filter(|m| !on_the_way.contains(&m.key())).take(PUBLISH_BATCH_MAX).collect()
    };
    if batch.is_empty() {
        return Ok(false);
    }
    let mut pending = Vec::with_capacity(batch.len());
    let mut first_error = None;
    for message in batch {
        let payload = postcard::to_stdvec(&message).map_err(|e| e.to_string())?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", message.key().to_string().as_str());
        match js.publish_with_headers(subject(message.to), headers, payload.into()).await {
            Ok(ack) => pending.push((message.key(), ack)),
            Err(e) => {
                first_error = Some(e.to_string());
                break;
            }
        }
    }
    let mut stored = Vec::with_capacity(pending.len());
    for (key, ack) in pending {
        match ack.await {
            Ok(_) => stored.push(key),
            Err(e) => {
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if !stored.is_empty() {
        let count = stored.len() as u64;
        metrics::counter!("hongbao_cross_published_total").increment(count);
        hongbao_boundary::sync::lock(marking).extend(stored.iter().copied());
        let (engine, status, marking) = (engine.clone(), status.clone(), marking.clone());
        tokio::spawn(async move {
            let marked = engine.cross_published(stored.clone()).await;
            // Marked or not, they leave the set: a row whose mark failed is
            // read and published again (JetStream drops the copy by its id,
            // the receiving SET by its key).
            let mut on_the_way = hongbao_boundary::sync::lock(&marking);
            for key in &stored {
                on_the_way.remove(key);
            }
            drop(on_the_way);
            if let Err(e) = marked {
                status.failed("publish", format!("marking published: {e}"));
            }
        });
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(true),
    }
}

async fn consume_loop(
    js: jetstream::Context,
    config: RelayConfig,
    engine: Engine,
    status: Arc<RelayStatus>,
    mut stop: watch::Receiver<bool>,
) {
    let set = config.set.set();
    let mut retry = RETRY_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        // A continuous pull: JetStream keeps delivering up to a batch ahead,
        // so the next messages arrive while these are being applied.
        let opened: Result<_, String> = match open_consumer(&js, &config).await {
            Ok(consumer) => consumer
                .stream()
                .max_messages_per_batch(APPLY_BATCH_MAX)
                .heartbeat(HEARTBEAT)
                .messages()
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let mut messages = match opened {
            Ok(messages) => {
                // The consumer is there and pulling: this side works.
                status.succeeded(Side::In);
                messages.ready_chunks(APPLY_BATCH_MAX)
            }
            Err(e) => {
                status.failed("consumer", e);
                if pause_or_stop(retry, &mut stop).await {
                    return;
                }
                retry = next_retry(retry);
                continue;
            }
        };
        // Each message is applied as it arrives, many at once (the writer
        // commits them together), without waiting for the ones before:
        // keys are independent and every apply is idempotent. The permits
        // bound what is being applied.
        let permits = Arc::new(tokio::sync::Semaphore::new(APPLY_BATCH_MAX * 2));
        let mut applying = tokio::task::JoinSet::new();
        loop {
            while let Some(done) = applying.try_join_next() {
                if let Ok(Err(e)) = done {
                    status.failed("apply", e);
                }
            }
            let chunk = tokio::select! {
                chunk = messages.next() => chunk,
                _ = stop.wait_for(|s| *s) => break,
            };
            let Some(chunk) = chunk else { break };
            let mut fetch_error = None;
            for item in chunk {
                let message = match item {
                    Ok(message) => message,
                    Err(e) => {
                        fetch_error = Some(e.to_string());
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let (engine, status) = (engine.clone(), status.clone());
                applying.spawn(async move {
                    let outcome = apply_one(&engine, set, message).await;
                    drop(permit);
                    match outcome {
                        Ok(_) => {
                            status.succeeded(Side::In);
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                });
            }
            if let Some(e) = fetch_error {
                // Opened again after a pause: a NATS that came back may
                // have lost the consumer with its store.
                status.failed("fetch", e);
                break;
            }
            retry = RETRY_MIN;
        }
        // What is being applied finishes (each is one commit) and is acked.
        while let Some(done) = applying.join_next().await {
            if let Ok(Err(e)) = done {
                status.failed("apply", e);
            }
        }
        if *stop.borrow() {
            return;
        }
        if pause_or_stop(retry, &mut stop).await {
            return;
        }
        retry = next_retry(retry);
    }
}

async fn open_consumer(
    js: &jetstream::Context,
    config: &RelayConfig,
) -> Result<consumer::PullConsumer, async_nats::Error> {
    let stream = ensure_stream(js, config).await?;
    let name = format!("set-{}", config.set.set());
    let consumer = stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: subject(config.set.set()),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                max_ack_pending: (APPLY_BATCH_MAX * 2) as i64,
                // Lets the stream above pull a batch ahead of the applying.
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer)
}

/// Applies one delivered message and acknowledges it after the commit.
/// `Ok(applied now)`; an error leaves it unacknowledged (delivered again
/// after `ACK_WAIT`), except a message that can never apply, which is
/// terminated and counted.
async fn apply_one(engine: &Engine, set: SetId, delivered: jetstream::Message) -> Result<bool, String> {
    let message: CrossMessage = match postcard::from_bytes(&delivered.payload) {
        Ok(m) => m,
        Err(e) => {
            poison(&delivered, format!("undecodable cross-SET message: {e}")).await;
            return Ok(false);
        }
    };
    if message.to != set {
        poison(&delivered, format!("a message for SET {} reached SET {set}", message.to)).await;
        return Ok(false);
    }
    match engine.apply_cross(message).await {
        Ok(applied) => {
            delivered.ack().await.map_err(|e| format!("ack: {e}"))?;
            Ok(applied)
        }
        Err(EngineError::Invalid(reason)) => {
            poison(&delivered, reason).await;
            Ok(false)
        }
        Err(e) => {
            // Storage away: NAKed so it comes back once the SET can commit.
            let _ = delivered.ack_with(AckKind::Nak(Some(RETRY_MAX))).await;
            Err(e.to_string())
        }
    }
}

/// A message no SET can apply: logged loudly, counted, never delivered
/// again (the cluster audit reports its credit as still in flight).
async fn poison(delivered: &jetstream::Message, reason: String) {
    metrics::counter!("hongbao_cross_poison_total").increment(1);
    tracing::error!(subject = %delivered.subject, reason, "cross-SET message refused for good");
    let _ = delivered.ack_with(AckKind::Term).await;
}
