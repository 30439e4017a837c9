// The dashboard: the user's VMs with live state, quota bars, start/stop, and re-sending the
// confirmation mail. The list and the bars are server-rendered; on a state change the page
// fetches them again as a fragment (/dashboard/vms).
import { api, refreshFragment, say, watchStates } from './common.js';

const msg = document.getElementById('message');
const live = document.getElementById('live');

live.addEventListener('click', async (ev) => {
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  const { action, vmId } = button.dataset;
  button.disabled = true;
  try {
    await api('POST', `/api/vms/${vmId}/${action}`);
    say(msg, '');
  } catch (err) { say(msg, err.message, 'error'); }
  refresh();
});

const resend = document.getElementById('resend');
if (resend) {
  resend.addEventListener('click', async () => {
    try {
      const { email } = await api('POST', '/api/auth/verify/resend');
      say(msg, `A new confirmation link is on its way to ${email}; earlier links no longer work.`, 'ok');
    } catch (err) { say(msg, err.message, 'error'); }
  });
}

// What the list shows, by VM: an event only causes a fetch when it differs.
let shown = new Map();
const readShown = () => {
  shown = new Map([...live.querySelectorAll('li[data-vm-id]')].map((li) => [li.dataset.vmId, li.dataset.state]));
};
readShown();

let pending = null;
function refresh() {
  // Several events in a burst cause one fetch.
  clearTimeout(pending);
  pending = setTimeout(() => refreshFragment('/dashboard/vms', live).then(readShown, () => {}), 150);
}

watchStates('/api/me/events', async () => (await api('GET', '/api/me/vms')).vms, (item) => {
  if (shown.get(item.vm_id) === item.state) return;
  shown.set(item.vm_id, item.state);
  refresh();
}, { onOpen: refresh });
