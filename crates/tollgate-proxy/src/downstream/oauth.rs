//! Tollgate as an OAuth 2.1 resource server (MCP authorization): bearer access
//! tokens of one issuer, for one resource, checked as OAuth 2.1 §5.2, RFC 8707 and
//! RFC 9068 ask, and the Protected Resource Metadata (RFC 9728) that tells clients
//! where to get one.
//!
//! A token's signature is checked against the issuer's JWKS, fetched (bounded in
//! time and size), cached, and fetched again when a token names an unknown `kid`,
//! at most once per [`MIN_REFRESH`] however many such tokens arrive. Only the
//! configured asymmetric algorithms are accepted: never `none`, never HMAC (a
//! resource server has no shared secret, and an HMAC "signed" with a public key
//! must not verify). The token itself is never logged nor forwarded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::http::HeaderValue;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde_json::{Map, Value, json};

use crate::config::{OAuthConfig, secure_url};
use crate::error::ProxyError;
use crate::pipeline::Identity;

/// The least time between two JWKS fetches prompted by unknown key ids.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);
/// How long fetched keys are used before they are fetched again.
const MAX_AGE: Duration = Duration::from_secs(600);
/// Largest metadata or JWKS document read.
const MAX_DOCUMENT: usize = 1 << 20;
/// Largest token looked at; real ones are a few KiB.
const MAX_TOKEN: usize = 16 * 1024;
/// Time for one fetch from the authorization server.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The resource server: validation settings and the issuer's keys.
pub struct OAuth {
    issuer: String,
    resource: String,
    /// `scheme://authority` of the resource, where the metadata is served.
    origin: String,
    scopes_supported: Vec<String>,
    required_scopes: Vec<String>,
    skew: Duration,
    algorithms: Vec<Algorithm>,
    keys: Keys,
}

/// Why a token was refused; said to the client in `error_description`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a JWT, or not one Tollgate can read.
    Malformed,
    /// Its `alg` is not in the allow-list (`none`, HMAC, …).
    Algorithm,
    /// No key of the issuer has its `kid` (even after fetching the keys again).
    UnknownKey,
    /// The signature does not verify.
    Signature,
    /// `exp` has passed.
    Expired,
    /// `nbf` is in the future.
    NotYetValid,
    /// `iss` is another issuer.
    Issuer,
    /// `aud` does not name this resource.
    Audience,
    /// A claim Tollgate needs (`exp`, `iss`, `aud`, `sub`) is missing.
    MissingClaim,
    /// `sub` is empty: every such token would share one identity (RFC 9068 §2.2).
    NoSubject,
}

impl Refusal {
    /// The description sent with `error="invalid_token"`.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::Malformed => "the access token is not a JWT this server can read",
            Refusal::Algorithm => "the access token's signing algorithm is not accepted",
            Refusal::UnknownKey => {
                "the access token is signed by a key the issuer does not publish"
            }
            Refusal::Signature => "the access token's signature does not verify",
            Refusal::Expired => "the access token has expired",
            Refusal::NotYetValid => "the access token is not valid yet (nbf)",
            Refusal::Issuer => "the access token is from another issuer",
            Refusal::Audience => "the access token is not for this resource (aud)",
            Refusal::MissingClaim => "the access token lacks a required claim (exp, iss, aud, sub)",
            Refusal::NoSubject => "the token has no subject",
        }
    }
}

/// One usable verification key.
struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, which the token's must then equal.
    alg: Option<String>,
    key: DecodingKey,
}

#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
    fetched: Option<Instant>,
}

/// The issuer's keys, fetched on demand.
struct Keys {
    http: reqwest::Client,
    issuer: String,
    configured_uri: Option<String>,
    current: ArcSwap<KeySet>,
    /// Serialises fetches; holds the discovered JWKS URI and the last attempt.
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    jwks_uri: Option<String>,
    /// The last fetch, whatever prompted it.
    last_attempt: Option<Instant>,
    /// The last fetch prompted by an unknown `kid`.
    last_forced: Option<Instant>,
    fetches: u64,
}

impl OAuth {
    /// The resource server of `config`.
    pub fn new(config: &OAuthConfig) -> Result<OAuth, String> {
        let algorithms = config
            .algorithms
            .iter()
            .map(|name| {
                name.parse::<Algorithm>()
                    .map_err(|_| format!("auth.oauth.algorithms: `{name}` is not an algorithm"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            // Metadata and keys come from where they are named, never from a redirect.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|err| format!("auth.oauth: cannot build an HTTP client: {err}"))?;
        Ok(OAuth {
            issuer: config.issuer.clone(),
            resource: config.resource.clone(),
            origin: origin_of(&config.resource),
            scopes_supported: config.scopes_supported.clone(),
            required_scopes: config.required_scopes.clone(),
            skew: config.clock_skew,
            algorithms,
            keys: Keys {
                http,
                issuer: config.issuer.clone(),
                configured_uri: config.jwks_uri.clone(),
                current: ArcSwap::from_pointee(KeySet::default()),
                fetch: tokio::sync::Mutex::new(FetchState::default()),
            },
        })
    }

    /// The metadata URL for a resource at `path` (RFC 9728 §3.1: the well-known
    /// prefix before the path); `""` for the root document.
    pub fn metadata_url(&self, path: &str) -> String {
        format!("{}/.well-known/oauth-protected-resource{path}", self.origin)
    }

    /// The Protected Resource Metadata document.
    pub fn metadata(&self) -> Value {
        let mut doc = json!({
            "resource": self.resource,
            "authorization_servers": [self.issuer],
            "bearer_methods_supported": ["header"],
            "resource_name": "Tollgate",
        });
        if !self.scopes_supported.is_empty() {
            doc["scopes_supported"] = json!(self.scopes_supported);
        }
        doc
    }

    /// `WWW-Authenticate` for a request to `path`: with `error` (and its
    /// description) when a token was refused, and the scopes the client should ask for.
    pub fn challenge(&self, path: &str, error: Option<(&str, &str)>, scope: &str) -> HeaderValue {
        let mut value = String::from("Bearer");
        let mut params = Vec::new();
        if let Some((error, description)) = error {
            params.push(format!("error=\"{error}\""));
            params.push(format!("error_description=\"{description}\""));
        }
        if !scope.is_empty() {
            params.push(format!("scope=\"{scope}\""));
        }
        params.push(format!("resource_metadata=\"{}\"", self.metadata_url(path)));
        value.push(' ');
        value.push_str(&params.join(", "));
        // Scopes and URLs are checked when the configuration and policy load.
        HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// The scopes a token-less client is told to ask for.
    pub fn initial_scope(&self) -> String {
        if self.required_scopes.is_empty() {
            self.scopes_supported.join(" ")
        } else {
            self.required_scopes.join(" ")
        }
    }

    /// The scopes every request needs, missing from `identity`'s token, if any.
    pub fn missing_required(&self, identity: &Identity) -> Option<String> {
        self.required_scopes
            .iter()
            .any(|s| !identity.scopes.contains(s))
            .then(|| self.required_scopes.join(" "))
    }

    /// A 401 for a request to `path` without a token.
    pub fn token_required(&self, path: &str) -> ProxyError {
        ProxyError::TokenRequired {
            challenge: self.challenge(path, None, &self.initial_scope()),
        }
    }

    /// A 401 for a request to `path` whose token was refused.
    pub fn invalid(&self, path: &str, refusal: Refusal) -> ProxyError {
        ProxyError::InvalidToken {
            reason: refusal.describe(),
            challenge: self.challenge(
                path,
                Some(("invalid_token", refusal.describe())),
                &self.initial_scope(),
            ),
        }
    }

    /// A 403 asking the client to come back with a token that has `scope`.
    pub fn insufficient(&self, path: &str, scope: &str) -> ProxyError {
        ProxyError::InsufficientScope {
            scope: scope.to_owned(),
            challenge: Some(self.challenge(
                path,
                Some((
                    "insufficient_scope",
                    "the access token lacks a scope this request needs",
                )),
                scope,
            )),
        }
    }

    /// JWKS fetches made so far (metrics and tests).
    pub async fn fetches(&self) -> u64 {
        self.keys.fetch.lock().await.fetches
    }

    /// Validates a bearer token: what it says of its bearer, or why it is refused.
    /// `Err(Ok(_))` is a refused token; `Err(Err(_))` means the keys could not be had.
    pub async fn validate(&self, token: &str) -> Result<Identity, Result<Refusal, String>> {
        if token.len() > MAX_TOKEN || token.split('.').count() != 3 {
            return Err(Ok(Refusal::Malformed));
        }
        // The algorithm first, by its name: `none` and HMAC are refused as such
        // before anything else of the token is trusted.
        let alg = header_alg(token).ok_or(Ok(Refusal::Malformed))?;
        if !self.algorithms.iter().any(|a| format!("{a:?}") == alg) {
            return Err(Ok(Refusal::Algorithm));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Ok(Refusal::Malformed))?;
        let alg_name = format!("{:?}", header.alg);
        let mut set = self.keys.usable(false).await.map_err(Err)?;
        let mut candidates = keys_for(&set, header.kid.as_deref(), &alg_name);
        if candidates.is_empty() && header.kid.is_some() {
            // A key the cache does not know: perhaps rotated in since the last fetch.
            set = self.keys.usable(true).await.map_err(Err)?;
            candidates = keys_for(&set, header.kid.as_deref(), &alg_name);
        }
        if candidates.is_empty() {
            return Err(Ok(Refusal::UnknownKey));
        }
        let validation = self.validation(header.alg);
        let mut refusal = Refusal::Signature;
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
                Ok(data) => return identity(data.claims).map_err(Ok),
                Err(err) => refusal = refusal_of(err.kind()),
            }
        }
        Err(Ok(refusal))
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut validation = Validation::new(alg);
        validation.leeway = self.skew.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        // `https://h` and `https://h/` name one resource; clients write either.
        let bare = self.resource.trim_end_matches('/');
        validation.set_audience(&[bare.to_owned(), format!("{bare}/")]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation
    }
}

/// The `alg` a JWT's header names.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let head = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(head.trim_end_matches('='))
        .ok()?;
    let header: Value = serde_json::from_slice(&bytes).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

/// What the token's claims say of its bearer; refused without a string `sub`, or
/// with an empty one (all such tokens would be one user to limits and approvals).
fn identity(claims: Map<String, Value>) -> Result<Identity, Refusal> {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .map(Arc::<str>::from)
    };
    let user = text("sub").ok_or(Refusal::MissingClaim)?;
    if user.is_empty() {
        return Err(Refusal::NoSubject);
    }
    // `cid` is Okta's name for it.
    let client_id = text("azp")
        .or_else(|| text("client_id"))
        .or_else(|| text("cid"));
    let jti = text("jti");
    // `scope` (RFC 9068) is space-separated; Okta and Entra ID send `scp`, a list or a string.
    let mut scopes = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
            Some(Value::Array(items)) => {
                scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_owned));
            }
            _ => {}
        }
    }
    Ok(Identity {
        user,
        client_id,
        jti,
        scopes,
        claims,
    })
}

fn refusal_of(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::Issuer,
        ErrorKind::InvalidAudience => Refusal::Audience,
        ErrorKind::MissingRequiredClaim(_) => Refusal::MissingClaim,
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Refusal::Algorithm,
        ErrorKind::InvalidSignature => Refusal::Signature,
        _ => Refusal::Malformed,
    }
}

/// The keys of `set` that may have signed a token with `kid` and `alg`: by `kid`
/// when it has one, else every key whose `alg` allows it.
fn keys_for<'s>(set: &'s KeySet, kid: Option<&str>, alg: &str) -> Vec<&'s Key> {
    set.keys
        .iter()
        .filter(|key| kid.is_none() || key.kid.as_deref() == kid)
        .filter(|key| key.alg.as_deref().is_none_or(|a| a == alg))
        .collect()
}

/// `https://h:1/a/b` → `https://h:1`.
fn origin_of(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
            format!("{scheme}://{authority}")
        }
        None => url.trim_end_matches('/').to_owned(),
    }
}

impl Keys {
    /// The current keys; fetched first when there are none yet or they are old
    /// (after a failed fetch, not again for [`MIN_REFRESH`]), or (`unknown_kid`)
    /// when a token named a key they lack, at most once per [`MIN_REFRESH`].
    async fn usable(&self, unknown_kid: bool) -> Result<Arc<KeySet>, String> {
        let seen = self.current.load_full();
        let fresh = seen.fetched.is_some_and(|at| at.elapsed() < MAX_AGE);
        if fresh && !unknown_kid {
            return Ok(seen);
        }
        let mut state = self.fetch.lock().await;
        let now = self.current.load_full();
        // Someone else fetched while this one waited.
        if now.fetched != seen.fetched && now.fetched.is_some() {
            return Ok(now);
        }
        let recent = |at: Option<Instant>| at.is_some_and(|at| at.elapsed() < MIN_REFRESH);
        if unknown_kid {
            if recent(state.last_forced) {
                return Ok(now);
            }
            state.last_forced = Some(Instant::now());
        } else if recent(state.last_attempt) {
            return if now.fetched.is_some() {
                Ok(now)
            } else {
                Err(
                    "the authorization server's keys could not be fetched; retrying shortly"
                        .to_owned(),
                )
            };
        }
        state.last_attempt = Some(Instant::now());
        state.fetches += 1;
        match self.fetch_keys(&mut state).await {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "OAuth: fetched the issuer's keys");
                let set = Arc::new(KeySet {
                    keys,
                    fetched: Some(Instant::now()),
                });
                self.current.store(set.clone());
                Ok(set)
            }
            Err(err) => {
                tracing::warn!(error = %err, "OAuth: could not fetch the issuer's keys");
                // Old keys stay usable while the issuer is unreachable.
                if now.fetched.is_some() {
                    Ok(now)
                } else {
                    Err(err)
                }
            }
        }
    }

    async fn fetch_keys(&self, state: &mut FetchState) -> Result<Vec<Key>, String> {
        let uri = match (&self.configured_uri, &state.jwks_uri) {
            (Some(uri), _) | (None, Some(uri)) => uri.clone(),
            (None, None) => {
                let uri = self.discover().await?;
                state.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let doc = self.get_json(&uri).await?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("the JWKS at {uri} has no `keys` list"))?;
        Ok(keys.iter().filter_map(usable_key).collect())
    }

    /// The JWKS URI from the issuer's metadata: RFC 8414 (the well-known prefix
    /// before the issuer's path), else OpenID Connect discovery (appended, then prefixed).
    async fn discover(&self) -> Result<String, String> {
        let origin = origin_of(&self.issuer);
        let path = self.issuer[origin.len()..].trim_end_matches('/');
        let urls = [
            format!("{origin}/.well-known/oauth-authorization-server{path}"),
            format!(
                "{}/.well-known/openid-configuration",
                self.issuer.trim_end_matches('/')
            ),
            format!("{origin}/.well-known/openid-configuration{path}"),
        ];
        let mut last = String::new();
        for url in urls {
            match self.get_json(&url).await {
                Ok(meta) => {
                    // RFC 8414 §3.3: the metadata must be the issuer's own.
                    if meta.get("issuer").and_then(Value::as_str) != Some(self.issuer.as_str()) {
                        last = format!("the metadata at {url} names another issuer");
                        continue;
                    }
                    return match meta.get("jwks_uri").and_then(Value::as_str) {
                        Some(uri) if secure_url(uri) => Ok(uri.to_owned()),
                        Some(uri) => Err(format!("the issuer's jwks_uri `{uri}` is not https")),
                        None => Err(format!(
                            "the metadata at {url} has no jwks_uri; set auth.oauth.jwks_uri"
                        )),
                    };
                }
                Err(err) => last = err,
            }
        }
        Err(format!(
            "no authorization server metadata found for issuer {}: {last}",
            self.issuer
        ))
    }

    /// GETs a JSON document, bounded in time and size.
    async fn get_json(&self, url: &str) -> Result<Value, String> {
        let mut response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|err| format!("GET {url}: {err}"))?;
        if !response.status().is_success() {
            return Err(format!("GET {url}: HTTP {}", response.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| format!("GET {url}: {err}"))?
        {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(format!("GET {url}: larger than {MAX_DOCUMENT} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|err| format!("GET {url}: not JSON: {err}"))
    }
}

/// A JWK Tollgate may verify signatures with: public, for signing, not symmetric.
fn usable_key(value: &Value) -> Option<Key> {
    let jwk: Jwk = serde_json::from_value(value.clone()).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    // A symmetric key would let anyone who knows it sign: never trusted here.
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None;
    }
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    Some(Key {
        kid: jwk.common.key_id,
        alg: jwk.common.key_algorithm.map(|a| format!("{a:?}")),
        key,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    // A scenario test reads top to bottom as one story: its length is allowed here.
    #![allow(clippy::too_many_lines)]
    use super::*;

    fn config() -> OAuthConfig {
        serde_yaml::from_str(
            "issuer: https://idp.example/realms/acme\nresource: https://tollgate.example/mcp\nscopes_supported: [mcp]\n",
        )
        .unwrap()
    }

    #[test]
    fn metadata_and_challenges_name_the_resource_and_issuer() {
        let oauth = OAuth::new(&config()).unwrap();
        assert_eq!(
            oauth.metadata_url("/servers/a/mcp"),
            "https://tollgate.example/.well-known/oauth-protected-resource/servers/a/mcp"
        );
        let doc = oauth.metadata();
        assert_eq!(doc["resource"], "https://tollgate.example/mcp");
        assert_eq!(
            doc["authorization_servers"][0],
            "https://idp.example/realms/acme"
        );
        assert_eq!(doc["scopes_supported"][0], "mcp");
        let ProxyError::TokenRequired { challenge } = oauth.token_required("/mcp") else {
            panic!()
        };
        assert_eq!(
            challenge,
            "Bearer scope=\"mcp\", resource_metadata=\"https://tollgate.example/.well-known/oauth-protected-resource/mcp\""
        );
    }

    #[test]
    fn claims_become_an_identity() {
        let claims =
            json!({"sub": "alice", "azp": "vscode", "jti": "j1", "scope": "mcp a:b", "scp": ["c"]});
        let Value::Object(claims) = claims else {
            panic!()
        };
        let id = identity(claims).unwrap();
        assert_eq!(&*id.user, "alice");
        assert_eq!(id.client_id.as_deref(), Some("vscode"));
        assert_eq!(id.jti.as_deref(), Some("j1"));
        assert_eq!(id.scopes, ["mcp", "a:b", "c"]);
        let Value::Object(no_sub) = json!({"scope": "mcp"}) else {
            panic!()
        };
        assert!(matches!(identity(no_sub), Err(Refusal::MissingClaim)));
        let Value::Object(empty_sub) = json!({"sub": ""}) else {
            panic!()
        };
        assert!(matches!(identity(empty_sub), Err(Refusal::NoSubject)));
    }

    #[test]
    fn symmetric_and_encryption_keys_are_never_used() {
        assert!(usable_key(&json!({"kty": "oct", "k": "c2VjcmV0", "kid": "h"})).is_none());
        let rsa = json!({"kty": "RSA", "kid": "r", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"});
        assert!(usable_key(&rsa).is_some());
        let mut enc = rsa.clone();
        enc["use"] = json!("enc");
        assert!(usable_key(&enc).is_none());
    }

    const KEY_1: [u8; 48] = [
        48, 46, 2, 1, 0, 48, 5, 6, 3, 43, 101, 112, 4, 34, 4, 32, 137, 194, 224, 102, 144, 212,
        147, 131, 64, 157, 51, 51, 236, 53, 50, 183, 97, 229, 220, 54, 207, 31, 250, 156, 207, 230,
        120, 206, 229, 86, 181, 37,
    ];
    const PUBLIC_1: &str = "ndiQ2RSZ31HNuu0irYv2iUgOYY4vEhDJTabnwV1RIQg";
    const KEY_2: [u8; 48] = [
        48, 46, 2, 1, 0, 48, 5, 6, 3, 43, 101, 112, 4, 34, 4, 32, 205, 73, 66, 106, 26, 209, 170,
        238, 151, 59, 249, 49, 14, 1, 101, 128, 42, 108, 1, 215, 92, 161, 111, 158, 252, 13, 127,
        119, 198, 113, 176, 54,
    ];

    /// An issuer on a loopback port: RFC 8414 metadata and a JWKS with `KEY_1` as `k1`,
    /// counting how often the JWKS is fetched.
    async fn issuer() -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let meta = json!({"issuer": base, "jwks_uri": format!("{base}/jwks")});
        let counted = hits.clone();
        let app = axum::Router::new()
            .route(
                "/.well-known/oauth-authorization-server",
                axum::routing::get(move || async move { axum::Json(meta) }),
            )
            .route(
                "/jwks",
                axum::routing::get(move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        axum::Json(json!({"keys": [
                            {"kty": "oct", "k": "c2VjcmV0", "kid": "h"},
                            {"kty": "OKP", "crv": "Ed25519", "x": PUBLIC_1, "kid": "k1", "alg": "EdDSA", "use": "sig"},
                        ]}))
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (base, hits)
    }

    fn sign(claims: &Value, key: &[u8], kid: &str) -> String {
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ed_der(key),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn tokens_are_checked_against_the_issuers_keys() {
        use std::sync::atomic::Ordering;
        let (issuer, hits) = issuer().await;
        let config: OAuthConfig = serde_yaml::from_str(&format!(
            "issuer: {issuer}\nresource: https://tollgate.example/\n"
        ))
        .unwrap();
        let oauth = OAuth::new(&config).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let good = json!({"iss": issuer, "sub": "alice", "aud": "https://tollgate.example",
            "scope": "mcp", "exp": now + 60, "iat": now});
        let id = oauth.validate(&sign(&good, &KEY_1, "k1")).await.unwrap();
        assert_eq!(&*id.user, "alice");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let refused = |claims: Value, key: &'static [u8], kid: &'static str| {
            let token = sign(&claims, key, kid);
            let oauth = &oauth;
            async move { oauth.validate(&token).await.err().and_then(Result::ok) }
        };
        let mut other = good.clone();
        other["aud"] = json!("https://elsewhere.example");
        assert_eq!(refused(other, &KEY_1, "k1").await, Some(Refusal::Audience));
        let mut old = good.clone();
        old["exp"] = json!(now - 600);
        assert_eq!(refused(old, &KEY_1, "k1").await, Some(Refusal::Expired));
        let mut early = good.clone();
        early["nbf"] = json!(now + 600);
        assert_eq!(
            refused(early, &KEY_1, "k1").await,
            Some(Refusal::NotYetValid)
        );
        assert_eq!(
            refused(good.clone(), &KEY_2, "k1").await,
            Some(Refusal::Signature)
        );
        for _ in 0..5 {
            assert_eq!(
                refused(good.clone(), &KEY_2, "k9").await,
                Some(Refusal::UnknownKey)
            );
        }
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "one refresh for unknown kids"
        );
        // HMAC, even with a secret the JWKS publishes as a symmetric key, and `none`.
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("h".into());
        let hmac = jsonwebtoken::encode(
            &header,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert_eq!(
            oauth.validate(&hmac).await.err(),
            Some(Ok(Refusal::Algorithm))
        );
        let none = format!("eyJhbGciOiJub25lIn0.{}.", hmac.split('.').nth(1).unwrap());
        assert_eq!(
            oauth.validate(&none).await.err(),
            Some(Ok(Refusal::Algorithm))
        );
        assert_eq!(
            oauth.validate("a.b").await.err(),
            Some(Ok(Refusal::Malformed))
        );
    }
}
