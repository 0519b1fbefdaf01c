// @ts-check
/**
 * hongbao-client.js: a client of hongbao's WebSocket JSON protocol
 * (docs/protocol.md), for browsers and for Node (pass the `ws` package's
 * WebSocket). One ES module, no build step: this file is what the browser
 * runs and what `tsc --noEmit` (checkJs, strict; web/tsconfig.json) checks.
 *
 * What it does for its caller:
 * - `hello` with a token on every (re)connect; requests get ids and promises,
 *   each with a timeout; a reply is matched to its request by id.
 * - Pushes go to the `push` listeners; a persistent one (`msg` ≠ 0) is acked
 *   after every listener ran (and returned, if it returned a promise), and a
 *   repeat of a message already handled is acked without being handed out
 *   again (the server may send a message twice, docs/protocol.md "Pushes").
 * - Heartbeats: a `ping` once nothing was sent for `heartbeat_s` (from
 *   `welcome`); a connection on which nothing arrived for twice that is
 *   taken for dead and replaced.
 * - Reconnects with exponential backoff and full jitter: the n-th wait in a
 *   row is uniform in [0, min(cap, base·2^n)); the count starts again once a
 *   connection has stayed up for `stableMs`. A fatal refusal of the token
 *   (`bad_token`, `token_expired`, …) is not retried.
 * - Requests made while not connected wait in a bounded queue (`queueMax`)
 *   and go out after the next `welcome`; past the bound they are refused at
 *   once (`queue_full`). At most `inflightMax` requests are on the wire at
 *   once (the server allows 64); the rest wait in the same queue.
 *
 * What it must not do: decide anything about money. Amounts are integer fen
 * as the server sends them; `yuanToFen` parses what a person types without
 * floating point. A request cut off by a lost connection is rejected with
 * `disconnected`: it may or may not have been done, so a caller retries
 * `send` and `shake` with the same idempotency key.
 *
 * Time, randomness and the WebSocket constructor are options, so tests can
 * pass a seeded random, and Node the `ws` package.
 */

/**
 * The server's error codes (docs/protocol.md "Errors").
 * @typedef {'malformed' | 'frame_too_large' | 'unknown_op' | 'hello_required' | 'bad_token' |
 *   'token_expired' | 'idle_timeout' | 'slow_consumer' | 'shutting_down' | 'invalid_request' |
 *   'insufficient_funds' | 'not_found' | 'not_eligible' | 'finished' | 'expired' | 'key_conflict' |
 *   'overload' | 'internal' | 'unavailable' | 'rate_limited'} ServerErrorCode
 */

/**
 * What this client reports itself: `timeout` (no reply in time; the request
 * may still be done), `disconnected` (the connection ended with the request
 * on the wire; it may have been done), `queue_full` (not connected and the
 * queue is at its bound; nothing was sent), `closed` (`close()` was called,
 * or the server refused the token for good), `unexpected_reply` (the server
 * answered with another kind of reply than the request asks for).
 * @typedef {'timeout' | 'disconnected' | 'queue_full' | 'closed' | 'unexpected_reply'} ClientErrorCode
 */

/** @typedef {ServerErrorCode | ClientErrorCode} ErrorCode */

/** @typedef {'lucky' | 'fixed'} SplitKind */
/** @typedef {{group: number} | {users: number[]} | {user: number}} Target */
/** @typedef {{user: number, protocol: number, heartbeat_s: number, server_time_ms: number}} Welcome */
/** @typedef {{campaign: number, packet: number, amount_fen: number}} Win */
/** @typedef {{won: Win} | 'none' | 'overload' | 'not_running'} ShakeResult */
/** @typedef {{packet: number, amount_fen: number, count: number, expires_ms: number, repeat: boolean}} Sent */
/** @typedef {{packet: number, amount_fen: number, repeat: boolean, finished: boolean}} Opened */
/** @typedef {'can_open' | {already_opened: {amount_fen: number}} | 'finished' | 'expired' | 'not_eligible'} GrabState */
/** @typedef {{packet: number, state: GrabState}} Grab */
/** @typedef {{user: number, amount_fen: number, at_ms: number}} Claim */
/**
 * @typedef {{packet: number, sender: number, kind: SplitKind, amount_fen: number, count: number,
 *   remaining_fen: number, refunded_fen: number, status: 'open' | 'finished' | 'refunded',
 *   greeting: string, created_ms: number, expires_ms: number, best_luck: number | null,
 *   claims: Claim[]}} Detail
 */

/**
 * What `send` takes. `greeting` defaults to "". `key` is the idempotency key
 * (1–64 bytes, per sender): retry a lost `send` with the same key.
 * @typedef {{amount_fen: number, count: number, kind: SplitKind, to: Target, greeting?: string, key: string}} SendArgs
 */

/**
 * @typedef {{hello: {token: string}} | 'ping' | {shake: {campaign: number, key: string | null}} |
 *   {send: {amount_fen: number, count: number, kind: SplitKind, to: Target, greeting: string, key: string}} |
 *   {grab: {packet: number}} | {open: {packet: number}} | {detail: {packet: number}} | 'balance' |
 *   {ack: {msg: number}}} Request
 */

/**
 * @typedef {{welcome: Welcome} | 'pong' | {shake: ShakeResult} | {sent: Sent} | {grab: Grab} |
 *   {opened: Opened} | {detail: Detail} | {balance: {balance_fen: number}} | {acked: {msg: number}} |
 *   {error: {code: ServerErrorCode, message: string}}} Reply
 */

/**
 * @typedef {{packet_received: {packet: number, sender: number, amount_fen: number, count: number, kind: SplitKind, greeting: string}} |
 *   {packet_opened: {packet: number, user: number, amount_fen: number, remaining_count: number}} |
 *   {packet_finished: {packet: number, best_luck: number}} |
 *   {packet_refunded: {packet: number, amount_fen: number}} |
 *   {notice: {topic: string, text: string}}} PushBody
 */

/** A push: `msg` 0 is transient, any other is persistent until acked. @typedef {{msg: number, body: PushBody}} Push */

/**
 * @typedef {{reply: {id: number, reply: Reply}} | {push: Push} |
 *   {close: {code: ServerErrorCode, message: string}}} ServerFrame
 */

/**
 * The part of a WebSocket this client uses: the browser's and the `ws`
 * package's both have it.
 * @typedef {object} SocketLike
 * @property {number} readyState
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 * @property {((ev: any) => void) | null} onopen
 * @property {((ev: any) => void) | null} onmessage
 * @property {((ev: any) => void) | null} onclose
 * @property {((ev: any) => void) | null} onerror
 */

/** @typedef {new (url: string) => SocketLike} SocketConstructor */

/**
 * Where time comes from. Defaults to `Date.now` and the global timers.
 * @typedef {object} Clock
 * @property {() => number} now milliseconds
 * @property {(fn: () => void, ms: number) => unknown} setTimeout
 * @property {(handle: unknown) => void} clearTimeout
 */

/**
 * `idle`: made, `connect()` not called yet; `connecting`: socket opening or
 * `hello` sent; `open`: welcomed, requests flow; `waiting`: between two
 * connection attempts (backoff); `closed`: `close()` was called, or the
 * server refused the token for good.
 * @typedef {'idle' | 'connecting' | 'open' | 'waiting' | 'closed'} State
 */

/**
 * @typedef {object} ClientEvents
 * @property {Push} push a push from the server (persistent ones acked after the listeners ran)
 * @property {number} acked the server confirmed the ack of a persistent push handed to the listeners
 * @property {State} state the connection state changed
 * @property {Welcome} welcome a connection was accepted
 * @property {{attempt: number, delay_ms: number}} reconnect the next attempt is due in `delay_ms`
 * @property {HongbaoError} close the server closed the connection with a code (`close` frame)
 * @property {unknown} error a listener threw, or the server sent what this client cannot read
 */

/**
 * @typedef {object} ClientOptions
 * @property {string} url e.g. `ws://127.0.0.1:7071/`
 * @property {string} token a signed token; in dev mode a bare user id such as "42"
 * @property {SocketConstructor} [WebSocket] default: the global `WebSocket`
 * @property {() => number} [random] uniform in [0, 1); default `Math.random`
 * @property {Clock} [clock]
 * @property {number} [requestTimeoutMs] per request, queue time included (default 10,000)
 * @property {number} [backoffBaseMs] first reconnect's bound (default 500)
 * @property {number} [backoffCapMs] largest bound (default 30,000)
 * @property {number} [stableMs] up this long, a connection resets the backoff (default 10,000)
 * @property {number} [queueMax] requests waiting to be sent (default 100)
 * @property {number} [inflightMax] requests on the wire at once (default 64, the server's limit)
 * @property {number} [seenMax] persistent message ids remembered to drop repeats (default 1,024)
 */

/** Codes after which the server closes the connection (docs/protocol.md). */
export const FATAL_CODES = /** @type {const} */ ([
  'malformed', 'frame_too_large', 'unknown_op', 'hello_required', 'bad_token', 'token_expired',
  'idle_timeout', 'slow_consumer', 'shutting_down',
]);

/**
 * Fatal codes that another attempt would only meet again: the client stops
 * instead of reconnecting. (`idle_timeout`, `slow_consumer`, `shutting_down`
 * and a `close` with `overload` are worth another try, after the backoff.)
 */
const FINAL_CODES = /** @type {ReadonlyArray<string>} */ ([
  'malformed', 'frame_too_large', 'unknown_op', 'hello_required', 'bad_token', 'token_expired',
]);

/** An error with a code: the server's (docs/protocol.md) or this client's. */
export class HongbaoError extends Error {
  /**
   * @param {ErrorCode} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'HongbaoError';
    /** @type {ErrorCode} */
    this.code = code;
  }

  /** Did the server close the connection with this code? */
  get fatal() {
    return /** @type {ReadonlyArray<string>} */ (FATAL_CODES).includes(this.code);
  }
}

/**
 * The wait before reconnect attempt `attempt` (0 for the first after a
 * loss): full jitter, uniform in [0, min(cap, base·2^attempt)).
 * @param {number} attempt
 * @param {number} baseMs
 * @param {number} capMs
 * @param {() => number} random
 * @returns {number} whole milliseconds
 */
export function backoffDelayMs(attempt, baseMs, capMs, random) {
  // 2^31 is past any cap; the exponent is clamped so the product stays finite.
  const bound = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 31));
  return Math.floor(random() * bound);
}

/**
 * Parses an amount in yuan as a person types it ("12", "12.3", "12.34")
 * into integer fen, from the decimal digits: no floating point touches the
 * money. Throws a `RangeError` for anything else (a sign, a third decimal,
 * letters, over 13 integer digits).
 * @param {string} text
 * @returns {number} fen, a safe integer
 */
export function yuanToFen(text) {
  const m = /^(\d{1,13})(?:\.(\d{1,2}))?$/.exec(text.trim());
  if (!m) {
    throw new RangeError(`not an amount in yuan (at most 2 decimals): ${JSON.stringify(text)}`);
  }
  // 13 digits of yuan is below 10^15 fen, well inside 2^53.
  return Number(m[1]) * 100 + Number((m[2] ?? '').padEnd(2, '0'));
}

/**
 * Integer fen as yuan with two decimals ("12.34", "-0.05"), by integer
 * arithmetic.
 * @param {number} fen
 * @returns {string}
 */
export function formatFen(fen) {
  const sign = fen < 0 ? '-' : '';
  const abs = Math.abs(fen);
  return `${sign}${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
}

/**
 * A request waiting to go out or for its reply.
 * @typedef {object} Pending
 * @property {number} id
 * @property {Request} req
 * @property {(reply: Reply) => void} resolve
 * @property {(err: HongbaoError) => void} reject
 * @property {unknown} timer
 */

const SOCKET_OPEN = 1;

/** A connection to a hongbao gateway that stays connected. */
export class HongbaoClient {
  /** @type {string} */ #url;
  /** @type {string} */ #token;
  /** @type {SocketConstructor} */ #WebSocket;
  /** @type {() => number} */ #random;
  /** @type {Clock} */ #clock;
  #requestTimeoutMs;
  #backoffBaseMs;
  #backoffCapMs;
  #stableMs;
  #queueMax;
  #inflightMax;
  #seenMax;

  /** @type {State} */ #state = 'idle';
  /** @type {SocketLike | null} */ #socket = null;
  /** Next request id; ids only grow, so one is never in flight twice. */
  #nextId = 1;
  /** Requests not sent yet, oldest first (at most `queueMax`). @type {Pending[]} */
  #queue = [];
  /** Requests on the wire, by id (at most `inflightMax`, plus `hello` and pings). @type {Map<number, Pending>} */
  #inflight = new Map();
  /** Consecutive failed attempts: the exponent of the next wait. */
  #attempt = 0;
  /** @type {unknown} */ #reconnectTimer = null;
  /** @type {unknown} */ #heartbeatTimer = null;
  /** From `welcome`; 0 until then. */
  #heartbeatMs = 0;
  /** When the current connection was welcomed (clock ms), or -1. */
  #openedAt = -1;
  #lastReceivedAt = 0;
  #lastSentAt = 0;
  /** @type {Welcome | null} */ #welcome = null;
  /** Why the client ended (`close()`, or a final `close` from the server). @type {HongbaoError | null} */
  #closeReason = null;
  /** Persistent message ids handled this session, oldest first, to drop repeats. @type {Set<number>} */
  #seen = new Set();
  /** @type {{[K in keyof ClientEvents]: Set<(value: ClientEvents[K]) => unknown>}} */
  #listeners = { push: new Set(), acked: new Set(), state: new Set(), welcome: new Set(), reconnect: new Set(), close: new Set(), error: new Set() };

  /** @param {ClientOptions} options */
  constructor(options) {
    this.#url = options.url;
    this.#token = options.token;
    const ctor = options.WebSocket ?? /** @type {SocketConstructor | undefined} */ (globalThis.WebSocket);
    if (!ctor) {
      throw new TypeError('no WebSocket: pass one in the options (in Node: the ws package)');
    }
    this.#WebSocket = ctor;
    this.#random = options.random ?? Math.random;
    this.#clock = options.clock ?? {
      now: () => Date.now(),
      setTimeout: (fn, ms) => globalThis.setTimeout(fn, ms),
      clearTimeout: (handle) => globalThis.clearTimeout(/** @type {any} */ (handle)),
    };
    this.#requestTimeoutMs = options.requestTimeoutMs ?? 10_000;
    this.#backoffBaseMs = options.backoffBaseMs ?? 500;
    this.#backoffCapMs = options.backoffCapMs ?? 30_000;
    this.#stableMs = options.stableMs ?? 10_000;
    this.#queueMax = options.queueMax ?? 100;
    this.#inflightMax = options.inflightMax ?? 64;
    this.#seenMax = options.seenMax ?? 1024;
  }

  /** @returns {State} */
  get state() {
    return this.#state;
  }

  /** The last `welcome` (the user id is `welcome.user`), or null before the first. */
  get welcome() {
    return this.#welcome;
  }

  /** Requests waiting to be sent. */
  get queued() {
    return this.#queue.length;
  }

  /**
   * Listens to an event; returns a function that stops listening.
   * @template {keyof ClientEvents} K
   * @param {K} event
   * @param {(value: ClientEvents[K]) => unknown} fn
   * @returns {() => void}
   */
  on(event, fn) {
    const set = /** @type {Set<(value: ClientEvents[K]) => unknown>} */ (this.#listeners[event]);
    set.add(fn);
    return () => set.delete(fn);
  }

  /**
   * Starts connecting (and keeps reconnecting until `close()`). Resolves with
   * the first `welcome`; rejects if the server refuses the token for good or
   * `close()` is called first. Requests may be made before: they wait.
   * @returns {Promise<Welcome>}
   */
  connect() {
    if (this.#state === 'closed') {
      return Promise.reject(new HongbaoError('closed', 'the client was closed'));
    }
    const welcomed = new Promise((resolve, reject) => {
      const offWelcome = this.on('welcome', (w) => {
        offWelcome();
        offState();
        resolve(w);
      });
      const offState = this.on('state', (s) => {
        if (s === 'closed') {
          offWelcome();
          offState();
          reject(this.#closeReason ?? new HongbaoError('closed', 'the client was closed'));
        }
      });
    });
    if (this.#state === 'idle') {
      this.#open();
    } else if (this.#welcome && this.#state === 'open') {
      return Promise.resolve(this.#welcome);
    }
    return /** @type {Promise<Welcome>} */ (welcomed);
  }

  /**
   * Closes the connection for good: no reconnect; every waiting request is
   * rejected with `closed`.
   */
  close() {
    if (this.#state === 'closed') return;
    this.#stop(new HongbaoError('closed', 'the client was closed'));
  }

  // ---- requests -----------------------------------------------------------

  /**
   * Sends any request and resolves with its reply; an `error` reply rejects
   * with a `HongbaoError` carrying the server's code.
   * @param {Request} req
   * @returns {Promise<Reply>}
   */
  request(req) {
    return new Promise((resolve, reject) => {
      if (this.#state === 'closed') {
        reject(this.#closeReason ?? new HongbaoError('closed', 'the client was closed'));
        return;
      }
      const canSend = this.#state === 'open' && this.#inflight.size < this.#inflightMax && this.#queue.length === 0;
      if (!canSend && this.#queue.length >= this.#queueMax) {
        reject(new HongbaoError('queue_full', `${this.#queue.length} requests already wait to be sent`));
        return;
      }
      /** @type {Pending} */
      const p = { id: this.#nextId++, req, resolve, reject, timer: null };
      p.timer = this.#clock.setTimeout(() => this.#timedOut(p), this.#requestTimeoutMs);
      if (canSend) {
        this.#sendNow(p);
      } else {
        this.#queue.push(p);
      }
    });
  }

  /**
   * Shakes: `campaign` 0 is any running campaign. A `key` makes a retry
   * answer the first win again (docs/protocol.md "Shakes").
   * @param {number} [campaign]
   * @param {string} [key]
   * @returns {Promise<ShakeResult>}
   */
  async shake(campaign = 0, key) {
    const reply = await this.request({ shake: { campaign, key: key ?? null } });
    if (typeof reply === 'object' && 'shake' in reply) return reply.shake;
    throw unexpected('shake', reply);
  }

  /**
   * Funds a packet from this user's balance.
   * @param {SendArgs} args
   * @returns {Promise<Sent>}
   */
  async send(args) {
    const { amount_fen, count, kind, to, key } = args;
    const reply = await this.request({ send: { amount_fen, count, kind, to, greeting: args.greeting ?? '', key } });
    if (typeof reply === 'object' && 'sent' in reply) return reply.sent;
    throw unexpected('sent', reply);
  }

  /**
   * Takes this user's share of a packet (a second open answers the first share, `repeat`).
   * @param {number} packet
   * @returns {Promise<Opened>}
   */
  async open(packet) {
    const reply = await this.request({ open: { packet } });
    if (typeof reply === 'object' && 'opened' in reply) return reply.opened;
    throw unexpected('opened', reply);
  }

  /**
   * Can this user still open the packet?
   * @param {number} packet
   * @returns {Promise<Grab>}
   */
  async grab(packet) {
    const reply = await this.request({ grab: { packet } });
    if (typeof reply === 'object' && 'grab' in reply) return reply.grab;
    throw unexpected('grab', reply);
  }

  /**
   * Every claim of a packet (its sender and recipients only).
   * @param {number} packet
   * @returns {Promise<Detail>}
   */
  async detail(packet) {
    const reply = await this.request({ detail: { packet } });
    if (typeof reply === 'object' && 'detail' in reply) return reply.detail;
    throw unexpected('detail', reply);
  }

  /**
   * This user's committed balance, in fen.
   * @returns {Promise<number>}
   */
  async balance() {
    const reply = await this.request('balance');
    if (typeof reply === 'object' && 'balance' in reply) return reply.balance.balance_fen;
    throw unexpected('balance', reply);
  }

  /**
   * Deletes a persistent message. Pushes handed to listeners are acked by
   * the client already; this is for callers that keep a message for later.
   * @param {number} msg
   * @returns {Promise<number>}
   */
  async ack(msg) {
    const reply = await this.request({ ack: { msg } });
    if (typeof reply === 'object' && 'acked' in reply) return reply.acked.msg;
    throw unexpected('acked', reply);
  }

  /** @returns {Promise<void>} */
  async ping() {
    const reply = await this.request('ping');
    if (reply !== 'pong') throw unexpected('pong', reply);
  }

  // ---- connection ---------------------------------------------------------

  #open() {
    this.#setState('connecting');
    /** @type {SocketLike} */
    let socket;
    try {
      socket = new this.#WebSocket(this.#url);
    } catch (err) {
      // A malformed URL: no attempt can do better.
      this.#stop(new HongbaoError('closed', `cannot open ${this.#url}: ${String(err)}`));
      return;
    }
    this.#socket = socket;
    socket.onopen = () => {
      if (this.#socket !== socket) return;
      this.#lastReceivedAt = this.#clock.now();
      this.#hello();
    };
    socket.onmessage = (ev) => {
      if (this.#socket !== socket) return;
      this.#lastReceivedAt = this.#clock.now();
      this.#frame(ev.data);
    };
    socket.onclose = () => {
      if (this.#socket === socket) this.#lost();
    };
    // An error is followed by `close`; nothing to do twice.
    socket.onerror = () => {};
  }

  /** Sends `hello` ahead of the queue; the `welcome` opens the gate. */
  #hello() {
    /** @type {Pending} */
    const p = {
      id: this.#nextId++,
      req: { hello: { token: this.#token } },
      resolve: (reply) => {
        if (typeof reply === 'object' && 'welcome' in reply) {
          this.#welcomed(reply.welcome);
        } else {
          this.#drop();
        }
      },
      // A connection that does not answer its `hello` in time is replaced.
      reject: () => this.#drop(),
      timer: null,
    };
    p.timer = this.#clock.setTimeout(() => this.#timedOut(p), this.#requestTimeoutMs);
    this.#sendNow(p);
  }

  /** @param {Welcome} welcome */
  #welcomed(welcome) {
    this.#welcome = welcome;
    this.#openedAt = this.#clock.now();
    this.#heartbeatMs = Math.max(1, welcome.heartbeat_s) * 1000;
    this.#setState('open');
    this.#scheduleHeartbeat();
    this.#emit('welcome', welcome);
    this.#flush();
  }

  /** Sends queued requests while there is room on the wire. */
  #flush() {
    while (this.#state === 'open' && this.#queue.length > 0 && this.#inflight.size < this.#inflightMax) {
      const p = /** @type {Pending} */ (this.#queue.shift());
      this.#sendNow(p);
    }
  }

  /** @param {Pending} p */
  #sendNow(p) {
    const socket = this.#socket;
    if (!socket || socket.readyState !== SOCKET_OPEN) {
      this.#settle(p);
      p.reject(new HongbaoError('disconnected', 'the connection is not open'));
      return;
    }
    this.#inflight.set(p.id, p);
    this.#lastSentAt = this.#clock.now();
    socket.send(JSON.stringify({ id: p.id, req: p.req }));
  }

  /** @param {Pending} p */
  #timedOut(p) {
    const queuedAt = this.#queue.indexOf(p);
    if (queuedAt >= 0) this.#queue.splice(queuedAt, 1);
    // A reply that comes later finds no request and is dropped.
    this.#inflight.delete(p.id);
    p.reject(new HongbaoError('timeout', `no reply within ${this.#requestTimeoutMs} ms`));
    this.#flush();
  }

  /** Forgets a request's timer (it is answered or given up). @param {Pending} p */
  #settle(p) {
    this.#clock.clearTimeout(p.timer);
    this.#inflight.delete(p.id);
  }

  /** @param {unknown} data */
  #frame(data) {
    if (typeof data !== 'string') {
      this.#emit('error', new HongbaoError('unexpected_reply', 'a binary frame on a JSON connection'));
      return;
    }
    /** @type {ServerFrame} */
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (err) {
      this.#emit('error', err);
      return;
    }
    if ('reply' in frame) {
      const p = this.#inflight.get(frame.reply.id);
      if (!p) return; // timed out already
      this.#settle(p);
      const reply = frame.reply.reply;
      if (typeof reply === 'object' && 'error' in reply) {
        p.reject(new HongbaoError(reply.error.code, reply.error.message));
      } else {
        p.resolve(reply);
      }
      this.#flush();
    } else if ('push' in frame) {
      void this.#push(frame.push);
    } else if ('close' in frame) {
      const err = new HongbaoError(frame.close.code, frame.close.message);
      this.#emit('close', err);
      if (FINAL_CODES.includes(err.code)) {
        this.#stop(err);
      }
      // Otherwise the socket's close follows, and with it a reconnect.
    }
  }

  /**
   * Hands a push to the listeners, then acks it if it is persistent. A
   * listener that throws leaves the message unacked (the server sends it
   * again on the next connection) and forgotten here, so that copy is
   * handed out again.
   * @param {Push} push
   */
  async #push(push) {
    const persistent = push.msg !== 0;
    if (persistent && this.#seen.has(push.msg)) {
      this.#autoAck(push.msg);
      return;
    }
    if (persistent) {
      this.#seen.add(push.msg);
      if (this.#seen.size > this.#seenMax) {
        const oldest = this.#seen.values().next().value;
        if (oldest !== undefined) this.#seen.delete(oldest);
      }
    }
    try {
      for (const fn of [...this.#listeners.push]) {
        await fn(push);
      }
    } catch (err) {
      if (persistent) this.#seen.delete(push.msg);
      this.#emit('error', err);
      return;
    }
    if (persistent) this.#autoAck(push.msg);
  }

  /**
   * Acks a message the listeners have handled. A lost ack is harmless: the
   * server sends the message again on the next connection, and it is
   * dropped here as a repeat (or handed out again after a restart).
   * @param {number} msg
   */
  #autoAck(msg) {
    this.ack(msg).then(
      () => this.#emit('acked', msg),
      () => {},
    );
  }

  /**
   * Wakes when the next ping is due (`heartbeat_s` after the last frame
   * sent) or when the connection would have been silent for twice that,
   * whichever comes first.
   */
  #scheduleHeartbeat() {
    this.#clock.clearTimeout(this.#heartbeatTimer);
    const now = this.#clock.now();
    const due = Math.min(this.#lastSentAt + this.#heartbeatMs, this.#lastReceivedAt + 2 * this.#heartbeatMs + 1);
    this.#heartbeatTimer = this.#clock.setTimeout(() => this.#beat(), Math.max(10, due - now));
  }

  #beat() {
    if (this.#state !== 'open') return;
    const now = this.#clock.now();
    if (now - this.#lastReceivedAt > 2 * this.#heartbeatMs) {
      this.#drop();
      return;
    }
    if (now - this.#lastSentAt >= this.#heartbeatMs) {
      this.ping().catch(() => {});
    }
    this.#scheduleHeartbeat();
  }

  /** Gives up on the current socket without waiting for its close handshake. */
  #drop() {
    const socket = this.#socket;
    if (!socket) return;
    try {
      socket.close();
    } catch {
      // Closing a socket still connecting may throw in some implementations.
    }
    this.#lost();
  }

  /** The connection is gone: fail what was on the wire, then wait and retry. */
  #lost() {
    const socket = this.#socket;
    if (socket) {
      socket.onopen = socket.onmessage = socket.onclose = socket.onerror = null;
    }
    this.#socket = null;
    this.#clock.clearTimeout(this.#heartbeatTimer);
    const wasStable = this.#openedAt >= 0 && this.#clock.now() - this.#openedAt >= this.#stableMs;
    this.#openedAt = -1;
    this.#failInflight(new HongbaoError('disconnected', 'the connection was lost'));
    if (this.#state === 'closed') return;
    if (wasStable) this.#attempt = 0;
    const delay = backoffDelayMs(this.#attempt, this.#backoffBaseMs, this.#backoffCapMs, this.#random);
    this.#emit('reconnect', { attempt: this.#attempt, delay_ms: delay });
    this.#attempt += 1;
    this.#setState('waiting');
    this.#reconnectTimer = this.#clock.setTimeout(() => {
      this.#reconnectTimer = null;
      if (this.#state === 'waiting') this.#open();
    }, delay);
  }

  /** @param {HongbaoError} err */
  #failInflight(err) {
    const inflight = [...this.#inflight.values()];
    this.#inflight.clear();
    for (const p of inflight) {
      this.#clock.clearTimeout(p.timer);
      p.reject(err);
    }
  }

  /** Ends for good: no reconnect, everything waiting rejected. @param {HongbaoError} reason */
  #stop(reason) {
    this.#closeReason = reason;
    this.#clock.clearTimeout(this.#reconnectTimer);
    this.#setState('closed');
    this.#drop();
    this.#failInflight(reason);
    const queued = this.#queue;
    this.#queue = [];
    for (const p of queued) {
      this.#clock.clearTimeout(p.timer);
      p.reject(reason);
    }
  }

  /** @param {State} state */
  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    this.#emit('state', state);
  }

  /**
   * @template {keyof ClientEvents} K
   * @param {K} event
   * @param {ClientEvents[K]} value
   */
  #emit(event, value) {
    const set = /** @type {Set<(value: ClientEvents[K]) => unknown>} */ (this.#listeners[event]);
    if (event === 'error' && set.size === 0) {
      console.error('hongbao-client:', value);
      return;
    }
    for (const fn of [...set]) {
      try {
        fn(value);
      } catch (err) {
        if (event !== 'error') this.#emit('error', err);
      }
    }
  }
}

/**
 * @param {string} wanted
 * @param {Reply} reply
 */
function unexpected(wanted, reply) {
  return new HongbaoError('unexpected_reply', `expected a ${wanted} reply, got ${JSON.stringify(reply)}`);
}
