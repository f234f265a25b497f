-- KEYS: meta log, for each message (on a cluster, all in one slot)
-- ARGV: retain, then for each message: topic rest ms(13 digits) suffix(6 digits),
-- then the batch's deadline (Unix ms in Redis' clock)
-- Publishes a batch of messages (one or more), in order. A message's one
-- stored copy is its log entry: history reads the log. Its id is
-- ms .. suffix; if that is not above the channel's last id (another
-- node's clock is ahead), its millisecond part moves just past the last
-- one. The entry id (`0-*`) is the message's `n`, so no number is read or
-- written. Returns n and the final id of each message; nothing, and
-- publishes nothing, when the batch arrives after its deadline (its
-- senders were told 4018: it must not appear later).
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[#ARGV]) then
  return {}
end
local out = {}
for i = 1, #KEYS / 2 do
  local meta, log, a = KEYS[2 * i - 1], KEYS[2 * i], 4 * i - 2
  local id = ARGV[a + 2] .. ARGV[a + 3]
  local last = redis.call('HGET', meta, 'lastid') or ''
  if #id == #last and id <= last then
    id = string.format('%013d', tonumber(string.sub(last, 1, 13)) + 1) .. ARGV[a + 3]
  end
  redis.call('HSET', meta, 'lastid', id)
  local d = 'MESSAGE_CREATE {"id":"' .. id .. '"' .. ARGV[a + 1]
  local n = string.sub(redis.call('XADD', log, 'MAXLEN', '~', ARGV[1], '0-*', 'd', d), 3)
  redis.call('PUBLISH', ARGV[a], n .. ' 0 ' .. d)
  out[2 * i - 1] = tonumber(n)
  out[2 * i] = id
end
return out
