// deploy/compose.yaml's OHIF (profile "viewer"): the data source of docs/viewer.md, DICOMweb through the same
// origin (deploy/ohif/nginx.conf proxies /dicom-web to Orthanc).
window.config = {
  routerBasename: null,
  extensions: [],
  modes: [],
  showStudyList: true,
  defaultDataSourceName: 'pacs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'pacs',
      configuration: {
        friendlyName: 'Hospital PACS (DICOMweb)',
        name: 'pacs',
        wadoUriRoot: '/dicom-web',          // same origin as OHIF, see "Proxy" below
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
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
