-- KEYS: session buf   ARGV: node window_ms
if redis.call('HGET', KEYS[1], 'state') ~= 'parked' then return false end
redis.call('HSET', KEYS[1], 'state', 'live', 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local buf = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return buf
