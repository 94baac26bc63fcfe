// A real OpenID provider (npm `oidc-provider`, which nobody here wrote) set up like an Okta custom
// authorization server, for Warden's identity tests. Loopback only.
//
//   node server.js --keys-dir DIR [--port N] [--discovery oidc|oauth]
//
// Shape (as Okta's `/oauth2/default` server): issuer http://127.0.0.1:PORT/oauth2/default, token endpoint
// <issuer>/v1/token, JWKS <issuer>/v1/keys, client-credentials only, RS256 JWT access tokens with `ver`, `cid`,
// `scp` (array), `sub` = client id, audience `api://warden`, and a custom `groups` claim per client.
//
// The clients below are created at start; their private keys (PKCS#8 PEM) and secrets are written to
// --keys-dir, mode 0600, named after the client id (`<id>.pem`, `<id>.secret`). Port 0 (the default) picks a
// free port. When listening, one line is printed on stdout:
//
//   warden-test-idp ready issuer=<issuer> port=<port>
//
// Admin endpoints (loopback, outside the issuer path), each answering JSON once the change is live:
//   POST /admin/rotate            new signing key first in the JWKS, the previous ones kept (as Okta does);
//                                 `?drop_old=1` removes the previous keys. SIGHUP rotates too.
//   POST /admin/disable?client=ID token requests from that client fail with invalid_client (401).
//   POST /admin/enable?client=ID
//   GET  /admin/stats             counts of token requests and JWKS fetches.
// `--discovery oauth` serves only /.well-known/oauth-authorization-server (so clients must fall back to it).

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';

import Provider from 'oidc-provider';

const ISSUER_PATH = '/oauth2/default';
const AUDIENCE = 'api://warden';
const SCOPES = 'warden.connect warden.read';

function parseArgs(argv) {
  const args = { port: 0, keysDir: undefined, discovery: 'oidc' };
  for (let i = 0; i < argv.length; i += 1) {
    const next = () => {
      i += 1;
      if (i >= argv.length) throw new Error(`${argv[i - 1]} needs a value`);
      return argv[i];
    };
    switch (argv[i]) {
      case '--port': args.port = Number(next()); break;
      case '--keys-dir': args.keysDir = next(); break;
      case '--discovery': args.discovery = next(); break;
      default: throw new Error(`unknown argument ${argv[i]}`);
    }
  }
  if (!args.keysDir) throw new Error('--keys-dir DIR is required');
  if (!['oidc', 'oauth'].includes(args.discovery)) throw new Error('--discovery is oidc or oauth');
  return args;
}

const args = parseArgs(process.argv.slice(2));

// The clients, as an Okta admin would create service apps. `groups` is the custom claim's value for the
// client (an array, a plain string, or absent), `ttl` the access token lifetime in seconds.
const CLIENTS = [
  { id: 'agent-pkjwt-rs', auth: 'private_key_jwt', keyType: 'rsa', groups: ['agents-research'], ttl: 3600 },
  { id: 'agent-pkjwt-es', auth: 'private_key_jwt', keyType: 'ec', groups: ['agents-build', 'agents-research'], ttl: 3600 },
  { id: 'agent-secret-basic', auth: 'client_secret_basic', groups: 'agents-ops', ttl: 3600 },
  { id: 'agent-secret-post', auth: 'client_secret_post', ttl: 3600 },
  { id: 'agent-short', auth: 'client_secret_basic', groups: ['agents-research'], ttl: 5 },
];

fs.mkdirSync(args.keysDir, { recursive: true });

function writePrivate(file, contents) {
  fs.writeFileSync(file, contents, { mode: 0o600 });
  fs.chmodSync(file, 0o600);
}

const clientMetadata = CLIENTS.map((c) => {
  const meta = {
    client_id: c.id,
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: SCOPES,
    token_endpoint_auth_method: c.auth,
  };
  if (c.auth === 'private_key_jwt') {
    const { privateKey, publicKey } = c.keyType === 'ec'
      ? crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' })
      : crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
    writePrivate(path.join(args.keysDir, `${c.id}.pem`), privateKey.export({ type: 'pkcs8', format: 'pem' }));
    const jwk = publicKey.export({ format: 'jwk' });
    jwk.use = 'sig';
    jwk.alg = c.keyType === 'ec' ? 'ES256' : 'RS256';
    meta.jwks = { keys: [jwk] };
  } else {
    const secret = crypto.randomBytes(32).toString('base64url');
    writePrivate(path.join(args.keysDir, `${c.id}.secret`), `${secret}\n`);
    meta.client_secret = secret;
  }
  return meta;
});
const byId = new Map(CLIENTS.map((c) => [c.id, c]));

// Signing keys, newest first.
let signingKeys = [];
function newSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  jwk.kid = crypto.randomBytes(9).toString('base64url');
  jwk.use = 'sig';
  jwk.alg = 'RS256';
  return jwk;
}
signingKeys.push(newSigningKey());

const disabled = new Set();
const stats = { token: 0, jwks: 0 };

let issuer;
let handler;

function buildProvider() {
  const provider = new Provider(issuer, {
    clients: clientMetadata.filter((m) => !disabled.has(m.client_id)),
    jwks: { keys: signingKeys },
    routes: { token: '/v1/token', jwks: '/v1/keys' },
    scopes: SCOPES.split(' '),
    ttl: { ClientCredentials: (ctx, token, client) => byId.get(client.clientId)?.ttl ?? 3600 },
    clientAuthMethods: ['client_secret_basic', 'client_secret_post', 'private_key_jwt'],
    enabledJWA: {
      clientAuthSigningAlgValues: ['RS256', 'ES256'],
    },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => AUDIENCE,
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => {
          if (resource !== AUDIENCE) throw new Provider.errors.InvalidTarget();
          return {
            scope: SCOPES,
            audience: AUDIENCE,
            accessTokenFormat: 'jwt',
            accessTokenTTL: byId.get(client.clientId)?.ttl ?? 3600,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    formats: {
      customizers: {
        jwt(ctx, token, jwt) {
          const { payload } = jwt;
          const clientId = payload.client_id;
          payload.ver = 1;
          payload.cid = clientId;
          payload.scp = payload.scope ? payload.scope.split(' ') : [];
          delete payload.scope;
          delete payload.client_id;
          const c = byId.get(clientId);
          if (c && c.groups !== undefined) payload.groups = c.groups;
          jwt.header = { ...(jwt.header ?? {}), typ: 'JWT' };
        },
      },
    },
  });
  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  return provider.callback();
}

function rotate(dropOld) {
  const key = newSigningKey();
  signingKeys = dropOld ? [key] : [key, ...signingKeys];
  handler = buildProvider();
  return key.kid;
}

function sendJson(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

function admin(req, res, url) {
  const client = url.searchParams.get('client');
  if (req.method === 'POST' && url.pathname === '/admin/rotate') {
    const kid = rotate(url.searchParams.get('drop_old') === '1');
    sendJson(res, 200, { kid, kids: signingKeys.map((k) => k.kid) });
  } else if (req.method === 'POST' && (url.pathname === '/admin/disable' || url.pathname === '/admin/enable')) {
    if (!byId.has(client)) {
      sendJson(res, 404, { error: `no client ${client}` });
      return;
    }
    if (url.pathname === '/admin/disable') disabled.add(client); else disabled.delete(client);
    handler = buildProvider();
    sendJson(res, 200, { disabled: [...disabled] });
  } else if (req.method === 'GET' && url.pathname === '/admin/stats') {
    sendJson(res, 200, { ...stats, kids: signingKeys.map((k) => k.kid) });
  } else {
    sendJson(res, 404, { error: 'unknown admin endpoint' });
  }
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname.startsWith('/admin/')) {
    admin(req, res, url);
    return;
  }
  if (!url.pathname.startsWith(`${ISSUER_PATH}/`)) {
    sendJson(res, 404, { error: 'not_found' });
    return;
  }
  let rest = req.url.slice(ISSUER_PATH.length);
  const wellKnown = url.pathname.slice(ISSUER_PATH.length);
  if (wellKnown === '/.well-known/openid-configuration' && args.discovery === 'oauth') {
    sendJson(res, 404, { error: 'not_found' });
    return;
  }
  if (wellKnown === '/.well-known/oauth-authorization-server') {
    rest = '/.well-known/openid-configuration';
  }
  if (wellKnown === '/v1/keys') stats.jwks += 1;
  const dispatch = () => {
    req.originalUrl = `${ISSUER_PATH}${rest}`;
    req.url = rest;
    handler(req, res);
  };
  if (wellKnown === '/v1/token') stats.token += 1;
  dispatch();
});

process.on('SIGHUP', () => {
  const kid = rotate(false);
  console.log(`warden-test-idp rotated kid=${kid}`);
});

server.listen(args.port, '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}${ISSUER_PATH}`;
  handler = buildProvider();
  console.log(`warden-test-idp ready issuer=${issuer} port=${port}`);
});
