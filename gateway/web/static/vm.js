// The VM page: live state (the panel is re-fetched as a fragment when it changes), start, stop,
// destroy after a confirmation, the serial log tail, and the job spec once it is rendered.
import { api, csrfToken, refreshFragment, say, vmStateOf, watchStates } from './common.js';

const panel = document.getElementById('panel');
const vmId = panel.dataset.vmId;
const msg = document.getElementById('message');
const serial = document.getElementById('serial');
const jobspec = document.getElementById('jobspec');
const dialog = document.getElementById('destroy-dialog');
let state = panel.dataset.state;

async function loadSerial() {
  try {
    const { serial: text } = await api('GET', `/api/vms/${vmId}/logs?max_bytes=16384`, undefined, { background: true });
    const atBottom = serial.scrollHeight - serial.scrollTop - serial.clientHeight < 40;
    serial.textContent = text || '(nothing yet)';
    if (atBottom) serial.scrollTop = serial.scrollHeight;
  } catch (err) { serial.textContent = err.message; }
}

async function loadJobspec() {
  try {
    jobspec.textContent = await api('GET', `/api/vms/${vmId}/jobspec?format=hcl`);
  } catch (err) { if (err.code !== 'no_jobspec') jobspec.textContent = err.message; }
}

async function act(action) {
  try {
    if (action === 'destroy') await api('DELETE', `/api/vms/${vmId}`);
    else await api('POST', `/api/vms/${vmId}/${action}`);
    say(msg, '');
    if (action === 'destroy') { location.href = '/dashboard'; return; }
  } catch (err) { say(msg, err.message, 'error'); }
  refreshFragment(`/vms/${vmId}/panel`, panel);
}

// Snapshots: take one (the form), restore or delete one (buttons per row). The panel is re-read while
// one is being made or deleted (server-sent events follow the VM's state, not its snapshots').
async function snapshotAction(method, path, body, done) {
  try {
    await api(method, path, body);
    say(msg, done, 'ok');
  } catch (err) { say(msg, err.message, 'error'); }
  await refreshPanel();
}

async function refreshPanel() {
  await refreshFragment(`/vms/${vmId}/panel`, panel);
  const busy = panel.querySelector('#snapshots[data-busy]');
  if (busy) setTimeout(refreshPanel, 1000);
}

panel.addEventListener('submit', (ev) => {
  if (ev.target.id !== 'snapshot-form') return;
  ev.preventDefault();
  const name = ev.target.elements.name.value.trim();
  snapshotAction('POST', `/api/vms/${vmId}/snapshots`, { name }, `Taking snapshot “${name}”…`);
});

panel.addEventListener('click', (ev) => {
  const snap = ev.target.closest('button[data-snapshot-action]');
  if (snap) {
    snap.disabled = true;
    const base = `/api/vms/${vmId}/snapshots/${snap.dataset.snapshot}`;
    if (snap.dataset.snapshotAction === 'restore') snapshotAction('POST', `${base}/restore`, undefined, 'Restoring…');
    else snapshotAction('DELETE', base, undefined, 'Deleting the snapshot…');
    return;
  }
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  if (button.dataset.action === 'destroy') { dialog.returnValue = ''; dialog.showModal(); return; }
  button.disabled = true;
  act(button.dataset.action);
});
dialog.addEventListener('close', () => { if (dialog.returnValue === 'destroy') act('destroy'); });
document.getElementById('serial-refresh').addEventListener('click', loadSerial);

watchStates(`/api/vms/${vmId}/events`, async () => [vmStateOf(await api('GET', `/api/vms/${vmId}`, undefined, { background: true }))], (item) => {
  if (item.gone) { say(msg, 'This VM no longer exists.', 'error'); return; }
  if (item.state === state) return;
  state = item.state;
  panel.dataset.state = state;
  refreshFragment(`/vms/${vmId}/panel`, panel);
  loadSerial();
  if (jobspec.textContent === 'Not rendered yet.') loadJobspec();
}, { onOpen: () => refreshFragment(`/vms/${vmId}/panel`, panel) });

loadSerial();
// The serial log grows while the VM runs.
setInterval(() => { if (state === 'running' && !document.hidden) loadSerial(); }, 3000);

// Files (the VM's guest agent): an upload is the file's bytes as the body of PUT .../files?path=; a download
// is a plain link, which the browser saves (the answer is an attachment).
const uploadForm = document.getElementById('upload-form');
if (uploadForm) {
  uploadForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const file = uploadForm.elements.file.files[0];
    if (!file) return;
    const path = `${uploadForm.elements.dir.value.replace(/\/+$/, '')}/${file.name}`;
    say(msg, `Uploading ${file.name}…`);
    try {
      const res = await fetch(`/api/vms/${vmId}/files?path=${encodeURIComponent(path)}`, {
        method: 'PUT', credentials: 'same-origin', body: file,
        headers: { 'Content-Type': 'application/octet-stream', 'X-CSRF-Token': csrfToken() },
      });
      const data = await res.json().catch(() => ({}));
      if (!res.ok) throw new Error((data.error && data.error.message) || `The server answered ${res.status}.`);
      say(msg, `Uploaded ${data.path} (${data.size} bytes).`, 'ok');
    } catch (err) { say(msg, err.message, 'error'); }
  });
  document.getElementById('download-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const path = ev.target.elements.path.value;
    const link = document.createElement('a');
    link.href = `/api/vms/${vmId}/files?path=${encodeURIComponent(path)}`;
    link.download = path.split('/').pop();
    document.body.append(link);
    link.click();
    link.remove();
  });
}
