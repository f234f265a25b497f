-- KEYS: meta log
-- ARGV: position entry gen topic
-- A node checks, after its subscription was lost (a reconnect, a failover),
-- that the log still holds what it delivered: the counter is not behind
-- `position`, and the entry at `position` is the one it delivered (`entry`,
-- when it still holds it). A promoted replica can lack the last events of
-- its master, and would give their numbers to new events. Then the log
-- starts a new generation, and every node ends the sessions of the channel
-- (their clients resume to `resumed: false`): a loss is never silent.
-- A generation behind the node's is a reset the log lost (a failover after
-- it): as lost as the rest, and the new one goes past both.
-- Returns {status, gen, n}: 'ok', or 'reset' with the generation to follow.
local n = head(KEYS[2])
local gen = redis.call('HGET', KEYS[1], 'gen') or '0'
local behind = tonumber(gen) < tonumber(ARGV[3])
if gen ~= ARGV[3] and not behind then return {'reset', gen, n} end
local pos = tonumber(ARGV[1])
local lost = behind or n < pos
if not lost and ARGV[2] ~= '' then
  local at = redis.call('XRANGE', KEYS[2], '0-' .. pos, '0-' .. pos)
  lost = at[1] ~= nil and at[1][2][2] ~= ARGV[2]
end
if not lost then return {'ok', gen, n} end
gen = tostring(math.max(tonumber(gen), tonumber(ARGV[3])) + 1)
redis.call('HSET', KEYS[1], 'gen', gen)
-- New events are numbered past anything a node may have delivered.
if n < pos then
  n = pos
  if redis.call('EXISTS', KEYS[2]) == 0 then
    -- XSETID needs the stream: make it, empty, with its last id at `pos`.
    redis.call('XADD', KEYS[2], '0-' .. pos, 'd', '')
    redis.call('XDEL', KEYS[2], '0-' .. pos)
  end
  redis.call('XSETID', KEYS[2], '0-' .. pos)
end
redis.call('PUBLISH', ARGV[4], 'reset ' .. gen .. ' ' .. n)
return {'reset', gen, n}
