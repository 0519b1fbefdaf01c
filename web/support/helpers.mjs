// What every web test needs: a real `hongbao serve --dev` on free loopback
// ports (stopped by its PID), the admin API over fetch, headless Chromium
// (Debian's), a seeded random and a deadline-bounded wait.

import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const BIN = process.env.HONGBAO_BIN ?? path.join(ROOT, 'target/debug/hongbao');
/**
 * Where the screenshots go: `target/screenshots` on every run, so the test
 * command leaves the checkout clean; `docs/screenshots` (committed, the
 * README shows them) with `HONGBAO_UPDATE_SCREENSHOTS=1`.
 */
export const SCREENSHOTS = process.env.HONGBAO_UPDATE_SCREENSHOTS === '1'
  ? path.join(ROOT, 'docs/screenshots')
  : path.join(ROOT, 'target/screenshots');

/** Lines of the server's stderr kept for a failure message. */
const STDERR_LINES_MAX = 40;

/**
 * Starts `hongbao serve --dev` on port 0 everywhere and waits for its
 * HONGBAO_READY line. `extra` adds flags; `ws` pins the WebSocket address
 * (to restart a server where its clients expect it); `data` reuses a data
 * directory.
 */
export async function startServer({ extra = [], ws = '127.0.0.1:0', data } = {}) {
  const dir = data ?? mkdtempSync(path.join(tmpdir(), 'hongbao-web-'));
  const args = ['serve', '--dev', '--data', dir, '--tcp', '127.0.0.1:0', '--ws', ws, '--admin', '127.0.0.1:0', ...extra];
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  const stderr = [];
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk) => {
    stderr.push(...chunk.split('\n').filter(Boolean));
    if (stderr.length > STDERR_LINES_MAX) stderr.splice(0, stderr.length - STDERR_LINES_MAX);
  });
  const exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
  const ready = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`no HONGBAO_READY in 30 s:\n${stderr.join('\n')}`)), 30_000);
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const line = out.split('\n').find((l) => l.startsWith('HONGBAO_READY '));
      if (line) {
        clearTimeout(timer);
        resolve(JSON.parse(line.slice('HONGBAO_READY '.length)));
      }
    });
    exited.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`${BIN} exited (${code ?? signal}) before it was ready:\n${stderr.join('\n')}`));
    });
  });
  const pid = child.pid;
  let stopped = false;
  return {
    pid,
    dir,
    ready,
    admin: `http://${ready.admin}`,
    ws: `ws://${ready.ws}/`,
    wsAddr: ready.ws,
    stderr,
    /** SIGSTOP / SIGCONT: a server that holds its connections and answers nothing. */
    signal(sig) {
      process.kill(pid, sig);
    },
    /** SIGTERM by PID, then SIGKILL if it has not exited in 10 s. Keeps the data unless `removeData`. */
    async stop({ removeData = !data } = {}) {
      if (!stopped) {
        stopped = true;
        try {
          process.kill(pid, 'SIGCONT');
          process.kill(pid, 'SIGTERM');
        } catch {
          // Already gone.
        }
        const killer = setTimeout(() => {
          try {
            process.kill(pid, 'SIGKILL');
          } catch {
            // Already gone.
          }
        }, 10_000);
        await exited;
        clearTimeout(killer);
      }
      if (removeData) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** One admin API call; returns status and parsed body. */
export async function api(server, method, route, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers['content-type'] = 'application/json';
  }
  const response = await fetch(`${server.admin}${route}`, init);
  const text = await response.text();
  return { status: response.status, body: text ? JSON.parse(text) : null };
}

/** An admin call that must answer `status`; returns the body. */
export async function must(server, method, route, body, status = 200) {
  const r = await api(server, method, route, body);
  if (r.status !== status) {
    throw new Error(`${method} ${route}: HTTP ${r.status} ${JSON.stringify(r.body)}, expected ${status}`);
  }
  return r.body;
}

/** Debian's Chromium, headless (Playwright's own browser download does not work here). */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-background-networking'],
  });
}

/**
 * A page that fails the test on a script error or a content-security-policy
 * violation (the console reports both).
 */
export async function newPage(browser, problems) {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error' && /Content Security Policy|Refused to/i.test(msg.text())) {
      problems.push(`console: ${msg.text()}`);
    }
  });
  return page;
}

/** Where the tests write their screenshots (`SCREENSHOTS`). */
export function screenshotPath(name) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  return path.join(SCREENSHOTS, name);
}

/** mulberry32: a seeded random in [0, 1), so a run can be replayed. */
export function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Polls `check` until it returns a truthy value (returned) or the deadline
 * passes (throws with `what`). Not a timing assertion: the deadline only
 * bounds a wait for something that must happen.
 */
export async function waitFor(check, { timeoutMs = 15_000, intervalMs = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((resolve) => setTimeout(resolve, intervalMs));
  }
}

/** Resolves on the next `event` of a HongbaoClient. */
export function next(client, event, filter = () => true) {
  return new Promise((resolve) => {
    const off = client.on(event, (value) => {
      if (!filter(value)) return;
      off();
      resolve(value);
    });
  });
}
