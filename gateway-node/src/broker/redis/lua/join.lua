-- KEYS: meta members users ujson order log presence hist
-- ARGV: sid uid user_json threshold topic channel_json retain want_snapshot
--       history_limit presence_expiry_ms
local n = head(KEYS[6])
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then
    local ord = redis.call('HINCRBY', KEYS[1], 'ord', 1)
    redis.call('ZADD', KEYS[5], ord, ARGV[2])
    redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  end
  if redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[4]) then
    local d = 'ROOM_USER_ADD {"channel":' .. ARGV[6] .. ',"user":' .. ARGV[3] .. ',"session_id":' .. ARGV[1] .. '}'
    n = emit(KEYS[6], ARGV[5], d, ARGV[7])
  end
end
redis.call('ZADD', KEYS[7], ARGV[10], ARGV[1])
local out = {n, redis.call('HLEN', KEYS[3]), redis.call('HGET', KEYS[1], 'gen') or '0'}
if ARGV[8] == '1' then
  local ids = redis.call('ZRANGE', KEYS[5], 0, 99)
  local users = {}
  if #ids > 0 then users = redis.call('HMGET', KEYS[4], unpack(ids)) end
  table.insert(out, #users)
  for _, u in ipairs(users) do table.insert(out, u or '{}') end
  -- The last 50 messages, oldest first.
  local recent = {}
  history(KEYS[1], KEYS[6], KEYS[8], tonumber(ARGV[9]), function(_, d)
    table.insert(recent, string.sub(d, 16))
    return #recent >= 50
  end)
  for i = #recent, 1, -1 do table.insert(out, recent[i]) end
end
return out
