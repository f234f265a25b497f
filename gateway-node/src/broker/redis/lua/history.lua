-- Walks a channel's log from the newest entry back, calling visit(id, d)
-- on every message still in history: the last `limit` MESSAGE_CREATE
-- entries, less those a later MESSAGE_DELETE removed. visit returns true
-- to stop. Returns what the visit that stopped returned, or nil.
-- A channel whose meta has no `lastid` never had a message (every message
-- sets it, in the same script as its log entry): its log, however long
-- with presence events, is not walked.
local function history(meta, log, limit, visit)
  if redis.call('HEXISTS', meta, 'lastid') == 0 then return nil end
  local deleted = {}
  local seen = 0
  local upper = '+'
  while seen < limit do
    local batch = redis.call('XREVRANGE', log, upper, '-', 'COUNT', 256)
    for _, entry in ipairs(batch) do
      local d = entry[2][2]
      local kind = string.sub(d, 1, 15)
      if kind == 'MESSAGE_CREATE ' then
        seen = seen + 1
        local id = string.match(d, '^MESSAGE_CREATE {"id":"(%d+)"')
        if id and not deleted[id] then
          local stop, value = visit(id, d)
          if stop then return value end
        end
        if seen >= limit then return nil end
      elseif kind == 'MESSAGE_DELETE ' then
        local id = string.match(d, '^MESSAGE_DELETE {"id":"(%d+)"')
        if id then deleted[id] = true end
      end
    end
    if #batch < 256 then return nil end
    upper = '(' .. batch[#batch][1]
  end
  return nil
end
