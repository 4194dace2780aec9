//! `testnet run --dashboard` serves the report live, and writes
//! report.html at the end: a self-contained page whose plots render in a
//! real browser (Debian's headless Chromium, installed by
//! `scripts/setup.sh --tests`), with honest nodes and attackers told apart.

use std::path::Path;
use std::process::Command;

use meshtrain_tests::meshtrain_bin;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Pixels of the screenshot near COLOUR.
fn count_near(img: &[u8], channels: usize, colour: [u8; 3]) -> usize {
    img.chunks_exact(channels)
        .filter(|p| (0..3).all(|c| (i32::from(p[c]) - i32::from(colour[c])).abs() <= 12))
        .count()
}

/// The screenshot's pixels and channels per pixel.
fn pixels(shot: &Path) -> (Vec<u8>, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(shot).expect("screenshot")));
    let mut reader = decoder.read_info().expect("screenshot is a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("screenshot decodes");
    buf.truncate(info.buffer_size());
    (buf, info.color_type.samples())
}

/// GET / on 127.0.0.1:PORT; the body, if the server answered 200.
fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    stream.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then(|| body.to_string())
        .or_else(|| head.starts_with("HTTP/1.1 200").then(|| body.to_string()))
}

fn screenshot(page: &Path, shot: &Path) {
    let out = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,3200",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| panic!("{CHROMIUM}: {e} (scripts/setup.sh --tests installs Debian's chromium)"));
    assert!(
        shot.exists(),
        "chromium wrote no screenshot: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn report_renders_in_chromium_with_attackers_told_apart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("net");
    // A free port for the live dashboard (taken back just before use).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut testnet = Command::new(meshtrain_bin())
        .args([
            "testnet",
            "run",
            "--nodes",
            "4",
            "--byzantine",
            "1",
            "--attack",
            "sign-flip",
            "--rounds",
            "12",
            "--out",
        ])
        .arg(&out_dir)
        .args(["--dashboard", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run testnet");
    // While it runs, the dashboard serves the page live, plots included.
    let mut live = None;
    while testnet.try_wait().expect("wait").is_none() {
        if let Some(page) = http_get(port).filter(|p| p.contains("http-equiv=\"refresh\"") && p.contains("<svg")) {
            live = Some(page);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let status = testnet.wait().expect("testnet");
    assert!(status.success(), "testnet failed: see {}", out_dir.display());
    let live = live.expect("the dashboard never served a live page while the testnet ran");
    assert!(
        live.contains("pending (runs at the end)"),
        "a live page shows audits as pending"
    );
    let page = out_dir.join("report.html");
    let html = std::fs::read_to_string(&page).expect("report.html");
    for id in [
        "accuracy",
        "loss",
        "bytes",
        "mesh",
        "rejected-author",
        "rejected-reason",
        "audits",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "report lacks {id}");
    }
    assert!(
        !html.contains("<script") && !html.contains("src=\"http"),
        "the report must be self-contained"
    );
    for png in ["accuracy", "loss", "bytes", "rejected"] {
        assert!(
            out_dir.join("plots").join(format!("{png}.png")).exists(),
            "{png}.png missing"
        );
    }

    let shot = tmp.path().join("shot.png");
    screenshot(&page, &shot);
    let (img, channels) = pixels(&shot);
    let img = &img[..];
    // The attacker's curve and node are drawn in red, honest ones in blue,
    // bars in a lighter blue: each must show up as actual pixels.
    let red = count_near(img, channels, [214, 39, 40]);
    let blue = count_near(img, channels, [31, 119, 180]);
    let white = count_near(img, channels, [255, 255, 255]);
    let total = img.len() / channels;
    assert!(red > 200, "attacker red barely rendered ({red} px)");
    assert!(blue > 200, "honest blue barely rendered ({blue} px)");
    assert!(white < total * 97 / 100, "the page rendered almost blank");

    // A page with the plots taken out has none of those pixels: the check
    // above measures the plots, not the page chrome.
    let stripped = tmp.path().join("stripped.html");
    let without: String = html
        .split("<svg")
        .map(|part| part.split_once("</svg>").map_or(part, |(_, rest)| rest))
        .collect();
    std::fs::write(&stripped, without).expect("write stripped page");
    let shot2 = tmp.path().join("shot2.png");
    screenshot(&stripped, &shot2);
    let (img2, channels2) = pixels(&shot2);
    assert!(count_near(&img2, channels2, [214, 39, 40]) < red / 10);
}
