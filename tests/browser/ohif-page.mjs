// One OHIF page for the browser scripts (ohif-check.mjs, ohif-draw.mjs): OHIF's dist served against an Orthanc's
// DICOMweb (ohif-server.mjs), Chromium headless with nothing but loopback reachable, the onboarding tour marked as
// shown, page errors and console errors collected into `result`, and a screenshot helper.
import path from 'node:path';
import { chromium } from 'playwright-core';
import { startServer } from './ohif-server.mjs';

export async function openOhif({ orthanc, executablePath, timeout, out, result }) {
  const { server, url } = await startServer({ orthanc, log: (m) => result.consoleErrors.push(m) });
  const browser = await chromium.launch({
    executablePath, headless: true,
    args: ['--headless', '--no-sandbox', '--disable-background-networking', '--disable-component-update',
      '--no-first-run', '--no-default-browser-check', '--disable-default-apps', '--disable-sync',
      '--disable-extensions', '--disable-domain-reliability', '--disable-client-side-phishing-detection',
      '--metrics-recording-only', '--use-gl=swiftshader', '--enable-unsafe-swiftshader', '--mute-audio'],
  });
  const close = async () => { await browser.close(); server.close(); };
  try {
    const context = await browser.newContext({ viewport: { width: 1600, height: 1000 }, serviceWorkers: 'block' });
    // OHIF's onboarding tour (shepherd.js) overlays the viewer on first visit; mark it as already shown.
    await context.addInitScript(() => {
      try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) { /* ignore */ }
    });
    const page = await context.newPage();
    page.setDefaultTimeout(timeout);
    page.on('pageerror', (e) => result.pageErrors.push(String(e.message).slice(0, 300)));
    page.on('console', (m) => { if (m.type() === 'error') result.consoleErrors.push(m.text().slice(0, 300)); });
    await context.route('**/*', (route) => {
      const u = new URL(route.request().url());
      if (u.hostname === '127.0.0.1' || u.protocol === 'data:' || u.protocol === 'blob:') return route.continue();
      result.blocked.push(u.origin);
      return route.abort();
    });
    const shot = async (name) => {
      const file = path.join(out, name);
      await page.screenshot({ path: file });
      result.screenshots.push(file);
    };
    return { url, page, shot, close };
  } catch (e) {
    await close();
    throw e;
  }
}
