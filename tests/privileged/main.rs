//! Privileged end-to-end tests: the real `warden` binary with its kernel programs attached, real cgroups,
//! a real OpenID provider and real loopback peers. Run as root (CI runs them with CI=true, where a test
//! that cannot run fails instead of skipping). Each test has its own daemon, bpffs pins, cgroups, proxy
//! port and audit directory, and removes them when it ends.

mod audit;
mod bypass;
mod dataplane;
mod exhaustion;
mod grants;
mod harness;
mod holes;
mod identity;
mod observe;
mod operator;
mod package;
mod postgres;
mod relay;
mod ship;
mod splice;
mod ssh;
mod untagged;
