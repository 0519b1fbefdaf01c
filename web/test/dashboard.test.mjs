// The dashboard (/) in headless Chromium against a real server: under a
// small load (20 Node clients using hongbao-client.js over `ws`, shaking),
// the connection count and shakes/s on the page move; a campaign is made,
// started and stopped from the page; a broadcast started from the page fills its progress bar.
// A server with an admin key: the page asks for it and keeps it out of the
// address. And with short alert settings: cutting the load off shows an
// alert firing on the page, and its return shows it cleared.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { HongbaoClient } from '../../crates/admin/ui/hongbao-client.js';
import { startServer, must, launchBrowser, newPage, screenshotPath, waitFor } from '../support/helpers.mjs';

const CLIENTS = 20;
/** Longest the load runs, whatever happens to the test. */
const LOAD_MS_MAX = 30_000;
/** Pause between one client's shakes: 20 clients × ~40/s. */
const SHAKE_GAP_MS = 25;

/**
 * `CLIENTS` users (1001…) connected with hongbao-client.js, each shaking in
 * a loop until `stop()` (or `LOAD_MS_MAX`).
 */
async function startLoad(server) {
  const clients = Array.from(
    { length: CLIENTS },
    (_, i) => new HongbaoClient({ url: server.ws, token: String(1001 + i), WebSocket }),
  );
  await Promise.all(clients.map((c) => c.connect()));
  const until = Date.now() + LOAD_MS_MAX;
  let running = true;
  const results = { won: 0, none: 0, other: 0 };
  const loops = clients.map(async (c) => {
    while (running && Date.now() < until) {
      try {
        const r = await c.shake();
        if (typeof r === 'object') results.won += 1;
        else if (r === 'none') results.none += 1;
        else results.other += 1;
      } catch {
        results.other += 1;
      }
      await new Promise((resolve) => setTimeout(resolve, SHAKE_GAP_MS));
    }
  });
  return {
    results,
    async stop() {
      running = false;
      await Promise.all(loops);
      for (const c of clients) c.close();
    },
  };
}

/** The number an element shows ("1,234" → 1234; "—" → NaN). */
async function shown(page, testId) {
  const text = await page.textContent(`[data-testid=${testId}]`);
  return Number((text ?? '').replace(/,/g, ''));
}

test('dashboard: live figures move under load; a campaign made, started and stopped and a broadcast run from the page', async () => {
  const server = await startServer();
  const browser = await launchBrowser();
  const problems = [];
  let load = null;
  try {
    await must(server, 'POST', '/v1/accounts/1/deposit', { amount_fen: 10_000_000, key: 'dep-1' });
    // One campaign from the API; the page makes a second, starts and stops it.
    const kept = await must(
      server,
      'POST',
      '/v1/campaigns',
      { funder: 1, total_fen: 1_000_000, rule: { count: { packets: 100_000 } }, rate_per_s: 50, key: 'camp-kept' },
      201,
    );
    await must(server, 'POST', `/v1/campaigns/${kept.id}/start`);

    const page = await newPage(browser, problems);
    await page.goto(`${server.admin}/`);
    // A dev server needs no key: the stream just runs.
    await page.waitForSelector('[data-testid=live-status]:text-is("live")');
    assert.equal(await page.isVisible('#key-card'), false);
    await waitFor(async () => (await shown(page, 'conn-total')) === 0, { what: 'no connections shown' });

    load = await startLoad(server);
    await waitFor(async () => (await shown(page, 'conn-total')) >= CLIENTS, { what: `${CLIENTS} connections shown` });
    await waitFor(async () => (await shown(page, 'shakes-per-s')) > 0, { what: 'shakes/s above 0' });
    assert.ok((await page.textContent('[data-testid=ops] tr[data-op=shake]')).includes('shake'));
    assert.equal(await page.getAttribute('[data-testid=money]', 'data-balanced'), 'true');

    // A campaign created, started and stopped from the page; the API agrees at each step.
    await page.fill('#campaign-funder', '1');
    await page.fill('#campaign-total', '10000.50');
    await page.fill('#campaign-packets', '100000');
    await page.fill('#campaign-rate', '20');
    await page.click('#campaign-form button[type=submit]');
    const campaign = await waitFor(
      async () => (await must(server, 'GET', '/v1/campaigns')).find((c) => c.id !== kept.id),
      { what: 'the campaign made from the page' },
    );
    assert.deepEqual([campaign.total_fen, campaign.rate_per_s, campaign.status], [1_000_050, 20, 'created']);
    const row = `[data-testid=campaigns] tr[data-campaign="${campaign.id}"]`;
    await page.click(`[data-testid=campaign-start-${campaign.id}]`);
    await waitFor(async () => (await must(server, 'GET', `/v1/campaigns/${campaign.id}`)).status === 'running', {
      what: 'the campaign running',
    });
    await page.waitForSelector(`${row}[data-status=running]`);
    await page.click(`[data-testid=campaign-stop-${campaign.id}]`);
    await waitFor(async () => (await must(server, 'GET', `/v1/campaigns/${campaign.id}`)).status === 'stopped', {
      what: 'the campaign stopped',
    });
    await page.waitForSelector(`${row}[data-status=stopped]`);

    // A broadcast from the form: its bar reaches the end.
    await page.fill('#broadcast-text', 'Happy new year 新年快乐');
    await page.click('#broadcast-form button[type=submit]');
    const task = await waitFor(async () => (await must(server, 'GET', '/v1/tasks'))[0], { what: 'a broadcast task' });
    const bar = `[data-testid=task-progress-${task.id}]`;
    await page.waitForSelector(bar);
    const done = await waitFor(
      async () => {
        const [value, max] = await page.$eval(bar, (p) => [p.value, p.max]);
        return value === max && value >= CLIENTS ? { value, max } : null;
      },
      { what: 'the progress bar at its end' },
    );
    assert.ok(done.max >= CLIENTS);
    await page.waitForSelector(`[data-testid=tasks] tr[data-task="${task.id}"][data-state=done]`);

    // A few seconds of chart under load, then the picture.
    await waitFor(async () => Number(await page.getAttribute('[data-testid=chart-rates]', 'data-points')) >= 8, {
      what: 'eight seconds of chart',
    });
    await waitFor(async () => (await shown(page, 'shakes-per-s')) > 0, { what: 'shakes/s still above 0' });
    assert.equal((await must(server, 'GET', `/v1/campaigns/${kept.id}`)).status, 'running');
    await page.screenshot({ path: screenshotPath('dashboard.png'), fullPage: true });
    await load.stop();
    load = null;
    assert.deepEqual(problems, []);
  } finally {
    await load?.stop();
    await browser.close();
    await server.stop();
  }
});

test('dashboard: a server with a key makes the page ask; the key stays out of the address', async () => {
  const KEY = 'dashboard-test-key-0123456789';
  const server = await startServer({ extra: ['--admin-key', KEY] });
  const browser = await launchBrowser();
  const problems = [];
  try {
    const page = await newPage(browser, problems);
    const asked = [];
    page.on('request', (r) => asked.push(r.url()));
    await page.goto(`${server.admin}/`);
    await page.waitForSelector('#key-card:not(.hidden)');
    await page.fill('#admin-key', KEY);
    await page.check('#key-remember');
    await page.click('#key-form button[type=submit]');
    await page.waitForSelector('[data-testid=live-status]:text-is("live")');
    await waitFor(async () => (await shown(page, 'conn-total')) === 0, { what: 'a snapshot shown' });
    assert.equal(await page.evaluate(() => sessionStorage.getItem('hongbao.admin_key')), KEY);
    assert.ok(asked.length > 0 && asked.every((u) => !u.includes(KEY)), 'the key went into an address');
    assert.deepEqual(problems, []);
  } finally {
    await browser.close();
    await server.stop();
  }
});

test('dashboard: cutting the load off raises an alert on the page, and its return clears it', async () => {
  // Short alert settings (docs/operations.md, "Alerts"): judged after 5 s of
  // traffic, fired after 3 s out of band, cleared after 3 s back in it.
  const server = await startServer({
    extra: ['--alert-warmup-s', '5', '--alert-fire-after-s', '3', '--alert-clear-after-s', '3'],
  });
  const browser = await launchBrowser();
  const problems = [];
  let load = null;
  try {
    const page = await newPage(browser, problems);
    await page.goto(`${server.admin}/`);
    await page.waitForSelector('[data-testid=live-status]:text-is("live")');
    await page.waitForSelector('[data-testid=alerts-firing]:text-is("no alert")');

    // Ten seconds with shakes (no campaign: each is answered `not_running`,
    // which is the work done), so the shake count has a baseline.
    load = await startLoad(server);
    const loaded = new Set();
    await waitFor(
      async () => {
        const now = await must(server, 'GET', '/v1/live/now');
        if ((now.ops.shake?.count ?? 0) >= 50) loaded.add(now.seq);
        return loaded.size >= 10;
      },
      { what: 'ten seconds of load', timeoutMs: 40_000, intervalMs: 250 },
    );

    // The load stops at once: the page shows the shake count alert firing.
    await load.stop();
    load = null;
    const firing = '[data-testid=alerts] li[data-state=firing]';
    try {
      await page.waitForSelector(`${firing}:has-text("shake requests")`, { timeout: 30_000 });
    } catch (e) {
      // What the server judged, for whoever reads the failure.
      console.log('alerts:', JSON.stringify(await must(server, 'GET', '/v1/alerts')));
      console.log('latest snapshot:', JSON.stringify(await must(server, 'GET', '/v1/live/now')));
      throw e;
    }
    await page.waitForSelector('[data-testid=alerts-firing]:has-text("firing")');
    const id = await page.getAttribute(firing, 'data-alert');
    const api = (await must(server, 'GET', '/v1/alerts')).alerts.find((a) => String(a.id) === id);
    assert.deepEqual([api?.op, api?.signal, api?.state], ['shake', 'count', 'firing']);

    // The load comes back: the same alert shows cleared, and the pill says so.
    load = await startLoad(server);
    await page.waitForSelector(`[data-testid=alerts] li[data-alert="${id}"][data-state=cleared]`, { timeout: 30_000 });
    await page.waitForSelector('[data-testid=alerts-firing]:text-is("no alert")');
    await load.stop();
    load = null;
    assert.deepEqual(problems, []);
  } finally {
    await load?.stop();
    await browser.close();
    await server.stop();
  }
});
