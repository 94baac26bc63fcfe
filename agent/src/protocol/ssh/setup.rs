//! Where an SSH connection's set-up time goes, from the handler getting the connection to the first
//! channel request answered: one `debug` line under the target `ssh_setup` per connection (what
//! `cargo xtask bench ssh` breaks the `ssh host true` cost down with). Cheap monotonic stamps only.

use std::time::{Duration, Instant};

/// The steps before the session is admitted, stamped by [`super::Greeting`].
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// When [`super::Ssh::hello`] got the connection (after the proxy's accept and origin lookup).
    start: Instant,
    /// To the agent's first user-auth request: version lines, key exchange, host certificate, service
    /// request.
    hello: Duration,
    /// To [`super::Greeting::connect`]: the proxy's identity, policy and grant decision in between.
    connect_start: Duration,
    /// The upstream TCP connect.
    tcp: Duration,
    /// To [`super::Greeting::run`]: the proxy waited for the durable `session.start` in between.
    run_start: Duration,
    /// To the upstream login done: its version line, key exchange, host key check, user auth.
    login_done: Duration,
}

impl Setup {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            hello: Duration::ZERO,
            connect_start: Duration::ZERO,
            tcp: Duration::ZERO,
            run_start: Duration::ZERO,
            login_done: Duration::ZERO,
        }
    }

    pub fn hello_done(&mut self) {
        self.hello = self.start.elapsed();
    }

    pub fn connect_started(&mut self) {
        self.connect_start = self.start.elapsed();
    }

    pub fn connect_done(&mut self) {
        self.tcp = self.start.elapsed().saturating_sub(self.connect_start);
    }

    pub fn run_started(&mut self) {
        self.run_start = self.start.elapsed();
    }

    pub fn login_done(&mut self) {
        self.login_done = self.start.elapsed();
    }

    /// Logs the whole set-up once the first channel's request was answered. `open` is when the agent's
    /// channel open arrived, `opened` when the upstream confirmed its channel, `request` when the agent's
    /// exec, shell or subsystem request arrived; now is when the upstream answered it. The phases follow
    /// one another, so they add up to `total_us`.
    pub fn log(&self, open: Instant, opened: Instant, request: Instant, what: &'static str) {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let at = |i: Instant| i.saturating_duration_since(self.start);
        let after_connect = self.connect_start + self.tcp;
        let total = self.start.elapsed();
        tracing::debug!(
            target: "ssh_setup",
            request = what,
            hello_us = us(self.hello),
            gate_us = us(self.connect_start.saturating_sub(self.hello)),
            upstream_tcp_us = us(self.tcp),
            durable_wait_us = us(self.run_start.saturating_sub(after_connect)),
            upstream_login_us = us(self.login_done.saturating_sub(self.run_start)),
            agent_open_us = us(at(open).saturating_sub(self.login_done)),
            upstream_open_us = us(opened.saturating_duration_since(open)),
            agent_request_us = us(request.saturating_duration_since(opened)),
            upstream_request_us = us(total.saturating_sub(at(request))),
            total_us = us(total),
            "ssh connection set-up"
        );
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}

/// The first channel's stamps, kept by the agent-side handler until its request is answered.
#[derive(Debug, Clone, Copy)]
pub struct FirstChannel {
    pub open: Instant,
    pub opened: Instant,
}
