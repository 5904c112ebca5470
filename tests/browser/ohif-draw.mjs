// A radiologist's measurement drawn in OHIF: opens a study in OHIF (prebuilt @ohif/app dist, served by
// ohif-server.mjs against Orthanc DICOMweb) in headless Debian Chromium, goes to the slice of a point, picks OHIF's
// Length tool in its toolbar, drags a line between two points with the mouse, accepts "Track measurements for this
// series?", names the measurement (the row's Rename), and saves it as OHIF saves a report (Measurements panel
// "Create SR" → Save: STOW-RS to the archive). Every request that is not to 127.0.0.1 is refused (no network).
//
//   node tests/browser/ohif-draw.mjs --orthanc http://127.0.0.1:8042 --study <StudyInstanceUID> --out DIR \
//        --from x,y,z --to x,y,z [--label "L2 liver"] [--chromium /usr/bin/chromium]
//
// --from/--to are patient coordinates (DICOM LPS, mm) on one slice of the study's CT. Prints one JSON object on
// stdout (what was drawn and saved); exit status 0 when the SR was stored (STOW-RS 2xx), 1 otherwise.
import fs from 'node:fs';
import path from 'node:path';
import { openOhif } from './ohif-page.mjs';

const argv = process.argv.slice(2);
const arg = (name, dflt) => { const i = argv.indexOf(`--${name}`); return i >= 0 ? argv[i + 1] : dflt; };
const point = (s) => s.split(',').map(Number);
const orthanc = arg('orthanc');
const study = arg('study');
const out = arg('out', '.');
const from = point(arg('from', ''));
const to = point(arg('to', ''));
const label = arg('label', '');
const executablePath = arg('chromium', '/usr/bin/chromium');
const timeout = Number(arg('timeout-ms', '90000'));
if (!orthanc || !study || from.length !== 3 || to.length !== 3 || [...from, ...to].some(Number.isNaN)) {
  console.error('usage: ohif-draw.mjs --orthanc URL --study UID --out DIR --from x,y,z --to x,y,z [--label TEXT]');
  process.exit(2);
}
fs.mkdirSync(out, { recursive: true });

const result = { url: null, blocked: [], pageErrors: [], consoleErrors: [], steps: [], slice: null, canvasPoints: [],
  measurementsPanelText: '', saveDialogText: '', stowStatus: null, screenshots: [] };
const step = (s) => { result.steps.push(s); console.error(`[ohif-draw] ${s}`); };

// In the page: the stack viewport showing the study, moved to the image nearest to `world` (its position along the
// slice normal); returns the image's index and the two points in page (CSS) pixels. OHIF exposes cornerstone as
// window.cornerstone (extensions/cornerstone/src/init.tsx).
async function showSliceOf(page, a, b) {
  return page.evaluate(async ([a, b]) => {
    const cs = window.cornerstone;
    const viewport = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getImageIds().length > 1);
    const ids = viewport.getImageIds();
    const normal = viewport.getCamera().viewPlaneNormal;
    const along = (p) => p[0] * normal[0] + p[1] * normal[1] + p[2] * normal[2];
    const distance = (id) => Math.abs(along(cs.metaData.get('imagePlaneModule', id).imagePositionPatient) - along(a));
    const index = ids.reduce((best, id, i) => (distance(id) < distance(ids[best]) ? i : best), 0);
    await viewport.setImageIdIndex(index);
    viewport.render();
    const rect = viewport.element.getBoundingClientRect();
    const onPage = (p) => { const [x, y] = viewport.worldToCanvas(p); return [rect.left + x, rect.top + y]; };
    return { index, count: ids.length, offset: distance(ids[index]), points: [onPage(a), onPage(b)] };
  }, [a, b]);
}

const viewer = await openOhif({ orthanc, executablePath, timeout, out, result });
const { url, page, shot } = viewer;
let ok = false;
try {

  result.url = `${url}/viewer?StudyInstanceUIDs=${study}`;
  step('open study');
  await page.goto(result.url);
  await page.waitForSelector('[data-cy="study-browser-thumbnail"]');
  // the CT is in the viewport once cornerstone's stack viewport holds its images and shows one of them
  await page.waitForFunction(() => {
    const cs = window.cornerstone;
    return cs && cs.getEnabledElements().some((e) => e.viewport && e.viewport.getImageIds
      && e.viewport.getImageIds().length > 1 && e.viewport.getCurrentImageId() && e.viewport.getImageData());
  });
  step('go to the slice');
  result.slice = await showSliceOf(page, from, to);
  result.canvasPoints = result.slice.points;
  await shot('ohif-draw-slice.png');

  step('pick the Length tool');
  await page.locator('[data-cy="MeasurementTools-split-button-primary"], [data-cy="Length"]').first().click();
  step('draw');
  const [[x0, y0], [x1, y1]] = result.canvasPoints;
  await page.mouse.move(x0, y0);
  await page.mouse.down();
  await page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, { steps: 5 });
  await page.mouse.move(x1, y1, { steps: 5 });
  await page.mouse.up();
  step('track');
  await page.getByText('Track measurements for this series?').first().waitFor();
  await page.getByRole('button', { name: 'Yes', exact: true }).first().click();
  const tab = page.locator('[data-cy="trackedMeasurements-btn"]');
  if (await tab.count()) await tab.first().click();
  await page.locator('[data-cy="measurement-table-row-0"], [data-cy="data-row"]').first().waitFor();
  await shot('ohif-drawn.png');
  if (label) {
    step('name the measurement');
    const row = page.locator('[data-cy="data-row"]').first();
    await row.hover();
    await row.locator('button').last().click();
    await page.locator('[data-cy="Rename"]').first().click();
    const input = page.locator('#dialog-input, [role="dialog"] input').first();
    await input.fill(label);
    await page.locator('[data-cy="input-dialog-save-button"]').first().click();
    await page.getByText(label, { exact: true }).first().waitFor();
  }
  result.measurementsPanelText = (await page.evaluate(() => document.body.innerText)).slice(-3000);
  await shot('ohif-named.png');

  step('save the report');
  await page.getByText('Create SR', { exact: true }).first().click();
  const save = page.getByRole('button', { name: 'Save', exact: true });
  await save.first().waitFor();
  result.saveDialogText = (await page.evaluate(() => document.body.innerText)).slice(-1500);
  const stow = page.waitForResponse((r) => r.request().method() === 'POST' && r.url().includes('/dicom-web/'));
  await save.first().click();
  result.stowStatus = (await stow).status();
  ok = result.blocked.length === 0 && result.stowStatus >= 200 && result.stowStatus < 300;
} catch (e) {
  result.error = String(e && e.stack || e).slice(0, 2000);
} finally {
  await viewer.close();
}
console.log(JSON.stringify(result, null, 1));
process.exit(ok ? 0 : 1);
