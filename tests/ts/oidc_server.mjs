// A real OAuth 2.1 authorization server for Tollgate's identity tests: node
// `oidc-provider` with dynamic client registration, authorization code + PKCE
// (its built-in login and consent pages), client credentials, and resource
// indicators issuing JWT access tokens (RFC 9068) for the resources named.
//
//   node oidc_server.mjs PORT KEYS_FILE RESOURCE[,RESOURCE...]
//
// KEYS_FILE holds the private signing JWKS (the test keeps it, to sign tokens of
// its own with the issuer's real key). Users: alice (groups sre), bob (dev).
// `ci-agent` / `ci-agent-secret-0123` is a client-credentials client. GET
// /test/jwks-hits says how often /jwks was fetched. Prints `issuer <url>` when ready.
import { readFileSync } from 'node:fs';
import Provider, { errors } from 'oidc-provider';

const [port, keysFile, resources] = process.argv.slice(2);
const issuer = `http://127.0.0.1:${port}`;
const allowed = resources.split(',');
const jwks = JSON.parse(readFileSync(keysFile, 'utf8'));
const groups = { alice: ['sre'], bob: ['dev'] };
const scope = 'mcp exports:write';

const provider = new Provider(issuer, {
  jwks,
  clients: [{
    client_id: 'ci-agent',
    client_secret: 'ci-agent-secret-0123',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope,
  }],
  scopes: ['openid', 'offline_access', 'mcp', 'exports:write'],
  features: {
    devInteractions: { enabled: true },
    registration: { enabled: true },
    clientCredentials: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => allowed[0],
      useGrantedResource: () => true,
      getResourceServerInfo: (ctx, indicator) => {
        if (!allowed.includes(indicator)) {
          throw new errors.InvalidTarget(`unknown resource ${indicator}`);
        }
        return {
          scope,
          audience: indicator,
          accessTokenTTL: 600,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256' } },
        };
      },
    },
  },
  // A registered client may later ask for any scope of this server (a step-up), not
  // only those it registered with.
  extraClientMetadata: {
    properties: ['tollgate_test'],
    validator: (ctx, key, value, metadata) => {
      metadata.scope = `openid offline_access ${scope}`;
    },
  },
  extraTokenClaims: (ctx, token) => ({
    groups: token.accountId ? (groups[token.accountId] ?? []) : ['ci'],
  }),
  pkce: { required: () => true },
  ttl: { AccessToken: 600, Grant: 600, Interaction: 600, Session: 600 },
});
provider.proxy = false;

let jwksHits = 0;
provider.use(async (ctx, next) => {
  if (ctx.path === '/test/jwks-hits') {
    ctx.body = { hits: jwksHits };
    return;
  }
  if (ctx.path === '/jwks') jwksHits += 1;
  await next();
});

provider.listen(Number(port), '127.0.0.1', () => {
  console.log(`issuer ${issuer}`);
});
