// The start page: log in, sign up, list VMs, create one. Talks to /api only.
const msg = document.getElementById('message');
const say = (text, isError = false) => { msg.textContent = text; msg.className = isError ? 'error' : ''; };

// The session's CSRF token, echoed on every unsafe request (double submit).
const csrfToken = () => (document.cookie.match(/(?:^|; )vmgate_csrf=([^;]*)/) || [])[1] || '';

async function api(method, path, body) {
  const headers = body ? { 'Content-Type': 'application/json' } : {};
  if (method !== 'GET') headers['X-CSRF-Token'] = decodeURIComponent(csrfToken());
  const res = await fetch(path, {
    method, credentials: 'same-origin', headers,
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error ? data.error.message : `HTTP ${res.status}`);
  return data;
}

function formData(form) { return Object.fromEntries(new FormData(form).entries()); }

const loginForm = document.getElementById('login-form');
if (loginForm) {
  loginForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await api('POST', '/api/auth/login', formData(loginForm));
      const next = new URLSearchParams(location.search).get('next');
      location.href = next && next.startsWith('/') && !next.startsWith('//') ? next : '/';
    } catch (err) { say(err.message, true); }
  });
  document.getElementById('signup-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const account = formData(ev.target);
      const { verification_mail_sent: sent } = await api('POST', '/api/auth/signup', account);
      say(sent ? `Account created. We mailed a confirmation link to ${account.email}: open it, then log in above.`
        : 'Account created, but the confirmation mail could not be sent. Log in above and press '
          + '“Send the link again”.', !sent);
    } catch (err) { say(err.message, true); }
  });
}

async function refresh() {
  const list = document.getElementById('vms');
  const { vms } = await api('GET', '/api/me/vms');
  list.replaceChildren(...vms.map((vm) => {
    const li = document.createElement('li');
    li.dataset.vmId = vm.vm_id;
    const link = document.createElement('a');
    link.href = `/vms/${vm.vm_id}/console`;
    link.textContent = vm.name;
    li.append(link, ` — ${vm.state}${vm.error ? ` (${vm.error})` : ''} `);
    const actions = { running: ['stop'], stopped: ['start'] }[vm.state] || [];
    for (const action of [...actions, 'destroy']) {
      const b = document.createElement('button');
      b.type = 'button';
      b.textContent = action;
      b.addEventListener('click', async () => {
        if (action === 'destroy' && !confirm(`Destroy ${vm.name}? Its disk is deleted.`)) return;
        say(`${action} ${vm.name}…`);
        try {
          if (action === 'destroy') await api('DELETE', `/api/vms/${vm.vm_id}`);
          else await api('POST', `/api/vms/${vm.vm_id}/${action}`);
          say('');
        } catch (err) { say(err.message, true); }
        refresh();
      });
      li.append(b);
    }
    return li;
  }));
  document.getElementById('empty').hidden = vms.length > 0;
}

const resend = document.getElementById('resend');
if (resend) {
  resend.addEventListener('click', async () => {
    try {
      const { email } = await api('POST', '/api/auth/verify/resend');
      say(`A new confirmation link is on its way to ${email}; earlier links no longer work.`);
    } catch (err) { say(err.message, true); }
  });
}

const createForm = document.getElementById('create-form');
if (createForm) {
  document.getElementById('logout').addEventListener('click', async () => {
    await api('POST', '/api/auth/logout');
    location.href = '/';
  });
  api('GET', '/api/templates').then(({ templates }) => {
    const select = document.getElementById('template');
    for (const t of templates) {
      const opt = new Option(`${t.title} — ${t.description}`, t.name);
      opt.disabled = !t.available;
      select.append(opt);
    }
  });
  createForm.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    say('Creating your VM…');
    try {
      const vm = await api('POST', '/api/vms', { template: formData(createForm).template });
      location.href = `/vms/${vm.vm_id}/console`;
    } catch (err) { say(err.message, true); refresh(); }
  });
  refresh().catch((err) => say(err.message, true));
}
