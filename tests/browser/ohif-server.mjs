// Serves OHIF's prebuilt dist (npm @ohif/app) on loopback with a generated app-config.js, and reverse-proxies
// /dicom-web/* to an Orthanc DICOMweb endpoint so the viewer and the archive share one origin (no CORS set-up).
//
// Used by ohif-check.mjs (the Playwright test driver); runnable on its own to look at a study by hand:
//   node tests/browser/ohif-server.mjs --orthanc http://127.0.0.1:8042 [--port 3000]
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const OHIF_DIST = path.join(HERE, 'node_modules', '@ohif', 'app', 'dist');

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'application/javascript', '.mjs': 'application/javascript',
  '.css': 'text/css', '.json': 'application/json', '.wasm': 'application/wasm', '.svg': 'image/svg+xml',
  '.png': 'image/png', '.ico': 'image/x-icon', '.woff2': 'font/woff2', '.woff': 'font/woff', '.map': 'application/json',
  '.txt': 'text/plain', '.xml': 'application/xml', '.onnx': 'application/octet-stream',
};

/** The OHIF app-config.js pointing at a DICOMweb root on the same origin (`/dicom-web`). */
export function appConfig(dicomWebRoot = '/dicom-web') {
  return `/** LesionTrack test bed: OHIF against Orthanc DICOMweb (orthanc-dicomweb), same origin via proxy. */
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc DICOMweb',
        name: 'orthanc',
        wadoUriRoot: '${dicomWebRoot}',
        qidoRoot: '${dicomWebRoot}',
        wadoRoot: '${dicomWebRoot}',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
`;
}

/** Start the server; resolves to { server, url }. */
export function startServer({ orthanc, port = 0, dist = OHIF_DIST, log = () => {} }) {
  const target = new URL(orthanc);
  const config = appConfig();
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://local');
    if (url.pathname.startsWith('/dicom-web/')) {
      // Keep the Host header: Orthanc builds BulkDataURIs and RetrieveURLs from it, so they come back to us.
      const proxied = http.request({
        host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers,
      }, (up) => { res.writeHead(up.statusCode, up.headers); up.pipe(res); });
      proxied.on('error', (err) => { log(`proxy error ${err}`); res.writeHead(502); res.end(String(err)); });
      req.pipe(proxied);
      return;
    }
    if (url.pathname === '/app-config.js') {
      res.writeHead(200, { 'content-type': TYPES['.js'], 'cache-control': 'no-store' });
      res.end(config);
      return;
    }
    let file = path.normalize(path.join(dist, decodeURIComponent(url.pathname)));
    if (!file.startsWith(dist) || !fs.existsSync(file) || fs.statSync(file).isDirectory()) {
      file = path.join(dist, 'index.html');   // single-page app: every route is index.html
    }
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] || 'application/octet-stream' });
    fs.createReadStream(file).pipe(res);
  });
  return new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(port, '127.0.0.1', () => {
      resolve({ server, url: `http://127.0.0.1:${server.address().port}` });
    });
  });
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const args = Object.fromEntries(
    process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
  if (!args.orthanc) {
    console.error('usage: node ohif-server.mjs --orthanc http://127.0.0.1:8042 [--port 3000]');
    process.exit(2);
  }
  const { url } = await startServer({ orthanc: args.orthanc, port: Number(args.port || 3000), log: console.error });
  console.log(`OHIF on ${url} (DICOMweb proxied to ${args.orthanc}/dicom-web)`);
}
