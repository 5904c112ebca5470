-- deploy/compose.yaml's Orthanc (profile "viewer"): the routing script of docs/pacs/orthanc.md, its URL and
-- key read from the container's environment (tests/test_deploy.py keeps the two in step).
-- LesionTrack auto-routing: follow-up CT series, and the annotations a person saves on a patient LesionTrack
-- analysed; each series then gets the explicit completion trigger.
local LESIONTRACK_MODALITY = 'lesiontrack'                  -- the DicomModalities entry
local LESIONTRACK_URL = os.getenv('TRACKER_URL')               -- compose: http://lesiontrack:8080
local LESIONTRACK_KEY = os.getenv('TRACKER_API_KEY')           -- compose: ORTHANC_LESIONTRACK_KEY
local OUR_MANUFACTURER = 'LesionTrack'                      -- Manufacturer of LesionTrack's SEG/SR: never routed back
local ANNOTATIONS = { PR = true, SR = true, SEG = true, RTSTRUCT = true } -- GSPS, SR, SEG, RTSTRUCT
local DOSE_REPORTS = { ['1.2.840.10008.5.1.4.1.1.88.67'] = true,  -- the scanner's dose SRs: no annotation
                       ['1.2.840.10008.5.1.4.1.1.88.68'] = true, ['1.2.840.10008.5.1.4.1.1.88.73'] = true }

local function isFollowUp(seriesId)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local study = ParseJson(RestApiGet('/studies/' .. series['ParentStudy']))
  local date = study['MainDicomTags']['StudyDate'] or ''
  local studies = ParseJson(RestApiGet('/patients/' .. study['ParentPatient'] .. '/studies'))
  for _, other in pairs(studies) do
    local otherDate = other['MainDicomTags']['StudyDate'] or ''
    if other['ID'] ~= study['ID'] and otherDate ~= '' and otherDate < date then
      return true
    end
  end
  return false
end

local function madeByPerson(seriesId)       -- an instance LesionTrack did not write (OHIF saves into our series too)
  for _, instanceId in pairs(ParseJson(RestApiGet('/series/' .. seriesId))['Instances']) do
    local tags = ParseJson(RestApiGet('/instances/' .. instanceId .. '/simplified-tags'))
    if tags['Manufacturer'] ~= OUR_MANUFACTURER and not DOSE_REPORTS[tags['SOPClassUID']] then
      return true
    end
  end
  return false
end

local function analysedByLesionTrack(seriesId)   -- one of the patient's studies holds a report of LesionTrack's
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  local study = ParseJson(RestApiGet('/studies/' .. series['ParentStudy']))
  for _, other in pairs(ParseJson(RestApiGet('/patients/' .. study['ParentPatient'] .. '/series'))) do
    local tags = other['MainDicomTags']
    if tags['Modality'] == 'SR' and tags['Manufacturer'] == OUR_MANUFACTURER then
      return true
    end
  end
  return false
end

local function route(seriesId, seriesUid)
  local series = ParseJson(RestApiGet('/series/' .. seriesId))
  if series['Status'] == 'Missing' then  -- fewer instances than Orthanc expects from the series' tags
    print('LesionTrack: ' .. seriesId .. ' is stable but incomplete; routed when the rest arrives')
    return
  end
  local count = #series['Instances']
  -- synchronous: returns once every instance is stored at LesionTrack
  RestApiPost('/modalities/' .. LESIONTRACK_MODALITY .. '/store',
              DumpJson({ Resources = { seriesId }, Synchronous = true }, true))
  -- the completion trigger, with the count LesionTrack waits for
  local answer = HttpPost(LESIONTRACK_URL .. '/api/series/' .. seriesUid ..
                          '/complete?expected_instances=' .. count, '',
                          { ['X-API-Key'] = LESIONTRACK_KEY })
  if answer == nil then
    print('LesionTrack: completion trigger failed for ' .. seriesId .. '; its quiet period will complete it')
  end
end

local function routeAnnotationsOf(studyId)  -- a person's annotations saved there while LesionTrack analysed it
  for _, series in pairs(ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))) do
    local tags = series['MainDicomTags']
    if ANNOTATIONS[tags['Modality']] and madeByPerson(series['ID']) then
      route(series['ID'], tags['SeriesInstanceUID'])
    end
  end
end

function OnStableSeries(seriesId, tags, metadata)
  local modality = tags['Modality']
  if modality == 'CT' then
    if not isFollowUp(seriesId) then
      print('LesionTrack: not routing ' .. seriesId .. ' (no earlier study: baseline)')
      return
    end
    route(seriesId, tags['SeriesInstanceUID'])
  elseif ANNOTATIONS[modality] and madeByPerson(seriesId) then
    if analysedByLesionTrack(seriesId) then
      route(seriesId, tags['SeriesInstanceUID'])   -- a reader's arrow, line, contour, SEG or SR: it counts
    else
      print('LesionTrack: not routing ' .. seriesId .. ' (LesionTrack has no result of this patient yet)')
    end
  elseif modality == 'SR' then                        -- LesionTrack's report arrived: what a person saved meanwhile
    routeAnnotationsOf(ParseJson(RestApiGet('/series/' .. seriesId))['ParentStudy'])
  end                                               -- LesionTrack's own SEG/SR otherwise: never routed back
end
