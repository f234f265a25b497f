-- KEYS: meta members users ujson order log presence
-- ARGV: sid threshold topic channel_json retain
redis.call('ZREM', KEYS[7], ARGV[1])
local uid = redis.call('HGET', KEYS[2], ARGV[1])
if not uid then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local ujson = redis.call('HGET', KEYS[4], uid) or '{}'
if redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[2]) then
  local d = 'ROOM_USER_REMOVE {"channel":' .. ARGV[4] .. ',"user":' .. ujson .. ',"session_id":' .. ARGV[1] .. '}'
  emit(KEYS[6], ARGV[3], d, ARGV[5])
end
if redis.call('HINCRBY', KEYS[3], uid, -1) <= 0 then
  redis.call('HDEL', KEYS[3], uid)
  redis.call('ZREM', KEYS[5], uid)
  redis.call('HDEL', KEYS[4], uid)
end
return 1
