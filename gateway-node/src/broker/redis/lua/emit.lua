local function emit(meta, log, topic, d, retain)
  local n = redis.call('HINCRBY', meta, 'n', 1)
  redis.call('XADD', log, 'MAXLEN', '~', retain, '0-' .. n, 'd', d)
  redis.call('PUBLISH', topic, n .. ' 0 ' .. d)
  return n
end
