//! Charts, as PNG (plotters' bitmap backend) or inline SVG: bar charts of
//! histograms and line charts of per-round series.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers DejaVu Sans (Debian's fonts-dejavu-core) as "sans-serif" for
/// text in bitmaps, once. SVG output needs no font file.
fn ensure_font() -> Result<(), String> {
    static FONT: OnceLock<Result<(), String>> = OnceLock::new();
    FONT.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable font"));
            }
        }
        Err("no DejaVu Sans font found (install Debian's fonts-dejavu-core)".into())
    })
    .clone()
}

/// One bar chart: a title, bar labels and values.
#[derive(Clone)]
pub struct Bars {
    pub title: String,
    pub labels: Vec<String>,
    pub values: Vec<f64>,
}

/// One named, coloured line of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>, RGBColor);

/// One line chart: a title, axis names and named series of (x, y) points.
#[derive(Clone)]
pub struct Lines {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, b: &Bars) -> Result<(), String> {
    let max = b.values.iter().cloned().fold(0.0f64, f64::max).max(1e-9);
    let n = b.values.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&b.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d((0..n.saturating_sub(1)).into_segmented(), 0.0..max * 1.1)
        .map_err(|e| e.to_string())?;
    let labels = b.labels.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.min(20))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(BLUE.mix(0.6).filled())
                .margin(2)
                .data(b.values.iter().enumerate().map(|(i, v)| (i, *v))),
        )
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, l: &Lines) -> Result<(), String> {
    let pts = l
        .series
        .iter()
        .flat_map(|(_, p, _)| p.iter())
        .filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let mut chart = ChartBuilder::on(area)
        .caption(&l.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(&l.x_label)
        .y_desc(&l.y_label)
        .draw()
        .map_err(|e| e.to_string())?;
    for (name, points, color) in &l.series {
        let color = *color;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()),
                color.stroke_width(2),
            ))
            .map_err(|e| e.to_string())?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    if l.series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Bar charts stacked vertically into one PNG.
pub fn bars_png(path: &Path, charts: &[Bars]) -> Result<(), String> {
    ensure_font()?;
    let height = 300 * charts.len().max(1) as u32;
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    for (area, b) in root.split_evenly((charts.len().max(1), 1)).iter().zip(charts) {
        draw_bars(area, b)?;
    }
    root.present().map_err(|e| format!("{}: {e}", path.display()))
}

/// One line chart as a PNG.
pub fn lines_png(path: &Path, chart: &Lines) -> Result<(), String> {
    ensure_font()?;
    let root = BitMapBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    draw_lines(&root, chart)?;
    root.present().map_err(|e| format!("{}: {e}", path.display()))
}

/// An SVG document of SIZE drawn by DRAW (for inline use in HTML).
fn svg(
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Result<String, String> {
    // Text extents are measured with the font even for SVG.
    ensure_font()?;
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        draw(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// One line chart as an SVG document.
pub fn lines_svg(chart: &Lines) -> Result<String, String> {
    svg((900, 420), |root| draw_lines(root, chart))
}

/// One bar chart as an SVG document.
pub fn bars_svg(chart: &Bars) -> Result<String, String> {
    svg((900, 320), |root| draw_bars(root, chart))
}

/// A distinct colour per series index.
pub fn palette(i: usize) -> RGBColor {
    const P: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
        RGBColor(188, 189, 34),
        RGBColor(127, 127, 127),
    ];
    P[i % P.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let bars = Bars {
            title: "class balance".into(),
            labels: (0..10).map(|i| i.to_string()).collect(),
            values: (0..10).map(|i| i as f64).collect(),
        };
        let p = dir.path().join("b.png");
        bars_png(&p, &[bars]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let lines = Lines {
            title: "accuracy".into(),
            x_label: "round".into(),
            y_label: "acc".into(),
            series: vec![("a".into(), vec![(0.0, 0.1), (1.0, 0.5), (2.0, f64::NAN)], palette(0))],
        };
        let svg = lines_svg(&lines).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{}",
            &svg[..100.min(svg.len())]
        );
    }
}
