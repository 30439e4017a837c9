// The console page: ask the API for a short-lived token, then connect noVNC through websockify.
import RFB from '/novnc/core/rfb.js';

const screen = document.getElementById('screen');
const status = document.getElementById('status');
const reconnect = document.getElementById('reconnect');
const vmId = screen.dataset.vmId;

function show(state, text) {
  status.dataset.state = state;
  status.textContent = text;
  reconnect.hidden = !['disconnected', 'refused', 'error'].includes(state);
}

async function connect() {
  reconnect.hidden = true;
  show('requesting', 'Requesting a console token…');
  let grant;
  try {
    const res = await fetch(`/api/vms/${vmId}/console`, { credentials: 'same-origin' });
    grant = await res.json();
    if (!res.ok) { show('error', grant.error ? grant.error.message : `HTTP ${res.status}`); return; }
  } catch (err) { show('error', `Cannot reach vmgate: ${err.message}`); return; }

  show('connecting', 'Connecting…');
  // A token is good for one connection; every (re)connect asks for a fresh one.
  const rfb = new RFB(screen, grant.url);
  rfb.scaleViewport = true;
  rfb.focusOnClick = true;
  let connected = false;
  rfb.addEventListener('connect', () => { connected = true; show('connected', 'Connected'); rfb.focus(); });
  rfb.addEventListener('securityfailure', (e) => show('refused', `Refused: ${e.detail.reason || 'security failure'}`));
  rfb.addEventListener('disconnect', (e) => {
    if (!connected) show('refused', 'The console connection was refused (token expired or VM not running).');
    else show('disconnected', e.detail.clean ? 'Disconnected.' : 'Connection lost.');
  });
  window.vmgateRfb = rfb;
}

reconnect.addEventListener('click', connect);
connect();
