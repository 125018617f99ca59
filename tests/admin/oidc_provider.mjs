// A real OpenID Provider (npm `oidc-provider`) for the admin auth tests, on 127.0.0.1 only.
//
//   node oidc_provider.mjs <node_modules dir> <port> <clients.json>
//
// clients.json: [{"client_id", "client_secret", "roles": [...], "ttl": seconds}, ...], or
// {"clients": [...], "users": {"<login>": [roles...]}}. A client with "redirect_uris" is a
// console: the authorization code flow (PKCE), with the provider's own login and consent
// forms (devInteractions; any password), and the logged-in user's roles in its tokens.
// Each client gets access tokens by the client_credentials grant, as JWTs for the resource
// (audience) it asks for, with a `realm_access.roles` claim holding its roles (the path
// Keycloak uses; the tests read it with a dotted role claim) and `sub` = its client id.
// POST /__rotate (test control, loopback only) signs with a new RSA key from then on; the
// old key stays published in the JWKS, as an operator rotating keys would do.

import { generateKeyPairSync, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const [modulesDir, portArg, clientsFile] = process.argv.slice(2);
const port = Number(portArg);
const issuer = `http://127.0.0.1:${port}`;
const entry = join(modulesDir, 'oidc-provider', 'lib', 'index.js');
const { default: Provider } = await import(pathToFileURL(entry).href);
const spec = JSON.parse(readFileSync(clientsFile, 'utf8'));
const clients = Array.isArray(spec) ? spec : spec.clients;
const users = Array.isArray(spec) ? {} : spec.users ?? {};
const interactive = Object.keys(users).length > 0;
const byId = new Map(clients.map((c) => [c.client_id, c]));

function newKey() {
  const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  return { ...privateKey.export({ format: 'jwk' }), kid: randomUUID(), alg: 'RS256', use: 'sig' };
}

let keys = [newKey()];

function build() {
  const provider = new Provider(issuer, {
    clients: clients.map((c) =>
      c.redirect_uris
        ? {
            client_id: c.client_id,
            client_secret: c.client_secret,
            grant_types: ['authorization_code'],
            redirect_uris: c.redirect_uris,
            post_logout_redirect_uris: c.post_logout_redirect_uris ?? [],
            response_types: ['code'],
            scope: 'openid admin',
          }
        : {
            client_id: c.client_id,
            client_secret: c.client_secret,
            grant_types: ['client_credentials'],
            redirect_uris: [],
            response_types: [],
            scope: 'admin',
          },
    ),
    jwks: { keys },
    scopes: ['openid', 'admin'],
    findAccount: (ctx, id) => ({ accountId: id, claims: () => ({ sub: id }) }),
    features: {
      devInteractions: { enabled: interactive },
      clientCredentials: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => undefined,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => ({
          scope: 'admin',
          audience: resource,
          accessTokenFormat: 'jwt',
          accessTokenTTL: byId.get(client.clientId)?.ttl ?? 300,
          jwt: { sign: { alg: 'RS256' } },
        }),
      },
    },
    extraTokenClaims: (ctx, token) => ({
      realm_access: {
        roles: token.accountId ? users[token.accountId] ?? [] : byId.get(token.clientId)?.roles ?? [],
      },
    }),
  });
  provider.on('server_error', (ctx, err) => console.error('provider error:', err));
  return provider.callback();
}

let handler = build();

const server = http.createServer((req, res) => {
  if (req.method === 'POST' && req.url === '/__rotate') {
    keys = [newKey(), ...keys];
    handler = build();
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ kid: keys[0].kid }));
    return;
  }
  handler(req, res);
});

server.listen(port, '127.0.0.1', () => console.log(`ready ${issuer}`));
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
