-- KEYS: meta log hist
-- ARGV: topic id uid admin body retain
local prefix = ARGV[2] .. ' '
for _, e in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  if string.sub(e, 1, #prefix) == prefix then
    local msg = cjson.decode(string.sub(e, #prefix + 1))
    if msg.author.id ~= ARGV[3] and ARGV[4] ~= '1' then return -2 end
    redis.call('LREM', KEYS[3], 1, e)
    return emit(KEYS[1], KEYS[2], ARGV[1], 'MESSAGE_DELETE ' .. ARGV[5], ARGV[6])
  end
end
return -1
