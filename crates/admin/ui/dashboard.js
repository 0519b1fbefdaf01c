// @ts-check
/**
 * The live dashboard (`/`). Reads the snapshot stream `GET /v1/live`
 * (Server-Sent Events, parsed here from a `fetch()` body: EventSource cannot
 * send the Authorization header, and the key never goes into an address),
 * and polls campaigns, broadcast tasks and alerts. Plain DOM; the charts are
 * uPlot (vendored, loaded before this module).
 *
 * The admin key: first every call goes without one (a `--dev` server needs
 * none); on a 401 the page asks for it. It is kept in memory, and in this
 * tab's sessionStorage only if the operator ticks the box.
 */

import { formatFen, yuanToFen } from './hongbao-client.js';

/**
 * The snapshot of the live-data contract (docs/api.md, `GET /v1/live`).
 * @typedef {{count: number, ok: number, success_ratio: number | null, p50_ms: number | null, p99_ms: number | null}} OpStats
 * @typedef {{
 *   seq: number, at_ms: number,
 *   connections: {total: number, parked: number, gateways: {name: string, pid: number, connections: number}[]},
 *   ops: Record<string, OpStats>,
 *   shakes: {won: number, none: number, not_running: number, overload: number},
 *   wins_per_s: number, opens_per_s: number, sends_per_s: number,
 *   commit: {commits_per_s: number, batch_ops_mean: number | null, batch_ops_p99: number | null, p50_ms: number | null, p99_ms: number | null},
 *   queues: {writer: number, shard: number},
 *   overload_per_s: {total: number, shard_queue: number, storage_reads: number},
 *   money: {user_balances_fen: number, packet_escrow_fen: number, campaign_escrow_fen: number,
 *           in_flight_fen: number, deposits_minus_withdrawals_fen: number, balanced: boolean},
 *   storage: {up: boolean, failure: unknown},
 *   campaigns: {running: number, released_per_s: number},
 *   alerts_firing: number
 * }} Snapshot
 */

/**
 * @typedef {{id: number, op: string, signal: string, state: 'firing' | 'cleared', severity: 'page' | 'ticket',
 *   since_ms: number, cleared_ms: number | null, value: number, expected: number, low: number, high: number,
 *   baseline: string, message: string}} Alert
 * @typedef {{id: number, funder: number, total_fen: number, rate_per_s: number, win_cap_per_user: number | null,
 *   status: 'created' | 'running' | 'stopped' | 'finished', released: number, won: number, won_fen: number,
 *   refunded_fen: number, escrow_fen: number}} Campaign
 * @typedef {{id: number, state: 'running' | 'stopping' | 'stopped' | 'done', targets: number, delivered: number,
 *   created_ms: number}} Task
 */

/** The chart library, loaded by a classic script before this module. */
const UPlot = /** @type {typeof import('./vendor/uPlot') | undefined} */ (/** @type {any} */ (window).uPlot);

const KEY_STORAGE = 'hongbao.admin_key';
/** Points kept per chart series: ten minutes of snapshots. */
const CHART_POINTS_MAX = 600;
/** No byte from the stream for this long (the server sends a keepalive every 15 s): start again. */
const STREAM_SILENCE_MS = 20_000;
/** Longest line of the event stream held while it arrives. */
const STREAM_LINE_BYTES_MAX = 1 << 20;
const POLL_MS = 1000;
const ALERTS_POLL_MS = 5000;

/**
 * @param {string} id
 * @returns {HTMLElement}
 */
function $(id) {
  const found = document.getElementById(id);
  if (!found) throw new Error(`page is missing #${id}`);
  return found;
}

/**
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
function typed(id, type) {
  const found = $(id);
  if (!(found instanceof type)) throw new Error(`#${id} is not a ${type.name}`);
  return found;
}

/** @param {string} id @param {string | number} text */
function setText(id, text) {
  const node = $(id);
  const value = String(text);
  if (node.textContent !== value) node.textContent = value;
}

/** @param {number | null | undefined} v @param {number} [digits] */
function num(v, digits = 0) {
  if (v === null || v === undefined || !Number.isFinite(v)) return '—';
  return v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/**
 * @param {string} tag
 * @param {string | number} [text]
 * @param {string} [className]
 */
function cell(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

/** Fen as yuan with thousands grouped: 12345678 → "123,456.78". @param {number} fen */
function yuan(fen) {
  return formatFen(fen).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
}

/** @param {number} ms */
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- the admin key ---------------------------------------------------------

/** The key in use: null until a server asked for one. */
let adminKey = sessionStorage.getItem(KEY_STORAGE);
/** Resolves the waiters once the operator gave a key. @type {(() => void)[]} */
let keyWaiters = [];

/** @returns {Record<string, string>} */
function authHeaders() {
  return adminKey ? { authorization: `Bearer ${adminKey}` } : {};
}

/** @param {string} why */
function askForKey(why) {
  show('key-card', true);
  setText('key-error', why);
  typed('admin-key', HTMLInputElement).focus();
}

/** @returns {Promise<void>} */
function keyGiven() {
  return new Promise((resolve) => keyWaiters.push(resolve));
}

/** @param {Event} ev */
function onKeySubmit(ev) {
  ev.preventDefault();
  const input = typed('admin-key', HTMLInputElement);
  adminKey = input.value.trim() || null;
  input.value = '';
  if (adminKey && typed('key-remember', HTMLInputElement).checked) {
    sessionStorage.setItem(KEY_STORAGE, adminKey);
  }
  show('key-card', false);
  show('forget-key', true);
  const waiters = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiters) resolve();
}

function forgetKey() {
  adminKey = null;
  sessionStorage.removeItem(KEY_STORAGE);
  show('forget-key', false);
}

/** @param {string} id @param {boolean} shown */
function show(id, shown) {
  $(id).classList.toggle('hidden', !shown);
}

class Unauthorized extends Error {}

/**
 * One call to the admin API; a 401 asks for the key and waits for it, then
 * tries once more.
 * @param {string} method
 * @param {string} path
 * @param {unknown} [body]
 * @returns {Promise<{status: number, json: any}>}
 */
async function api(method, path, body) {
  for (let tries = 0; ; tries++) {
    /** @type {RequestInit} */
    const init = { method, headers: authHeaders(), cache: 'no-store' };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { ...authHeaders(), 'content-type': 'application/json' };
    }
    const response = await fetch(path, init);
    if (response.status === 401) {
      if (tries > 0) throw new Unauthorized('the admin key was refused');
      askForKey(adminKey ? 'The server refused this key.' : 'This server needs its admin key.');
      await keyGiven();
      continue;
    }
    const text = await response.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      json = { error: { code: 'internal', message: text } };
    }
    return { status: response.status, json };
  }
}

/** @param {{status: number, json: any}} r */
function errorText(r) {
  return r.json?.error ? `${r.json.error.code}: ${r.json.error.message}` : `HTTP ${r.status}`;
}

// ---- the snapshot stream ---------------------------------------------------

/**
 * Reads a `text/event-stream` body and calls `onEvent` for each complete
 * event (comments such as `: keepalive` only count as bytes arriving).
 * @param {ReadableStream<Uint8Array>} body
 * @param {(type: string, data: string) => void} onEvent
 * @param {() => void} onBytes
 */
async function readEventStream(body, onEvent, onBytes) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let type = '';
  /** @type {string[]} */
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    buffer += decoder.decode(value, { stream: true });
    for (;;) {
      const at = buffer.search(/[\r\n]/);
      if (at < 0) break;
      // A CR at the very end may be the first half of a CRLF: wait for more.
      if (buffer[at] === '\r' && at === buffer.length - 1) break;
      const line = buffer.slice(0, at);
      buffer = buffer.slice(at + (buffer[at] === '\r' && buffer[at + 1] === '\n' ? 2 : 1));
      if (line === '') {
        if (data.length > 0) onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
      } else if (!line.startsWith(':')) {
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let v = colon < 0 ? '' : line.slice(colon + 1);
        if (v.startsWith(' ')) v = v.slice(1);
        if (field === 'event') type = v;
        else if (field === 'data') data.push(v);
      }
    }
    if (buffer.length > STREAM_LINE_BYTES_MAX) throw new Error('an event stream line over 1 MiB');
  }
}

/** @param {string} text @param {'ok' | 'bad' | ''} kind */
function liveStatus(text, kind) {
  const pill = $('live-status');
  setText('live-status', text);
  pill.className = `pill ${kind}`;
}

async function streamLoop() {
  let attempt = 0;
  for (;;) {
    const abort = new AbortController();
    let lastBytesAt = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - lastBytesAt > STREAM_SILENCE_MS) abort.abort();
    }, 1000);
    try {
      const response = await fetch('/v1/live', { headers: authHeaders(), signal: abort.signal, cache: 'no-store' });
      if (response.status === 401) {
        liveStatus('admin key needed', 'bad');
        askForKey(adminKey ? 'The server refused this key.' : 'This server needs its admin key.');
        await keyGiven();
        continue;
      }
      if (!response.ok || !response.body) {
        liveStatus(`no live stream (HTTP ${response.status})`, 'bad');
      } else {
        liveStatus('live', 'ok');
        await readEventStream(
          response.body,
          (type, data) => {
            if (type !== 'snapshot') return;
            attempt = 0;
            onSnapshot(JSON.parse(data));
          },
          () => {
            lastBytesAt = Date.now();
          },
        );
        liveStatus('stream ended; reconnecting', 'bad');
      }
    } catch (err) {
      liveStatus(abort.signal.aborted ? 'stream silent; reconnecting' : 'stream lost; reconnecting', 'bad');
    } finally {
      clearInterval(watchdog);
      abort.abort();
    }
    // Full jitter, 0.5 s doubling to 10 s.
    await sleep(Math.floor(Math.random() * Math.min(10_000, 500 * 2 ** Math.min(attempt, 10))) + 200);
    attempt += 1;
  }
}

// ---- rendering a snapshot --------------------------------------------------

/** @type {Snapshot | null} */
let latest = null;
let renderQueued = false;
/** @type {number} */
let lastAlertsFiring = -1;
/** Sum of `rate_per_s` of the running campaigns, from the last poll. */
let releaseTarget = 0;

/** Chart columns: time (s), shakes/s, opens/s | time, shake p99, open p99, commit p99. */
const series = {
  /** @type {number[]} */ t: [],
  /** @type {(number | null)[]} */ shakes: [],
  /** @type {(number | null)[]} */ opens: [],
  /** @type {(number | null)[]} */ shakeP99: [],
  /** @type {(number | null)[]} */ openP99: [],
  /** @type {(number | null)[]} */ commitP99: [],
};

/** @param {Snapshot} s */
function onSnapshot(s) {
  // A reconnect replays the last snapshots: keep time moving forward only.
  const lastT = series.t.length ? series.t[series.t.length - 1] : -Infinity;
  const t = s.at_ms / 1000;
  if (t > lastT) {
    series.t.push(t);
    series.shakes.push(s.shakes.won + s.shakes.none + s.shakes.not_running + s.shakes.overload);
    series.opens.push(s.opens_per_s);
    series.shakeP99.push(s.ops.shake?.p99_ms ?? null);
    series.openP99.push(s.ops.open?.p99_ms ?? null);
    series.commitP99.push(s.commit.p99_ms ?? null);
    for (const column of Object.values(series)) {
      if (column.length > CHART_POINTS_MAX) column.splice(0, column.length - CHART_POINTS_MAX);
    }
  }
  if (!latest || s.at_ms >= latest.at_ms) latest = s;
  if (s.alerts_firing !== lastAlertsFiring) {
    lastAlertsFiring = s.alerts_firing;
    void pollAlerts();
  }
  if (!renderQueued) {
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      render();
    });
  }
}

function render() {
  const s = latest;
  if (!s) return;
  setText('snapshot-at', `snapshot ${s.seq} at ${new Date(s.at_ms).toLocaleTimeString()}`);
  renderConnections(s);
  const shakes = s.shakes.won + s.shakes.none + s.shakes.not_running + s.shakes.overload;
  setText('shakes-per-s', num(shakes));
  setText('shakes-won', num(s.shakes.won));
  setText('shakes-none', num(s.shakes.none));
  setText('shakes-not-running', num(s.shakes.not_running));
  setText('shakes-overload', num(s.shakes.overload));
  setText('wins-per-s', num(s.wins_per_s));
  setText('opens-per-s', num(s.opens_per_s));
  setText('sends-per-s', num(s.sends_per_s));
  renderOps(s);
  setText('commits-per-s', num(s.commit.commits_per_s));
  setText('batch-mean', num(s.commit.batch_ops_mean, 1));
  setText('batch-p99', num(s.commit.batch_ops_p99, 0));
  setText('commit-p50', num(s.commit.p50_ms, 2));
  setText('commit-p99', num(s.commit.p99_ms, 2));
  setText('queue-writer', num(s.queues.writer));
  setText('queue-shard', num(s.queues.shard));
  setText('overload-total', num(s.overload_per_s.total));
  setText('overload-shard-queue', num(s.overload_per_s.shard_queue));
  setText('overload-storage-reads', num(s.overload_per_s.storage_reads));
  renderMoney(s);
  const storage = $('storage');
  setText('storage', s.storage.up ? 'storage up' : `STORAGE DOWN${s.storage.failure ? `: ${describeFailure(s.storage.failure)}` : ''}`);
  storage.className = `pill ${s.storage.up ? 'ok' : 'bad'}`;
  const firing = $('alerts-firing');
  setText('alerts-firing', s.alerts_firing === 0 ? 'no alert' : `${s.alerts_firing} alert${s.alerts_firing > 1 ? 's' : ''} firing`);
  firing.className = `pill ${s.alerts_firing === 0 ? 'ok' : 'bad'}`;
  setText('campaigns-running', num(s.campaigns.running));
  setText('released-per-s', num(s.campaigns.released_per_s));
  setText('release-target', num(releaseTarget));
  renderCharts();
}

/** @param {unknown} failure */
function describeFailure(failure) {
  if (failure && typeof failure === 'object' && 'reason' in failure) return String(failure.reason);
  return JSON.stringify(failure);
}

/** @param {Snapshot} s */
function renderConnections(s) {
  setText('conn-total', num(s.connections.total));
  setText('conn-parked', num(s.connections.parked));
  const rows = s.connections.gateways.map((g) => {
    const tr = document.createElement('tr');
    tr.append(cell('td', g.name), cell('td', g.pid, 'num'), cell('td', num(g.connections), 'num'));
    tr.dataset.gateway = g.name;
    return tr;
  });
  $('gateways').replaceChildren(...rows);
}

/** @param {Snapshot} s */
function renderOps(s) {
  const rows = Object.entries(s.ops)
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([op, o]) => {
      const tr = document.createElement('tr');
      tr.dataset.op = op;
      const ratio = o.success_ratio === null ? '—' : `${num(o.success_ratio * 100, 1)}%`;
      tr.append(
        cell('td', op),
        cell('td', num(o.count), 'num'),
        cell('td', num(o.ok), 'num'),
        cell('td', ratio, 'num'),
        cell('td', num(o.p50_ms, 2), 'num'),
        cell('td', num(o.p99_ms, 2), 'num'),
      );
      return tr;
    });
  $('ops').replaceChildren(...rows);
}

/** @param {Snapshot} s */
function renderMoney(s) {
  const m = s.money;
  const card = $('money');
  card.dataset.balanced = String(m.balanced);
  card.classList.toggle('alarm', !m.balanced);
  const held = m.user_balances_fen + m.packet_escrow_fen + m.campaign_escrow_fen + m.in_flight_fen;
  setText('money-verdict', m.balanced ? 'balanced' : `NOT BALANCED: off by ¥${yuan(m.deposits_minus_withdrawals_fen - held)}`);
  setText(
    'money-equation',
    `balances ¥${yuan(m.user_balances_fen)} + packet escrow ¥${yuan(m.packet_escrow_fen)} + ` +
      `campaign escrow ¥${yuan(m.campaign_escrow_fen)} + in flight ¥${yuan(m.in_flight_fen)} ` +
      `${m.balanced ? '=' : '≠'} deposits − withdrawals ¥${yuan(m.deposits_minus_withdrawals_fen)}`,
  );
}

// ---- charts ----------------------------------------------------------------

/** @type {import('./vendor/uPlot') | null} */
let ratesChart = null;
/** @type {import('./vendor/uPlot') | null} */
let p99Chart = null;

/**
 * @param {string} id
 * @param {{label: string, stroke: string}[]} lines
 * @param {string} unit
 */
function makeChart(id, lines, unit) {
  if (!UPlot) return null;
  const host = $(id);
  return new UPlot(
    {
      width: Math.max(300, host.clientWidth),
      height: 200,
      series: [{}, ...lines.map((l) => ({ label: l.label, stroke: l.stroke, width: 2, spanGaps: false }))],
      axes: [{ space: 90, values: (_u, splits) => splits.map(clock) }, { label: unit, size: 60 }],
      scales: { x: { time: true } },
      legend: { live: false },
      cursor: { show: false },
    },
    [[]],
    host,
  );
}

/** Seconds since the epoch as the local time of day, for the charts' time axis. @param {number} s */
function clock(s) {
  return new Date(s * 1000).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hour12: false });
}

function renderCharts() {
  if (!UPlot) return;
  ratesChart ??= makeChart('chart-rates', [
    { label: 'shakes/s', stroke: '#b71c1c' },
    { label: 'opens/s', stroke: '#1565c0' },
  ], 'per second');
  p99Chart ??= makeChart('chart-p99', [
    { label: 'shake p99', stroke: '#b71c1c' },
    { label: 'open p99', stroke: '#1565c0' },
    { label: 'commit p99', stroke: '#2e7d32' },
  ], 'ms');
  ratesChart?.setData([series.t, series.shakes, series.opens]);
  $('chart-rates').dataset.points = String(series.t.length);
  p99Chart?.setData([series.t, series.shakeP99, series.openP99, series.commitP99]);
}

function resizeCharts() {
  for (const [chart, id] of /** @type {const} */ ([[ratesChart, 'chart-rates'], [p99Chart, 'chart-p99']])) {
    if (chart) chart.setSize({ width: Math.max(300, $(id).clientWidth), height: 200 });
  }
}

// ---- campaigns, broadcasts, alerts -----------------------------------------

async function pollCampaigns() {
  const r = await api('GET', '/v1/campaigns');
  if (r.status !== 200) {
    setText('campaign-msg', `campaigns: ${errorText(r)}`);
    return;
  }
  /** @type {Campaign[]} */
  const campaigns = r.json;
  releaseTarget = campaigns.filter((c) => c.status === 'running').reduce((sum, c) => sum + c.rate_per_s, 0);
  setText('release-target', num(releaseTarget));
  const rows = campaigns
    .slice()
    .sort((a, b) => b.id - a.id)
    .slice(0, 50)
    .map((c) => {
      const tr = document.createElement('tr');
      tr.dataset.campaign = String(c.id);
      tr.dataset.status = c.status;
      const actions = cell('td');
      if (c.status === 'created') actions.append(actionButton(`Start`, `campaign-start-${c.id}`, () => campaignAction(c.id, 'start')));
      if (c.status === 'created' || c.status === 'running') {
        actions.append(actionButton('Stop', `campaign-stop-${c.id}`, () => campaignAction(c.id, 'stop')));
      }
      tr.append(
        cell('td', c.id),
        cell('td', c.status),
        cell('td', num(c.rate_per_s), 'num'),
        cell('td', num(c.released), 'num'),
        cell('td', num(c.won), 'num'),
        cell('td', yuan(c.won_fen), 'num'),
        cell('td', yuan(c.escrow_fen), 'num'),
        actions,
      );
      return tr;
    });
  $('campaigns').replaceChildren(...rows);
}

/**
 * @param {string} label
 * @param {string} testId
 * @param {() => Promise<void>} action
 */
function actionButton(label, testId, action) {
  const button = document.createElement('button');
  button.type = 'button';
  button.textContent = label;
  button.dataset.testid = testId;
  button.addEventListener('click', () => {
    button.disabled = true;
    action().finally(() => {
      button.disabled = false;
    });
  });
  return button;
}

/** @param {number} id @param {'start' | 'stop'} what */
async function campaignAction(id, what) {
  const r = await api('POST', `/v1/campaigns/${id}/${what}`);
  setText('campaign-msg', r.status === 200 ? `campaign ${id}: ${r.json.status}` : `campaign ${id}: ${errorText(r)}`);
  await pollCampaigns();
}

/** @param {Event} ev */
async function onCreateCampaign(ev) {
  ev.preventDefault();
  const value = (/** @type {string} */ id) => typed(id, HTMLInputElement).value.trim();
  /** @type {Record<string, unknown>} */
  let body;
  try {
    const cap = value('campaign-cap');
    body = {
      funder: Number(value('campaign-funder')),
      total_fen: yuanToFen(value('campaign-total')),
      rule: { count: { packets: Number(value('campaign-packets')) } },
      rate_per_s: Number(value('campaign-rate')),
      key: `dashboard-${Date.now()}-${Math.floor(Math.random() * 1e9)}`,
    };
    if (cap) body.win_cap_per_user = Number(cap);
  } catch (err) {
    setText('campaign-msg', String(err instanceof Error ? err.message : err));
    return;
  }
  const r = await api('POST', '/v1/campaigns', body);
  setText('campaign-msg', r.status === 201 ? `campaign ${r.json.id} created: start it below` : errorText(r));
  await pollCampaigns();
}

async function pollTasks() {
  const r = await api('GET', '/v1/tasks');
  if (r.status !== 200) {
    setText('broadcast-msg', `tasks: ${errorText(r)}`);
    return;
  }
  /** @type {Task[]} */
  const tasks = r.json;
  const rows = tasks
    .slice()
    .sort((a, b) => b.id - a.id)
    .slice(0, 20)
    .map((t) => {
      const tr = document.createElement('tr');
      tr.dataset.task = String(t.id);
      tr.dataset.state = t.state;
      const bar = document.createElement('progress');
      bar.max = Math.max(1, t.targets);
      bar.value = t.targets === 0 ? 1 : t.delivered;
      bar.dataset.testid = `task-progress-${t.id}`;
      const barCell = cell('td');
      barCell.append(bar);
      const actions = cell('td');
      if (t.state === 'running') actions.append(actionButton('Stop', `task-stop-${t.id}`, () => stopTask(t.id)));
      tr.append(cell('td', t.id), cell('td', t.state), cell('td', `${num(t.delivered)} / ${num(t.targets)}`, 'num'), barCell, actions);
      return tr;
    });
  $('tasks').replaceChildren(...rows);
}

/** @param {number} id */
async function stopTask(id) {
  const r = await api('POST', `/v1/tasks/${id}/stop`);
  setText('broadcast-msg', r.status === 200 ? `broadcast ${id}: ${r.json.state}` : errorText(r));
  await pollTasks();
}

/** @param {Event} ev */
async function onBroadcast(ev) {
  ev.preventDefault();
  const topic = typed('broadcast-topic', HTMLInputElement).value;
  const text = typed('broadcast-text', HTMLInputElement).value;
  const r = await api('POST', '/v1/broadcast', { topic, text });
  setText('broadcast-msg', r.status === 202 ? `broadcast ${r.json.id} started to ${num(r.json.targets)} connections` : errorText(r));
  await pollTasks();
}

async function pollAlerts() {
  const r = await api('GET', '/v1/alerts');
  if (r.status !== 200) {
    setText('alerts-empty', r.status === 404 ? 'This server reports no alerts.' : `alerts: ${errorText(r)}`);
    show('alerts-empty', true);
    return;
  }
  /** @type {Alert[]} */
  const alerts = r.json.alerts;
  const items = alerts.map((a) => {
    const li = document.createElement('li');
    li.dataset.alert = String(a.id);
    li.dataset.state = a.state;
    const since = new Date(a.since_ms).toLocaleTimeString();
    const until = a.cleared_ms ? ` – ${new Date(a.cleared_ms).toLocaleTimeString()}` : '';
    li.append(
      cell('span', a.state === 'firing' ? `FIRING (${a.severity})` : 'cleared', a.state === 'firing' ? 'alert-firing' : 'alert-cleared'),
      cell('span', a.message, 'grow'),
      cell('span', `${since}${until}`, 'hint'),
    );
    return li;
  });
  $('alerts').replaceChildren(...items);
  setText('alerts-empty', 'No alert so far.');
  show('alerts-empty', items.length === 0);
}

/**
 * Runs `fn` every `ms`, one run at a time; an error is shown and the loop goes on.
 * @param {() => Promise<void>} fn
 * @param {number} ms
 */
async function every(fn, ms) {
  for (;;) {
    try {
      await fn();
    } catch (err) {
      if (!(err instanceof Unauthorized)) console.warn(err);
    }
    await sleep(ms);
  }
}

typed('key-form', HTMLFormElement).addEventListener('submit', onKeySubmit);
$('forget-key').addEventListener('click', forgetKey);
show('forget-key', adminKey !== null);
typed('campaign-form', HTMLFormElement).addEventListener('submit', (ev) => void onCreateCampaign(ev));
typed('broadcast-form', HTMLFormElement).addEventListener('submit', (ev) => void onBroadcast(ev));
window.addEventListener('resize', resizeCharts);

void streamLoop();
void every(pollCampaigns, POLL_MS);
void every(pollTasks, POLL_MS);
void every(pollAlerts, ALERTS_POLL_MS);
