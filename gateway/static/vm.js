// The VM page: live state (the panel is re-fetched as a fragment when it changes), start, stop,
// destroy after a confirmation, the serial log tail, and the job spec once it is rendered.
import { api, refreshFragment, say, vmStateOf, watchStates } from './common.js';

const panel = document.getElementById('panel');
const vmId = panel.dataset.vmId;
const msg = document.getElementById('message');
const serial = document.getElementById('serial');
const jobspec = document.getElementById('jobspec');
const dialog = document.getElementById('destroy-dialog');
let state = panel.dataset.state;

async function loadSerial() {
  try {
    const { serial: text } = await api('GET', `/api/vms/${vmId}/logs?max_bytes=16384`);
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

panel.addEventListener('click', (ev) => {
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  if (button.dataset.action === 'destroy') { dialog.returnValue = ''; dialog.showModal(); return; }
  button.disabled = true;
  act(button.dataset.action);
});
dialog.addEventListener('close', () => { if (dialog.returnValue === 'destroy') act('destroy'); });
document.getElementById('serial-refresh').addEventListener('click', loadSerial);

watchStates(`/api/vms/${vmId}/events`, async () => [vmStateOf(await api('GET', `/api/vms/${vmId}`))], (item) => {
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
