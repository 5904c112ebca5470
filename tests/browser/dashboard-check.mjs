// Dashboard check: logs in to a running LesionTrack HTTP server with an API key in headless Chromium, reads the job
// queue and one patient's lesion timeline (values, image load state) and saves screenshots. Offline: requests that
// are not to 127.0.0.1 are refused and reported.
//
//   node tests/browser/dashboard-check.mjs --url http://127.0.0.1:8080 --key KEY --patient 1 --out DIR
//
// Prints one JSON object on stdout (the Python test compares it with the database).
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const argv = process.argv.slice(2);
const arg = (name, dflt) => { const i = argv.indexOf(`--${name}`); return i >= 0 ? argv[i + 1] : dflt; };
const base = arg('url');
const key = arg('key');
const patient = arg('patient');
const out = arg('out', '.');
if (!base || !key || !patient) {
  console.error('usage: dashboard-check.mjs --url URL --key KEY --patient PK --out DIR');
  process.exit(2);
}
fs.mkdirSync(out, { recursive: true });
const result = { blocked: [], pageErrors: [], consoleErrors: [], jobs: [], counts: {}, timeline: null,
  images: [], screenshots: [] };

const browser = await chromium.launch({
  executablePath: arg('chromium', '/usr/bin/chromium'), headless: true,
  args: ['--headless', '--no-sandbox', '--disable-background-networking', '--disable-component-update',
    '--no-first-run', '--no-default-browser-check', '--disable-default-apps', '--disable-sync', '--disable-extensions'],
});
let ok = false;
try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 900 } });
  await context.route('**/*', (route) => {
    const u = new URL(route.request().url());
    if (u.hostname === '127.0.0.1' || u.protocol === 'data:') return route.continue();
    result.blocked.push(u.origin);
    return route.abort();
  });
  const page = await context.newPage();
  page.setDefaultTimeout(30000);
  page.on('pageerror', (e) => result.pageErrors.push(String(e.message)));
  page.on('console', (m) => { if (m.type() === 'error') result.consoleErrors.push(m.text()); });
  const shot = async (name, fullPage = false) => {
    const file = path.join(out, name);
    await page.screenshot({ path: file, fullPage });
    result.screenshots.push(file);
  };

  // log in (the first request redirects to the login form)
  await page.goto(`${base}/`);
  await page.waitForSelector('#key');
  await page.fill('#key', key);
  await Promise.all([page.waitForNavigation(), page.click('#login-submit')]);

  // job queue
  await page.waitForSelector('#jobs');
  result.jobs = await page.$$eval('#jobs tbody tr[data-job-id]', (rows) => rows.map((tr) => ({
    id: Number(tr.dataset.jobId),
    state: tr.querySelector('.badge').textContent.trim().replace(/ /g, '_'),
    series: tr.querySelector('.uid').textContent.trim(),
    error: tr.querySelector('.error-text').textContent.trim(),
    retryButton: !!tr.querySelector('button.retry'),
  })));
  result.counts = await page.$$eval('#job-counts a[data-state]', (as) => Object.fromEntries(
    as.map((a) => [a.dataset.state, Number(a.querySelector('b').textContent)])));
  await shot('dashboard-jobs.png');

  // live refresh: with --live, tell the caller we are watching, then wait for a job row that was not there
  if (argv.includes('--live')) {
    const known = result.jobs.map((j) => j.id);
    process.stderr.write('WATCHING-QUEUE\n');
    const handle = await page.waitForFunction((ids) => {
      const rows = Array.from(document.querySelectorAll('#jobs tbody tr[data-job-id]'));
      const fresh = rows.find((tr) => !ids.includes(Number(tr.dataset.jobId)));
      return fresh ? { id: Number(fresh.dataset.jobId), state: fresh.querySelector('.badge').textContent.trim() } : null;
    }, known, { timeout: 30000 });
    result.liveNewJob = await handle.jsonValue();
  }

  // patient timeline
  await page.goto(`${base}/patients/${patient}`);
  await page.waitForSelector('#timeline');
  // lazy images: scroll every one into view, then wait until each has finished loading
  for (const img of await page.$$('#timeline img')) await img.scrollIntoViewIfNeeded();
  await page.waitForFunction(() => Array.from(document.querySelectorAll('#timeline img')).every((i) => i.complete));
  await page.evaluate(() => window.scrollTo(0, 0));
  result.images = await page.$$eval('#timeline img', (imgs) => imgs.map((i) => ({
    src: i.getAttribute('src'), naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight })));
  result.timeline = await page.evaluate(() => {
    const tps = Array.from(document.querySelectorAll('#timeline thead th.tp')).map((th) => ({
      index: Number(th.dataset.tp), series: th.dataset.seriesUid,
      label: th.querySelector('.tp-label').textContent.trim(), date: th.querySelector('.tp-date').textContent.trim(),
      objects: Array.from(th.querySelectorAll('a.obj')).map((a) => a.textContent.trim()) }));
    const lesions = Array.from(document.querySelectorAll('#timeline tbody tr[data-lesion-id]')).map((tr) => ({
      lesionId: Number(tr.dataset.lesionId), trackingUid: tr.dataset.trackingUid,
      trackingId: tr.querySelector('.tid').textContent.trim(), role: tr.querySelector('.role').textContent.trim(),
      cells: Array.from(tr.querySelectorAll('td.cell')).map((td) => td.classList.contains('missing') ? null : ({
        tp: Number(td.dataset.tp), observationId: Number(td.dataset.observationId),
        volume: td.querySelector('.vol').textContent.trim(), longAxis: td.querySelector('.la').textContent.trim(),
        shortAxis: td.querySelector('.sa').textContent.trim(), status: td.querySelector('.status').textContent.trim(),
        changeBaseline: td.querySelector('.chg-base') ? td.querySelector('.chg-base').textContent.trim() : null })),
    }));
    const overall = Array.from(document.querySelectorAll('#timeline td.overall-resp')).map((td) => td.textContent.trim());
    const target = Array.from(document.querySelectorAll('#timeline td.target-resp')).map((td) => td.textContent.trim());
    return { timepoints: tps, lesions, overall, target,
      best: document.querySelector('#best-response').textContent.trim() };
  });
  // layout: does the table fit its container and the 1500 px window, and does every cell hold its content?
  result.layout = await page.evaluate(() => {
    const table = document.querySelector('#timeline');
    const scroll = table.closest('.scroll');
    const tp = table.querySelector('thead th.tp');
    const lesion = table.querySelector('thead th.lesion-col');
    return { tableWidth: table.getBoundingClientRect().width, containerWidth: scroll.clientWidth,
      scrollWidth: scroll.scrollWidth, timepointWidth: tp.getBoundingClientRect().width,
      lesionWidth: lesion.getBoundingClientRect().width, timepoints: Number(table.dataset.timepoints),
      // the page itself must not scroll sideways, and no cell's content may spill over its neighbours (a fixed-layout
      // table does not widen a column for content that is too wide: it overflows the cell, which only this shows)
      pageScrollWidth: document.documentElement.scrollWidth, windowWidth: document.documentElement.clientWidth,
      overflowingCells: Array.from(table.querySelectorAll('th, td')).filter((c) => c.scrollWidth > c.clientWidth + 1)
        .map((c) => ({ tag: c.tagName, cls: c.className, tp: c.dataset.tp ?? null, scrollWidth: c.scrollWidth,
          clientWidth: c.clientWidth, text: c.textContent.trim().replace(/\s+/g, ' ').slice(0, 80) })) };
  });
  await shot('dashboard-timeline.png', true);

  // with --analyse SERIES: the skipped-series page's "Analyse anyway" button (operator), and what it says
  const analyse = arg('analyse');
  if (analyse) {
    await page.goto(`${base}/series/skipped`);
    const row = page.locator(`#skipped tr[data-series-uid="${analyse}"]`);
    result.skippedReason = (await row.locator('.reason').textContent()).trim();
    await Promise.all([page.waitForNavigation(), row.locator('button.analyse').click()]);
    result.analyseFlash = (await page.locator('#flash').textContent()).trim();
    result.stillListed = await page.locator(`#skipped tr[data-series-uid="${analyse}"]`).count();
    await shot('dashboard-analyse-anyway.png');
  }
  ok = result.blocked.length === 0 && result.pageErrors.length === 0;
} catch (e) {
  result.error = String(e && e.stack || e).slice(0, 2000);
} finally {
  await browser.close();
}
console.log(JSON.stringify(result, null, 1));
process.exit(ok ? 0 : 1);
