// edgeloop dashboard: live refresh of the page's [data-live] regions, action buttons and forms that call
// the JSON API, and errors shown in plain words. No framework, no third-party code.
'use strict';

// Sent with every request the dashboard makes; the API refuses cookie-authenticated changes without it,
// which a form or script on another site cannot add.
const HEADERS = { 'X-Edgeloop-Dashboard': '1' };

function flash(message, ok) {
  const box = document.getElementById('flash');
  if (!box) return;
  box.textContent = message;
  box.className = ok ? 'ok' : 'error';
  if (ok) setTimeout(() => { if (box.textContent === message) { box.textContent = ''; box.className = ''; } }, 4000);
}

const WHAT = {
  400: 'The control plane did not accept that',
  401: 'You are not logged in, or your token is no longer valid',
  403: 'Your role does not allow this',
  404: 'That no longer exists',
  409: 'That is not possible right now',
  413: 'That is too large',
  429: 'Too many requests; try again in a moment',
};

function explain(status, body) {
  const detail = body && body.detail ? body.detail : '';
  const what = WHAT[status] || ('The control plane answered with an error (HTTP ' + status + ')');
  return what + (detail ? ': ' + detail : '.');
}

async function call(method, url, body) {
  const init = { method, headers: { ...HEADERS }, credentials: 'same-origin' };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(url, init);
  } catch (e) {
    throw new Error('The control plane could not be reached. Check the network and try again.');
  }
  let data = null;
  try { data = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) throw new Error(explain(resp.status, data));
  return data;
}

const BUILD = {
  rollout(form) {
    const [model, version] = form.get('model').split(':');
    const count = Number(form.get('canary_count'));
    return {
      model,
      version: Number(version),
      stages: [
        { name: 'canary', share: { count }, bake_secs: Number(form.get('canary_bake')) },
        { name: 'second', share: { percent: Number(form.get('middle_percent')) }, bake_secs: Number(form.get('middle_bake')) },
        { name: 'all', share: { percent: 100 }, bake_secs: 0 },
      ],
      on_breach: form.get('on_breach'),
      manual_approval: form.get('manual_approval') === 'on',
    };
  },
  train(form) {
    return { class: form.get('class'), trials: Number(form.get('trials')) };
  },
};

const AFTER = {
  rollout(out) { location.href = '/rollouts/' + encodeURIComponent(out.id); },
  train(out) { flash('Training job ' + out.job + ' started.', true); refresh(); },
};

document.addEventListener('click', async (ev) => {
  const button = ev.target.closest('button[data-action]');
  if (!button) return;
  ev.preventDefault();
  button.disabled = true;
  try {
    await call(button.dataset.method || 'POST', button.dataset.action);
    flash(button.dataset.done || 'Done.', true);
    await refresh();
  } catch (e) {
    flash(e.message, false);
    button.disabled = false;
  }
});

document.addEventListener('submit', async (ev) => {
  const form = ev.target;
  if (!form.dataset.api) return;
  ev.preventDefault();
  const kind = form.dataset.build;
  const submit = form.querySelector('button[type=submit]');
  if (submit) submit.disabled = true;
  try {
    const out = await call('POST', form.dataset.api, BUILD[kind](new FormData(form)));
    AFTER[kind](out);
  } catch (e) {
    flash(e.message, false);
  } finally {
    if (submit) submit.disabled = false;
  }
});

let refreshing = false;
async function refresh() {
  const live = document.querySelectorAll('[data-live][id]');
  if (!live.length || refreshing) return;
  refreshing = true;
  try {
    const resp = await fetch(location.href, { headers: HEADERS, credentials: 'same-origin' });
    if (resp.redirected && new URL(resp.url).pathname === '/login') {
      location.href = '/login?next=' + encodeURIComponent(location.pathname + location.search);
      return;
    }
    if (!resp.ok) {
      flash('Live updates paused: the control plane answered HTTP ' + resp.status + '.', false);
      return;
    }
    const doc = new DOMParser().parseFromString(await resp.text(), 'text/html');
    for (const el of live) {
      const fresh = doc.getElementById(el.id);
      if (fresh && fresh.innerHTML !== el.innerHTML) el.innerHTML = fresh.innerHTML;
    }
    const stamp = doc.getElementById('updated');
    const mine = document.getElementById('updated');
    if (stamp && mine) mine.textContent = stamp.textContent;
    const box = document.getElementById('flash');
    if (box && box.textContent.startsWith('Live updates')) { box.textContent = ''; box.className = ''; }
  } catch (e) {
    flash('Live updates paused: the control plane could not be reached.', false);
  } finally {
    refreshing = false;
  }
}

document.addEventListener('DOMContentLoaded', () => {
  const main = document.getElementById('main');
  const every = main ? Number(main.dataset.refreshMs || 0) : 0;
  if (every > 0) setInterval(refresh, every);
});
