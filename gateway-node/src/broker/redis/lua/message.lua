-- KEYS: meta log
-- ARGV: topic rest retain ms(13 digits) suffix(6 digits)
-- The message's one stored copy is its log entry: history reads the log.
-- The id is ms .. suffix; if it is not above the channel's last id (another
-- node's clock is ahead), its millisecond part moves just past the last one.
-- Four calls, not `emit`, so that the id is written before the entry; the
-- entry id (`0-*`) is the message's `n`, so no number is read or written.
local id = ARGV[4] .. ARGV[5]
local last = redis.call('HGET', KEYS[1], 'lastid') or ''
if #id == #last and id <= last then
  id = string.format('%013d', tonumber(string.sub(last, 1, 13)) + 1) .. ARGV[5]
end
redis.call('HSET', KEYS[1], 'lastid', id)
local d = 'MESSAGE_CREATE {"id":"' .. id .. '"' .. ARGV[2]
local n = string.sub(redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '0-*', 'd', d), 3)
redis.call('PUBLISH', ARGV[1], n .. ' 0 ' .. d)
return {tonumber(n), id}
