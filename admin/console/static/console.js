// The console's actions: each calls the admin REST API with the session cookie and the
// CSRF token (X-CSRF-Token), reports in the page's live region, and reloads the page for
// everything but a new key's secret (shown once, never stored in the page).
'use strict';

(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : '';
  const statusBox = document.getElementById('status');
  const alertBox = document.getElementById('alert');

  function say(message) {
    if (alertBox) alertBox.textContent = '';
    if (statusBox) statusBox.textContent = message;
  }

  function fail(message) {
    if (statusBox) statusBox.textContent = '';
    if (alertBox) alertBox.textContent = message;
  }

  function errorText(status, body) {
    const err = body && body.error;
    return 'Refused (' + status + '): ' + (err && err.message ? err.message : 'no details');
  }

  async function api(method, path, body) {
    const headers = { 'X-CSRF-Token': csrf, Accept: 'application/json' };
    const init = { method: method, headers: headers, credentials: 'same-origin' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (response.status === 401) {
      window.location.assign('/console/login?next=' + encodeURIComponent(location.pathname));
    }
    return { ok: response.ok, status: response.status, data: data };
  }

  function doneThenReload(message) {
    sessionStorage.setItem('lpx-flash', message);
    window.location.reload();
  }

  function limitsOf(form) {
    const limits = {};
    form.querySelectorAll('input[data-limit]').forEach(function (input) {
      if (input.value.trim() !== '') limits[input.name] = Number(input.value);
    });
    return limits;
  }

  function tenantPath(form) {
    return '/admin/v1/tenants/' + encodeURIComponent(form.dataset.tenant);
  }

  const handlers = {
    'create-tenant': async function (form) {
      const body = { name: form.elements.name.value.trim(), limits: limitsOf(form) };
      const plan = form.elements.plan.value.trim();
      if (plan) body.plan = plan;
      const r = await api('POST', '/admin/v1/tenants', body);
      if (!r.ok) return fail(errorText(r.status, r.data));
      doneThenReload('Tenant ' + r.data.name + ' created.');
    },
    'edit-tenant': async function (form) {
      const body = { status: form.elements.status.value, limits: limitsOf(form) };
      const r = await api('PATCH', tenantPath(form), body);
      if (!r.ok) return fail(errorText(r.status, r.data));
      doneThenReload('Tenant ' + r.data.name + ' saved.');
    },
    'create-key': async function (form) {
      const scopes = Array.from(form.querySelectorAll('input[name="scopes"]:checked')).map(
        function (box) { return box.value; });
      const body = { name: form.elements.name.value.trim(), scopes: scopes };
      const r = await api('POST', tenantPath(form) + '/keys', body);
      if (!r.ok) return fail(errorText(r.status, r.data));
      showSecret(r.data.key, 'Key ' + r.data.prefix + ' created.');
      form.reset();
    },
    'upload-adapter': function (form) {
      return upload(form);
    },
    'set-alias': async function (form) {
      const path = tenantPath(form) + '/adapters/' + encodeURIComponent(form.elements.adapter.value) +
        '/aliases/' + encodeURIComponent(form.elements.alias.value.trim());
      const r = await api('PUT', path, { version: Number(form.elements.version.value) });
      if (!r.ok) return fail(errorText(r.status, r.data));
      doneThenReload('Alias ' + r.data.alias + ' now points at ' + r.data.name + '@' + r.data.version + '.');
    },
  };

  function showSecret(secret, message) {
    const panel = document.getElementById('secret-panel');
    const field = document.getElementById('secret');
    field.value = secret;
    panel.hidden = false;
    say(message + ' Copy the key now: it is shown only this once.');
    document.getElementById('secret-heading').focus();
    field.select();
  }

  function upload(form) {
    return new Promise(function (resolve) {
      const data = new FormData();
      data.append('name', form.elements.name.value.trim());
      Array.from(form.elements.files.files).forEach(function (file) {
        data.append('files', file, file.name);
      });
      const bar = document.getElementById('upload-progress');
      const percent = document.getElementById('upload-percent');
      bar.hidden = false;
      bar.value = 0;
      const xhr = new XMLHttpRequest();
      xhr.open('POST', tenantPath(form) + '/adapters');
      xhr.setRequestHeader('X-CSRF-Token', csrf);
      xhr.setRequestHeader('Accept', 'application/json');
      xhr.upload.addEventListener('progress', function (event) {
        if (!event.lengthComputable) return;
        const p = Math.round((100 * event.loaded) / event.total);
        bar.value = p;
        bar.textContent = p + '%';
        percent.textContent = p + '%';
        bar.dataset.seen = String(Math.max(Number(bar.dataset.seen || 0), p));
      });
      xhr.addEventListener('load', function () {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = null; }
        if (xhr.status === 201) {
          doneThenReload('Uploaded ' + body.name + ' version ' + body.version + '.');
        } else {
          fail(errorText(xhr.status, body));
        }
        resolve();
      });
      xhr.addEventListener('error', function () {
        fail('The upload failed: the connection broke.');
        resolve();
      });
      say('Uploading…');
      xhr.send(data);
    });
  }

  async function keyAction(button) {
    const revoke = button.dataset.action === 'revoke-key';
    const path = '/admin/v1/tenants/' + encodeURIComponent(button.dataset.tenant) + '/keys/' +
      encodeURIComponent(button.dataset.keyId);
    if (revoke && !window.confirm('Revoke this key? Requests with it fail at once.')) return;
    const r = revoke ? await api('DELETE', path) : await api('POST', path + '/rotate');
    if (!r.ok) return fail(errorText(r.status, r.data));
    if (revoke) return doneThenReload('Key ' + r.data.prefix + ' revoked.');
    showSecret(r.data.key, 'Key rotated: the new key is ' + r.data.prefix + '.');
  }

  document.addEventListener('submit', function (event) {
    const form = event.target;
    const handler = handlers[form.dataset.action];
    if (!handler) return;
    event.preventDefault();
    const button = form.querySelector('button[type="submit"]');
    if (button) button.disabled = true;
    Promise.resolve(handler(form)).finally(function () {
      if (button) button.disabled = false;
    });
  });

  document.addEventListener('click', function (event) {
    const button = event.target.closest('button[data-key-id]');
    if (button) keyAction(button);
    if (event.target.id === 'secret-done') {
      document.getElementById('secret').value = '';
      doneThenReload('The key is no longer shown.');
    }
  });

  const flash = sessionStorage.getItem('lpx-flash');
  if (flash) {
    sessionStorage.removeItem('lpx-flash');
    say(flash);
    const heading = document.querySelector('main h1');
    if (heading) heading.focus();
  }
})();
