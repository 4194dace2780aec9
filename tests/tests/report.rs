//! `testnet run` writes report.html: a self-contained page whose plots
//! render in a real browser (Debian's headless Chromium, installed by
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

fn screenshot(page: &Path, shot: &Path) {
    let out = Command::new(CHROMIUM)
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,3200"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", page.display()))
        .output()
        .unwrap_or_else(|e| panic!("{CHROMIUM}: {e} (scripts/setup.sh --tests installs Debian's chromium)"));
    assert!(shot.exists(), "chromium wrote no screenshot: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn report_renders_in_chromium_with_attackers_told_apart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out_dir = tmp.path().join("net");
    let out = Command::new(meshtrain_bin())
        .args(["testnet", "run", "--nodes", "4", "--byzantine", "1", "--attack", "sign-flip", "--rounds", "6", "--out"])
        .arg(&out_dir)
        .output()
        .expect("run testnet");
    assert!(out.status.success(), "testnet failed: {}", String::from_utf8_lossy(&out.stderr));
    let page = out_dir.join("report.html");
    let html = std::fs::read_to_string(&page).expect("report.html");
    for id in ["accuracy", "loss", "bytes", "mesh", "rejected-author", "rejected-reason", "audits"] {
        assert!(html.contains(&format!("id=\"{id}\"")), "report lacks {id}");
    }
    assert!(!html.contains("<script") && !html.contains("src=\"http"), "the report must be self-contained");
    for png in ["accuracy", "loss", "bytes", "rejected"] {
        assert!(out_dir.join("plots").join(format!("{png}.png")).exists(), "{png}.png missing");
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
    let without: String = html.split("<svg").map(|part| part.split_once("</svg>").map_or(part, |(_, rest)| rest)).collect();
    std::fs::write(&stripped, without).expect("write stripped page");
    let shot2 = tmp.path().join("shot2.png");
    screenshot(&stripped, &shot2);
    let (img2, channels2) = pixels(&shot2);
    assert!(count_near(&img2, channels2, [214, 39, 40]) < red / 10);
}
