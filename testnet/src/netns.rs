//! Each node as its own host (`testnet run --hosts netns`): a network
//! namespace per node with its own address, wired to a bridge by a veth
//! pair whose two ends are shaped with `tbf` (upload on the node's end,
//! download on the bridge's), so that payloads take the time a real link
//! gives them. The bridge lives in a namespace of its own: nothing touches
//! the host's network. Partitions re-wire a group's ports onto a bridge of
//! its own and back.
//!
//! There is no delay or loss emulation: the `netem` qdisc does not exist in
//! the kernels this runs on, and faking latency in the application would
//! measure the fake. Everything is removed on drop (every exit path of a
//! run, Ctrl-C included); namespaces a killed testnet left behind are
//! removed by the next one.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::TestnetError;

/// Namespaces this module makes start with this, then the testnet's pid.
const PREFIX: &str = "mtnet-";
/// The nodes' subnet: node `i` is 10.99.(i / 250).(i % 250 + 1).
const SUBNET: [u8; 2] = [10, 99];
/// The port every node listens on (each host has its own stack).
pub const PORT: u16 = 4001;

/// A link rate in tc's notation (`20mbit`, `500kbit`, `1gbit`).
#[derive(Clone, Debug, PartialEq)]
pub struct Rate {
    pub bits_per_s: u64,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let (num, mult) = [
            ("gbit", 1_000_000_000u64),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
            ("bit", 1),
        ]
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.to_string(), *m)))
        .ok_or_else(|| format!("link rate `{s}`: give a number and kbit, mbit or gbit (e.g. 20mbit)"))?;
        let n: f64 = num
            .parse()
            .map_err(|_| format!("link rate `{s}`: `{num}` is not a number"))?;
        let bits = n * mult as f64;
        if !(bits.is_finite() && (8_000.0..=100e9).contains(&bits)) {
            return Err(format!("link rate `{s}`: must be between 8kbit and 100gbit"));
        }
        Ok(Rate {
            bits_per_s: bits as u64,
        })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.bits_per_s;
        if b.is_multiple_of(1_000_000_000) {
            write!(f, "{}gbit", b / 1_000_000_000)
        } else if b.is_multiple_of(1_000_000) {
            write!(f, "{}mbit", b / 1_000_000)
        } else if b.is_multiple_of(1_000) {
            write!(f, "{}kbit", b / 1_000)
        } else {
            write!(f, "{b}bit")
        }
    }
}

/// `--slow NODES:RATE`: those nodes' links run at RATE (NODES: `3` or
/// `2,5` or `4-6`).
pub fn parse_slow(s: &str) -> Result<Vec<(usize, Rate)>, String> {
    let (nodes, rate) = s
        .split_once(':')
        .ok_or_else(|| format!("--slow `{s}`: give NODES:RATE, e.g. 7:2mbit"))?;
    let rate: Rate = rate.parse()?;
    let mut out = Vec::new();
    for part in nodes.split(',') {
        let bad = || format!("--slow `{s}`: `{part}` is not a node index or a range a-b");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b {
                    return Err(bad());
                }
                out.extend((a..=b).map(|i| (i, rate.clone())));
            }
            None => out.push((part.parse().map_err(|_| bad())?, rate.clone())),
        }
    }
    Ok(out)
}

/// `--cut AT_ROUND:ROUNDS:GROUPS`: from round AT_ROUND on, for ROUNDS
/// rounds, the nodes are split into GROUPS contiguous groups that cannot
/// reach each other.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cut {
    pub at_round: u64,
    pub rounds: u64,
    pub groups: usize,
}

impl std::str::FromStr for Cut {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let p: Vec<&str> = s.split(':').collect();
        let num = |x: &str| {
            x.parse::<u64>()
                .map_err(|_| format!("--cut `{s}`: `{x}` is not a number (AT_ROUND:ROUNDS:GROUPS)"))
        };
        match p.as_slice() {
            [a, r, g] => {
                let cut = Cut {
                    at_round: num(a)?,
                    rounds: num(r)?,
                    groups: num(g)? as usize,
                };
                if cut.groups < 2 || cut.rounds == 0 {
                    return Err(format!("--cut `{s}`: needs at least 2 groups and 1 round"));
                }
                Ok(cut)
            }
            _ => Err(format!("--cut takes AT_ROUND:ROUNDS:GROUPS, got `{s}`")),
        }
    }
}

/// Set by SIGINT or SIGTERM while a testnet runs: the run stops, and
/// cleans up, at its next look.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Catches SIGINT and SIGTERM so that a run can clean up after itself.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn run(program: &str, args: &[&str]) -> Result<(), TestnetError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| TestnetError::Netns(format!("cannot run `{program}`: {e}")))?;
    if !out.status.success() {
        return Err(TestnetError::Netns(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// One host: its namespace, address and link rate.
#[derive(Debug, Clone)]
pub struct Host {
    pub ns: String,
    pub addr: Ipv4Addr,
    pub rate: Option<Rate>,
    /// The bridge-side end of its veth pair (in the switch namespace).
    port: String,
}

/// The namespaces, bridges and links of one run; removed on drop.
#[derive(Debug)]
pub struct Net {
    switch: String,
    pub hosts: Vec<Host>,
    groups: usize,
    cut_now: bool,
}

/// The tbf qdisc for `rate`: a burst of 10 ms at that rate (at least 32
/// KiB, so that one full-size packet always fits) and at most 100 ms of
/// queue.
fn tbf(rate: &Rate) -> Vec<String> {
    let burst = (rate.bits_per_s / 8 / 100).max(32 * 1024);
    vec![
        "root".into(),
        "tbf".into(),
        "rate".into(),
        rate.to_string(),
        "burst".into(),
        burst.to_string(),
        "latency".into(),
        "100ms".into(),
    ]
}

/// Removes namespaces left by testnets that are no longer running.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl Net {
    /// Makes `nodes` hosts on one bridge; `link` shapes every link, `slow`
    /// some of them differently; `groups` bridges are made for partitions.
    pub fn create(
        nodes: usize,
        link: Option<&Rate>,
        slow: &[(usize, Rate)],
        groups: usize,
    ) -> Result<Net, TestnetError> {
        if nodes > 250 * 250 {
            return Err(TestnetError::Netns(format!(
                "{nodes} hosts are more than this subnet holds"
            )));
        }
        if let Some((i, _)) = slow.iter().find(|(i, _)| *i >= nodes) {
            return Err(TestnetError::Netns(format!(
                "--slow names node {i}, but there are {nodes}"
            )));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(TestnetError::Netns(
                "--hosts netns makes network namespaces, which needs root (CI runs as root); run as root or use --hosts loopback".into(),
            ));
        }
        sweep_stale();
        let pid = std::process::id();
        let switch = format!("{PREFIX}{pid}-sw");
        let mut net = Net {
            switch: switch.clone(),
            hosts: Vec::new(),
            groups: groups.max(1),
            cut_now: false,
        };
        run("ip", &["netns", "add", &switch])?;
        for g in 0..net.groups {
            let br = format!("br{g}");
            run("ip", &["-n", &switch, "link", "add", &br, "type", "bridge"])?;
            run("ip", &["-n", &switch, "link", "set", &br, "up"])?;
        }
        for i in 0..nodes {
            let ns = format!("{PREFIX}{pid}-{i}");
            let addr = Ipv4Addr::new(SUBNET[0], SUBNET[1], (i / 250) as u8, (i % 250 + 1) as u8);
            let port = format!("p{i}");
            let rate = slow
                .iter()
                .rev()
                .find(|(j, _)| *j == i)
                .map(|(_, r)| r.clone())
                .or_else(|| link.cloned());
            // Pushed first, so that a failure half-way still removes it.
            net.hosts.push(Host {
                ns: ns.clone(),
                addr,
                rate: rate.clone(),
                port: port.clone(),
            });
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &switch,
                ],
            )?;
            run("ip", &["-n", &ns, "addr", "add", &format!("{addr}/16"), "dev", "eth0"])?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", &switch, "link", "set", &port, "master", "br0"])?;
            run("ip", &["-n", &switch, "link", "set", &port, "up"])?;
            if let Some(rate) = &rate {
                let q = tbf(rate);
                let q: Vec<&str> = q.iter().map(String::as_str).collect();
                let up = [&["-n", ns.as_str(), "qdisc", "add", "dev", "eth0"][..], &q].concat();
                run("tc", &up)?;
                let down = [&["-n", switch.as_str(), "qdisc", "add", "dev", port.as_str()][..], &q].concat();
                run("tc", &down)?;
            }
        }
        Ok(net)
    }

    /// The address node `i` listens on.
    pub fn listen_addr(&self, i: usize) -> Option<String> {
        self.hosts.get(i).map(|h| format!("/ip4/{}/tcp/{PORT}", h.addr))
    }

    /// Partitions the hosts into the contiguous groups of `cut`, or heals.
    pub fn set_cut(&mut self, on: bool) -> Result<(), TestnetError> {
        if on == self.cut_now {
            return Ok(());
        }
        let n = self.hosts.len().max(1);
        for (i, h) in self.hosts.iter().enumerate() {
            let group = if on { i * self.groups / n } else { 0 };
            run(
                "ip",
                &[
                    "-n",
                    &self.switch,
                    "link",
                    "set",
                    &h.port,
                    "master",
                    &format!("br{group}"),
                ],
            )?;
        }
        self.cut_now = on;
        Ok(())
    }

    pub fn is_cut(&self) -> bool {
        self.cut_now
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Removing a namespace removes the veth ends and qdiscs in it.
        for h in &self.hosts {
            let _ = run("ip", &["netns", "del", &h.ns]);
        }
        let _ = run("ip", &["netns", "del", &self.switch]);
    }
}

/// Namespaces this process made that still exist (for tests).
pub fn leftover_namespaces(pid: u32) -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    let mine = format!("{PREFIX}{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&mine))
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_like_tc() {
        assert_eq!("20mbit".parse::<Rate>().unwrap().bits_per_s, 20_000_000);
        assert_eq!("1gbit".parse::<Rate>().unwrap().to_string(), "1gbit");
        assert_eq!("2.5mbit".parse::<Rate>().unwrap().to_string(), "2500kbit");
        assert!("20".parse::<Rate>().is_err());
        assert!("fastmbit".parse::<Rate>().is_err());
        assert!("1kbit".parse::<Rate>().is_err(), "too slow for a packet");
    }

    #[test]
    fn slow_and_cut_parse() {
        let s = parse_slow("2,4-5:2mbit").unwrap();
        assert_eq!(s.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [2, 4, 5]);
        assert!(parse_slow("5-4:2mbit").is_err());
        assert!(parse_slow("x:2mbit").is_err());
        assert!(parse_slow("3").is_err());
        assert_eq!(
            "5:3:2".parse::<Cut>().unwrap(),
            Cut {
                at_round: 5,
                rounds: 3,
                groups: 2
            }
        );
        assert!("5:3:1".parse::<Cut>().is_err());
        assert!("5:3".parse::<Cut>().is_err());
    }

    #[test]
    fn tbf_burst_holds_a_packet_and_10ms() {
        let q = tbf(&"10mbit".parse().unwrap());
        assert_eq!(q[5], (32 * 1024).to_string());
        let q = tbf(&"1gbit".parse().unwrap());
        assert_eq!(q[5], (1_000_000_000u64 / 800).to_string());
    }
}
