// hongbao-client.js in Node, against a real `hongbao serve --dev`: the
// backoff is bounded, jittered and replayable from its seed and starts over
// after a stable connection; a request times out on a server that answers
// nothing (SIGSTOP), pings keep an idle connection open, and a dead one is
// noticed from the heartbeat;
// the queue of requests made while disconnected is bounded; persistent
// pushes are acked after the listener ran. Money parsing needs no server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { HongbaoClient, HongbaoError, backoffDelayMs, formatFen, yuanToFen } from '../../crates/admin/ui/hongbao-client.js';
import { startServer, must, seeded, waitFor, next } from '../support/helpers.mjs';

/** @param {Partial<ConstructorParameters<typeof HongbaoClient>[0]> & {url: string, token: string}} options */
function client(options) {
  return new HongbaoClient({ WebSocket, ...options });
}

test('yuan are parsed to integer fen from the digits, and printed back', () => {
  assert.equal(yuanToFen('12'), 1200);
  assert.equal(yuanToFen('12.3'), 1230);
  assert.equal(yuanToFen(' 0.07 '), 7);
  assert.equal(yuanToFen('0.29'), 29); // 0.29 * 100 is 28.999999999999996 in floating point
  assert.equal(yuanToFen('1.15'), 115); // and 1.15 * 100 is 114.99999999999999
  assert.equal(yuanToFen('9999999999999.99'), 999999999999999);
  for (const bad of ['', '-1', '1.234', '1e3', '1,5', '.5', '1.', 'abc', '12345678901234']) {
    assert.throws(() => yuanToFen(bad), RangeError, bad);
  }
  assert.equal(formatFen(0), '0.00');
  assert.equal(formatFen(7), '0.07');
  assert.equal(formatFen(123456), '1234.56');
  assert.equal(formatFen(-5), '-0.05');
});

test('backoff with a seeded random: bounded by min(cap, base·2^n), jittered, replayable', () => {
  const base = 100;
  const cap = 3000;
  const a = seeded(7);
  const b = seeded(7);
  const delays = [];
  for (let n = 0; n < 12; n++) {
    const d = backoffDelayMs(n, base, cap, a);
    assert.ok(Number.isInteger(d) && d >= 0 && d < Math.min(cap, base * 2 ** n), `attempt ${n}: ${d}`);
    assert.equal(d, backoffDelayMs(n, base, cap, b));
    delays.push(d);
  }
  // Full jitter: the waits are not the bounds, nor all alike.
  const bounds = delays.map((_, n) => Math.min(cap, base * 2 ** n));
  assert.ok(delays.some((d, n) => d < bounds[n] * 0.9), `${delays}`);
  assert.ok(new Set(delays.slice(5)).size > 3, `capped waits differ: ${delays}`);
  assert.ok(backoffDelayMs(1000, base, cap, () => 0.999999) < cap);
});

test('reconnects with bounded jittered backoff, and starts over after a stable connection', async () => {
  let server = await startServer();
  const base = 100;
  const cap = 800;
  const seed = 20261129;
  const c = client({ url: server.ws, token: '42', random: seeded(seed), backoffBaseMs: base, backoffCapMs: cap, stableMs: 1500 });
  /** @type {{attempt: number, delay_ms: number}[]} */
  const waits = [];
  c.on('reconnect', (r) => waits.push(r));
  try {
    await c.connect();
    const wsAddr = server.wsAddr;
    const dir = server.dir;
    // The server goes away: every attempt fails, each wait longer (up to the cap).
    await server.stop({ removeData: false });
    await waitFor(() => waits.length >= 6, { timeoutMs: 20_000, what: '6 reconnect attempts' });
    const replay = seeded(seed);
    waits.slice(0, 6).forEach((w, n) => {
      assert.equal(w.attempt, n);
      assert.ok(w.delay_ms < Math.min(cap, base * 2 ** n), `wait ${n}: ${w.delay_ms}`);
      // The random is used for nothing else: the waits are the seed's.
      assert.equal(w.delay_ms, backoffDelayMs(n, base, cap, replay));
    });
    // Back where the client expects it: it reconnects by itself.
    server = await startServer({ ws: wsAddr, data: dir });
    await waitFor(() => c.state === 'open', { timeoutMs: 20_000, what: 'the client to reconnect' });
    assert.equal(await c.balance(), 0);
    // Up longer than stableMs: the next loss waits from the first bound again.
    await new Promise((resolve) => setTimeout(resolve, 1700));
    const before = waits.length;
    await server.stop({ removeData: false });
    await waitFor(() => waits.length > before, { what: 'a reconnect after the second loss' });
    assert.equal(waits[before].attempt, 0);
    assert.ok(waits[before].delay_ms < base);
    server = await startServer({ ws: wsAddr, data: dir });
  } finally {
    c.close();
    await server.stop({ removeData: true });
  }
});

test('a request times out on a server that answers nothing, and a silent connection is replaced', async () => {
  // Heartbeat every second: a connection with nothing for 2 s is dead. The
  // server closes one silent for 3 s, which the client's pings prevent.
  const server = await startServer({ extra: ['--heartbeat-s', '1', '--idle-timeout-s', '3'] });
  const c = client({ url: server.ws, token: '43', requestTimeoutMs: 300, backoffBaseMs: 50, backoffCapMs: 200 });
  const losses = [];
  c.on('reconnect', (r) => losses.push(r));
  try {
    const welcome = await c.connect();
    assert.equal(welcome.user, 43);
    assert.equal(welcome.heartbeat_s, 1);
    // Idle past the server's idle timeout: the pings kept it open.
    await new Promise((resolve) => setTimeout(resolve, 4000));
    assert.deepEqual(losses, []);
    assert.equal(c.state, 'open');
    server.signal('SIGSTOP');
    try {
      await assert.rejects(c.balance(), (err) => err instanceof HongbaoError && err.code === 'timeout');
      // Nothing arrives (pongs included): the client gives the connection up.
      const lost = await next(c, 'reconnect');
      assert.equal(lost.attempt, 0);
    } finally {
      server.signal('SIGCONT');
    }
    await waitFor(() => c.state === 'open', { what: 'a new connection once the server runs again' });
    assert.equal(await c.balance(), 0);
  } finally {
    c.close();
    await server.stop();
  }
});

test('requests made before connecting wait in a bounded queue, then go out', async () => {
  const server = await startServer();
  const c = client({ url: server.ws, token: '44', queueMax: 5 });
  try {
    const waiting = Array.from({ length: 5 }, () => c.balance());
    assert.equal(c.queued, 5);
    await assert.rejects(c.balance(), (err) => err instanceof HongbaoError && err.code === 'queue_full');
    await c.connect();
    assert.deepEqual(await Promise.all(waiting), [0, 0, 0, 0, 0]);
    assert.equal(c.queued, 0);
    c.close();
    await assert.rejects(c.balance(), (err) => err instanceof HongbaoError && err.code === 'closed');
  } finally {
    c.close();
    await server.stop();
  }
});

test('a persistent push is acked after the listener ran, so it is not sent again', async () => {
  const server = await startServer();
  await must(server, 'POST', '/v1/accounts/1/deposit', { amount_fen: 10_000, key: 'dep-1' });
  const packet = (n) => ({ sender: 1, amount_fen: 100, count: 1, kind: 'lucky', to: { user: 45 }, greeting: `p${n}`, key: `pkt-${n}` });
  const first = client({ url: server.ws, token: '45' });
  const second = client({ url: server.ws, token: '45' });
  try {
    await first.connect();
    /** What happened, in order. */
    const order = [];
    first.on('push', async (push) => {
      // The ack must wait for this (async) listener to finish.
      await new Promise((r) => setTimeout(r, 100));
      order.push(`handled ${push.msg}`);
    });
    const acked = next(first, 'acked');
    const pushed = next(first, 'push');
    const sent = await must(server, 'POST', '/v1/packets', packet(1), 201);
    const push = await pushed;
    assert.ok(push.msg > 0 && 'packet_received' in push.body);
    assert.equal(push.body.packet_received.packet, sent.packet);
    assert.equal(await acked, push.msg);
    order.push(`acked ${push.msg}`);
    assert.deepEqual(order, [`handled ${push.msg}`, `acked ${push.msg}`]);
    first.close();
    // A new connection of the same user gets stored messages first: the
    // first packet's is gone, the second's is there.
    const sent2 = await must(server, 'POST', '/v1/packets', packet(2), 201);
    const firstPush = next(second, 'push');
    await second.connect();
    const p = await firstPush;
    assert.equal(p.body.packet_received.packet, sent2.packet);
  } finally {
    first.close();
    second.close();
    await server.stop();
  }
});

test('the helpers against a real server: send, grab, open, detail, balance, and typed errors', async () => {
  const server = await startServer();
  await must(server, 'POST', '/v1/accounts/50/deposit', { amount_fen: 1000, key: 'dep-50' });
  const sender = client({ url: server.ws, token: '50' });
  const taker = client({ url: server.ws, token: '51' });
  try {
    await Promise.all([sender.connect(), taker.connect()]);
    const sent = await sender.send({ amount_fen: 200, count: 2, kind: 'fixed', to: { users: [50, 51] }, key: 'k1' });
    assert.deepEqual([sent.amount_fen, sent.count, sent.repeat], [200, 2, false]);
    // A retry with the same key answers the first result.
    const again = await sender.send({ amount_fen: 200, count: 2, kind: 'fixed', to: { users: [50, 51] }, key: 'k1' });
    assert.deepEqual([again.packet, again.repeat], [sent.packet, true]);
    assert.equal(await sender.balance(), 800);

    assert.deepEqual(await taker.grab(sent.packet), { packet: sent.packet, state: 'can_open' });
    const opened = await taker.open(sent.packet);
    assert.deepEqual([opened.amount_fen, opened.repeat, opened.finished], [100, false, false]);
    assert.deepEqual((await taker.grab(sent.packet)).state, { already_opened: { amount_fen: 100 } });
    const detail = await taker.detail(sent.packet);
    assert.deepEqual([detail.sender, detail.kind, detail.remaining_fen], [50, 'fixed', 100]);
    assert.deepEqual(detail.claims.map((c) => [c.user, c.amount_fen]), [[51, 100]]);
    assert.equal(await taker.balance(), 100);

    const code = (want) => (err) => err instanceof HongbaoError && err.code === want;
    await assert.rejects(taker.send({ amount_fen: 500, count: 1, kind: 'lucky', to: { user: 50 }, key: 'k2' }), code('insufficient_funds'));
    await assert.rejects(taker.open(12345), code('not_found'));
    await assert.rejects(sender.send({ amount_fen: 0, count: 1, kind: 'lucky', to: { user: 51 }, key: 'k3' }), code('invalid_request'));
    // A shake with no campaign running.
    assert.equal(await taker.shake(), 'not_running');
  } finally {
    sender.close();
    taker.close();
    await server.stop();
  }
});
