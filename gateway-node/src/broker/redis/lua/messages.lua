-- KEYS: meta log hist
-- ARGV: history_limit before limit
-- A page of the channel's history, newest first: the MESSAGE_CREATE
-- bodies of messages with an id below `before` (every one, when empty),
-- at most limit + 1 (the extra one tells the caller an older page exists).
-- Ids are decimal strings: a shorter one is smaller.
local before, limit = ARGV[2], tonumber(ARGV[3])
local out = {}
history(KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1]), function(id, d)
  if before == '' or #id < #before or (#id == #before and id < before) then
    table.insert(out, string.sub(d, 16))
  end
  return #out > limit
end)
return out
