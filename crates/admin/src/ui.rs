//! The two web pages and their files, compiled into the binary: the live
//! dashboard at `/`, the user page at `/app`, their scripts, styles and the
//! vendored chart library under `/ui/{file}`, and `/ui/config.json` (the
//! gateway's WebSocket port, which the user page connects to).
//!
//! None of these needs the admin key: they are the same bytes for everyone
//! and hold no data. The data routes the dashboard reads (`/v1/...`) keep
//! needing it; the page asks for the key and sends it in a header.
//!
//! Every answer says `cache-control: no-cache` (a new binary's pages are
//! seen at once; the files are small), `x-content-type-options: nosniff`,
//! and a content security policy that allows scripts, styles and fetches
//! from this origin only (no inline script, no eval, no framing), plus the
//! gateway's WebSocket origin for the user page.
//!
//! Must not: read files at run time (the binary is the deployment), or
//! serve anything not listed in `FILES`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ApiError;
use crate::AppState;

/// One embedded file.
pub(crate) struct Asset {
    /// Its name under `/ui/`.
    pub(crate) name: &'static str,
    pub(crate) content_type: &'static str,
    pub(crate) body: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// The dashboard, served at `/`.
const DASHBOARD_HTML: &[u8] = include_bytes!("../ui/dashboard.html");
/// The user page, served at `/app`.
const APP_HTML: &[u8] = include_bytes!("../ui/app.html");

/// Everything under `/ui/`.
pub(crate) const FILES: &[Asset] = &[
    Asset { name: "hongbao-client.js", content_type: JS, body: include_bytes!("../ui/hongbao-client.js") },
    Asset { name: "app.js", content_type: JS, body: include_bytes!("../ui/app.js") },
    Asset { name: "dashboard.js", content_type: JS, body: include_bytes!("../ui/dashboard.js") },
    Asset { name: "style.css", content_type: CSS, body: include_bytes!("../ui/style.css") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", body: include_bytes!("../ui/favicon.svg") },
    Asset {
        name: "vendor/uPlot.iife.min.js",
        content_type: JS,
        body: include_bytes!("../ui/vendor/uPlot.iife.min.js"),
    },
    Asset { name: "vendor/uPlot.min.css", content_type: CSS, body: include_bytes!("../ui/vendor/uPlot.min.css") },
    Asset {
        name: "vendor/uPlot.LICENSE",
        content_type: "text/plain; charset=utf-8",
        body: include_bytes!("../ui/vendor/uPlot.LICENSE"),
    },
];

/// What `/ui/config.json` tells the pages.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct UiConfig {
    /// The port of the gateway's WebSocket listener; `None` when the admin
    /// API runs without a gateway (its own tests).
    pub(crate) ws_port: Option<u16>,
    /// Dev mode: the user page says a bare user id works as a token.
    pub(crate) dev: bool,
}

/// The policy for every page and file. `connect` is the extra origin the
/// page may open connections to (the user page's WebSocket), if any.
fn csp(connect: Option<&str>) -> String {
    let connect = connect.map(|origin| format!(" {origin}")).unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{connect}; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
}

fn respond(content_type: &'static str, csp: &str, body: &'static [u8]) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // Built from constants and a host checked by `ws_origin`: always a valid value.
    if let Ok(value) = HeaderValue::from_str(csp) {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

/// The pages and their files, registered beside the API's route table:
/// they are not API routes, so the OpenAPI document does not list them.
pub(crate) fn pages() -> Vec<(&'static str, axum::routing::MethodRouter<Arc<AppState>>)> {
    use axum::routing::get;
    vec![("/", get(dashboard)), ("/app", get(app)), ("/ui/{*file}", get(file))]
}

/// `GET /`: the dashboard.
pub(crate) async fn dashboard() -> Response {
    respond(HTML, &csp(None), DASHBOARD_HTML)
}

/// `GET /app`: the user page. Its policy also allows the gateway's WebSocket
/// on the host the page was loaded from, the address the page connects to.
pub(crate) async fn app(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let origin = app.ui.ws_port.and_then(|port| ws_origin(&headers, port));
    respond(HTML, &csp(origin.as_deref()), APP_HTML)
}

/// `GET /ui/{*file}`.
pub(crate) async fn file(Path(name): Path<String>) -> Response {
    match FILES.iter().find(|asset| asset.name == name) {
        Some(asset) => respond(asset.content_type, &csp(None), asset.body),
        None => ApiError::not_found(format!("no file /ui/{name}")).into_response(),
    }
}

/// What the user page needs to know to connect.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct UiConfigBody {
    /// The gateway's WebSocket port on this host; `null` without a gateway.
    ws_port: Option<u16>,
    /// Dev mode: a bare user id works as a token.
    dev: bool,
}

/// `GET /ui/config.json`: `{"ws_port": 7071, "dev": false}`.
#[utoipa::path(
    get,
    path = "/ui/config.json",
    summary = "What the user page needs to connect",
    description = "Public (no key): the gateway's WebSocket port on this host and whether the server runs in dev mode.",
    tag = "health",
    responses((status = 200, description = "The page's settings.", body = UiConfigBody))
)]
pub(crate) async fn config(State(app): State<Arc<AppState>>) -> Response {
    let body = UiConfigBody { ws_port: app.ui.ws_port, dev: app.ui.dev };
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `ws://<host of the request>:<port>`, if the request's `Host` is a plain
/// host name or IP address (with or without a port): the value goes into a
/// header, so nothing else may pass.
fn ws_origin(headers: &HeaderMap, port: u16) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let name = if host.starts_with('[') {
        // [v6]:port
        let end = host.find(']')?;
        let inner = &host[1..end];
        if inner.is_empty() || !inner.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return None;
        }
        &host[..=end]
    } else {
        let name = host.split(':').next()?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') {
            return None;
        }
        name
    };
    Some(format!("ws://{name}:{port}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::{HeaderMap, HeaderValue};

    use super::{ws_origin, APP_HTML, DASHBOARD_HTML, FILES};

    /// Every `src="…"` and `href="…"` of a page, and every `from './…'` of a
    /// script: what the browser will ask for.
    fn references(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for marker in ["src=\"", "href=\"", "from '"] {
            let quote = marker.chars().last().unwrap_or('"');
            for (at, _) in text.match_indices(marker) {
                let rest = &text[at + marker.len()..];
                if let Some(end) = rest.find(quote) {
                    out.push(rest[..end].to_owned());
                }
            }
        }
        out
    }

    /// A reference as a path under `/ui/` (`None` for the page routes themselves).
    fn under_ui(reference: &str) -> Option<&str> {
        match reference {
            "/" | "/app" => None,
            r => Some(r.strip_prefix("/ui/").or_else(|| r.strip_prefix("./")).unwrap_or(r)),
        }
    }

    #[test]
    fn every_file_a_page_or_script_refers_to_is_served() {
        let served: BTreeSet<&str> = FILES.iter().map(|a| a.name).collect();
        let mut checked = 0;
        let pages = [("dashboard.html", DASHBOARD_HTML), ("app.html", APP_HTML)];
        let scripts = FILES.iter().filter(|a| a.name.ends_with(".js") && !a.name.starts_with("vendor/"));
        for (name, body) in pages.into_iter().chain(scripts.map(|a| (a.name, a.body))) {
            let text = std::str::from_utf8(body).unwrap();
            for reference in references(text) {
                assert!(!reference.contains("://"), "{name} refers to another origin: {reference}");
                if let Some(path) = under_ui(&reference) {
                    assert!(served.contains(path), "{name} refers to {reference}, which is not served");
                    checked += 1;
                }
            }
        }
        // Both pages load the client's scripts and the styles at least.
        assert!(checked >= 6, "only {checked} references found: is the parser still right?");
    }

    #[test]
    fn the_websocket_origin_takes_only_a_clean_host() {
        let with = |host: &str| {
            let mut h = HeaderMap::new();
            h.insert("host", HeaderValue::from_str(host).unwrap());
            ws_origin(&h, 7071)
        };
        assert_eq!(with("127.0.0.1:7080").as_deref(), Some("ws://127.0.0.1:7071"));
        assert_eq!(with("localhost").as_deref(), Some("ws://localhost:7071"));
        assert_eq!(with("[::1]:7080").as_deref(), Some("ws://[::1]:7071"));
        assert_eq!(with("evil; script-src *"), None);
        assert_eq!(with("a'b:1"), None);
        assert_eq!(with("[::1;x]:1"), None);
        assert_eq!(ws_origin(&HeaderMap::new(), 7071), None);
    }
}
