// Shared by the web console's pages: the API client (cookie session + CSRF double submit),
// messages, local times, the log-out button, and live VM state (server-sent events, else polling).

export const TRANSITIONAL = ['requested', 'provisioning', 'starting', 'stopping', 'destroying', 'suspending', 'resuming',
  'restoring'];

// The session's CSRF token, echoed on every unsafe request (double submit).
export const csrfToken = () => decodeURIComponent((document.cookie.match(/(?:^|; )vmgate_csrf=([^;]*)/) || [])[1] || '');

// An error the API answered with its envelope {"error": {"code", "message", "details"}}.
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `The server answered ${status}. Try again later.`);
    this.status = status;
    this.code = error.code || 'http_error';
    this.details = error.details || {};
  }
}

// Calls /api; resolves to the JSON (or text) answer, rejects with ApiError (message for people).
// `background`: a refresh no person asked for (a poll); it does not count as use of the VM, so an open
// page does not keep an idle VM from being suspended.
export async function api(method, path, body, { background = false } = {}) {
  const headers = body !== undefined ? { 'Content-Type': 'application/json' } : {};
  if (background) headers['X-Vmgate-Background'] = '1';
  if (method !== 'GET') headers['X-CSRF-Token'] = csrfToken();
  let res;
  try {
    res = await fetch(path, {
      method, credentials: 'same-origin', headers,
      body: body !== undefined ? JSON.stringify(body) : undefined,
    });
  } catch {
    throw new ApiError(0, { code: 'network', message: 'vmgate could not be reached. Check your connection and try again.' });
  }
  const type = res.headers.get('Content-Type') || '';
  const data = type.includes('json') ? await res.json().catch(() => ({})) : await res.text();
  if (!res.ok) throw new ApiError(res.status, (data && data.error) || {});
  return data;
}

// Writes a message into an element (role=status): plain, 'ok' or 'error'.
export function say(el, text, kind = '') {
  if (!el) return;
  el.textContent = text;
  el.className = `msg${kind ? ` ${kind}` : ''}`;
}

// <time datetime=…> elements are rendered in UTC; show them in the reader's own time zone.
export function localTimes(root = document) {
  for (const t of root.querySelectorAll('time[datetime]')) {
    const d = new Date(t.dateTime);
    if (!Number.isNaN(d.getTime())) {
      t.textContent = d.toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'medium' });
      t.title = t.dateTime;
    }
  }
}

// Replaces el's content with the HTML fragment at url (pages render their live parts as fragments).
// A 401 means the session ended: reload, and the page sends the reader to log in.
export async function refreshFragment(url, el) {
  const res = await fetch(url, { credentials: 'same-origin', headers: { Accept: 'text/html' } });
  if (res.status === 401) { location.reload(); return false; }
  if (!res.ok) return false;
  const html = await res.text();
  // What the user is typing survives the refresh (a state change can re-render a form mid-word).
  const typed = [...el.querySelectorAll('input[id], textarea[id]')]
    .filter((input) => input.type !== 'hidden' && input.value).map((input) => [input.id, input.value]);
  const focused = el.contains(document.activeElement) && document.activeElement.id ? document.activeElement.id : null;
  el.innerHTML = html;
  for (const [id, value] of typed) {
    const input = el.querySelector(`#${CSS.escape(id)}`);
    if (input && !input.value) input.value = value;
  }
  if (focused) el.querySelector(`#${CSS.escape(focused)}`)?.focus();
  localTimes(el);
  return true;
}

// Follows live VM state. Uses the API's server-sent events at `eventsUrl` (`event: state`, data
// {vm_id, state, desired_state, error, reason, at}); when they are not there (404, an old gateway)
// or the stream breaks, it polls `poll()` about every second instead and tries the stream again
// later. `poll` resolves to a list of such state objects. `onOpen` runs each time the stream
// opens: what changed before it was subscribed is not in it, so a page re-reads then what it shows.
// Returns a function that stops watching.
export function watchStates(eventsUrl, poll, onState, { pollMs = 1000, retrySseMs = 30000, onOpen = null } = {}) {
  let stopped = false;
  let source = null;
  let timer = null;
  let last = new Map();

  const deliver = (item) => {
    const key = JSON.stringify([item.state, item.desired_state, item.error]);
    if (last.get(item.vm_id) === key) return;
    last.set(item.vm_id, key);
    onState(item);
  };

  const startPolling = () => {
    const started = Date.now();
    const tick = async () => {
      if (stopped) return;
      try {
        const items = await poll();
        const seen = new Set(items.map((i) => i.vm_id));
        for (const item of items) deliver(item);
        // A VM that left the list (destroyed) is reported once as destroyed.
        for (const id of [...last.keys()]) {
          if (!seen.has(id)) { deliver({ vm_id: id, state: 'destroyed', desired_state: 'destroyed', error: null }); last.delete(id); }
        }
      } catch (err) {
        if (err instanceof ApiError && err.status === 404) deliver({ vm_id: null, state: 'destroyed', gone: true });
        if (err instanceof ApiError && err.status === 401) { location.reload(); return; }
      }
      if (stopped) return;
      if (typeof EventSource !== 'undefined' && Date.now() - started > retrySseMs) { startStream(); return; }
      timer = setTimeout(tick, pollMs);
    };
    tick();
  };

  const startStream = () => {
    if (stopped) return;
    if (typeof EventSource === 'undefined') { startPolling(); return; }
    source = new EventSource(eventsUrl, { withCredentials: true });
    let failures = 0;
    source.addEventListener('open', () => { failures = 0; if (onOpen) onOpen(); });
    source.addEventListener('state', (ev) => {
      try { deliver(JSON.parse(ev.data)); } catch { /* a malformed event is skipped */ }
    });
    source.addEventListener('error', () => {
      // A dropped stream is reopened by the browser (with Last-Event-ID); one that is not there
      // (404), refused (503), or keeps failing is closed, and the page polls, trying it again later.
      failures += 1;
      if (source.readyState === EventSource.CONNECTING && failures < 3) return;
      source.close();
      source = null;
      if (!stopped) startPolling();
    });
  };

  startStream();
  return () => {
    stopped = true;
    if (source) source.close();
    clearTimeout(timer);
    last = new Map();
  };
}

// The VM's state as watchStates delivers it, from GET /api/vms/{id}.
export const vmStateOf = (vm) => ({
  vm_id: vm.vm_id, state: vm.state, desired_state: vm.desired_state, error: vm.error,
});

// The log-out button in the top bar, on every page for a logged-in user.
const logout = document.getElementById('logout');
if (logout) {
  logout.addEventListener('click', async () => {
    try { await api('POST', '/api/auth/logout'); } catch { /* the cookie is cleared either way */ }
    location.href = '/';
  });
}

localTimes();
