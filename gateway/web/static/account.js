// The account page: create an API token (shown once), revoke one. The list is re-fetched as a
// fragment (/account/tokens) after each change.
import { api, refreshFragment, say } from './common.js';

const msg = document.getElementById('message');
const form = document.getElementById('token-form');
const list = document.getElementById('tokens');
const shown = document.getElementById('new-token');
const value = document.getElementById('new-token-value');

form.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const name = form.elements.name.value.trim();
  if (!name) { say(msg, 'Name: give the token a name, so you can tell it apart later.', 'error'); return; }
  try {
    const token = await api('POST', '/api/me/tokens', { name, expires_in: Number(form.elements.expires_in.value) });
    value.textContent = token.token;
    shown.hidden = false;
    form.reset();
    say(msg, `Token “${token.name}” created.`, 'ok');
  } catch (err) { say(msg, err.message, 'error'); }
  refreshFragment('/account/tokens', list);
});

document.getElementById('copy-token').addEventListener('click', async () => {
  try {
    await navigator.clipboard.writeText(value.textContent);
    say(msg, 'Copied.', 'ok');
  } catch {
    // No clipboard access (plain http, or denied): select it for a manual copy.
    getSelection().selectAllChildren(value);
    say(msg, 'Press Ctrl+C (⌘C) to copy the selected token.');
  }
});

list.addEventListener('click', async (ev) => {
  const button = ev.target.closest('button[data-revoke]');
  if (!button) return;
  button.disabled = true;
  try {
    const token = await api('DELETE', `/api/me/tokens/${button.dataset.revoke}`);
    say(msg, `Token “${token.name}” revoked.`, 'ok');
  } catch (err) { say(msg, err.message, 'error'); }
  refreshFragment('/account/tokens', list);
});
