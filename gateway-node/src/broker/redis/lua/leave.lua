-- KEYS: meta members users ujson order log presence hist
-- ARGV: threshold topic channel_json retain, then the ids of the sessions
-- that leave (one or more, a self-clocked batch)
-- Each session leaves the channel: its presence entry goes, and if it
-- was a member, ROOM_USER_REMOVE is logged (in channels up to the
-- threshold) and its user is dropped once no session of theirs is left.
-- Returns how many of them were members.
local left = 0
for i = 5, #ARGV do
  local sid = ARGV[i]
  redis.call('ZREM', KEYS[7], sid)
  local uid = redis.call('HGET', KEYS[2], sid)
  if uid then
    left = left + 1
    redis.call('HDEL', KEYS[2], sid)
    local ujson = redis.call('HGET', KEYS[4], uid) or '{}'
    if redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[1]) then
      local d = 'ROOM_USER_REMOVE {"channel":' .. ARGV[3] .. ',"user":' .. ujson .. ',"session_id":' .. sid .. '}'
      emit(KEYS[6], ARGV[2], d, ARGV[4])
    end
    if redis.call('HINCRBY', KEYS[3], uid, -1) <= 0 then
      redis.call('HDEL', KEYS[3], uid)
      redis.call('ZREM', KEYS[5], uid)
      redis.call('HDEL', KEYS[4], uid)
    end
  end
end
return left
