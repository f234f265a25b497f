local function emit(log, topic, d, retain)
  -- The log's own entry ids count the events: 0-1, 0-2, … (`0-*`).
  local n = string.sub(redis.call('XADD', log, 'MAXLEN', '~', retain, '0-*', 'd', d), 3)
  redis.call('PUBLISH', topic, n .. ' 0 ' .. d)
  return tonumber(n)
end
