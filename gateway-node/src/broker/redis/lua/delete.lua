-- KEYS: meta log hist
-- ARGV: topic id uid admin body retain history_limit
local result = history(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[7]), function(id, d)
  if id ~= ARGV[2] then return false end
  local msg = cjson.decode(string.sub(d, 16))
  if msg.author.id ~= ARGV[3] and ARGV[4] ~= '1' then return true, -2 end
  return true, emit(KEYS[2], ARGV[1], 'MESSAGE_DELETE ' .. ARGV[5], ARGV[6])
end)
return result or -1
