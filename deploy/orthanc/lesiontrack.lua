-- deploy/compose.yaml's Orthanc (profile "viewer"): the routing script of docs/pacs/orthanc.md, its URL and
-- key read from the container's environment (tests/test_deploy.py keeps the two in step).
-- LesionTrack auto-routing: follow-up CT series only, then the explicit completion trigger.
local LESIONTRACK_MODALITY = 'lesiontrack'                  -- the DicomModalities entry
local LESIONTRACK_URL = os.getenv('TRACKER_URL')               -- compose: http://lesiontrack:8080
local LESIONTRACK_KEY = os.getenv('TRACKER_API_KEY')           -- compose: ORTHANC_LESIONTRACK_KEY

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

function OnStableSeries(seriesId, tags, metadata)
  if tags['Modality'] ~= 'CT' then
    return                                  -- SEG, SR (ours included), PR, ...
  end
  if not isFollowUp(seriesId) then
    print('LesionTrack: not routing ' .. seriesId .. ' (no earlier study: baseline)')
    return
  end
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
  local answer = HttpPost(LESIONTRACK_URL .. '/api/series/' .. tags['SeriesInstanceUID'] ..
                          '/complete?expected_instances=' .. count, '',
                          { ['X-API-Key'] = LESIONTRACK_KEY })
  if answer == nil then
    print('LesionTrack: completion trigger failed for ' .. seriesId .. '; its quiet period will complete it')
  end
end
