// Admin pages: change a user's quota, disable or enable an account (after a confirmation), and
// show the lifecycle queue when the gateway has GET /api/admin/queue.
import { api, say } from './common.js';

const msg = document.getElementById('message');

async function patchUser(userId, body, done) {
  try {
    const answer = await api('PATCH', `/api/admin/users/${userId}`, body);
    const stopped = answer.stopped_vms && answer.stopped_vms.length ? ` ${answer.stopped_vms.length} VM(s) stopped.` : '';
    const failed = answer.failed_vms && answer.failed_vms.length ? ` ${answer.failed_vms.length} VM(s) would not stop.` : '';
    say(msg, `${answer.user.email}: ${answer.changed.length ? `changed ${answer.changed.join(', ')}` : 'nothing changed'}.${stopped}${failed}`,
      failed ? 'error' : 'ok');
    if (done) setTimeout(() => location.reload(), 600);
  } catch (err) { say(msg, err.message, 'error'); }
}

for (const form of document.querySelectorAll('form.quota-form')) {
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const quota = {};
    for (const input of form.querySelectorAll('input')) {
      quota[input.name] = input.value.trim() === '' ? null : Number(input.value);
    }
    patchUser(form.dataset.userId, { quota }, true);
  });
}

const dialog = document.getElementById('disable-dialog');
let disabling = null;
document.addEventListener('click', (ev) => {
  const disable = ev.target.closest('button[data-disable]');
  const enable = ev.target.closest('button[data-enable]');
  if (disable) {
    disabling = disable.dataset.disable;
    document.getElementById('disable-email').textContent = disable.closest('[data-email]').dataset.email;
    dialog.returnValue = '';
    dialog.showModal();
  } else if (enable) {
    patchUser(enable.dataset.enable, { is_active: true }, true);
  }
});
if (dialog) {
  dialog.addEventListener('close', () => {
    if (dialog.returnValue === 'disable' && disabling) patchUser(disabling, { is_active: false }, true);
  });
}

// The queue: its shape is the lifecycle engine's; lists of objects become tables, the rest key: value.
const queue = document.getElementById('queue');
function render(value) {
  if (Array.isArray(value) && value.length && value.every((v) => v && typeof v === 'object' && !Array.isArray(v))) {
    const keys = [...new Set(value.flatMap((v) => Object.keys(v)))];
    const table = document.createElement('table');
    table.className = 'table';
    const head = table.createTHead().insertRow();
    for (const k of keys) { const th = document.createElement('th'); th.scope = 'col'; th.textContent = k; head.append(th); }
    const body = table.createTBody();
    for (const v of value) {
      const row = body.insertRow();
      for (const k of keys) row.insertCell().textContent = v[k] === null || v[k] === undefined ? '' : (typeof v[k] === 'object' ? JSON.stringify(v[k]) : String(v[k]));
    }
    const wrap = document.createElement('div');
    wrap.className = 'relative overflow-x-auto';
    wrap.append(table);
    return wrap;
  }
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    const dl = document.createElement('dl');
    dl.className = 'space-y-3';
    for (const [k, v] of Object.entries(value)) {
      const dt = document.createElement('dt');
      dt.className = 'font-medium';
      dt.textContent = k;
      const dd = document.createElement('dd');
      dd.append(render(v));
      dl.append(dt, dd);
    }
    return dl;
  }
  const span = document.createElement('span');
  span.textContent = Array.isArray(value) ? (value.length ? JSON.stringify(value) : '(empty)') : String(value);
  return span;
}

async function loadQueue() {
  try {
    const data = await api('GET', '/api/admin/queue');
    queue.replaceChildren(render(data));
  } catch (err) {
    const p = document.createElement('p');
    p.className = 'msg';
    p.id = 'queue-unavailable';
    p.textContent = err.status === 404
      ? 'Not available: this gateway has no queue endpoint (GET /api/admin/queue answered 404).'
      : `Not available: ${err.message}`;
    queue.replaceChildren(p);
  }
}
if (queue) {
  loadQueue();
  document.getElementById('queue-refresh').addEventListener('click', loadQueue);
}
