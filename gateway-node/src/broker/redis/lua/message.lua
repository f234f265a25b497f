-- KEYS: meta log
-- ARGV: topic rest retain ms(13 digits) suffix(6 digits)
-- The message's one stored copy is its log entry: history reads the log.
-- The id is ms .. suffix; if it is not above the channel's last id (another
-- node's clock is ahead), its millisecond part moves just past the last one.
-- Four calls, not `emit`: the counter and the last id share one read and
-- one write of the meta hash.
local meta = redis.call('HMGET', KEYS[1], 'n', 'lastid')
local n = tonumber(meta[1] or '0') + 1
local id = ARGV[4] .. ARGV[5]
local last = meta[2] or ''
if #id == #last and id <= last then
  id = string.format('%013d', tonumber(string.sub(last, 1, 13)) + 1) .. ARGV[5]
end
redis.call('HSET', KEYS[1], 'n', n, 'lastid', id)
local d = 'MESSAGE_CREATE {"id":"' .. id .. '"' .. ARGV[2]
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-' .. n, 'd', d)
redis.call('PUBLISH', ARGV[1], n .. ' 0 ' .. d)
return {n, id}
