//! Okta non-human identities: obtains client-credentials tokens per configured identity and verifies
//! them against the issuer's JWKS. (Stub: lands with issue 4.)
