// The console page: noVNC (from npm, served under /novnc) full-window, through websockify with a
// short-lived token the gateway issues. Every (re)connect asks for a fresh token: one is good for
// one connection. Follows the VM's live state: waits while it starts, says so when it stops.
import RFB from '/novnc/core/rfb.js';
import { api, vmStateOf, watchStates } from '/static/app/common.js';

const screen = document.getElementById('screen');
const stage = document.getElementById('stage');
const status = document.getElementById('status');
const statusText = document.getElementById('status-text');
const spinner = document.getElementById('status-spinner');
const reconnect = document.getElementById('reconnect');
const notice = document.getElementById('notice');
const noticeText = document.getElementById('notice-text');
const cad = document.getElementById('ctrl-alt-del');
const pasteOpen = document.getElementById('paste-open');
const pasteDialog = document.getElementById('paste-dialog');
const scale = document.getElementById('scale');
const fullscreen = document.getElementById('fullscreen');
const vmId = screen.dataset.vmId;
// A desktop template: the guest's screen follows the window (SetDesktopSize, virtio-gpu) and the clipboard
// is shared (QEMU's VNC clipboard extension with the guest's spice-vdagent): docs/CONSOLE.md.
const desktop = screen.dataset.desktop === 'true';
const vmClipboard = document.getElementById('vm-clipboard');

const BUSY = ['requesting', 'connecting', 'waiting'];
const TRANSITIONAL = ['requested', 'provisioning', 'starting'];
export const REFUSED = 'The console connection was refused (token expired or VM not running).';

let rfb = null;
let vmState = screen.dataset.state;

function show(state, text, { notice: noticeMessage = null } = {}) {
  status.dataset.state = state;
  statusText.textContent = text;
  spinner.hidden = !BUSY.includes(state);
  reconnect.hidden = !['disconnected', 'refused', 'error'].includes(state);
  cad.disabled = state !== 'connected';
  pasteOpen.disabled = state !== 'connected';
  notice.hidden = !noticeMessage;
  noticeText.textContent = noticeMessage || '';
}

const stoppedText = (state) => (state === 'suspended' ? 'The VM is suspended (its memory is saved). Reconnect to resume it.'
  : state === 'error'
  ? 'The VM is in error. Open its page for the reason.'
  : `The VM is ${state}. Start it from its page to use the console.`);

// The WebSocket URL as the gateway gave it, with the scheme following the page: wss behind TLS (no
// mixed content), ws on plain http; a relative URL is taken relative to this page.
function socketUrl(url) {
  const u = new URL(url, location.href);
  if (location.protocol === 'https:') u.protocol = 'wss:';
  else if (u.protocol === 'http:' || u.protocol === 'https:') u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  return u.href;
}

function dropRfb() {
  if (rfb) {
    const old = rfb;
    rfb = null;
    old.removeEventListener('disconnect', old.vmgateOnDisconnect);
    try { old.disconnect(); } catch { /* already closed */ }
  }
}

// One token request at a time: a suspended VM's answers only once it has resumed, and the live state
// saying "running" meanwhile must not start a second connection.
let requesting = false;

async function connect() {
  if (requesting) return;
  dropRfb();
  requesting = true;
  show('requesting', vmState === 'suspended' ? 'Resuming the VM…' : 'Requesting a console token…');
  let grant;
  try {
    grant = await api('GET', `/api/vms/${vmId}/console`);
  } catch (err) {
    if (err.status === 401) {
      show('error', 'Your session has ended.', { notice: 'Your session has ended. Log in again to use the console.' });
      noticeText.append(' ');
      const link = document.createElement('a');
      link.href = `/?next=${encodeURIComponent(location.pathname)}`;
      link.textContent = 'Log in';
      noticeText.append(link);
    } else if (err.code === 'vm_not_running') {
      vmState = (err.details && err.details.state) || vmState;
      show('stopped', err.message, { notice: err.message });
    } else {
      show('error', err.message);
    }
    return;
  } finally {
    requesting = false;
  }

  show('connecting', 'Connecting…');
  const conn = new RFB(screen, socketUrl(grant.url));
  rfb = conn;
  applyFit(conn);
  conn.focusOnClick = true;
  conn.background = '#020617';
  let connected = false;
  conn.addEventListener('connect', () => {
    connected = true;
    show('connected', 'Connected');
    conn.focus();
  });
  conn.addEventListener('clipboard', (e) => {
    // The guest copied something: keep it for the clipboard dialog, and hand it to the browser's
    // clipboard where the page may write it (a secure context with focus); else the dialog has it.
    if (vmClipboard) vmClipboard.value = e.detail.text;
    if (navigator.clipboard && document.hasFocus()) navigator.clipboard.writeText(e.detail.text).catch(() => {});
  });
  conn.addEventListener('securityfailure', (e) => show('refused', `Refused: ${e.detail.reason || 'security failure'}`));
  conn.vmgateOnDisconnect = async (e) => {
    if (rfb !== conn) return;
    rfb = null;
    if (!connected) show('refused', REFUSED);
    else show('disconnected', e.detail.clean ? 'Disconnected.' : 'Connection lost.');
    // Was it the VM? Then say so rather than offer a reconnect that cannot work.
    try {
      const vm = await api('GET', `/api/vms/${vmId}`);
      vmState = vm.state;
      if (vm.state !== 'running' && !TRANSITIONAL.includes(vm.state)) {
        show('stopped', stoppedText(vm.state), { notice: stoppedText(vm.state) });
      }
    } catch { /* keep the message above */ }
  };
  conn.addEventListener('disconnect', conn.vmgateOnDisconnect);
  window.vmgateRfb = conn;
}

// ---- live state: wait for a starting VM, notice a stopping one -----------------------------------

watchStates(`/api/vms/${vmId}/events`, async () => [vmStateOf(await api('GET', `/api/vms/${vmId}`, undefined, { background: true }))], (item) => {
  if (item.gone) { dropRfb(); show('stopped', 'This VM no longer exists.', { notice: 'This VM no longer exists.' }); return; }
  const before = vmState;
  vmState = item.state;
  if (item.state === 'running') {
    if (before !== 'running' && !rfb && status.dataset.state !== 'connected') connect();
  } else if (TRANSITIONAL.includes(item.state)) {
    show('waiting', `The VM is ${item.state}…`);
  } else if (item.state === 'suspended') {
    dropRfb();
    show('disconnected', stoppedText(item.state));
  } else {
    // stopping, stopped, destroying, destroyed, error: websockify closes the session itself.
    dropRfb();
    show('stopped', stoppedText(item.state), { notice: stoppedText(item.state) });
  }
});

// ---- controls -------------------------------------------------------------------------------------

reconnect.addEventListener('click', connect);
cad.addEventListener('click', () => { if (rfb) { rfb.sendCtrlAltDel(); rfb.focus(); } });

scale.checked = localStorage.getItem('vmgate.console.scale') !== 'off';
// Fit the screen to the window: a desktop is resized to it (the guest changes its resolution; scaling
// covers the moment until it has), a text console is scaled. Unchecked: the screen's own size, scrolled.
function applyFit(conn) {
  conn.scaleViewport = scale.checked;
  conn.clipViewport = !scale.checked;
  conn.resizeSession = desktop && scale.checked;
}

scale.addEventListener('change', () => {
  localStorage.setItem('vmgate.console.scale', scale.checked ? 'on' : 'off');
  screen.classList.toggle('overflow-auto', !scale.checked);
  if (rfb) applyFit(rfb);
});
screen.classList.toggle('overflow-auto', !scale.checked);

fullscreen.addEventListener('click', async () => {
  try {
    if (document.fullscreenElement) await document.exitFullscreen();
    else await stage.requestFullscreen();
  } catch { /* not allowed here */ }
  if (rfb) rfb.focus();
});
document.addEventListener('fullscreenchange', () => {
  fullscreen.textContent = document.fullscreenElement ? 'Exit fullscreen' : 'Fullscreen';
});

// Paste: type the text as key presses with a US keyboard's key codes (noVNC sends them as QEMU
// extended key events, scan codes, so the guest sees Shift where a person would press it).
const SHIFTED = { '!': 'Digit1', '@': 'Digit2', '#': 'Digit3', $: 'Digit4', '%': 'Digit5', '^': 'Digit6',
  '&': 'Digit7', '*': 'Digit8', '(': 'Digit9', ')': 'Digit0', _: 'Minus', '+': 'Equal', '{': 'BracketLeft',
  '}': 'BracketRight', '|': 'Backslash', ':': 'Semicolon', '"': 'Quote', '<': 'Comma', '>': 'Period',
  '?': 'Slash', '~': 'Backquote' };
const PLAIN = { ' ': 'Space', '-': 'Minus', '=': 'Equal', '[': 'BracketLeft', ']': 'BracketRight',
  '\\': 'Backslash', ';': 'Semicolon', "'": 'Quote', ',': 'Comma', '.': 'Period', '/': 'Slash', '`': 'Backquote' };
const SHIFT = [0xffe1, 'ShiftLeft'];

function keyFor(ch) {
  if (ch === '\n') return [0xff0d, 'Enter', false];
  if (ch === '\t') return [0xff09, 'Tab', false];
  const cp = ch.codePointAt(0);
  if (/[a-z]/.test(ch)) return [cp, `Key${ch.toUpperCase()}`, false];
  if (/[A-Z]/.test(ch)) return [cp, `Key${ch}`, true];
  if (/[0-9]/.test(ch)) return [cp, `Digit${ch}`, false];
  if (PLAIN[ch]) return [cp, PLAIN[ch], false];
  if (SHIFTED[ch]) return [cp, SHIFTED[ch], true];
  // Anything else goes as its keysym alone (Latin-1 as is, others as Unicode keysyms).
  return [cp <= 0xff ? cp : 0x01000000 + cp, undefined, false];
}

const pause = (ms) => new Promise((resolve) => { setTimeout(resolve, ms); });

async function typeText(text) {
  const target = rfb;
  for (const ch of text.replace(/\r\n?/g, '\n')) {
    if (rfb !== target) return;
    const [keysym, code, shift] = keyFor(ch);
    if (shift) target.sendKey(SHIFT[0], SHIFT[1], true);
    target.sendKey(keysym, code);
    if (shift) target.sendKey(SHIFT[0], SHIFT[1], false);
    await pause(8);
  }
}

const clipboardCopy = document.getElementById('vm-clipboard-copy');
if (clipboardCopy) {
  clipboardCopy.addEventListener('click', async () => {
    try { await navigator.clipboard.writeText(vmClipboard.value); } catch { vmClipboard.select(); }
  });
}

pasteOpen.addEventListener('click', () => {
  pasteDialog.returnValue = '';
  pasteDialog.showModal();
});
pasteDialog.addEventListener('close', async () => {
  const field = document.getElementById('paste-text');
  if (pasteDialog.returnValue === 'type' && rfb && field.value) {
    const text = field.value;
    field.value = '';
    await typeText(text);
  } else if (pasteDialog.returnValue === 'clipboard' && rfb) {
    rfb.clipboardPasteFrom(field.value);
  }
  if (rfb) rfb.focus();
});

// ---- start -----------------------------------------------------------------------------------------

// A suspended VM is resumed by asking for its console.
if (vmState === 'running' || vmState === 'suspended') connect();
else if (TRANSITIONAL.includes(vmState)) show('waiting', `The VM is ${vmState}…`);
else show('stopped', stoppedText(vmState), { notice: stoppedText(vmState) });
