//! `testnet run --dashboard ADDR`: the report page, served live while the
//! testnet runs (rebuilt from each node's `live.json` on every request and
//! reloading itself), and the final report once the run is over.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::{info, warn};

use crate::html;
use crate::report::{NodeReport, NodeSummary, Summary};

/// What the dashboard needs to know about the run.
#[derive(Clone)]
pub struct Board {
    pub out: PathBuf,
    pub template: Summary,
    pub started: Instant,
    /// Node data dirs, by index (late joiners are added as they start).
    pub dirs: Arc<Mutex<Vec<PathBuf>>>,
}

impl Board {
    fn live_page(&self) -> Result<String, String> {
        let final_page = self.out.join("report.html");
        if let Ok(page) = std::fs::read_to_string(&final_page) {
            return Ok(page);
        }
        let dirs = self
            .dirs
            .lock()
            .map_err(|_| "dashboard state poisoned".to_string())?
            .clone();
        let reports: Vec<Option<NodeReport>> = dirs
            .iter()
            .map(|d| {
                std::fs::read(d.join("live.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            })
            .collect();
        let mut s = self.template.clone();
        s.nodes_total = dirs.len();
        s.wall_s = self.started.elapsed().as_secs_f64();
        s.rounds = reports.iter().flatten().map(|r| r.rounds_completed).max().unwrap_or(0);
        let latest = |r: &NodeReport| r.history.iter().rev().map(|h| h.test_acc).find(|a| a.is_finite());
        let honest: Vec<f32> = reports
            .iter()
            .flatten()
            .filter(|r| r.honest)
            .filter_map(latest)
            .collect();
        if !honest.is_empty() {
            s.honest_mean_acc = honest.iter().sum::<f32>() / honest.len() as f32;
            s.honest_min_acc = honest.iter().cloned().fold(f32::MAX, f32::min);
        }
        s.nodes = reports
            .iter()
            .enumerate()
            .map(|(index, r)| NodeSummary {
                index,
                honest: r.as_ref().is_none_or(|r| r.honest),
                attack: r.as_ref().and_then(|r| r.attack.clone()),
                final_test_acc: r.as_ref().and_then(latest).unwrap_or(f32::NAN),
                ..Default::default()
            })
            .collect();
        html::render(&s, &reports, Some(2))
    }
}

/// Serves the board on ADDR from its own thread; returns the bound address.
pub fn serve(addr: SocketAddr, board: Board) -> std::io::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("dashboard bound to a non-IP address"))?;
    info!(url = %format!("http://{bound}/"), "live dashboard");
    std::thread::Builder::new().name("dashboard".into()).spawn(move || {
        for request in server.incoming_requests() {
            let response = match request.url() {
                "/" | "/index.html" => match board.live_page() {
                    Ok(page) => {
                        let mut r = tiny_http::Response::from_string(page);
                        if let Ok(h) =
                            tiny_http::Header::from_bytes(&b"Content-Type"[..], &b"text/html; charset=utf-8"[..])
                        {
                            r.add_header(h);
                        }
                        r
                    }
                    Err(e) => {
                        tiny_http::Response::from_string(format!("cannot build the page: {e}\n")).with_status_code(500)
                    }
                },
                _ => tiny_http::Response::from_string("not found: try /\n").with_status_code(404),
            };
            if let Err(e) = request.respond(response) {
                warn!(error = %e, "dashboard response failed");
            }
        }
    })?;
    Ok(bound)
}
