-- KEYS: order ujson users
-- ARGV: min limit
-- A page of the channel's members (distinct users), in the order they
-- entered, from join position `min` (a ZRANGE BYSCORE bound: '-inf' or
-- '(N'). Returns {member_count, then per member: position, user JSON,
-- sessions} (an empty JSON for a user leaving meanwhile).
local page = redis.call('ZRANGE', KEYS[1], ARGV[1], '+inf', 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[2]), 'WITHSCORES')
local out = {redis.call('ZCARD', KEYS[1])}
for i = 1, #page, 2 do
  local uid = page[i]
  table.insert(out, page[i + 1])
  table.insert(out, redis.call('HGET', KEYS[2], uid) or '')
  table.insert(out, redis.call('HGET', KEYS[3], uid) or '0')
end
return out
