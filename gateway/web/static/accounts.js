// The pages mailed links open: /verify confirms an address; /reset asks for a reset link or,
// opened from one, sets a new password. Talks to /api only; these calls need no session.
const msg = document.getElementById('message');
const say = (text, isError = false) => {
  msg.textContent = text;
  msg.className = isError ? 'msg error' : 'msg ok';
};

// Read the token once, then take it out of the address bar (and so out of history and bookmarks).
const token = new URLSearchParams(location.search).get('token');
if (token !== null) history.replaceState(null, '', location.pathname);

async function post(path, body) {
  let res;
  try {
    res = await fetch(path, {
      method: 'POST', credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
    });
  } catch {
    throw Object.assign(new Error('vmgate could not be reached. Check your connection and try again.'),
      { code: 'network' });
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) {
    const error = data.error || {};
    throw Object.assign(new Error(error.message || `The server answered ${res.status}. Try again later.`),
      { code: error.code || 'http_error' });
  }
  return data;
}

const BAD_LINK = 'This link is invalid, has already been used, or has expired.';
const formData = (form) => Object.fromEntries(new FormData(form).entries());

if (document.getElementById('verify-page')) {
  if (!token) {
    say('This page confirms your email address with the link from the mail we sent you. '
      + 'Open that link, or log in to have a new one sent.', true);
  } else {
    post('/api/auth/verify', { token }).then(
      (data) => say(`Your email address ${data.email} is confirmed. You can now create VMs.`),
      (err) => say(err.code === 'invalid_token'
        ? `${BAD_LINK} If your address is not confirmed yet, log in and press “Send the link again”.`
        : err.message, true),
    );
  }
}

if (document.getElementById('reset-page')) {
  const requestForm = document.getElementById('reset-request-form');
  const confirmForm = document.getElementById('reset-confirm-form');
  requestForm.hidden = Boolean(token);
  confirmForm.hidden = !token;

  requestForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const { email } = formData(requestForm);
    try {
      await post('/api/auth/password-reset', { email });
      say(`If ${email} belongs to an account, a link to choose a new password is on its way. `
        + 'It works once and expires; check your spam folder if it does not arrive.');
    } catch (err) { say(err.message, true); }
  });

  confirmForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const { password, repeat } = formData(confirmForm);
    if (password !== repeat) { say('The two passwords differ. Type the same new password twice.', true); return; }
    try {
      await post('/api/auth/password-reset/confirm', { token, password });
      confirmForm.hidden = true;
      say('Your password is changed, and every session that used the old one has ended. '
        + 'Log in with the new password.');
    } catch (err) {
      if (err.code === 'invalid_token') {
        confirmForm.hidden = true;
        requestForm.hidden = false;
        say(`${BAD_LINK} Enter your email address to get a new one.`, true);
      } else {
        say(err.message, true);
      }
    }
  });
}
