-- Walks a channel's log from the newest entry back, calling visit(id, d)
-- on every message still in history: the last `limit` MESSAGE_CREATE
-- entries, less those a later MESSAGE_DELETE removed. visit returns true
-- to stop. Returns what the visit that stopped returned, or nil.
-- A channel whose meta has no `lastid` never had a message (every message
-- sets it, in the same script as its log entry): its log, however long
-- with presence events, is not walked.
-- Each walk records in `hist` (a string key beside the log) where the
-- messages and deletions it read lie: "gen top bottom n…" says that in
-- the log of generation gen the entries from bottom to top that are
-- messages or deletions are n…, newest first. The next walk reads the
-- entries logged since top, then those n (a run of consecutive ones in
-- one read), then below bottom if it must: not the presence events in
-- between. Only walks write the record, so nothing is added to the path
-- of a message or a presence event, and whatever any version appends
-- later is read as new. A new generation (a reset log) or a newest entry
-- below top (a log made again) voids it.
local function history(meta, log, hist, limit, visit)
  local m = redis.call('HMGET', meta, 'lastid', 'gen')
  if not m[1] then return nil end
  local record = redis.call('GET', hist)
  local newest = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  if not newest then return nil end
  local top = tonumber(string.sub(newest[1], 3))
  local gen = m[2] or '0'
  local known, ktop, kbottom = {}, nil, nil
  if record then
    local words = string.gmatch(record, '%S+')
    local g, t, b = words(), tonumber(words()), tonumber(words())
    if g == gen and t and b and t <= top then
      ktop, kbottom = t, b
      for w in words do table.insert(known, tonumber(w)) end
    end
  end

  local deleted, seen = {}, 0
  -- Messages and deletions read, newest first; the n of the last entry read.
  local found, last = {}, top + 1
  local value
  -- Reads one entry; true when the walk is over.
  local function read(entry)
    local n = tonumber(string.sub(entry[1], 3))
    last = n
    local d = entry[2][2]
    local kind = string.sub(d, 1, 15)
    if kind == 'MESSAGE_CREATE ' then
      table.insert(found, n)
      seen = seen + 1
      local id = string.match(d, '^MESSAGE_CREATE {"id":"(%d+)"')
      if id and not deleted[id] then
        local stop, v = visit(id, d)
        if stop then
          value = v
          return true
        end
      end
      return seen >= limit
    elseif kind == 'MESSAGE_DELETE ' then
      table.insert(found, n)
      local id = string.match(d, '^MESSAGE_DELETE {"id":"(%d+)"')
      if id then deleted[id] = true end
    end
    return false
  end
  -- Reads every entry from hi down to lo (to the log's start without lo).
  local function scan(hi, lo)
    local upper, lower = '0-' .. hi, lo and ('0-' .. lo) or '-'
    while true do
      local batch = redis.call('XREVRANGE', log, upper, lower, 'COUNT', 256)
      for _, entry in ipairs(batch) do
        if read(entry) then return true end
      end
      if #batch < 256 then return false end
      upper = '(' .. batch[#batch][1]
    end
  end

  -- Reads the recorded entries, a run of consecutive numbers at once;
  -- true when the walk ends among them (those not read yet stay known).
  local function read_known()
    local i = 1
    while i <= #known do
      local j = i
      while j < #known and known[j + 1] == known[j] - 1 do j = j + 1 end
      for _, entry in ipairs(redis.call('XREVRANGE', log, '0-' .. known[i], '0-' .. known[j])) do
        if read(entry) then
          for k = i, #known do
            if known[k] < last then table.insert(found, known[k]) end
          end
          return true
        end
      end
      i = j + 1
    end
    return false
  end

  -- bottom: from it to top, `found` lists every message and deletion.
  local bottom
  if not ktop then
    bottom = scan(top, nil) and last or 0
  elseif scan(top, ktop + 1) then
    bottom = last
  elseif read_known() then
    bottom = kbottom
  else
    bottom = kbottom > 1 and scan(kbottom - 1, nil) and last or 0
  end
  -- A bounded record: the newest 64, complete down to the last kept.
  if #found > 64 then
    for k = #found, 65, -1 do table.remove(found, k) end
    bottom = found[64]
  end
  redis.call('SET', hist,
    gen .. ' ' .. top .. ' ' .. bottom .. ' ' .. table.concat(found, ' '))
  return value
end
