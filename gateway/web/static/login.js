// The start page for visitors: log in, sign up. Talks to /api only.
import { api, say } from './common.js';

const msg = document.getElementById('message');
const formData = (form) => Object.fromEntries(new FormData(form).entries());

// Only a page of this site is a place to go back to after logging in. The URL is resolved as the browser
// will resolve it (it drops tabs and newlines, reads "\\" as "/"), and kept only if it stays on this origin.
function nextPage() {
  const next = new URLSearchParams(location.search).get('next');
  if (!next || !next.startsWith('/')) return '/dashboard';
  try {
    const url = new URL(next, location.origin);
    if (url.origin === location.origin && !/[\t\n\r\\]/.test(next)) return url.pathname + url.search + url.hash;
  } catch (err) { /* not a URL: the dashboard */ }
  return '/dashboard';
}

const loginForm = document.getElementById('login-form');
loginForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const button = loginForm.querySelector('button[type=submit]');
  button.disabled = true;
  say(msg, 'Logging in…');
  try {
    await api('POST', '/api/auth/login', formData(loginForm));
    location.href = nextPage();
  } catch (err) {
    say(msg, err.code === 'rate_limited' && err.details.retry_after
      ? `${err.message} Try again in ${err.details.retry_after} s.` : err.message, 'error');
    button.disabled = false;
  }
});

const signupForm = document.getElementById('signup-form');
signupForm.addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const account = formData(signupForm);
  try {
    const { verification_mail_sent: sent } = await api('POST', '/api/auth/signup', account);
    signupForm.reset();
    say(msg, sent ? `Account created. We mailed a confirmation link to ${account.email}: open it, then log in.`
      : 'Account created, but the confirmation mail could not be sent. Log in and press '
        + '“Send the link again”.', sent ? 'ok' : 'error');
    document.getElementById('login-email').value = account.email;
  } catch (err) { say(msg, err.message, 'error'); }
});
