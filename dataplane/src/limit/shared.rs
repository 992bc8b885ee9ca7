//! The Redis backend (`rate_limit.backend: redis`): RPM/TPM windows and bans shared by every
//! replica of a pool, so N replicas admit exactly what one would.
//!
//! Each decision is one Lua script, which Redis runs atomically, with Redis's own clock (the
//! replicas' clocks need not agree):
//! - [`ADMIT`] walks the candidates of one request in selection order and admits the first
//!   that is neither banned nor at a limit — one round trip per request, however many
//!   credentials are full;
//! - [`CHARGE`] adds the tokens a provider reported;
//! - [`OUTCOME`] counts fail2ban strikes and sets the ban. A success is sent only when
//!   [`ADMIT`] saw strikes on the pair it admitted (there is nothing else for it to reset), so
//!   a request on a healthy credential costs two calls: the admission and the token charge.
//!
//! Windows are exact like the local ones: a sorted set of events scored by time (TPM events
//! carry their token count, with a running sum beside the set). Every key starts with the hash
//! tag `{key_prefix}`, so all keys of a pool hash to one slot: with `rate_limit.cluster` the
//! client learns a Redis Cluster's nodes from `redis_url` and sends every script to the node
//! that owns that slot (following `MOVED` when slots move).
//!
//! The in-process [`CredState`](super::CredState) keeps mirroring what this replica admits,
//! charges and sees banned, for `/health`, `/admin/state` and metrics — and it is what
//! enforcement falls back on when Redis does not answer within `rate_limit.timeout`: each
//! replica then enforces `limit / replicas` ([`LocalLimits::share_of`], never the whole
//! limit), and Redis is tried again after [`RETRY_AFTER_FAILURE`].

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use redis::{
    aio::ConnectionManager,
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
    Script,
};
use tracing::{info, warn};

use super::{
    fail2ban::{Ban, Outcome, Policy},
    Admission, LocalLimits, SlotLimits, WINDOW,
};
use crate::config::{Limit, RateLimitConfig};

/// After Redis fails, requests use the local share for this long before Redis is tried again
/// (so an outage does not add `rate_limit.timeout` to every request).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);
/// Strikes without a ban are forgotten after this long without a new one.
const STRIKES_TTL: Duration = Duration::from_secs(24 * 3600);

/// What [`OUTCOME`] does with an answer: reset the strikes, count one, or nothing.
const OUTCOME_SUCCESS: i64 = 0;
const OUTCOME_COUNTED: i64 = 1;
const OUTCOME_NOT_COUNTED: i64 = 2;

/// Whether `url` is a Redis URL this client can use (`cluster`: as a Redis Cluster node).
/// Says nothing more: the URL may hold a password, so neither it nor the parser's message
/// about it is echoed.
pub fn is_redis_url(url: &str, cluster: bool) -> bool {
    Endpoint::open(url, cluster).is_ok()
}

/// Where the scripts go: one server, or a Redis Cluster.
#[allow(clippy::large_enum_variant, reason = "one per backend, built once")]
enum Endpoint {
    Server(redis::Client),
    Cluster(ClusterClient),
}

impl Endpoint {
    fn open(url: &str, cluster: bool) -> redis::RedisResult<Endpoint> {
        if cluster {
            ClusterClient::new([url]).map(Endpoint::Cluster)
        } else {
            redis::Client::open(url).map(Endpoint::Server)
        }
    }
}

/// A connection to an [`Endpoint`]; both kinds connect lazily and reconnect by themselves.
#[derive(Clone)]
enum Connection {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

/// One candidate of a request, as [`ADMIT`] sees it.
pub struct Candidate<'a> {
    pub credential: &'a str,
    /// [`crate::runtime::ban_scope`]: bans and strikes are kept per key, windows per name.
    pub ban_scope: &'a str,
    pub limits: SlotLimits,
}

/// What [`SharedLimits::admit`] decided for the candidates, in order: the index of the one
/// admitted (if any) and the verdict on each one passed over before it.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdicts {
    pub admitted: Option<usize>,
    /// The admitted pair has fail2ban strikes, which a success must reset.
    pub strikes: bool,
    pub refused: Vec<Refusal>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Banned { code: u16, until: Option<Instant> },
    Limited { frees_at: Option<Instant> },
}

impl Refusal {
    pub fn admission(&self) -> Admission {
        match *self {
            Refusal::Banned { until, .. } => Admission::Banned { until },
            Refusal::Limited { frees_at } => Admission::Limited { frees_at },
        }
    }
}

pub struct SharedLimits {
    settings: RateLimitConfig,
    endpoint: Endpoint,
    conn: OnceLock<Connection>,
    /// `{key_prefix}`: the hash tag every key starts with.
    tag: String,
    /// Until when Redis is skipped after a failure.
    down_until: Mutex<Option<Instant>>,
    up: AtomicBool,
    errors: AtomicU64,
    admit: Script,
    charge: Script,
    outcome: Script,
}

impl std::fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimits")
            .field("key_prefix", &self.settings.key_prefix)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SharedLimits {
    /// A backend for validated settings (`None` only without a usable `redis_url`, which the
    /// config parser refuses); it connects on first use, so a router whose Redis is down still
    /// starts (and enforces its local share until Redis answers).
    pub fn new(settings: &RateLimitConfig) -> Option<Arc<SharedLimits>> {
        let url = settings.redis_url.as_ref()?;
        let endpoint = Endpoint::open(url.expose(), settings.cluster).ok()?;
        Some(Arc::new(SharedLimits {
            settings: settings.clone(),
            endpoint,
            conn: OnceLock::new(),
            tag: format!("{{{}}}", settings.key_prefix),
            down_until: Mutex::new(None),
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
            admit: Script::new(ADMIT),
            charge: Script::new(CHARGE),
            outcome: Script::new(OUTCOME),
        }))
    }

    /// The settings this backend was built from (a reload with equal settings keeps it).
    pub fn settings(&self) -> &RateLimitConfig {
        &self.settings
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Calls that failed or timed out since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// The limits each replica enforces on its own while Redis is unreachable.
    pub fn fallback(&self) -> LocalLimits {
        LocalLimits::share_of(self.settings.replicas)
    }

    /// False while a recent failure says not to wait for Redis. When that pause ends, the
    /// first caller gets `true` and tries Redis while the others keep the local share for one
    /// more pause (unless its call succeeds first): a Redis that does not answer then costs
    /// `rate_limit.timeout` to one request a second, not to every request of that second.
    pub fn available(&self) -> bool {
        let mut down = self.down_until.lock();
        match *down {
            None => true,
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    return false;
                }
                *down = Some(now + RETRY_AFTER_FAILURE);
                true
            }
        }
    }

    fn connection(&self) -> Result<Connection, redis::RedisError> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let timeout = self.settings.timeout;
        let c = match &self.endpoint {
            Endpoint::Server(client) => {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(RETRY_AFTER_FAILURE);
                Connection::Server(ConnectionManager::new_lazy_with_config(
                    client.clone(),
                    config,
                )?)
            }
            Endpoint::Cluster(client) => {
                let config = ClusterConfig::new()
                    .set_connection_timeout(timeout)
                    .set_response_timeout(timeout);
                Connection::Cluster(client.get_pending_async_connection_with_config(config))
            }
        };
        Ok(self.conn.get_or_init(|| c).clone())
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        keys: &[String],
        args: &[i64],
    ) -> Result<T, String> {
        let call = async {
            let mut invocation = script.prepare_invoke();
            for k in keys {
                invocation.key(k);
            }
            for a in args {
                invocation.arg(*a);
            }
            match self.connection()? {
                Connection::Server(mut c) => invocation.invoke_async::<T>(&mut c).await,
                Connection::Cluster(mut c) => invocation.invoke_async::<T>(&mut c).await,
            }
        };
        let result = match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(describe(&e)),
            Err(_) => Err(format!(
                "no answer within rate_limit.timeout ({:?})",
                self.settings.timeout
            )),
        };
        match &result {
            Ok(_) => {
                if !self.up.swap(true, Ordering::Relaxed) {
                    info!("the Redis rate-limit backend answers again; limits are shared");
                }
                *self.down_until.lock() = None;
            }
            Err(why) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                *self.down_until.lock() = Some(Instant::now() + RETRY_AFTER_FAILURE);
                if self.up.swap(false, Ordering::Relaxed) {
                    warn!(
                        replicas = self.settings.replicas,
                        "the Redis rate-limit backend failed ({why}); each replica enforces limit / replicas locally until it answers"
                    );
                }
            }
        }
        result
    }

    fn cred_key(&self, credential: &str, what: &str) -> String {
        format!("{}:c:{}:{credential}:{what}", self.tag, credential.len())
    }

    fn pair_key(&self, credential: &str, model: &str, what: &str) -> String {
        format!(
            "{}:p:{}:{credential}:{model}:{what}",
            self.tag,
            credential.len()
        )
    }

    /// [`OUTCOME`]'s keys: the pair's ban and strikes, under the credential's ban scope.
    fn outcome_keys(&self, ban_scope: &str, model: &str) -> [String; 2] {
        [
            self.pair_key(ban_scope, model, "ban"),
            self.pair_key(ban_scope, model, "strikes"),
        ]
    }

    /// Admits the first candidate that is neither banned nor at a limit, recording one
    /// request on its windows; `Err` when Redis did not answer (the caller falls back).
    pub async fn admit(
        &self,
        model: &str,
        candidates: &[Candidate<'_>],
    ) -> Result<Verdicts, String> {
        let mut keys = Vec::with_capacity(1 + candidates.len() * 8);
        keys.push(format!("{}:seq", self.tag));
        let mut args = Vec::with_capacity(2 + candidates.len() * 4);
        args.push(WINDOW.as_millis() as i64);
        args.push(key_ttl_ms());
        for c in candidates {
            keys.push(self.cred_key(c.credential, "rpm"));
            keys.push(self.cred_key(c.credential, "tpm"));
            keys.push(self.cred_key(c.credential, "tpm:sum"));
            keys.push(self.pair_key(c.credential, model, "rpm"));
            keys.push(self.pair_key(c.credential, model, "tpm"));
            keys.push(self.pair_key(c.credential, model, "tpm:sum"));
            keys.extend(self.outcome_keys(c.ban_scope, model));
            for l in [
                c.limits.rpm,
                c.limits.tpm,
                c.limits.model_rpm,
                c.limits.model_tpm,
            ] {
                args.push(l.as_i64());
            }
        }
        let reply: Vec<i64> = self.run(&self.admit, &keys, &args).await?;
        parse_verdicts(&reply, candidates.len(), Instant::now())
    }

    /// Adds `tokens` to the credential's TPM window, and to the pair's when it has a limit.
    async fn charge_tokens(
        &self,
        credential: &str,
        model: &str,
        limits: SlotLimits,
        tokens: u64,
    ) -> Result<(), String> {
        let keys = [
            format!("{}:seq", self.tag),
            self.cred_key(credential, "tpm"),
            self.cred_key(credential, "tpm:sum"),
            self.pair_key(credential, model, "tpm"),
            self.pair_key(credential, model, "tpm:sum"),
        ];
        let pair = i64::from(limits.model_tpm != Limit::Unlimited);
        let args = [key_ttl_ms(), tokens.min(i64::MAX as u64) as i64, pair];
        self.run::<i64>(&self.charge, &keys, &args).await.map(drop)
    }

    /// [`SharedLimits::charge_tokens`] off the request path: the answer has already been
    /// counted locally, and a failure is logged by the backend.
    pub fn charge_in_background(
        self: &Arc<Self>,
        credential: Arc<str>,
        model: Arc<str>,
        limits: SlotLimits,
        tokens: u64,
    ) {
        // Tried even while admissions skip Redis after a failure: it costs no request any
        // time, and a charge left out would let every replica admit those tokens again.
        if tokens == 0 {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this
                .charge_tokens(&credential, &model, limits, tokens)
                .await;
        });
    }

    /// A success, off the request path: it resets the pair's strikes and can cause no ban,
    /// so the answer need not wait for Redis. `strikes`: [`Verdicts::strikes`] of the
    /// admission; without strikes there is nothing to reset and no call is made. (A strike
    /// another replica records while this request runs is then not reset by its success; the
    /// background call could as well land after a later strike, so replicas never ordered a
    /// success against their failures exactly.)
    pub fn record_success_in_background(
        self: &Arc<Self>,
        ban_scope: Arc<str>,
        model: Arc<str>,
        strikes: bool,
    ) {
        if !strikes || !self.available() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let keys = this.outcome_keys(&ban_scope, &model);
            let args = [200, OUTCOME_SUCCESS, 0, 0, 0];
            let _ = this.run::<i64>(&this.outcome, &keys, &args).await;
        });
    }

    /// Feeds one outcome to the shared fail2ban state; returns the ban it caused.
    pub async fn record_outcome(
        &self,
        ban_scope: &str,
        model: &str,
        outcome: Outcome,
        policy: &Policy,
    ) -> Result<Option<Ban>, String> {
        let keys = self.outcome_keys(ban_scope, model);
        let success = (200..300).contains(&outcome.status);
        let rule = policy.rule(outcome.status).filter(|_| outcome.counts);
        let (kind, threshold, duration_ms) = match rule {
            _ if success => (OUTCOME_SUCCESS, 0, 0),
            None => (OUTCOME_NOT_COUNTED, 0, 0),
            Some(rule) => {
                let length = rule.ban_length(outcome.retry_after);
                let ms = length.map_or(-1, |d| (d.as_millis() as i64).max(1));
                (OUTCOME_COUNTED, i64::from(rule.threshold), ms)
            }
        };
        let args = [
            i64::from(outcome.status),
            kind,
            threshold,
            duration_ms,
            STRIKES_TTL.as_millis() as i64,
        ];
        let started = Instant::now();
        let banned: i64 = self.run(&self.outcome, &keys, &args).await?;
        Ok((banned == 1).then(|| Ban {
            code: outcome.status,
            until: (duration_ms >= 0).then(|| started + Duration::from_millis(duration_ms as u64)),
        }))
    }
}

fn key_ttl_ms() -> i64 {
    (WINDOW + Duration::from_secs(1)).as_millis() as i64
}

fn describe(e: &redis::RedisError) -> String {
    // The error text of a connection failure names no URL or password; keep it that way by
    // using only what the error says about itself.
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connection_refusal() {
        "connection refused".into()
    } else {
        e.to_string()
    }
}

/// Reads [`ADMIT`]'s reply: the 1-based index admitted (0: none) and whether that pair has
/// strikes (1) or not (0), then three numbers per candidate passed over — kind (1 banned, 2
/// limited), milliseconds until it frees (-1: never for a ban, unknown for a window) and the
/// ban's status code.
fn parse_verdicts(reply: &[i64], candidates: usize, now: Instant) -> Result<Verdicts, String> {
    let bad = || format!("unexpected reply from the admission script: {reply:?}");
    let [first, strikes, rest @ ..] = reply else {
        return Err(bad());
    };
    let (first, strikes) = (*first, *strikes);
    if first < 0
        || first as usize > candidates
        || !(0..=1).contains(&strikes)
        || rest.len() % 3 != 0
    {
        return Err(bad());
    }
    let at = |ms: i64| (ms >= 0).then(|| now + Duration::from_millis(ms as u64));
    let refused = rest
        .chunks_exact(3)
        .map(|r| match r[0] {
            1 => Ok(Refusal::Banned {
                code: u16::try_from(r[2]).unwrap_or(0),
                until: at(r[1]),
            }),
            2 => Ok(Refusal::Limited { frees_at: at(r[1]) }),
            _ => Err(bad()),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Verdicts {
        admitted: (first > 0).then(|| first as usize - 1),
        strikes: strikes == 1,
        refused,
    })
}

/// KEYS: `seq`, then per candidate: credential rpm, tpm, tpm sum; pair rpm, tpm, tpm sum,
/// ban, strikes. ARGV: window ms, key TTL ms, then per candidate: rpm, tpm, model rpm, model
/// tpm (-1: unlimited). The credential's windows are always kept (a limit added by a reload then
/// sees the past minute); a pair's only when it has that limit.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local horizon = now - window

local function count(k)
  redis.call('ZREMRANGEBYSCORE', k, '-inf', horizon)
  return redis.call('ZCARD', k)
end

local function total(k, sumk)
  local old = redis.call('ZRANGEBYSCORE', k, '-inf', horizon)
  if #old > 0 then
    local gone = 0
    for _, m in ipairs(old) do
      gone = gone + tonumber(string.match(m, ':(%d+)$'))
    end
    redis.call('ZREMRANGEBYSCORE', k, '-inf', horizon)
    local left = redis.call('DECRBY', sumk, gone)
    if left <= 0 then
      redis.call('DEL', sumk)
      return 0
    end
    return left
  end
  return tonumber(redis.call('GET', sumk) or '0')
end

-- When a full count window frees a slot: its (n - limit + 1)-th oldest event expires.
local function count_frees(k, n, limit)
  local e = redis.call('ZRANGE', k, n - limit, n - limit, 'WITHSCORES')
  if #e < 2 then return -1 end
  return tonumber(e[2]) + window - now
end

-- When a full token window drops below its limit: walk the oldest events in growing pages
-- (the answer is usually among the first few; reading the whole set would make every refused
-- request cost O(window) while Redis runs nothing else).
local function total_frees(k, sum, limit)
  local left = sum
  local from, page = 0, 16
  while true do
    local e = redis.call('ZRANGE', k, from, from + page - 1, 'WITHSCORES')
    for i = 1, #e, 2 do
      left = left - tonumber(string.match(e[i], ':(%d+)$'))
      if left < limit then return tonumber(e[i + 1]) + window - now end
    end
    if #e < 2 * page then return -1 end
    from = from + page
    page = page * 2
  end
end

local out = {0, 0}
local n = (#KEYS - 1) / 8
for i = 0, n - 1 do
  local k = 1 + i * 8
  local a = 2 + i * 4
  local rpm, tpm = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local mrpm, mtpm = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local ban = KEYS[k + 7]
  local ban_ttl = redis.call('PTTL', ban)
  if ban_ttl ~= -2 then
    table.insert(out, 1)
    table.insert(out, ban_ttl)
    table.insert(out, tonumber(redis.call('GET', ban)) or 0)
  else
    local frees = -1
    local full = false
    local function full_at(f)
      full = true
      if f > frees then frees = f end
    end
    local c = count(KEYS[k + 1])
    if rpm >= 0 and c >= rpm then full_at(count_frees(KEYS[k + 1], c, rpm)) end
    local s = total(KEYS[k + 2], KEYS[k + 3])
    if tpm >= 0 and s >= tpm then full_at(total_frees(KEYS[k + 2], s, tpm)) end
    if mrpm >= 0 then
      local pc = count(KEYS[k + 4])
      if pc >= mrpm then full_at(count_frees(KEYS[k + 4], pc, mrpm)) end
    end
    if mtpm >= 0 then
      local ps = total(KEYS[k + 5], KEYS[k + 6])
      if ps >= mtpm then full_at(total_frees(KEYS[k + 5], ps, mtpm)) end
    end
    if full then
      table.insert(out, 2)
      table.insert(out, frees)
      table.insert(out, 0)
    else
      local id = now .. '-' .. redis.call('INCR', KEYS[1])
      redis.call('ZADD', KEYS[k + 1], now, id)
      redis.call('PEXPIRE', KEYS[k + 1], ttl)
      if mrpm >= 0 then
        redis.call('ZADD', KEYS[k + 4], now, id)
        redis.call('PEXPIRE', KEYS[k + 4], ttl)
      end
      out[1] = i + 1
      out[2] = redis.call('EXISTS', KEYS[k + 8])
      return out
    end
  end
end
return out
"#;

/// KEYS: `seq`, credential tpm, tpm sum, pair tpm, tpm sum. ARGV: key TTL ms, tokens, 1 when
/// the pair keeps a TPM window.
const CHARGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local id = now .. '-' .. redis.call('INCR', KEYS[1]) .. ':' .. ARGV[2]
local last = 3
if ARGV[3] == '1' then last = 5 end
for k = 2, last, 2 do
  redis.call('ZADD', KEYS[k], now, id)
  redis.call('INCRBY', KEYS[k + 1], ARGV[2])
  redis.call('PEXPIRE', KEYS[k], ttl)
  redis.call('PEXPIRE', KEYS[k + 1], ttl)
end
return 1
"#;

/// KEYS: ban, strikes. ARGV: status, kind (0 success, 1 counted failure, 2 not counted),
/// threshold, ban ms (-1: permanent), strikes TTL ms. Returns 1 when this outcome banned the
/// pair. The same rules as [`super::fail2ban::PairBans::record`].
const OUTCOME: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local kind = tonumber(ARGV[2])
if kind == 0 then
  redis.call('DEL', KEYS[2])
  return 0
end
if kind == 2 then return 0 end
local n = redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if n < tonumber(ARGV[3]) then return 0 end
local ms = tonumber(ARGV[4])
if ms < 0 then
  redis.call('SET', KEYS[1], ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ms)
end
redis.call('DEL', KEYS[2])
return 1
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_pause_one_caller_tries_redis_again_and_the_rest_wait() {
        let settings = RateLimitConfig {
            backend: crate::config::RateLimitBackend::Redis,
            redis_url: Some(crate::secret::Secret::new("redis://127.0.0.1:1")),
            ..RateLimitConfig::default()
        };
        let shared = SharedLimits::new(&settings).unwrap();
        assert!(shared.available());
        *shared.down_until.lock() = Some(Instant::now() + RETRY_AFTER_FAILURE);
        assert!(!shared.available(), "paused after a failure");
        *shared.down_until.lock() = Some(Instant::now());
        assert!(
            shared.available(),
            "the pause is over: one caller tries Redis"
        );
        assert!(
            !shared.available(),
            "the others keep the local share meanwhile"
        );
        assert!(!shared.available());
    }

    #[test]
    fn verdicts_read_every_refusal_in_order() {
        let now = Instant::now();
        let v = parse_verdicts(&[3, 1, 1, -1, 401, 2, 1500, 0], 3, now).unwrap();
        assert_eq!(v.admitted, Some(2));
        assert!(v.strikes);
        assert_eq!(
            v.refused,
            vec![
                Refusal::Banned {
                    code: 401,
                    until: None
                },
                Refusal::Limited {
                    frees_at: Some(now + Duration::from_millis(1500))
                },
            ]
        );
        let none = parse_verdicts(&[0, 0, 2, -1, 0], 1, now).unwrap();
        assert_eq!(none.admitted, None);
        assert!(!none.strikes);
        assert!(parse_verdicts(&[], 1, now).is_err());
        assert!(parse_verdicts(&[1], 1, now).is_err(), "no strikes flag");
        assert!(
            parse_verdicts(&[2, 0], 1, now).is_err(),
            "index past the list"
        );
        assert!(
            parse_verdicts(&[1, 2], 1, now).is_err(),
            "strikes not 0 or 1"
        );
        assert!(
            parse_verdicts(&[0, 0, 9, 0, 0], 1, now).is_err(),
            "unknown kind"
        );
    }

    #[test]
    fn redis_urls() {
        assert!(is_redis_url("redis://:hunter2@127.0.0.1:6379/0", false));
        assert!(is_redis_url("rediss://cache.example:6380", false));
        assert!(is_redis_url("unix:///run/redis.sock", false));
        assert!(!is_redis_url("http://:hunter2@host", false));
        assert!(!is_redis_url("cache:6379", false));
        assert!(is_redis_url("redis://:hunter2@10.0.0.7:7000", true));
        assert!(is_redis_url("rediss://cluster.example:6380", true));
        assert!(
            !is_redis_url("unix:///run/redis.sock", true),
            "a cluster node is on TCP"
        );
    }
}
