-- KEYS: channels global_log
-- ARGV: name meta_json max body retain topic
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return emit(KEYS[2], ARGV[6], 'CHANNEL_ADD ' .. ARGV[4], ARGV[5])
