// Live job queue: re-reads /api/jobs every 5 s (session cookie auth) and redraws the table body. No libraries.
(function () {
  const table = document.getElementById('jobs');
  if (!table) return;
  const canRetry = table.dataset.canRetry === 'true';
  const csrf = table.dataset.csrf;
  const filter = table.dataset.stateFilter;
  const series = table.dataset.seriesFilter;
  const retryable = new Set(['failed', 'done', 'nothing_to_track']);
  function cell(text, cls) { const td = document.createElement('td'); if (cls) td.className = cls; td.textContent = text; return td; }
  function row(j) {
    const tr = document.createElement('tr');
    tr.dataset.jobId = j.id; tr.className = 'row-' + j.state;
    const a = document.createElement('a'); a.href = '/jobs/' + j.id; a.textContent = '#' + j.id;
    const idc = document.createElement('td'); idc.appendChild(a); tr.appendChild(idc);
    const st = document.createElement('td'); const b = document.createElement('span');
    b.className = 'badge state-' + j.state; b.textContent = j.state.replace(/_/g, ' '); st.appendChild(b); tr.appendChild(st);
    tr.appendChild(cell(j.step || ''));
    tr.appendChild(cell(String(j.attempts)));
    const u = cell(j.followup_series_uid, 'uid'); u.title = j.followup_series_uid; tr.appendChild(u);
    const p = document.createElement('td');
    if (j.patient_pk) { const pa = document.createElement('a'); pa.href = '/patients/' + j.patient_pk; pa.textContent = '#' + j.patient_pk; p.appendChild(pa); }
    tr.appendChild(p);
    tr.appendChild(cell(j.created_at ? j.created_at.replace('T', ' ').slice(0, 19) : ''));
    tr.appendChild(cell(''));
    tr.appendChild(cell(j.error || '', 'error-text'));
    const act = document.createElement('td');
    if (canRetry && retryable.has(j.state)) {
      const f = document.createElement('form'); f.method = 'post'; f.action = '/jobs/' + j.id + '/retry';
      const h = document.createElement('input'); h.type = 'hidden'; h.name = 'csrf'; h.value = csrf; f.appendChild(h);
      const btn = document.createElement('button'); btn.type = 'submit'; btn.className = 'retry'; btn.textContent = 'Retry'; f.appendChild(btn);
      act.appendChild(f);
    }
    tr.appendChild(act);
    return tr;
  }
  async function refresh() {
    try {
      let q = filter ? '?limit=200&state=' + encodeURIComponent(filter) : '?limit=200';
      if (series) q += '&series_uid=' + encodeURIComponent(series);
      if (series || table.dataset.superseded === 'true') q += '&include_superseded=true';  // a history shows them all
      const r = await fetch('/api/jobs' + q, { credentials: 'same-origin' });
      if (!r.ok) return;
      const data = await r.json();
      const body = table.tBodies[0];
      const old = new Map(Array.from(body.rows).map(tr => [tr.dataset.jobId, tr]));
      body.replaceChildren(...data.items.map(j => {
        const fresh = row(j);
        const prev = old.get(String(j.id));
        if (prev && prev.cells[7]) fresh.cells[7].textContent = prev.cells[7].textContent;   // keep server-computed time
        return fresh;
      }));
      for (const a of document.querySelectorAll('#job-counts a[data-state]')) {
        const b = a.querySelector('b');
        if (b && data.counts && a.dataset.state in data.counts) b.textContent = String(data.counts[a.dataset.state]);
      }
      document.getElementById('refreshed').textContent = 'Last refresh ' + new Date().toLocaleTimeString();
    } catch (e) { /* keep the last table */ }
  }
  setInterval(refresh, 5000);
})();
