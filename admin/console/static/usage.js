// Usage and spend charts (Chart.js, vendored: chart.umd.min.js) from
// GET /admin/v1/usage/series, refreshed every 5 seconds; the same numbers fill the table.
'use strict';

(function () {
  const table = document.getElementById('usage-table');
  if (!table || typeof Chart === 'undefined') return;
  const params = new URLSearchParams(location.search);
  const tenant = table.dataset.tenant || '';
  const granularity = params.get('granularity') === 'day' ? 'day' : 'hour';
  document.getElementById('usage-granularity').value = granularity;
  const palette = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#17becf'];
  const charts = {};

  function chart(id, label) {
    const ctx = document.getElementById(id);
    charts[id] = new Chart(ctx, {
      type: 'bar',
      data: { labels: [], datasets: [] },
      options: {
        animation: false,
        responsive: true,
        scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: label } } },
      },
    });
    return charts[id];
  }

  const tokens = chart('tokens-chart', 'tokens');
  const spend = chart('spend-chart', 'spend (micro-units)');

  function period(iso) {
    return granularity === 'hour' ? iso.slice(0, 13).replace('T', ' ') + ':00' : iso.slice(0, 10);
  }

  function fill(target, rows, value) {
    const labels = Array.from(new Set(rows.map(function (r) { return period(r.period_start); })));
    const series = Array.from(new Set(rows.map(function (r) {
      return tenant ? r.adapter : r.tenant + ' / ' + r.adapter;
    })));
    target.data.labels = labels;
    target.data.datasets = series.map(function (name, i) {
      const values = labels.map(function () { return 0; });
      rows.forEach(function (r) {
        const key = tenant ? r.adapter : r.tenant + ' / ' + r.adapter;
        if (key === name) values[labels.indexOf(period(r.period_start))] += value(r);
      });
      return { label: name, data: values, backgroundColor: palette[i % palette.length] };
    });
    target.update();
  }

  function cell(row, text, header) {
    const c = document.createElement(header ? 'th' : 'td');
    if (header) c.scope = 'row';
    c.textContent = text;
    row.appendChild(c);
  }

  function fillTable(rows) {
    const body = table.tBodies[0];
    body.replaceChildren();
    if (rows.length === 0) {
      const tr = body.insertRow();
      cell(tr, 'No usage in this range.');
      tr.cells[0].colSpan = 7;
      return;
    }
    rows.forEach(function (r) {
      const tr = body.insertRow();
      tr.dataset.adapter = r.adapter;
      tr.dataset.tenant = r.tenant;
      cell(tr, period(r.period_start), true);
      [r.tenant, r.adapter, r.requests, r.prompt_tokens, r.completion_tokens,
        (r.cost_micros / 1e6).toFixed(6)].forEach(function (v) { cell(tr, String(v)); });
    });
  }

  async function refresh() {
    const query = new URLSearchParams({ granularity: granularity });
    if (tenant) query.set('tenant', tenant);
    const response = await fetch('/admin/v1/usage/series?' + query, { credentials: 'same-origin' });
    if (!response.ok) {
      document.getElementById('alert').textContent = 'Usage could not be read (' + response.status + ').';
      return;
    }
    const body = await response.json();
    fill(tokens, body.data, function (r) { return r.prompt_tokens + r.completion_tokens; });
    fill(spend, body.data, function (r) { return r.cost_micros; });
    fillTable(body.data);
    document.getElementById('usage-updated').textContent = new Date().toISOString().slice(11, 19) + ' UTC';
  }

  document.getElementById('usage-refresh').addEventListener('click', refresh);
  refresh();
  setInterval(refresh, 5000);
})();
