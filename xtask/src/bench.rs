//! `cargo xtask bench`: connection set-up latency and bulk throughput, direct, through Warden and through
//! haproxy (TCP mode), in one run; written to BENCHMARKS.md with the machine.

pub fn run(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is not written yet")
}
