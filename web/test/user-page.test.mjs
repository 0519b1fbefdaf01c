// The user page (/app) in headless Chromium against a real server: log in
// with a bare user id (dev mode), shake during a running campaign until a
// win, open a packet pushed to the page, send a group packet from the page
// and find it through the admin API. The balance shown follows each step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, must, launchBrowser, newPage, screenshotPath, waitFor } from '../support/helpers.mjs';

const USER = 42;
const FUNDER = 1;

test('user page: log in, shake to a win, open a pushed packet, send a group packet', async () => {
  const server = await startServer();
  const browser = await launchBrowser();
  const problems = [];
  try {
    // A generous campaign: 2,000 packets released 1,000 a second.
    await must(server, 'POST', `/v1/accounts/${FUNDER}/deposit`, { amount_fen: 1_000_000, key: 'dep-funder' });
    const campaign = await must(
      server,
      'POST',
      '/v1/campaigns',
      { funder: FUNDER, total_fen: 200_000, rule: { count: { packets: 2000 } }, rate_per_s: 1000, key: 'camp-web' },
      201,
    );
    await must(server, 'POST', `/v1/campaigns/${campaign.id}/start`);

    const page = await newPage(browser, problems);
    await page.goto(`${server.admin}/app`);
    // The address comes from /ui/config.json.
    await waitFor(async () => (await page.inputValue('#ws-url')) === server.ws, { what: 'the WebSocket address prefilled' });
    assert.match(await page.textContent('#token-hint'), /bare user id/);
    await page.fill('#token', String(USER));
    await page.click('#login');
    await page.waitForSelector('[data-testid=user-id]:has-text("42")');
    await page.waitForFunction(() => document.querySelector('#balance')?.getAttribute('data-fen') === '0');

    // Shake until a win; the balance is the win.
    const won = await waitFor(
      async () => {
        await page.click('[data-testid=shake]:not([disabled])');
        await page.waitForFunction(() => document.querySelector('#shake')?.hasAttribute('disabled') === false);
        return (await page.getAttribute('[data-testid=shake-result]', 'data-result')) === 'won';
      },
      { timeoutMs: 20_000, intervalMs: 10, what: 'a won shake' },
    );
    assert.ok(won);
    const afterWin = await fen(page, (v) => v > 0);
    const account = await must(server, 'GET', `/v1/accounts/${USER}`);
    assert.equal(account.balance_fen, afterWin);

    // A packet sent to this user is pushed to the page and opened from it.
    const sent = await must(
      server,
      'POST',
      '/v1/packets',
      { sender: FUNDER, amount_fen: 888, count: 1, kind: 'lucky', to: { user: USER }, greeting: '恭喜发财', key: 'to-42' },
      201,
    );
    const row = `li[data-packet="${sent.packet}"]`;
    await page.waitForSelector(row);
    assert.match(await page.textContent(row), /8\.88/);
    await page.click(`${row} button.open`);
    await page.waitForSelector(`${row} .opened[data-fen="888"]`);
    const afterOpen = await fen(page, (v) => v === afterWin + 888);
    assert.equal(afterOpen, afterWin + 888);

    // A group packet sent from the page: 1.23 yuan in 2 shares to group 9.
    await must(server, 'PUT', '/v1/groups/9', { members: [USER, 43] });
    await page.fill('#send-amount', '1.23');
    await page.fill('#send-count', '2');
    await page.selectOption('#send-to-kind', 'group');
    await page.fill('#send-to', '9');
    await page.click('#send');
    const packetId = await waitFor(() => page.getAttribute('[data-testid=send-result]', 'data-packet'), {
      what: 'the sent packet id',
    });
    const detail = await must(server, 'GET', `/v1/packets/${packetId}`);
    assert.equal(detail.sender, USER);
    assert.equal(detail.amount_fen, 123);
    assert.equal(detail.count, 2);
    assert.equal(detail.greeting, '恭喜发财');
    await fen(page, (v) => v === afterOpen - 123);
    // The page also got the packet (the sender is a member of the group).
    await page.waitForSelector(`li[data-packet="${packetId}"]`);

    // The page at a laptop's width, as tall as its content.
    await page.setViewportSize({ width: 1180, height: 400 });
    await page.screenshot({ path: screenshotPath('user-page.png'), fullPage: true });
    assert.deepEqual(problems, []);
  } finally {
    await browser.close();
    await server.stop();
  }
});

/** Waits until the balance shown satisfies `ok`; returns it in fen. */
async function fen(page, ok) {
  return waitFor(
    async () => {
      const v = Number(await page.getAttribute('[data-testid=balance]', 'data-fen'));
      return ok(v) ? v : null;
    },
    { what: 'the balance shown' },
  );
}
