//! `vm0 runs metrics --plot out.png`: cpu, memory and network over a run, one
//! panel each, as a PNG (plotters' bitmap backend, no system libraries). Text
//! needs a TrueType font: the first of the usual system fonts that exists is
//! used; without one the chart is drawn unlabelled and the CLI says so.

use std::path::Path;

use anyhow::{Result, bail};
use plotters::prelude::*;
use vm0_api_types::runs::MetricSample;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a system font as plotters' `sans-serif`; `false` when none exists.
fn register_font() -> bool {
    let candidates = std::env::var("VM0_PLOT_FONT")
        .ok()
        .into_iter()
        .chain(FONTS.iter().map(|f| f.to_string()));
    for path in candidates {
        if let Ok(bytes) = std::fs::read(&path) {
            // plotters keeps the font for the process's life.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// A named line of (seconds, value) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// One panel: its title (with the unit) and its lines.
struct Panel {
    title: &'static str,
    series: Vec<Series>,
}

pub fn draw(file: &Path, run_id: &str, samples: &[MetricSample]) -> Result<()> {
    if samples.is_empty() {
        bail!("run {run_id} has no metric samples to plot");
    }
    let text = register_font();
    if !text {
        eprintln!("no TrueType font found (set VM0_PLOT_FONT): the chart has no labels");
    }
    let start = samples[0].timestamp.micros();
    let t = |s: &MetricSample| (s.timestamp.micros() - start) as f64 / 1e6;
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    let panels = [
        Panel {
            title: "cpu (%)",
            series: vec![(
                "cpu",
                RED,
                samples.iter().map(|s| (t(s), s.cpu_percent)).collect(),
            )],
        },
        Panel {
            title: "memory (MiB)",
            series: vec![(
                "memory",
                BLUE,
                samples
                    .iter()
                    .map(|s| (t(s), mib(s.memory_bytes)))
                    .collect(),
            )],
        },
        Panel {
            title: "network (MiB, cumulative)",
            series: vec![
                (
                    "rx",
                    GREEN,
                    samples
                        .iter()
                        .map(|s| (t(s), mib(s.network_rx_bytes)))
                        .collect(),
                ),
                (
                    "tx",
                    MAGENTA,
                    samples
                        .iter()
                        .map(|s| (t(s), mib(s.network_tx_bytes)))
                        .collect(),
                ),
            ],
        },
    ];
    let end = samples.last().map(t).unwrap_or(0.0).max(1.0);
    let root = BitMapBackend::new(file, (1000, 900)).into_drawing_area();
    let fail = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", file.display());
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let root = if text {
        root.titled(&format!("run {run_id}"), ("sans-serif", 24))
            .map_err(|e| fail(&e))?
    } else {
        root
    };
    for (area, panel) in root.split_evenly((3, 1)).iter().zip(&panels) {
        let top = panel
            .series
            .iter()
            .flat_map(|(_, _, points)| points.iter().map(|p| p.1))
            .fold(0.0f64, f64::max);
        let top = if top > 0.0 { top * 1.1 } else { 1.0 };
        let mut builder = ChartBuilder::on(area);
        builder.margin(10);
        if text {
            builder
                .caption(panel.title, ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(60);
        }
        let mut chart = builder
            .build_cartesian_2d(0.0..end, 0.0..top)
            .map_err(|e| fail(&e))?;
        let mut mesh = chart.configure_mesh();
        if text {
            mesh.x_desc("seconds");
        } else {
            mesh.x_labels(0).y_labels(0);
        }
        mesh.draw().map_err(|e| fail(&e))?;
        for (name, color, points) in &panel.series {
            // Points too: a short run may have a single sample.
            chart
                .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                .map_err(|e| fail(&e))?;
            let series = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(&e))?;
            if text {
                series
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], *color));
            }
        }
        if text && panel.series.len() > 1 {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(|e| fail(&e))?;
        }
    }
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}
