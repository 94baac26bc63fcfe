//! `net.ipv4.ip_local_reserved_ports` (IPv4 and IPv6): ports the kernel never picks as ephemeral ports.

pub const PATH: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The ports in a list such as `8080,9000-9010`.
fn parse(text: &str) -> Vec<(u16, u16)> {
    text.trim()
        .split(',')
        .filter_map(|r| {
            let r = r.trim();
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

fn render(ranges: &[(u16, u16)]) -> String {
    let parts: Vec<String> =
        ranges.iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
    parts.join(",")
}

/// `ranges` with `ports` added (`add`) or removed (only where they stand alone, as `reserve` adds them).
pub fn edit(text: &str, ports: &[u16], add: bool) -> String {
    let mut ranges = parse(text);
    for &p in ports {
        let covered = ranges.iter().any(|&(a, b)| (a..=b).contains(&p));
        if add && !covered {
            ranges.push((p, p));
        } else if !add {
            ranges.retain(|&r| r != (p, p));
        }
    }
    render(&ranges)
}

/// Read, edit, write back under an exclusive lock, so two wardens starting at once lose no port.
fn update(ports: &[u16], add: bool) -> std::io::Result<()> {
    use std::io::{Read as _, Seek as _, Write as _};
    let file = std::fs::OpenOptions::new().read(true).write(true).open(PATH)?;
    let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| std::io::Error::from(e))?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    file.rewind()?;
    // With the newline: an empty write leaves the list as it was, "\n" empties it.
    file.write_all(format!("{}\n", edit(&text, ports, add)).as_bytes())
}

pub fn reserve(ports: &[u16]) -> std::io::Result<()> {
    update(ports, true)
}

pub fn release(ports: &[u16]) -> std::io::Result<()> {
    update(ports, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_port_lists_are_edited_in_place() {
        assert_eq!(edit("", &[15001], true), "15001");
        assert_eq!(edit("\n", &[15001, 15001], true), "15001");
        assert_eq!(edit("8080,9000-9010\n", &[9005, 40000], true), "8080,9000-9010,40000");
        assert_eq!(edit("8080,9000-9010,40000", &[40000, 9005], false), "8080,9000-9010");
        assert_eq!(edit("15001", &[15001], false), "");
    }
}
