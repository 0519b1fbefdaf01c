//! Calls to the SETs' admin APIs: hyper's HTTP/1.1 client connection over
//! a tokio `TcpStream`, one connection per call, each call bounded in time
//! (connect, request and the whole answer) and in the size of its answer,
//! at most `SET_CALLS_MAX` in flight over all SETs.
//!
//! One connection per call because the calls are operator requests (a few a
//! second at most): a pool would keep connections against each SET's cap
//! for nothing, and a connection is never reused after a failure here.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, Method, Request, StatusCode};
use hongbao_core::sets::SetId;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// A call to one SET that got no usable answer.
#[derive(Debug, thiserror::Error)]
#[error("SET {set} ({addr}): {kind}")]
pub struct SetError {
    pub set: SetId,
    /// The SET's admin address.
    pub addr: SocketAddr,
    pub kind: SetErrorKind,
}

/// What went wrong with a call to a SET.
#[derive(Debug, thiserror::Error)]
pub enum SetErrorKind {
    /// No connection (refused, no route, or not within the timeout): the
    /// request never reached the SET, so nothing was done there.
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    /// Connected, but the whole answer did not come within the timeout:
    /// the request may or may not have been done there.
    #[error("no answer within {0} ms")]
    TimedOut(u64),
    /// The HTTP exchange failed (the connection closed mid-answer, a
    /// malformed answer).
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    /// An answer that is not what the route answers (not JSON, a field
    /// missing).
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
}

impl SetErrorKind {
    /// True when the request surely never reached the SET.
    pub fn nothing_done(&self) -> bool {
        matches!(self, SetErrorKind::Connect(_))
    }
}

/// A SET's answer, whatever its status.
#[derive(Debug, Clone)]
pub struct SetAnswer {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

impl SetAnswer {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// What a refusal says: its status and the error body's message (or the
    /// start of its text).
    pub fn describe(&self) -> String {
        let json = self.json();
        match json["error"]["message"].as_str() {
            Some(message) => format!("{} {}", self.status.as_u16(), message),
            None => {
                let text = String::from_utf8_lossy(&self.body);
                let text: String = text.chars().take(200).collect();
                format!("{} {}", self.status.as_u16(), text.trim())
            }
        }
    }
}

/// The client of every SET's admin API.
pub struct SetClient {
    /// SET `i`'s admin address is `sets[i]`.
    sets: Vec<SocketAddr>,
    /// Sent on to the SETs as `Authorization: Bearer`; `None` in dev mode.
    authorization: Option<HeaderValue>,
    timeout: Duration,
    answer_bytes_max: usize,
    permits: Arc<Semaphore>,
}

impl SetClient {
    pub fn new(
        sets: Vec<SocketAddr>,
        api_key: Option<&str>,
        timeout: Duration,
        calls_max: usize,
        answer_bytes_max: usize,
    ) -> Result<SetClient, String> {
        let authorization = match api_key {
            Some(key) => Some(
                HeaderValue::try_from(format!("Bearer {key}"))
                    .map_err(|_| "the admin key cannot be sent in a header".to_owned())?,
            ),
            None => None,
        };
        Ok(SetClient { sets, authorization, timeout, answer_bytes_max, permits: Arc::new(Semaphore::new(calls_max)) })
    }

    /// How many SETs.
    pub fn count(&self) -> u8 {
        self.sets.len() as u8
    }

    pub fn addr(&self, set: SetId) -> SocketAddr {
        self.sets[usize::from(set)]
    }

    /// The error for an answer of SET `set` that is not `what` the route
    /// answers.
    pub fn bad_answer(&self, set: SetId, what: &str) -> SetError {
        SetError { set, addr: self.addr(set), kind: SetErrorKind::BadAnswer(format!("expected {what}")) }
    }

    /// `method path` (path and query, e.g. `/v1/stats`) on SET `set`, with
    /// `body` as JSON; the answer whatever its status.
    pub async fn call(&self, set: SetId, method: Method, path: &str, body: Bytes) -> Result<SetAnswer, SetError> {
        let addr = self.addr(set);
        let result = self.exchange(addr, method, path, body).await;
        result.map_err(|kind| {
            metrics::counter!("hongbao_admin_set_call_errors_total", "set" => set.to_string()).increment(1);
            SetError { set, addr, kind }
        })
    }

    async fn exchange(
        &self,
        addr: SocketAddr,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<SetAnswer, SetErrorKind> {
        // Never closed: `acquire` fails only on a closed semaphore.
        let _permit = self.permits.acquire().await.map_err(|_| SetErrorKind::BadAnswer("client closed".into()))?;
        let timeout_ms = u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX);
        let deadline = Instant::now() + self.timeout;
        let stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(SetErrorKind::Connect(e)),
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not within {timeout_ms} ms"));
                return Err(SetErrorKind::Connect(e));
            }
        };
        let _ = stream.set_nodelay(true);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, addr.to_string())
            .header(header::CONNECTION, "close");
        if !body.is_empty() {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, body.len().to_string());
        }
        if let Some(auth) = &self.authorization {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = request.body(Body::from(body)).map_err(|e| SetErrorKind::BadAnswer(e.to_string()))?;
        let answer_bytes_max = self.answer_bytes_max;
        let exchange = async move {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let ask = async {
                let response = sender.send_request(request).await?;
                let (parts, body) = response.into_parts();
                let body = collect(body, answer_bytes_max).await?;
                let content_type = parts.headers.get(header::CONTENT_TYPE).cloned();
                Ok::<_, SetErrorKind>(SetAnswer { status: parts.status, content_type, body })
            };
            tokio::pin!(conn);
            tokio::pin!(ask);
            // The connection is driven beside the exchange; once it ends
            // (the SET closes after its answer), the answer is still read
            // out of what it delivered.
            tokio::select! {
                biased;
                answer = &mut ask => answer,
                ended = &mut conn => {
                    ended?;
                    ask.await
                }
            }
        };
        match tokio::time::timeout_at(deadline, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(SetErrorKind::TimedOut(timeout_ms)),
        }
    }
}

/// A whole answer body, at most `limit` bytes.
async fn collect(mut body: Incoming, limit: usize) -> Result<Bytes, SetErrorKind> {
    if body.size_hint().lower() > limit as u64 {
        return Err(SetErrorKind::TooLarge(limit));
    }
    let mut bytes = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let Ok(data) = frame?.into_data() else { continue };
        if data.len() > limit - bytes.len() {
            return Err(SetErrorKind::TooLarge(limit));
        }
        bytes.extend_from_slice(&data);
    }
    Ok(Bytes::from(bytes))
}
