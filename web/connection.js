// The page's WebSocket to the gateway (/v1/ws): reconnects with back-off, except after the server refused
// the API key (close code 1008), when only a new key (reconnectNow) helps.

const POLICY_VIOLATION = 1008; // the close code the gateway refuses a wrong or missing API key with

export class Connection {
  // getKey() -> the API key to send ("" for none); onFrame(frame); onState(state, info)
  constructor(getKey, onFrame, onState) {
    this.getKey = getKey;
    this.onFrame = onFrame;
    this.onState = onState;
    this.ws = null;
    this.attempt = 0; // failed opens in a row, for the back-off
    this.timer = null;
    this.refused = false; // the server refused the API key; only a new key retries
  }

  get isOpen() { return this.ws?.readyState === WebSocket.OPEN; }

  url() {
    const url = new URL("/v1/ws", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const key = this.getKey();
    if (key) url.searchParams.set("api_key", key);
    return url.href;
  }

  connect() {
    clearTimeout(this.timer);
    this.refused = false;
    this.onState("connecting");
    const ws = new WebSocket(this.url());
    this.ws = ws;
    ws.addEventListener("open", () => {
      if (ws !== this.ws) return;
      this.attempt = 0;
      this.onState("open");
    });
    ws.addEventListener("message", (event) => {
      if (ws !== this.ws) return;
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; } // not ours to show
      this.onFrame(frame);
    });
    ws.addEventListener("close", (event) => {
      if (ws !== this.ws) return; // a socket we replaced on purpose
      this.ws = null;
      if (event.code === POLICY_VIOLATION) {
        // The key was refused: retrying with the same key cannot help. A new key reconnects.
        this.refused = true;
        this.onState("refused");
        return;
      }
      // Exponential back-off with jitter, so a restarting server is not hammered by every tab at once.
      const delay = Math.min(10000, 500 * 2 ** this.attempt++) * (0.75 + Math.random() / 2);
      this.onState("closed", { retryInMs: delay });
      this.timer = setTimeout(() => this.connect(), delay);
    });
  }

  reconnectNow() {
    const old = this.ws;
    this.ws = null;
    this.attempt = 0;
    if (old) {
      old.close();
      this.onState("closed", { retryInMs: 0 });
    }
    this.connect();
  }

  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }
}
