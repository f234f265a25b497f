-- The `n` of a log's last event: its last entry id, or, when its entries
-- are gone, the id the stream gave last.
local function head(log)
  local last = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)[1]
  if last then return tonumber(string.sub(last[1], 3)) end
  if redis.call('EXISTS', log) == 0 then return 0 end
  local info = redis.call('XINFO', 'STREAM', log)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then return tonumber(string.sub(info[i + 1], 3)) end
  end
  return 0
end
