//! `Runtime`: a config compiled for the request path — credentials with their precomputed
//! upstream auth headers, one route (primary and fallback slots) per model, aliases, real
//! names and the fail2ban policy. Built whole, off the request path, and swapped in at once
//! (see [`crate::store`]); limiter/ban state and round-robin cursors are looked up in the
//! [`Registry`] by credential name and model, so they survive a reload.
//!
//! Pure apart from the registry lookups.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;
use parking_lot::{Mutex, RwLock};

use crate::{
    config::{
        CredentialType, HttpVersion, Limit, MockConfig, RateLimitBackend, RateLimitConfig,
        RouterConfig,
    },
    limit::{fail2ban::Policy, shared::SharedLimits, CredState, SlotLimits},
    secret::Secret,
    FastMap,
};

/// `rpm` and `tpm` of a `models[]` entry, as written (`None`: not set).
type PairLimits = (Option<Limit>, Option<Limit>);

/// Which group of credentials a slot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Primary = 0,
    Fallback = 1,
}

/// A credential ready for the request path.
#[derive(Debug)]
pub struct Credential {
    pub name: Arc<str>,
    pub kind: CredentialType,
    pub is_fallback: bool,
    pub rpm: Limit,
    pub tpm: Limit,
    /// Without trailing `/` and `/v1`.
    pub base_url: String,
    /// `Authorization: Bearer <api_key>`, marked sensitive; `None` when there is no key (a
    /// proxy without `api_key` sends no Authorization header at all).
    pub authorization: Option<HeaderValue>,
    pub mock: Option<MockConfig>,
    pub state: Arc<CredState>,
    /// What its fail2ban bans and strikes are kept under in Redis: see [`ban_scope`].
    pub ban_scope: Arc<str>,
    /// `base_url` split for assembling request URIs (`None`: assembled from the string).
    pub base: Option<crate::upstream::BaseUrl>,
    pub http_version: HttpVersion,
}

impl Credential {
    pub fn tier(&self) -> Tier {
        if self.is_fallback {
            Tier::Fallback
        } else {
            Tier::Primary
        }
    }
}

/// One credential serving one model, with the pair's own limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub cred: usize,
    pub model_rpm: Limit,
    pub model_tpm: Limit,
}

/// The credentials that serve a model, in config order, per tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Route {
    pub tiers: [Vec<Slot>; 2],
}

impl Route {
    pub fn is_empty(&self) -> bool {
        self.tiers.iter().all(Vec::is_empty)
    }
}

/// Round-robin positions of one model, per tier.
#[derive(Debug, Default)]
pub struct Cursor {
    next: [AtomicUsize; 2],
}

impl Cursor {
    pub fn start(&self, tier: Tier) -> usize {
        self.next[tier as usize].load(Ordering::Relaxed)
    }

    pub fn advance_past(&self, tier: Tier, position: usize) {
        self.next[tier as usize].store(position + 1, Ordering::Relaxed);
    }
}

/// Past this many distinct model names, new names share one cursor (bounded memory when
/// clients send made-up names and no `models[]` filter is configured).
const MAX_CURSORS: usize = 4096;

/// State that outlives a config: per-credential windows and bans, per-model cursors.
#[derive(Debug, Default)]
pub struct Registry {
    creds: Mutex<HashMap<String, Arc<CredState>>>,
    cursors: RwLock<FastMap<Arc<str>, Arc<Cursor>>>,
    overflow: Arc<Cursor>,
    /// The Redis backend, kept across reloads that leave `rate_limit` unchanged (so its
    /// connection and failure state carry over).
    shared: Mutex<Option<Arc<SharedLimits>>>,
}

impl Registry {
    fn cred_state(&self, name: &str) -> Arc<CredState> {
        self.creds
            .lock()
            .entry(name.to_owned())
            .or_default()
            .clone()
    }

    fn shared_limits(&self, settings: &RateLimitConfig) -> Option<Arc<SharedLimits>> {
        let mut shared = self.shared.lock();
        if settings.backend == RateLimitBackend::Local {
            *shared = None;
            return None;
        }
        if shared.as_ref().is_none_or(|s| s.settings() != settings) {
            *shared = SharedLimits::new(settings);
        }
        shared.clone()
    }

    /// Forgets credentials a new config no longer has.
    pub fn retain_credentials(&self, runtime: &Runtime) {
        self.creds
            .lock()
            .retain(|name, _| runtime.by_name.contains_key(name.as_str()));
    }

    pub fn cursor(&self, model: &str) -> Arc<Cursor> {
        if let Some(c) = self.cursors.read().get(model) {
            return c.clone();
        }
        let mut cursors = self.cursors.write();
        if cursors.len() >= MAX_CURSORS && !cursors.contains_key(model) {
            return self.overflow.clone();
        }
        cursors.entry(Arc::from(model)).or_default().clone()
    }
}

/// Where a model id leads.
#[derive(Debug)]
pub enum Lookup<'r> {
    Route(&'r Route),
    /// No credential of a supported type serves the model; `unsupported` names credentials
    /// that would, were their type supported.
    NotServed {
        unsupported: Vec<&'r str>,
    },
}

#[derive(Debug)]
pub struct Runtime {
    pub config: RouterConfig,
    pub credentials: Vec<Credential>,
    by_name: HashMap<String, usize>,
    routes: FastMap<String, Route>,
    /// For model ids no `models[]` entry names.
    open_route: Route,
    unsupported_routes: HashMap<String, Vec<usize>>,
    real_names: FastMap<String, String>,
    /// Distinct `models[].name` in config order: the `/v1/models` list.
    pub model_ids: Vec<String>,
    pub policy: Policy,
    pub master_key: Secret,
    pub loaded_at_unix: u64,
    /// [`RouterConfig::hash`] of `config`.
    pub hash: String,
    /// `rate_limit.backend: redis`: windows and bans shared with the other replicas.
    pub shared: Option<Arc<SharedLimits>>,
    registry: Arc<Registry>,
}

/// The credential's name and a fingerprint of what its bans were earned with — its type,
/// endpoint and key: a rotated key or a moved endpoint starts without the old bans and
/// strikes on every replica that has the new config, while a replica still on the old one
/// keeps refusing the old key. (The fingerprint is 64 bits of a SHA-256: it names the key
/// without revealing it.)
pub fn ban_scope(c: &crate::config::CredentialConfig) -> Arc<str> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [
        format!("{:?}", c.kind).as_str(),
        &c.base_url,
        c.api_key.as_ref().map_or("", |k| k.expose()),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    let digest = hash.finalize();
    let fingerprint: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Arc::from(format!("{}#{fingerprint}", c.name))
}

impl Runtime {
    /// Compiles a validated config. Credential state comes from `registry` by name.
    pub fn compile(config: RouterConfig, registry: Arc<Registry>) -> Runtime {
        let credentials: Vec<Credential> = config
            .credentials
            .iter()
            .map(|c| Credential {
                name: Arc::from(c.name.as_str()),
                kind: c.kind,
                is_fallback: c.is_fallback,
                rpm: c.rpm,
                tpm: c.tpm,
                base_url: c.base_url.clone(),
                authorization: c.api_key.as_ref().filter(|k| !k.is_empty()).and_then(|k| {
                    let mut v = HeaderValue::from_str(&format!("Bearer {}", k.expose())).ok()?;
                    v.set_sensitive(true);
                    Some(v)
                }),
                mock: c.mock.clone(),
                state: registry.cred_state(&c.name),
                ban_scope: ban_scope(c),
                base: crate::upstream::BaseUrl::parse(c.kind, &c.base_url),
                http_version: c.http_version,
            })
            .collect();
        let by_name: HashMap<String, usize> = credentials
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.to_string(), i))
            .collect();

        // Pair bindings: a global entry binds a model to every credential; an entry with
        // `credential` binds it to that one and sets the pair's limits (it wins over global).
        let mut model_ids: Vec<String> = Vec::new();
        let mut global: HashMap<&str, PairLimits> = HashMap::new();
        let mut specific: HashMap<(&str, usize), PairLimits> = HashMap::new();
        let mut real_names = FastMap::default();
        for m in &config.models {
            if !model_ids.contains(&m.name) {
                model_ids.push(m.name.clone());
            }
            if let Some(real) = &m.model {
                if real != &m.name {
                    real_names.insert(m.name.clone(), real.clone());
                }
            }
            match &m.credential {
                None => {
                    global.insert(&m.name, (m.rpm, m.tpm));
                }
                Some(c) => {
                    if let Some(&i) = by_name.get(c) {
                        specific.insert((&m.name, i), (m.rpm, m.tpm));
                    }
                }
            }
        }
        let default_rpm = config.server.default_models_rpm;
        let mut routes = FastMap::default();
        let mut unsupported_routes: HashMap<String, Vec<usize>> = HashMap::new();
        for model in &model_ids {
            let mut route = Route::default();
            for (i, cred) in credentials.iter().enumerate() {
                let Some(&(rpm, tpm)) = specific
                    .get(&(model.as_str(), i))
                    .or(global.get(model.as_str()))
                else {
                    continue;
                };
                if !cred.kind.is_supported() {
                    unsupported_routes.entry(model.clone()).or_default().push(i);
                    continue;
                }
                let tier = cred.tier();
                route.tiers[tier as usize].push(Slot {
                    cred: i,
                    model_rpm: rpm.unwrap_or(default_rpm),
                    model_tpm: tpm.unwrap_or(Limit::Unlimited),
                });
            }
            routes.insert(model.clone(), route);
        }
        // Unknown model ids go to every credential when no `models[]` filter exists, else
        // only to credentials that no entry binds (upstream §3.2c: e.g. a proxy whose models
        // are only known to the remote).
        let filtering = !config.models.is_empty();
        let has_global = !global.is_empty();
        let mut open_route = Route::default();
        for (i, cred) in credentials.iter().enumerate() {
            let bound = has_global || specific.keys().any(|&(_, c)| c == i);
            if (filtering && bound) || !cred.kind.is_supported() {
                continue;
            }
            let tier = cred.tier();
            open_route.tiers[tier as usize].push(Slot {
                cred: i,
                model_rpm: Limit::Unlimited,
                model_tpm: Limit::Unlimited,
            });
        }
        let policy = Policy::compile(config.fail2ban.as_ref());
        let master_key = config.server.master_key.clone();
        let hash = config.hash();
        Runtime {
            credentials,
            by_name,
            routes,
            open_route,
            unsupported_routes,
            real_names,
            model_ids,
            policy,
            master_key,
            loaded_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            hash,
            shared: registry.shared_limits(&config.rate_limit),
            registry,
            config,
        }
    }

    /// Whether `/health` and `/admin/state` count credential `i` as available: a supported
    /// type with room in its own windows that can still serve some model — any model when no
    /// `models[]` entry binds it, else one of its bound models that is not banned. A ban is per
    /// (credential, model): one cooled-down model must not make a router in front of this one
    /// skip it for every model (§12.9).
    pub fn is_available(&self, i: usize, usage: &crate::limit::CredUsage) -> bool {
        let cred = &self.credentials[i];
        if !cred.kind.is_supported() || usage.at_limit(cred.rpm, cred.tpm) {
            return false;
        }
        let serves_any = self.open_route.tiers.iter().flatten().any(|s| s.cred == i);
        let banned = |model: &str| {
            usage
                .pairs
                .iter()
                .any(|p| p.model == model && p.ban.is_some())
        };
        serves_any || self.pairs().any(|(model, s)| s.cred == i && !banned(model))
    }

    /// The route of a model id a `models[]` entry names, if it has any credential.
    pub fn static_route(&self, model_id: &str) -> Option<&Route> {
        self.routes.get(model_id).filter(|r| !r.is_empty())
    }

    pub fn credential(&self, name: &str) -> Option<&Credential> {
        self.by_name.get(name).map(|&i| &self.credentials[i])
    }

    /// A route for a model no `models[]` entry names but proxy remotes serve: the open route
    /// plus those proxies (pair limits: `default_models_rpm`).
    pub fn route_with_remotes(&self, remote_serving: &[String]) -> Option<Route> {
        let mut route = self.open_route.clone();
        for name in remote_serving {
            let Some(&i) = self.by_name.get(name.as_str()) else {
                continue;
            };
            let cred = &self.credentials[i];
            let tier = cred.tier();
            if route.tiers[tier as usize].iter().any(|s| s.cred == i) {
                continue;
            }
            route.tiers[tier as usize].push(Slot {
                cred: i,
                model_rpm: self.config.server.default_models_rpm,
                model_tpm: Limit::Unlimited,
            });
        }
        for tier in &mut route.tiers {
            tier.sort_by_key(|s| s.cred);
        }
        (!route.is_empty()).then_some(route)
    }

    /// The model id used for routing: the alias target if `model` is an alias (one lookup,
    /// no chains, as upstream).
    pub fn resolve_alias<'a>(&'a self, model: &'a str) -> &'a str {
        self.config
            .model_alias
            .get(model)
            .map(String::as_str)
            .unwrap_or(model)
    }

    /// The name sent upstream for a model id, if it differs.
    pub fn real_name(&self, model_id: &str) -> Option<&str> {
        self.real_names.get(model_id).map(String::as_str)
    }

    pub fn lookup(&self, model_id: &str) -> Lookup<'_> {
        let route = self.routes.get(model_id).unwrap_or(&self.open_route);
        if !route.is_empty() {
            return Lookup::Route(route);
        }
        let unsupported = match self.unsupported_routes.get(model_id) {
            Some(ids) => ids.iter().map(|&i| &*self.credentials[i].name).collect(),
            None if !self.routes.contains_key(model_id) => self
                .credentials
                .iter()
                .filter(|c| !c.kind.is_supported())
                .map(|c| &*c.name)
                .collect(),
            None => Vec::new(),
        };
        Lookup::NotServed { unsupported }
    }

    pub fn cursor(&self, model_id: &str) -> Arc<Cursor> {
        self.registry.cursor(model_id)
    }

    /// The limits that apply when `slot` serves a request.
    pub fn slot_limits(&self, slot: &Slot) -> SlotLimits {
        let cred = &self.credentials[slot.cred];
        SlotLimits {
            rpm: cred.rpm,
            tpm: cred.tpm,
            model_rpm: slot.model_rpm,
            model_tpm: slot.model_tpm,
        }
    }

    /// Every configured (credential, model) pair with its limits, for `/health`.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &Slot)> {
        self.routes.iter().flat_map(|(model, route)| {
            route
                .tiers
                .iter()
                .flatten()
                .map(move |slot| (model.as_str(), slot))
        })
    }

    /// Credentials whose type has no adapter yet: reported as a warning at load.
    pub fn unsupported_credentials(&self) -> impl Iterator<Item = &Credential> {
        self.credentials.iter().filter(|c| !c.kind.is_supported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(yaml: &str) -> Runtime {
        let config = RouterConfig::from_yaml(yaml, &|_| None).unwrap().config;
        Runtime::compile(config, Arc::default())
    }

    const CREDS: &str = "server: {master_key: k, default_models_rpm: 7}\ncredentials:\n\
        - {name: a, type: openai, api_key: x, base_url: 'http://h'}\n\
        - {name: b, type: openai, api_key: x, base_url: 'http://h'}\n\
        - {name: f, type: proxy, base_url: 'http://h', is_fallback: true}\n\
        - {name: g, type: gemini, api_key: x, base_url: 'http://h'}\n";

    #[test]
    fn a_credential_is_available_while_it_can_serve_some_model() {
        use std::time::Instant;

        use crate::limit::fail2ban::{Outcome, Policy};
        let ban = |rt: &Runtime, cred: usize, model: &str| {
            rt.credentials[cred].state.record_outcome(
                model,
                Outcome {
                    status: 429,
                    retry_after: None,
                    counts: true,
                },
                &Policy::compile(None),
                Instant::now(),
            );
        };
        let available = |rt: &Runtime, cred: usize| {
            rt.is_available(cred, &rt.credentials[cred].state.usage(Instant::now()))
        };
        // Bound by models[]: unavailable only once every bound model is banned.
        let rt = runtime(&format!(
            "{CREDS}models:\n- {{name: m1, credential: a}}\n- {{name: m2, credential: a}}\n- {{name: m1, credential: b}}\n"
        ));
        ban(&rt, 0, "m1");
        assert!(available(&rt, 0), "a still serves m2");
        ban(&rt, 0, "m2");
        assert!(!available(&rt, 0));
        assert!(!available(&rt, 3), "no adapter for gemini");
        // No models[] filter: a credential serves any model, so one ban never empties it.
        let rt = runtime(CREDS);
        ban(&rt, 1, "m1");
        assert!(available(&rt, 1));
    }

    #[test]
    fn routes_bind_global_and_specific_entries() {
        let rt = runtime(&format!(
            "{CREDS}models:\n- {{name: m, rpm: 50}}\n- {{name: m, credential: a, rpm: 2}}\n- {{name: only-b, credential: b}}\n"
        ));
        let Lookup::Route(r) = rt.lookup("m") else {
            panic!()
        };
        let primaries: Vec<_> = r.tiers[0].iter().map(|s| (s.cred, s.model_rpm)).collect();
        assert_eq!(
            primaries,
            vec![(0, Limit::PerMinute(2)), (1, Limit::PerMinute(50))]
        );
        assert_eq!(
            r.tiers[1].len(),
            1,
            "the proxy fallback is bound by the global entry"
        );
        let Lookup::Route(r) = rt.lookup("only-b") else {
            panic!()
        };
        assert_eq!(
            r.tiers[0],
            vec![Slot {
                cred: 1,
                model_rpm: Limit::PerMinute(7),
                model_tpm: Limit::Unlimited
            }]
        );
        assert!(matches!(rt.lookup("unknown"), Lookup::NotServed { .. }));
        assert_eq!(rt.model_ids, vec!["m", "only-b"]);
    }

    #[test]
    fn without_models_every_supported_credential_serves_everything() {
        let rt = runtime(CREDS);
        let Lookup::Route(r) = rt.lookup("anything") else {
            panic!()
        };
        assert_eq!(r.tiers[0].len(), 2);
        assert_eq!(r.tiers[1].len(), 1);
        assert_eq!(rt.unsupported_credentials().count(), 1);
    }

    #[test]
    fn state_survives_recompile_by_name() {
        let registry: Arc<Registry> = Arc::default();
        let config = RouterConfig::from_yaml(CREDS, &|_| None).unwrap().config;
        let one = Runtime::compile(config.clone(), registry.clone());
        let two = Runtime::compile(config, registry);
        assert!(Arc::ptr_eq(
            &one.credentials[0].state,
            &two.credentials[0].state
        ));
    }

    #[test]
    fn cursors_are_bounded() {
        let registry = Registry::default();
        for i in 0..(MAX_CURSORS + 10) {
            registry.cursor(&format!("made-up-{i}"));
        }
        assert_eq!(registry.cursors.read().len(), MAX_CURSORS);
        let a = registry.cursor("made-up-0");
        assert!(
            Arc::ptr_eq(&a, &registry.cursor("made-up-0")),
            "known models keep their cursor"
        );
        let late = registry.cursor("another-new-one");
        assert!(
            Arc::ptr_eq(&late, &registry.overflow),
            "new names share one cursor past the cap"
        );
    }
}
