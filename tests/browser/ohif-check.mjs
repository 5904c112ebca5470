// Viewer proof: opens a study in OHIF (prebuilt @ohif/app dist, served by ohif-server.mjs against Orthanc DICOMweb)
// in headless Debian Chromium, loads the SEG and checks the segment labels are listed, loads the SR and checks its
// measurements are listed, and saves screenshots. Every request that is not to 127.0.0.1 is refused (no network).
//
//   node tests/browser/ohif-check.mjs --orthanc http://127.0.0.1:8042 --study <StudyInstanceUID> --out DIR \
//        --seg "LesionTrack lesions" --sr "LesionTrack measurements" --labels "L1 liver|L2 lymph node" \
//        [--sr-texts "Volume|Long axis"] [--chromium /usr/bin/chromium] \
//        [--track-sr "LesionTrack RECIST for OHIF" --tracked-texts "L1 liver: ...|12.1"]
//
// With --sr "" no SR is loaded (e.g. a study with an RT structure set only: --seg names the RTSTRUCT series).
// With --track-sr the named SR is then loaded too, OHIF's "track measurements" prompt is accepted (re-hydration)
// and the tracked-measurements panel must list every --tracked-texts entry. With --save-sr as well, the tracked
// measurements are then saved as OHIF saves them (panel "Create SR" → dialog defaults → Save: STOW-RS to the archive).
//
// Prints one JSON object (what was found) on stdout; exit status 0 when every expectation was met, 1 otherwise.
import fs from 'node:fs';
import path from 'node:path';
import { openOhif } from './ohif-page.mjs';

const argv = process.argv.slice(2);
const arg = (name, dflt) => { const i = argv.indexOf(`--${name}`); return i >= 0 ? argv[i + 1] : dflt; };
const orthanc = arg('orthanc');
const study = arg('study');
const out = arg('out', '.');
const segName = arg('seg', 'LesionTrack lesions');
const srName = arg('sr', 'LesionTrack measurements');
const labels = (arg('labels', '') || '').split('|').filter(Boolean);
const srTexts = (arg('sr-texts', '') || '').split('|').filter(Boolean);
// series descriptions that must be listed in the study browser too (e.g. the superseded revisions of a result)
const alsoListed = (arg('also-listed', '') || '').split('|').filter(Boolean);
const trackSr = arg('track-sr', '');
const saveSr = argv.includes('--save-sr');
const trackedTexts = (arg('tracked-texts', '') || '').split('|').filter(Boolean);
const executablePath = arg('chromium', '/usr/bin/chromium');
const timeout = Number(arg('timeout-ms', '90000'));
if (!orthanc || !study) {
  console.error('usage: ohif-check.mjs --orthanc URL --study UID --out DIR [--seg NAME] [--sr NAME] [--labels a|b]');
  process.exit(2);
}
fs.mkdirSync(out, { recursive: true });

const result = { url: null, blocked: [], pageErrors: [], consoleErrors: [], steps: [], segPanelText: '',
  labelsFound: [], labelsMissing: [], srPanelText: '', srTextsFound: [], srTextsMissing: [], screenshots: [],
  listedFound: [], listedMissing: [], trackPrompt: null, trackedPanelText: '', trackedFound: [], trackedMissing: [],
  saveDialogText: '', stowStatus: null };
const step = (s) => { result.steps.push(s); console.error(`[ohif-check] ${s}`); };

const viewer = await openOhif({ orthanc, executablePath, timeout, out, result });
const { url, page, shot } = viewer;
let ok = false;
try {
  const panelText = async () => page.evaluate(() => document.body.innerText);

  result.url = `${url}/viewer?StudyInstanceUIDs=${study}`;
  step('open study');
  await page.goto(result.url);
  await page.waitForSelector('[data-cy="study-browser-thumbnail"]');
  await page.getByText(segName, { exact: true }).first().waitFor();
  for (const name of alsoListed) {
    try {
      await page.getByText(name, { exact: true }).first().waitFor({ timeout: 20000 });
      result.listedFound.push(name);
    } catch { result.listedMissing.push(name); }
  }
  await shot('ohif-study.png');

  step('load SEG');
  await page.getByText(segName, { exact: true }).first().dblclick();
  const hydrate = page.locator('[data-cy="yes-hydrate-btn"]');
  await hydrate.first().waitFor();
  await hydrate.first().click();
  await page.locator('[data-cy="yes-hydrate-btn"]').first().waitFor({ state: 'detached' });
  step('open segmentation panel');
  await page.click('[data-cy="panelSegmentation-btn"]');
  for (const label of labels) {
    try {
      await page.getByText(label, { exact: true }).first().waitFor({ timeout: 20000 });
      result.labelsFound.push(label);
    } catch { result.labelsMissing.push(label); }
  }
  result.segPanelText = (await panelText()).slice(0, 4000);
  // Click a segment in the panel: OHIF jumps to the slice through it (for a screenshot that shows the lesion).
  const focus = arg('focus-label', labels[0]);
  if (focus && result.labelsFound.includes(focus)) {
    const overlay = page.locator('[data-cy="viewport-overlay-bottom-right"]').first();
    const before = await overlay.innerText().catch(() => '');
    await page.getByText(focus, { exact: true }).first().click();
    await page.waitForFunction((prev) => {
      const el = document.querySelector('[data-cy="viewport-overlay-bottom-right"]');
      return el && el.innerText !== prev;
    }, before, { timeout: 10000 }).catch(() => step(`slice did not change after clicking ${focus}`));
  }
  await shot('ohif-seg.png');

  if (srName) {
    step('load SR');
    await page.getByText(srName, { exact: true }).first().dblclick();
    // OHIF offers to "continue tracking" (hydrate) the SR's measurements; ours are shown read-only in the SR viewport.
    const noTrack = page.locator('[data-cy="no-hydrate-btn"]');
    try {
      await noTrack.first().waitFor({ timeout: 30000 });
      await noTrack.first().click();
    } catch { step('no tracking prompt shown'); }
    // The SR viewport draws one measurement group at a time with its values; step through them with its arrows.
    await page.waitForFunction(() => {
      const pane = document.querySelector('[data-cy="viewport-pane"]');
      return pane && /(Volume|Long axis|Diameter):/.test(pane.innerText);
    }, null, { timeout: 30000 }).catch(() => step('no measurement text in the first SR view'));
    let shotTaken = false;
    const seen = new Set();
    const wanted = new Set(srTexts);
    // OHIF's order of the groups is its own (merged by Tracking UID, which is random per run): step through enough views
    // to pass every lesion of a series-sized SR, not only as many as texts are wanted.
    for (let i = 0; i < Math.max(12, 3 * srTexts.length) && wanted.size > 0; i++) {
      const text = await page.locator('[data-cy="viewport-pane"]').first().innerText();
      result.srPanelText += `--- measurement view ${i + 1}\n${text}\n`;
      for (const t of [...wanted]) if (text.includes(t)) { wanted.delete(t); seen.add(t); }
      if (!shotTaken && /(Volume|Long axis|Diameter):/.test(text)) { await shot('ohif-sr.png'); shotTaken = true; }
      if (wanted.size === 0) break;
      const next = page.locator('[data-cy="viewport-action-arrows-right"]');
      if (!(await next.count())) break;
      await next.first().click();
      await page.waitForFunction((prev) => {
        const pane = document.querySelector('[data-cy="viewport-pane"]');
        return pane && pane.innerText !== prev;
      }, text, { timeout: 15000 }).catch(() => {});
    }
    if (!shotTaken) await shot('ohif-sr.png');
    result.srTextsFound = [...seen];
    result.srTextsMissing = [...wanted];
    await shot('ohif-sr-last.png');
  }

  if (trackSr) {
    step('load the SR to track');
    await page.getByText(trackSr, { exact: true }).first().dblclick();
    // OHIF re-hydrates an SR whose groups its cornerstone adapters read: it asks whether to track them.
    const yesTrack = page.locator('[data-cy="yes-hydrate-btn"]');
    try {
      await yesTrack.first().waitFor({ timeout: 30000 });
      result.trackPrompt = (await page.locator('[data-cy="viewport-pane"]').first().innerText()).slice(0, 500);
      await yesTrack.first().click();
      await yesTrack.first().waitFor({ state: 'detached' });
    } catch { step('no tracking prompt shown'); }
    const tab = page.locator('[data-cy="trackedMeasurements-btn"]');
    if (await tab.count()) await tab.first().click();
    await page.waitForFunction((texts) => texts.every((t) => document.body.innerText.includes(t)), trackedTexts,
      { timeout: 30000 }).catch(() => step('tracked-measurements panel incomplete'));
    result.trackedPanelText = await panelText();
    const wanted = new Set(trackedTexts.filter((t) => !result.trackedPanelText.includes(t)));
    result.trackedPanelText = result.trackedPanelText.slice(-8000);
    result.trackedFound = trackedTexts.filter((t) => !wanted.has(t));
    result.trackedMissing = [...wanted];
    await shot('ohif-tracked.png');
    if (saveSr) {
      step('save the tracked measurements');
      await page.getByText('Create SR', { exact: true }).first().click();
      const save = page.getByRole('button', { name: 'Save', exact: true });
      await save.first().waitFor();
      result.saveDialogText = (await panelText()).slice(-1500);
      const stow = page.waitForResponse((r) => r.request().method() === 'POST' && r.url().includes('/dicom-web/'));
      await save.first().click();
      result.stowStatus = (await stow).status();
    }
  }
  ok = result.labelsMissing.length === 0 && result.srTextsMissing.length === 0 && result.blocked.length === 0
    && result.listedMissing.length === 0 && result.trackedMissing.length === 0
    && (!saveSr || (result.stowStatus >= 200 && result.stowStatus < 300));
} catch (e) {
  result.error = String(e && e.stack || e).slice(0, 2000);
} finally {
  await viewer.close();
}
console.log(JSON.stringify(result, null, 1));
process.exit(ok ? 0 : 1);
