"""The Lua the Redis limiter runs: one script per admission, one per settlement.

Per scope the caller passes six keys, all in the tenant's hash slot (``{tenant_id}``):
``w`` (zset: admission id -> admitted at, ms), ``wt`` (hash: id -> tokens counted in the
minute window), ``f`` (zset: id -> lease expiry, ms: requests in flight), ``fr`` (hash:
``id|t`` / ``id|s`` -> reserved tokens / spend), ``sum`` (hash: ``wt`` window tokens,
``rt`` reserved tokens, ``rs`` reserved spend) and ``m`` (hash of the month: ``t`` tokens,
``s`` spend, settled). Time is Redis's own clock, so replicas agree on the window.

``InProcessLimiter`` implements the same steps in Python; keep the two in step.
"""

from __future__ import annotations

_COMMON = """
local W = 60000
local function int(x) return string.format('%d', x) end
local function num(x) return tonumber(x or '0') or 0 end
local function scope_keys(i)
  local b = (i - 1) * 6
  return {w = KEYS[b + 1], wt = KEYS[b + 2], f = KEYS[b + 3], fr = KEYS[b + 4],
          sum = KEYS[b + 5], m = KEYS[b + 6]}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

ADMIT_LUA = (
    _COMMON
    + """
-- ARGV: id, reserve tokens, reserve spend, lease ms, ms to next month, n scopes,
--       then per scope: rpm, tpm, concurrency, month tokens, month spend (-1 = none)
local rid, reserve, spend = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, month_ms, n = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl = math.max(W, lease) + 1000
local function lim(i, j)
  local v = tonumber(ARGV[6 + (i - 1) * 5 + j])
  if v < 0 then return nil end
  return v
end

local function prune(k)
  local cutoff = now - W
  local old = redis.call('ZRANGEBYSCORE', k.w, '-inf', cutoff)
  if #old > 0 then
    local freed = 0
    for _, id in ipairs(old) do
      freed = freed + num(redis.call('HGET', k.wt, id))
      redis.call('HDEL', k.wt, id)
    end
    redis.call('ZREMRANGEBYSCORE', k.w, '-inf', cutoff)
    redis.call('HINCRBY', k.sum, 'wt', int(-freed))
  end
  local gone = redis.call('ZRANGEBYSCORE', k.f, '-inf', now)
  if #gone > 0 then
    local rt, rs = 0, 0
    for _, id in ipairs(gone) do
      rt = rt + num(redis.call('HGET', k.fr, id .. '|t'))
      rs = rs + num(redis.call('HGET', k.fr, id .. '|s'))
      redis.call('HDEL', k.fr, id .. '|t', id .. '|s')
    end
    redis.call('ZREMRANGEBYSCORE', k.f, '-inf', now)
    redis.call('HINCRBY', k.sum, 'rt', int(-rt))
    redis.call('HINCRBY', k.sum, 'rs', int(-rs))
  end
end

local function oldest_reset(k)
  local o = redis.call('ZRANGE', k.w, 0, 0, 'WITHSCORES')
  if #o == 0 then return 0 end
  return tonumber(o[2]) + W - now
end

local viol = {}
local function add(i, kind, limit, retry)
  for _, v in ipairs({i, kind, limit, retry}) do viol[#viol + 1] = v end
end

local keys = {}
for i = 1, n do
  local k = scope_keys(i)
  keys[i] = k
  prune(k)
  local rpm, tpm, conc, mtok, mspend = lim(i, 1), lim(i, 2), lim(i, 3), lim(i, 4), lim(i, 5)
  local sums = redis.call('HMGET', k.sum, 'wt', 'rt', 'rs')
  local wt, rt, rs = num(sums[1]), num(sums[2]), num(sums[3])
  if rpm and redis.call('ZCARD', k.w) + 1 > rpm then
    local retry = W
    if redis.call('ZCARD', k.w) > 0 then retry = oldest_reset(k) end
    add(i, 1, rpm, retry)
  end
  if tpm then
    if reserve > tpm then
      add(i, 6, tpm, W)
    elseif wt + reserve > tpm then
      local entries = redis.call('ZRANGE', k.w, 0, -1, 'WITHSCORES')
      local freed, retry = 0, W
      for j = 1, #entries, 2 do
        freed = freed + num(redis.call('HGET', k.wt, entries[j]))
        if wt - freed + reserve <= tpm then
          retry = tonumber(entries[j + 1]) + W - now
          break
        end
      end
      add(i, 2, tpm, retry)
    end
  end
  if conc and redis.call('ZCARD', k.f) + 1 > conc then add(i, 3, conc, 1000) end
  if mtok or mspend then
    local m = redis.call('HMGET', k.m, 't', 's')
    if mtok and num(m[1]) + rt + reserve > mtok then add(i, 4, mtok, month_ms) end
    if mspend and num(m[2]) + rs + spend > mspend then add(i, 5, mspend, month_ms) end
  end
end

if #viol == 0 then
  for i = 1, n do
    local k = keys[i]
    if lim(i, 1) or lim(i, 2) then
      redis.call('ZADD', k.w, now, rid)
      redis.call('HSET', k.wt, rid, int(reserve))
      redis.call('HINCRBY', k.sum, 'wt', int(reserve))
    end
    redis.call('ZADD', k.f, now + lease, rid)
    redis.call('HSET', k.fr, rid .. '|t', int(reserve), rid .. '|s', int(spend))
    redis.call('HINCRBY', k.sum, 'rt', int(reserve))
    redis.call('HINCRBY', k.sum, 'rs', int(spend))
    for _, key in ipairs({k.w, k.wt, k.f, k.fr, k.sum}) do redis.call('PEXPIRE', key, ttl) end
  end
end

-- Reply: admitted, number of violations, violations (scope, kind, limit, retry ms),
-- then per scope: rpm, requests in window, tpm, tokens in window, reset ms (-1 = none).
local out = {#viol == 0 and 1 or 0, #viol / 4}
for _, v in ipairs(viol) do out[#out + 1] = v end
for i = 1, n do
  local k = keys[i]
  local wt = num(redis.call('HGET', k.sum, 'wt'))
  for _, v in ipairs({lim(i, 1) or -1, redis.call('ZCARD', k.w), lim(i, 2) or -1, wt,
                      oldest_reset(k)}) do
    out[#out + 1] = v
  end
end
return out
"""
)

SETTLE_LUA = (
    _COMMON
    + """
-- ARGV: id, used tokens, spend, n scopes, month key ttl ms
local rid, used, spend = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local n, month_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
for i = 1, n do
  local k = scope_keys(i)
  local rt = redis.call('HGET', k.fr, rid .. '|t')
  if rt then
    local rs = num(redis.call('HGET', k.fr, rid .. '|s'))
    redis.call('HDEL', k.fr, rid .. '|t', rid .. '|s')
    redis.call('HINCRBY', k.sum, 'rt', int(-tonumber(rt)))
    redis.call('HINCRBY', k.sum, 'rs', int(-rs))
  end
  redis.call('ZREM', k.f, rid)
  local old = redis.call('HGET', k.wt, rid)
  if old then
    redis.call('HSET', k.wt, rid, int(used))
    redis.call('HINCRBY', k.sum, 'wt', int(used - tonumber(old)))
  end
  redis.call('HINCRBY', k.m, 't', int(used))
  redis.call('HINCRBY', k.m, 's', int(spend))
  redis.call('PEXPIRE', k.m, month_ttl)
end
return 1
"""
)

SYNC_MONTH_LUA = """
-- KEYS: month hashes (one tenant's scopes); ARGV: ttl ms, then per key: tokens, spend.
-- Raises each counter to at least the given value; never lowers one.
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  local t, s = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local cur = redis.call('HMGET', KEYS[i], 't', 's')
  if t > tonumber(cur[1] or '0') then redis.call('HSET', KEYS[i], 't', string.format('%d', t)) end
  if s > tonumber(cur[2] or '0') then redis.call('HSET', KEYS[i], 's', string.format('%d', s)) end
  redis.call('PEXPIRE', KEYS[i], ttl)
end
return #KEYS
"""
