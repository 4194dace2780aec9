//! The README runs as written. Every `sh` block in it is executed as printed,
//! in order, by `bash -e` in a temporary directory laid out like a checkout
//! (`scripts/` and `.venv` linked in, `../shared/data` beside it), with
//! `MESHTRAIN_QUICK=1` (every run spec capped at 4 rounds) and
//! `MESHTRAIN_NO_BUILD=1` (setup uses the binary this suite built: a build
//! inside `cargo test` would wait on cargo's own lock).
//!
//! A `<!-- readme-test: ... -->` comment right before a block says how it
//! runs otherwise, and an unknown one fails the test, so markers cannot rot:
//! - `skip-lines N[,M] (why)`: those lines of the block are not run;
//! - `host ADDR[, in the background]`: the block runs in its own network
//!   namespace holding ADDR (two such hosts are joined by a veth pair, as
//!   two machines on one link); a background block runs on while the next
//!   ones do, and must have succeeded by the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshtrain_tests::meshtrain_bin;

/// Longest any one block may run.
const BLOCK_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, PartialEq)]
enum How {
    Run,
    SkipLines(Vec<usize>, String),
    Host { addr: String, background: bool },
}

#[derive(Debug)]
struct Block {
    /// Line of the opening fence in README.md (1-based).
    line: usize,
    text: String,
    how: How,
}

fn parse_marker(m: &str) -> Result<How, String> {
    let m = m.trim();
    if let Some(rest) = m.strip_prefix("skip-lines ") {
        let (nums, why) = rest.split_once(' ').unwrap_or((rest, ""));
        let lines = nums
            .split(',')
            .map(|n| n.trim().parse::<usize>().map_err(|_| format!("bad line number `{n}`")))
            .collect::<Result<Vec<_>, _>>()?;
        if why.trim().is_empty() {
            return Err("skip-lines needs a reason".into());
        }
        return Ok(How::SkipLines(lines, why.trim().to_string()));
    }
    if let Some(rest) = m.strip_prefix("host ") {
        let (addr, tail) = rest.split_once(',').unwrap_or((rest, ""));
        let background = match tail.trim() {
            "" => false,
            "in the background" => true,
            other => return Err(format!("unknown host option `{other}`")),
        };
        addr.trim()
            .parse::<std::net::Ipv4Addr>()
            .map_err(|_| format!("`{}` is not an IPv4 address", addr.trim()))?;
        return Ok(How::Host {
            addr: addr.trim().to_string(),
            background,
        });
    }
    Err(format!("unknown readme-test marker `{m}`"))
}

/// The `sh` blocks of the README, with how each runs.
fn blocks(readme: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut marker: Option<(usize, String)> = None;
    let mut open: Option<(usize, Vec<&str>)> = None;
    let mut fence_other = false;
    for (i, line) in readme.lines().enumerate() {
        let n = i + 1;
        if let Some((start, body)) = open.as_mut() {
            if line.trim_start().starts_with("```") {
                let how = match marker.take() {
                    Some((_, m)) => parse_marker(&m).map_err(|e| format!("README.md:{n}: {e}"))?,
                    None => How::Run,
                };
                out.push(Block {
                    line: *start,
                    text: body.join("\n"),
                    how,
                });
                open = None;
            } else {
                body.push(line);
            }
            continue;
        }
        if fence_other {
            fence_other = !line.trim_start().starts_with("```");
            continue;
        }
        let t = line.trim();
        if let Some(m) = t.strip_prefix("<!-- readme-test:").and_then(|m| m.strip_suffix("-->")) {
            marker = Some((n, m.to_string()));
        } else if t == "```sh" {
            open = Some((n, Vec::new()));
        } else if t.starts_with("```") {
            if let Some((at, _)) = marker {
                return Err(format!(
                    "README.md:{at}: a readme-test marker before a block that is not `sh`"
                ));
            }
            fence_other = true;
        } else if !t.is_empty() {
            if let Some((at, _)) = marker {
                return Err(format!("README.md:{at}: a readme-test marker not right before a block"));
            }
        }
    }
    if open.is_some() {
        return Err("README.md: an `sh` block is never closed".into());
    }
    Ok(out)
}

/// Two network namespaces, one per host address, joined by a veth pair;
/// removed on drop (which removes the veth pair with them).
struct Hosts {
    names: BTreeMap<String, String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Hosts {
    fn new(addrs: &[String]) -> Result<Self, String> {
        if addrs.len() != 2 {
            return Err(format!(
                "the README names {} hosts; this test links exactly two",
                addrs.len()
            ));
        }
        let pid = std::process::id();
        let mut hosts = Hosts { names: BTreeMap::new() };
        let vs = [format!("mtra{pid}"), format!("mtrb{pid}")];
        for (k, addr) in addrs.iter().enumerate() {
            let ns = format!("mt-readme-{pid}-{k}");
            ip(&["netns", "add", &ns])
                .map_err(|e| format!("{e}\nnetwork namespaces need root (CI runs as root); run the tests as root"))?;
            hosts.names.insert(addr.clone(), ns);
        }
        ip(&["link", "add", &vs[0], "type", "veth", "peer", "name", &vs[1]])?;
        for ((addr, ns), v) in hosts.names.iter().zip(&vs) {
            ip(&["link", "set", v, "netns", ns])?;
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", v])?;
            ip(&["-n", ns, "link", "set", v, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in self.names.values() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Background blocks, killed (with their process group) if the test ends
/// before they do.
struct Background(Vec<(usize, Child, PathBuf)>);

impl Drop for Background {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                // The block leads its own process group: kill all of it.
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Lays out `root` like a checkout: the scripts and virtualenv linked in,
/// `../shared/data` beside it (the real one when there is one; otherwise
/// MNIST-shaped IDX files from Fashion-MNIST's test split and a text file,
/// so that the commands run as printed).
fn checkout(tmp: &Path) -> PathBuf {
    let repo = meshtrain_tests::repo_root();
    let work = tmp.join("work");
    std::fs::create_dir_all(&work).expect("work dir");
    std::os::unix::fs::symlink(repo.join("scripts"), work.join("scripts")).expect("link scripts");
    if repo.join(".venv").exists() {
        std::os::unix::fs::symlink(repo.join(".venv"), work.join(".venv")).expect("link .venv");
    }
    let shared = repo.join("../shared/data");
    if shared.join("mnist-t10k").is_dir() && shared.join("tinyshakespeare.txt").is_file() {
        std::fs::create_dir_all(tmp.join("shared")).expect("shared dir");
        std::os::unix::fs::symlink(&shared, tmp.join("shared/data")).expect("link shared data");
    } else {
        eprintln!("readme: ../shared/data is not here; using stand-ins for MNIST t10k and tinyshakespeare.txt");
        let mnist = tmp.join("shared/data/mnist-t10k");
        std::fs::create_dir_all(&mnist).expect("stand-in dir");
        for f in ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"] {
            std::os::unix::fs::symlink(Path::new("/usr/share/datasets/fashion-mnist").join(f), mnist.join(f))
                .expect("link stand-in");
        }
        let mut text = String::new();
        let readme = std::fs::read_to_string(repo.join("README.md")).expect("README");
        while text.len() < 1 << 20 {
            text.push_str(&readme);
        }
        std::fs::write(tmp.join("shared/data/tinyshakespeare.txt"), text).expect("stand-in text");
    }
    work
}

fn command(work: &Path, ns: Option<&str>, script: &str, log: &Path) -> Command {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "bash", "-e", "-c", script]);
            c
        }
        None => {
            let mut c = Command::new("bash");
            c.args(["-e", "-c", script]);
            c
        }
    };
    let out = std::fs::File::create(log).expect("block log");
    let err = out.try_clone().expect("block log");
    cmd.current_dir(work)
        .env("B", meshtrain_bin())
        .env("MESHTRAIN_BIN", meshtrain_bin())
        .env("MESHTRAIN_QUICK", "1")
        .env("MESHTRAIN_NO_BUILD", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd
}

/// Waits for `child` up to `limit`; kills its group past it.
fn wait(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Files named `listen.json` under `dir` (one level of data dirs).
fn listen_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("listen.json").exists())
        .count()
}

#[test]
fn markers_parse_and_unknown_ones_fail() {
    let ok = "<!-- readme-test: skip-lines 2 (why) -->\n```sh\na\nb\n```\n\n<!-- readme-test: host 10.0.0.5, in the background -->\n```sh\nc\n```\n```\nnot sh\n```\n";
    let b = blocks(ok).expect("parses");
    assert_eq!(b.len(), 2);
    assert_eq!(b[0].how, How::SkipLines(vec![2], "(why)".into()));
    assert_eq!(
        b[1].how,
        How::Host {
            addr: "10.0.0.5".into(),
            background: true
        }
    );
    assert!(blocks("<!-- readme-test: sometimes -->\n```sh\na\n```\n").is_err());
    assert!(
        blocks("<!-- readme-test: skip-lines 1 -->\n```sh\na\n```\n").is_err(),
        "a reason is required"
    );
    assert!(blocks("<!-- readme-test: host 10.0.0.5 -->\ntext\n```sh\na\n```\n").is_err());
    assert!(blocks("<!-- readme-test: host nowhere -->\n```sh\na\n```\n").is_err());
}

#[test]
fn every_readme_block_runs_as_printed() {
    let repo = meshtrain_tests::repo_root();
    let readme = std::fs::read_to_string(repo.join("README.md")).expect("read README.md");
    let blocks = blocks(&readme).unwrap_or_else(|e| panic!("{e}"));
    assert!(blocks.len() >= 8, "only {} sh blocks found in README.md", blocks.len());

    let tmp = tempfile::tempdir().expect("tempdir");
    let work = checkout(tmp.path());
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    let addrs: Vec<String> = blocks
        .iter()
        .filter_map(|b| match &b.how {
            How::Host { addr, .. } => Some(addr.clone()),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let hosts = (!addrs.is_empty()).then(|| Hosts::new(&addrs).unwrap_or_else(|e| panic!("{e}")));

    let mut background = Background(Vec::new());
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let run_start = Instant::now();
    for b in &blocks {
        let log = logs.join(format!("block-{}.log", b.line));
        let (script, ns, bg) = match &b.how {
            How::Run => (b.text.clone(), None, false),
            How::SkipLines(skip, why) => {
                let kept: Vec<&str> = b
                    .text
                    .lines()
                    .enumerate()
                    .filter(|(i, _)| !skip.contains(&(i + 1)))
                    .map(|(_, l)| l)
                    .collect();
                report.push(format!("README.md:{}: lines {skip:?} not run {why}", b.line));
                (kept.join("\n"), None, false)
            }
            How::Host { addr, background } => {
                let ns = hosts.as_ref().and_then(|h| h.names.get(addr)).cloned();
                (b.text.clone(), ns, *background)
            }
        };
        let started = Instant::now();
        let listening = listen_files(&work);
        let mut child = command(&work, ns.as_deref(), &script, &log)
            .spawn()
            .unwrap_or_else(|e| panic!("README.md:{}: cannot start bash: {e}", b.line));
        if bg {
            // Like a person who waits for the first machine to print its
            // address before going to the second.
            while listen_files(&work) == listening && started.elapsed() < Duration::from_secs(120) {
                if let Ok(Some(s)) = child.try_wait() {
                    panic!(
                        "README.md:{}: the background block ended early ({s}):\n{}",
                        b.line,
                        tail(&log, 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            report.push(format!("README.md:{}: started in the background", b.line));
            background.0.push((b.line, child, log));
            continue;
        }
        let status = wait(&mut child, BLOCK_LIMIT);
        let secs = started.elapsed().as_secs_f64();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match status {
            Some(s) if s.success() && !text.contains("panicked") => {
                report.push(format!("README.md:{}: pass in {secs:.1} s", b.line));
            }
            Some(s) => failures.push(format!(
                "README.md:{}: {} after {secs:.1} s; output ends:\n{}",
                b.line,
                if s.success() {
                    "a panic".to_string()
                } else {
                    s.to_string()
                },
                tail(&log, 30)
            )),
            None => failures.push(format!(
                "README.md:{}: still running after {} s; output ends:\n{}",
                b.line,
                BLOCK_LIMIT.as_secs(),
                tail(&log, 30)
            )),
        }
    }
    for (line, child, log) in &mut background.0 {
        let status = wait(child, BLOCK_LIMIT);
        let text = std::fs::read_to_string(&*log).unwrap_or_default();
        match status {
            Some(s) if s.success() && !text.contains("panicked") => {
                report.push(format!("README.md:{line}: (background) pass"));
            }
            other => failures.push(format!(
                "README.md:{line}: the background block ended with {other:?}; output ends:\n{}",
                tail(log, 30)
            )),
        }
    }
    drop(background);
    drop(hosts);
    eprintln!(
        "readme: {} blocks in {:.1} s\n{}",
        blocks.len(),
        run_start.elapsed().as_secs_f64(),
        report.join("\n")
    );
    assert!(failures.is_empty(), "README blocks failed:\n{}", failures.join("\n\n"));
}
