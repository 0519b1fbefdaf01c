// @ts-check
/**
 * The user page (`/app`): log in with a token, shake, open the packets
 * pushed to you, send a group packet, watch the balance. Plain DOM over
 * hongbao-client.js; every amount is integer fen, parsed from what is typed
 * without floating point (`yuanToFen`).
 */

import { HongbaoClient, HongbaoError, formatFen, yuanToFen } from './hongbao-client.js';

/** @typedef {import('./hongbao-client.js').Push} Push */
/** @typedef {import('./hongbao-client.js').Target} Target */

/**
 * @template {HTMLElement} T
 * @param {string} id
 * @param {new () => T} type
 * @returns {T}
 */
function el(id, type) {
  const found = document.getElementById(id);
  if (!(found instanceof type)) throw new Error(`page is missing #${id}`);
  return found;
}

const ui = {
  state: el('conn-state', HTMLElement),
  whoami: el('whoami', HTMLElement),
  userId: el('user-id', HTMLElement),
  logout: el('logout', HTMLButtonElement),
  loginCard: el('login-card', HTMLElement),
  loginForm: el('login-form', HTMLFormElement),
  wsUrl: el('ws-url', HTMLInputElement),
  token: el('token', HTMLInputElement),
  tokenHint: el('token-hint', HTMLElement),
  login: el('login', HTMLButtonElement),
  loginError: el('login-error', HTMLElement),
  balance: el('balance', HTMLElement),
  campaign: el('campaign', HTMLInputElement),
  shake: el('shake', HTMLButtonElement),
  shakeResult: el('shake-result', HTMLElement),
  packets: el('packets', HTMLUListElement),
  packetsEmpty: el('packets-empty', HTMLElement),
  sendForm: el('send-form', HTMLFormElement),
  sendAmount: el('send-amount', HTMLInputElement),
  sendCount: el('send-count', HTMLInputElement),
  sendKind: el('send-kind', HTMLSelectElement),
  sendToKind: el('send-to-kind', HTMLSelectElement),
  sendTo: el('send-to', HTMLInputElement),
  sendGreeting: el('send-greeting', HTMLInputElement),
  send: el('send', HTMLButtonElement),
  sendResult: el('send-result', HTMLElement),
  log: el('log', HTMLUListElement),
};
const sessionCards = ['balance-card', 'shake-card', 'packets-card', 'send-card', 'log-card'].map((id) => el(id, HTMLElement));

/** Most packets and messages kept on the page. */
const LIST_MAX = 100;
/** How long logging in may take before the page gives up (the address may be wrong). */
const LOGIN_TIMEOUT_MS = 10_000;

/** @type {HongbaoClient | null} */
let client = null;
/**
 * The idempotency key of the send being tried: kept while the same packet is
 * retried (a lost connection leaves it unknown whether it was sent), new once
 * one succeeds or the form changes.
 * @type {string | null}
 */
let sendKey = null;

/** @param {HTMLElement} node @param {boolean} shown */
function show(node, shown) {
  node.classList.toggle('hidden', !shown);
}

/** @param {unknown} err */
function describe(err) {
  if (err instanceof HongbaoError) {
    switch (err.code) {
      case 'insufficient_funds': return 'not enough money';
      case 'disconnected': return 'the connection was lost: try again';
      case 'timeout': return 'no answer in time: try again';
      case 'queue_full': return 'not connected: try again shortly';
      case 'rate_limited': return 'too many packets: wait a moment';
      default: return `${err.code}: ${err.message}`;
    }
  }
  return String(err);
}

/** @param {string} text */
function log(text) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  ui.log.prepend(li);
  while (ui.log.children.length > LIST_MAX) ui.log.lastElementChild?.remove();
}

async function prefillAddress() {
  try {
    const response = await fetch('/ui/config.json', { cache: 'no-store' });
    /** @type {{ws_port: number | null, dev: boolean}} */
    const config = await response.json();
    if (config.ws_port !== null && !ui.wsUrl.value) {
      ui.wsUrl.value = `ws://${location.hostname}:${config.ws_port}/`;
    }
    if (config.dev) {
      ui.tokenHint.textContent = 'Dev mode: a bare user id (e.g. 42) works as a token.';
    }
  } catch (err) {
    ui.loginError.textContent = `cannot read /ui/config.json: ${String(err)}`;
  }
}

async function refreshBalance() {
  if (!client) return;
  try {
    const fen = await client.balance();
    ui.balance.textContent = formatFen(fen);
    ui.balance.dataset.fen = String(fen);
  } catch (err) {
    log(`balance: ${describe(err)}`);
  }
}

/** @param {Event} ev */
async function login(ev) {
  ev.preventDefault();
  ui.loginError.textContent = '';
  const c = new HongbaoClient({ url: ui.wsUrl.value.trim(), token: ui.token.value.trim() });
  client = c;
  c.on('state', (state) => {
    ui.state.textContent = state === 'open' ? 'connected' : state;
    ui.state.className = `pill ${state === 'open' ? 'ok' : state === 'closed' ? 'bad' : ''}`;
  });
  c.on('reconnect', ({ delay_ms }) => log(`connection lost; trying again in ${delay_ms} ms`));
  c.on('close', (err) => log(`server closed the connection: ${err.code}`));
  c.on('push', (push) => onPush(push));
  c.on('welcome', () => void refreshBalance());
  ui.login.disabled = true;
  /** @type {ReturnType<typeof setTimeout> | undefined} */
  let timer;
  try {
    // The client would keep trying; the page gives up so the address can be fixed.
    const late = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`no answer from ${ui.wsUrl.value} in ${LOGIN_TIMEOUT_MS / 1000} s`)), LOGIN_TIMEOUT_MS);
    });
    const welcome = await Promise.race([c.connect(), late]);
    ui.userId.textContent = String(welcome.user);
    show(ui.loginCard, false);
    show(ui.whoami, true);
    show(ui.logout, true);
    for (const card of sessionCards) show(card, true);
  } catch (err) {
    ui.loginError.textContent = `not connected: ${describe(err)}`;
    c.close();
    if (client === c) client = null;
  } finally {
    clearTimeout(timer);
    ui.login.disabled = false;
  }
}

function logout() {
  client?.close();
  client = null;
  ui.packets.replaceChildren();
  ui.log.replaceChildren();
  ui.shakeResult.textContent = '';
  ui.sendResult.textContent = '';
  ui.balance.textContent = '—';
  ui.balance.dataset.fen = '';
  show(ui.packetsEmpty, true);
  for (const card of sessionCards) show(card, false);
  show(ui.whoami, false);
  show(ui.logout, false);
  show(ui.loginCard, true);
  ui.state.textContent = 'not connected';
  ui.state.className = 'pill';
}

/** @param {Push} push */
function onPush(push) {
  const body = push.body;
  if ('packet_received' in body) {
    const p = body.packet_received;
    addPacket(p.packet, p.sender, p.amount_fen, p.count, p.greeting);
    log(`packet ${p.packet} from user ${p.sender}`);
  } else if ('packet_opened' in body) {
    const p = body.packet_opened;
    log(`user ${p.user} opened ¥${formatFen(p.amount_fen)} of your packet ${p.packet} (${p.remaining_count} left)`);
  } else if ('packet_finished' in body) {
    log(`your packet ${body.packet_finished.packet} is all opened; best luck: user ${body.packet_finished.best_luck}`);
  } else if ('packet_refunded' in body) {
    log(`¥${formatFen(body.packet_refunded.amount_fen)} of packet ${body.packet_refunded.packet} came back to you`);
    void refreshBalance();
  } else if ('notice' in body) {
    log(`[${body.notice.topic}] ${body.notice.text}`);
  }
}

/**
 * @param {number} packet
 * @param {number} sender
 * @param {number} amountFen
 * @param {number} count
 * @param {string} greeting
 */
function addPacket(packet, sender, amountFen, count, greeting) {
  if (ui.packets.querySelector(`li[data-packet="${packet}"]`)) return;
  const li = document.createElement('li');
  li.dataset.packet = String(packet);
  const envelope = document.createElement('span');
  envelope.className = 'envelope';
  const text = document.createElement('span');
  text.className = 'grow';
  text.textContent = `${greeting || '红包'} — ¥${formatFen(amountFen)} in ${count} from user ${sender}`;
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'primary open';
  button.textContent = 'Open';
  const result = document.createElement('span');
  result.className = 'opened';
  button.addEventListener('click', () => void openPacket(packet, button, result));
  li.append(envelope, text, button, result);
  ui.packets.prepend(li);
  while (ui.packets.children.length > LIST_MAX) ui.packets.lastElementChild?.remove();
  show(ui.packetsEmpty, false);
}

/**
 * @param {number} packet
 * @param {HTMLButtonElement} button
 * @param {HTMLElement} result
 */
async function openPacket(packet, button, result) {
  if (!client) return;
  button.disabled = true;
  try {
    const opened = await client.open(packet);
    result.textContent = `opened ¥${formatFen(opened.amount_fen)}${opened.repeat ? ' (already)' : ''}`;
    result.dataset.fen = String(opened.amount_fen);
    button.remove();
    await refreshBalance();
  } catch (err) {
    const done = err instanceof HongbaoError && ['finished', 'expired', 'not_eligible', 'not_found'].includes(err.code);
    result.textContent = done ? `${/** @type {HongbaoError} */ (err).code.replace('_', ' ')}` : describe(err);
    if (done) button.remove();
    else button.disabled = false;
  }
}

async function shake() {
  if (!client) return;
  ui.shake.disabled = true;
  try {
    const campaign = Number.parseInt(ui.campaign.value || '0', 10);
    const result = await client.shake(Number.isSafeInteger(campaign) && campaign >= 0 ? campaign : 0);
    ui.shakeResult.className = 'result';
    if (typeof result === 'object') {
      ui.shakeResult.textContent = `You won ¥${formatFen(result.won.amount_fen)}! (campaign ${result.won.campaign})`;
      ui.shakeResult.className = 'result won';
      ui.shakeResult.dataset.result = 'won';
      await refreshBalance();
    } else {
      ui.shakeResult.dataset.result = result;
      ui.shakeResult.textContent = {
        none: 'Nothing this time: shake again',
        not_running: 'No campaign is running',
        overload: 'Busy: shake again in a moment',
      }[result];
    }
  } catch (err) {
    ui.shakeResult.dataset.result = 'error';
    ui.shakeResult.textContent = describe(err);
  } finally {
    ui.shake.disabled = false;
  }
}

/** @returns {Target} */
function sendTarget() {
  const ids = ui.sendTo.value.split(/[\s,]+/).filter(Boolean).map((s) => {
    if (!/^\d{1,16}$/.test(s) || !Number.isSafeInteger(Number(s)) || Number(s) === 0) {
      throw new RangeError(`not an id: ${s}`);
    }
    return Number(s);
  });
  const kind = ui.sendToKind.value;
  if (ids.length === 0) throw new RangeError('give at least one id');
  if (kind === 'users') return { users: ids };
  if (ids.length > 1) throw new RangeError(`a ${kind} is one id`);
  return kind === 'user' ? { user: ids[0] } : { group: ids[0] };
}

/** @param {Event} ev */
async function send(ev) {
  ev.preventDefault();
  if (!client) return;
  ui.sendResult.className = 'result';
  /** @type {import('./hongbao-client.js').SendArgs} */
  let args;
  try {
    const count = Number(ui.sendCount.value);
    if (!Number.isSafeInteger(count) || count < 1) throw new RangeError('shares: a whole number, at least 1');
    const kind = ui.sendKind.value === 'fixed' ? 'fixed' : 'lucky';
    sendKey ??= `web-${client.welcome?.user ?? 0}-${Date.now()}-${Math.floor(Math.random() * 1e9)}`;
    args = { amount_fen: yuanToFen(ui.sendAmount.value), count, kind, to: sendTarget(), greeting: ui.sendGreeting.value, key: sendKey };
  } catch (err) {
    ui.sendResult.textContent = String(err instanceof Error ? err.message : err);
    ui.sendResult.classList.add('error');
    return;
  }
  ui.send.disabled = true;
  try {
    const sent = await client.send(args);
    sendKey = null;
    ui.sendResult.textContent = `Sent ¥${formatFen(sent.amount_fen)} in ${sent.count} shares: packet ${sent.packet}`;
    ui.sendResult.dataset.packet = String(sent.packet);
    await refreshBalance();
  } catch (err) {
    // Keep the key only where the packet may have gone out: a retry then
    // answers the first result instead of sending twice.
    if (!(err instanceof HongbaoError && ['disconnected', 'timeout', 'overload', 'unavailable'].includes(err.code))) {
      sendKey = null;
    }
    ui.sendResult.textContent = describe(err);
    ui.sendResult.classList.add('error');
  } finally {
    ui.send.disabled = false;
  }
}

ui.loginForm.addEventListener('submit', (ev) => void login(ev));
ui.logout.addEventListener('click', logout);
ui.shake.addEventListener('click', () => void shake());
ui.sendForm.addEventListener('submit', (ev) => void send(ev));
ui.sendForm.addEventListener('input', () => {
  sendKey = null;
});
void prefillAddress();
