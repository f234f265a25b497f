-- KEYS: meta log hist
-- ARGV: topic rest retain ms(13 digits) suffix(6 digits) hist_retain
-- The id is ms .. suffix; if it is not above the channel's last id (another
-- node's clock is ahead), its millisecond part moves just past the last one.
local id = ARGV[4] .. ARGV[5]
local last = redis.call('HGET', KEYS[1], 'lastid') or ''
if #id == #last and id <= last then
  id = string.format('%013d', tonumber(string.sub(last, 1, 13)) + 1) .. ARGV[5]
end
redis.call('HSET', KEYS[1], 'lastid', id)
local body = '{"id":"' .. id .. '"' .. ARGV[2]
redis.call('RPUSH', KEYS[3], id .. ' ' .. body)
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
return {emit(KEYS[1], KEYS[2], ARGV[1], 'MESSAGE_CREATE ' .. body, ARGV[3]), id}
