-- KEYS: meta log
-- Returns {n, gen}: where the log is, and its generation.
return {head(KEYS[2]), redis.call('HGET', KEYS[1], 'gen') or '0'}
