//! Small self-contained SVG charts for reports: a labelled scatter (e.g. reward vs KL) and bars
//! with 95% intervals (e.g. win rates); any browser shows them. `png` rasterises one with resvg
//! and an embedded DejaVu Sans, for viewers that do not show SVG — no system fonts needed.

use std::fmt::Write;

const W: f64 = 640.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// "Nice" tick values covering [lo, hi].
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| span / s <= 6.0)
        .unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = vec![];
    while t <= hi + 1e-9 * span {
        out.push(if t.abs() < 1e-12 * span { 0.0 } else { t });
        t += step;
    }
    out
}

fn padded_range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.1).max(1e-3);
    (lo - pad, hi + pad)
}

struct Frame {
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x.0) / (self.x.1 - self.x.0) * (W - LEFT - RIGHT)
    }
    fn py(&self, y: f64) -> f64 {
        H - BOTTOM - (y - self.y.0) / (self.y.1 - self.y.0) * (H - TOP - BOTTOM)
    }

    /// Axes, grid, tick labels, axis titles and the chart title.
    fn axes(&self, svg: &mut String, title: &str, xlabel: &str, ylabel: &str, xticks: bool) {
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#,
            W / 2.0,
            escape(title)
        );
        for t in ticks(self.y.0, self.y.1) {
            let y = self.py(t);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                fmt(t)
            );
        }
        if xticks {
            for t in ticks(self.x.0, self.x.1) {
                let x = self.px(t);
                let _ = write!(
                    svg,
                    r##"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                    H - BOTTOM,
                    H - BOTTOM + 16.0,
                    fmt(t)
                );
            }
        }
        let _ = write!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 16.0,
            escape(xlabel)
        );
        let _ = write!(
            svg,
            r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (TOP + H - BOTTOM) / 2.0,
            escape(ylabel)
        );
    }
}

fn fmt(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A scatter of labelled points; points sharing a `series` name share a colour and a legend entry.
pub fn scatter(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    points: &[(String, String, f64, f64)],
) -> String {
    let f = Frame {
        x: padded_range(points.iter().map(|p| p.2)),
        y: padded_range(points.iter().map(|p| p.3)),
    };
    let mut svg = String::new();
    f.axes(&mut svg, title, xlabel, ylabel, true);
    let mut series: Vec<&str> = vec![];
    for (s, _, _, _) in points {
        if !series.contains(&s.as_str()) {
            series.push(s);
        }
    }
    for (s, label, x, y) in points {
        let c = COLORS[series.iter().position(|n| n == s).unwrap() % COLORS.len()];
        let (px, py) = (f.px(*x), f.py(*y));
        // A label that would run past the frame goes to the left of its point (≈6 px a letter).
        let fits = px + 7.0 + 6.0 * label.chars().count() as f64 <= W - RIGHT;
        let (lx, anchor) = if fits {
            (px + 7.0, "start")
        } else {
            (px - 7.0, "end")
        };
        let _ = write!(
            svg,
            r#"<circle cx="{px:.1}" cy="{py:.1}" r="5" fill="{c}"/><text x="{lx:.1}" y="{:.1}" font-size="10" text-anchor="{anchor}">{}</text>"#,
            py - 6.0,
            escape(label)
        );
    }
    for (i, s) in series.iter().enumerate() {
        let y = TOP + 14.0 + 16.0 * i as f64;
        let _ = write!(
            svg,
            r#"<circle cx="{}" cy="{y}" r="5" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 14.0,
            COLORS[i % COLORS.len()],
            LEFT + 24.0,
            y + 4.0,
            escape(s)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Bars with 95% intervals: (name, value, low, high).
pub fn bars(
    title: &str,
    ylabel: &str,
    bars: &[(String, f64, f64, f64)],
    reference_line: Option<f64>,
) -> String {
    let mut vals: Vec<f64> = bars.iter().flat_map(|b| [b.1, b.2, b.3]).collect();
    vals.push(0.0);
    if let Some(r) = reference_line {
        vals.push(r);
    }
    let f = Frame {
        x: (0.0, bars.len().max(1) as f64),
        y: padded_range(vals.into_iter()),
    };
    let mut svg = String::new();
    f.axes(&mut svg, title, "", ylabel, false);
    let slot = (W - LEFT - RIGHT) / bars.len().max(1) as f64;
    for (i, (name, v, lo, hi)) in bars.iter().enumerate() {
        let x0 = LEFT + slot * i as f64 + slot * 0.2;
        let (y0, yv) = (f.py(0.0), f.py(*v));
        let c = COLORS[i % COLORS.len()];
        let _ = write!(
            svg,
            r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{c}"/>"#,
            yv.min(y0),
            slot * 0.6,
            (y0 - yv).abs()
        );
        let xm = x0 + slot * 0.3;
        if lo.is_finite() && hi.is_finite() {
            let _ = write!(
                svg,
                r##"<line x1="{xm:.1}" x2="{xm:.1}" y1="{:.1}" y2="{:.1}" stroke="#000"/>"##,
                f.py(*lo),
                f.py(*hi)
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{xm:.1}" y="{}" text-anchor="middle">{}</text><text x="{xm:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
            H - BOTTOM + 16.0,
            escape(name),
            yv.min(y0) - 4.0,
            fmt(*v)
        );
    }
    if let Some(r) = reference_line {
        let y = f.py(r);
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#555" stroke-dasharray="4 3"/>"##,
            W - RIGHT
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// The chart rasterised at twice its SVG size.
pub fn png(svg: &str) -> anyhow::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    static FONTS: std::sync::OnceLock<std::sync::Arc<usvg::fontdb::Database>> =
        std::sync::OnceLock::new();
    let fonts = FONTS.get_or_init(|| {
        let mut db = usvg::fontdb::Database::new();
        db.load_font_data(dejavu::sans::regular().to_vec());
        db.set_sans_serif_family("DejaVu Sans");
        std::sync::Arc::new(db)
    });
    let options = usvg::Options {
        fontdb: fonts.clone(),
        font_family: "DejaVu Sans".into(),
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &options)?;
    let scale = 2.0;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(scale)
        .expect("chart size");
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).expect("chart size");
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let close = |a: &[f64], b: &[f64]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9)
        };
        assert!(
            close(&ticks(0.0, 1.0), &[0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
            "{:?}",
            ticks(0.0, 1.0)
        );
        assert!(
            close(&ticks(-0.13, 2.7), &[0.0, 0.5, 1.0, 1.5, 2.0, 2.5]),
            "{:?}",
            ticks(-0.13, 2.7)
        );
    }

    #[test]
    fn charts_are_svg_with_every_label() {
        let s = scatter(
            "t",
            "KL",
            "reward",
            &[
                ("ppo".into(), "β=0.1".into(), 1.0, 0.5),
                ("dpo".into(), "a<b, a long label".into(), 2.0, 0.7),
            ],
        );
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert!(s.contains("ppo") && s.contains("a&lt;b") && s.contains(">KL<"));
        // The rightmost point's label is drawn leftwards, inside the frame.
        assert!(
            s.contains(r#"text-anchor="end">a&lt;b, a long label<"#),
            "{s}"
        );
        assert!(s.contains(r#"text-anchor="start">β=0.1<"#), "{s}");
        let b = bars("w", "win rate", &[("ppo".into(), 0.7, 0.6, 0.8)], Some(0.5));
        assert!(b.contains("stroke-dasharray") && b.contains(">ppo<"));
    }

    /// The PNG has the chart's size and its text is drawn: a chart whose only difference is a
    /// longer title rasterises to more dark pixels.
    #[test]
    fn png_rasterises_shapes_and_text() {
        let dark = |svg: &str| {
            let png = png(svg).unwrap();
            let img = resvg::tiny_skia::Pixmap::decode_png(&png).unwrap();
            assert_eq!((img.width(), img.height()), (2 * W as u32, 2 * H as u32));
            img.pixels().iter().filter(|p| p.red() < 128).count()
        };
        let points = [("ppo".to_string(), "x".to_string(), 1.0, 0.5)];
        let short = dark(&scatter("t", "KL", "reward", &points));
        let long = dark(&scatter(
            "title with many more letters",
            "KL",
            "reward",
            &points,
        ));
        assert!(short > 1000, "axes and labels drawn: {short} dark pixels");
        assert!(long > short + 200, "title text drawn: {long} vs {short}");
    }
}
