// The New VM page: template cards, size inputs bounded by the template's limits and what the quota
// leaves, then the create request and its progress, followed live until the VM runs; then the
// console. Works whether POST /api/vms answers 201 (running) or 202 (provisioning).
import { api, say, vmStateOf, watchStates } from './common.js';

const form = document.getElementById('create-form');
const msg = document.getElementById('message');
const warning = document.getElementById('quota-warning');
const left = JSON.parse(form.dataset.left);
const FIELDS = { cpu: ['vCPUs', 'cpu', ''], memory_mb: ['Memory', 'memory_mb', ' MB'], disk_gb: ['Disk', 'disk_gb', ' GB'] };

const selected = () => form.querySelector('input[name=template]:checked');

// Sets each input's bounds: the template's limits, capped by what the quota leaves when that
// still allows the template's minimum (otherwise the server's quota answer explains it).
function applyTemplate() {
  const radio = selected();
  const problems = [];
  if (left.vms < 1) problems.push('you have no VM left in your quota');
  for (const [field, [label, limitKey, unit]] of Object.entries(FIELDS)) {
    const input = document.getElementById(field);
    const hint = document.getElementById(`${field}-hint`);
    if (!radio) { input.disabled = true; continue; }
    input.disabled = false;
    const [lo, hi] = JSON.parse(radio.dataset.limits)[limitKey];
    const room = left[field];
    const max = room >= lo ? Math.min(hi, room) : hi;
    if (room < lo) problems.push(`${label.toLowerCase()} needs at least ${lo}${unit}, your quota leaves ${room}${unit}`);
    input.min = lo;
    input.max = max;
    input.value = Math.min(Math.max(JSON.parse(radio.dataset.defaults)[field], lo), max);
    hint.textContent = `${lo}–${max}${unit}${max < hi ? ` (the template allows up to ${hi}${unit}; your quota leaves ${room}${unit})` : ''}`;
  }
  warning.hidden = problems.length === 0;
  warning.textContent = problems.length ? `This VM will not fit: ${problems.join('; ')}.` : '';
  document.getElementById('create').disabled = !radio;
}

form.addEventListener('change', (ev) => { if (ev.target.name === 'template') applyTemplate(); });
applyTemplate();

function check() {
  for (const [field, [label, , unit]] of Object.entries(FIELDS)) {
    const input = document.getElementById(field);
    const value = Number(input.value);
    if (!Number.isInteger(value) || value < Number(input.min) || value > Number(input.max)) {
      input.focus();
      return `${label}: enter a whole number from ${input.min} to ${input.max}${unit}.`;
    }
  }
  const name = document.getElementById('name');
  if (name.value && !/^[a-z0-9-]{1,63}$/.test(name.value)) {
    name.focus();
    return 'Name: lower-case letters, digits and “-”, 1 to 63 characters (or leave it empty).';
  }
  return null;
}

// Progress: the steps up to running, marked as the VM passes them.
const STEPS = ['requested', 'provisioning', 'starting', 'running'];
function showProgress(state, text) {
  const at = STEPS.indexOf(state);
  for (const li of document.querySelectorAll('#progress-steps li')) {
    const i = STEPS.indexOf(li.dataset.step);
    li.toggleAttribute('data-done', at >= 0 && i < at);
    li.toggleAttribute('data-current', i === at);
  }
  document.getElementById('progress-text').textContent = text;
}

function failed(text, vmId) {
  document.getElementById('progress').hidden = true;
  say(msg, text, 'error');
  form.hidden = false;
  document.getElementById('create').disabled = false;
  if (vmId) {
    const link = document.createElement('a');
    link.href = `/vms/${vmId}`;
    link.textContent = ' Open the VM’s page.';
    msg.append(link);
  }
}

function follow(vm) {
  const toConsole = () => { location.href = `/vms/${vm.vm_id}/console`; };
  if (vm.state === 'running') { toConsole(); return; }
  const stop = watchStates(`/api/vms/${vm.vm_id}/events`, async () => [vmStateOf(await api('GET', `/api/vms/${vm.vm_id}`))],
    (item) => {
      if (item.gone || item.state === 'destroyed' || item.state === 'destroying') {
        stop(); failed('The VM was destroyed before it started.'); return;
      }
      if (item.state === 'error') { stop(); failed(`The VM could not be created: ${item.error || item.reason || 'unknown error'}`, vm.vm_id); return; }
      if (item.state === 'running') { stop(); showProgress('running', 'Running. Opening the console…'); toConsole(); return; }
      showProgress(item.state, `${item.state[0].toUpperCase()}${item.state.slice(1)}…`);
    });
}

form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const problem = check();
  if (problem) { say(msg, problem, 'error'); return; }
  const data = Object.fromEntries(new FormData(form).entries());
  const body = {
    template: data.template, cpu: Number(data.cpu), memory_mb: Number(data.memory_mb), disk_gb: Number(data.disk_gb),
    userdata: data.userdata ? data.userdata : null,
  };
  if (data.name) body.name = data.name;
  if (data.network) body.network = data.network;
  document.getElementById('create').disabled = true;
  say(msg, '');
  document.getElementById('progress').hidden = false;
  document.getElementById('progress-spinner').hidden = false;
  document.getElementById('progress-name').textContent = data.name || `a ${data.template} VM`;
  showProgress('requested', 'Sending the request…');
  let vm;
  try {
    vm = await api('POST', '/api/vms', body);
  } catch (err) {
    failed(err.message, err.details && err.details.vm_id);
    return;
  }
  form.hidden = true;
  document.getElementById('progress-name').textContent = vm.name;
  showProgress(vm.state, `${vm.state[0].toUpperCase()}${vm.state.slice(1)}…`);
  follow(vm);
});
