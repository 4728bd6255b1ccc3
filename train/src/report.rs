//! `dagmm-train report`: figures and a model card for one bundle, as PNG and SVG plus an
//! `index.html` and a `README.md` that lay them out.
//!
//! Figures: 3-D scatters (CPU × memory × disk busy, CPU × memory × network-in) with anomalies in
//! red; the training-energy distribution with the cutoffs and the scored rows overlaid; energy
//! over time per host with the four metrics in aligned panels; training curves; the latent space
//! coloured by mixture component; and per-metric contributions of the top anomalies. The font is
//! bundled, so rendering needs no system font libraries.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use dagmm_datasets::METRICS;
use dagmm_datasets::cli::ColumnArgs;
use dagmm_datasets::read::{ReadOptions, format_time, read_metrics};
use dagmm_model::{Bundle, Explainer, Verdict};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// DejaVu Sans (Bitstream Vera licence, see assets/DejaVuSans-LICENSE.txt).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FONT_NAME: &str = "sans-serif";

/// Size of most figures, in pixels.
pub const FIGURE_SIZE: (u32, u32) = (1200, 800);
/// Size of the energy-over-time figure (five stacked panels).
pub const TIMELINE_SIZE: (u32, u32) = (1400, 1200);
/// Anomalies shown in the contribution chart.
const TOP_ANOMALIES: usize = 15;
/// Hosts that get an energy-over-time figure.
const MAX_TIMELINES: usize = 6;

const NORMAL: RGBColor = RGBColor(70, 110, 170);
const ANOMALY: RGBColor = RGBColor(215, 25, 28);
const METRIC_COLOURS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
];
const COMPONENT_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

#[derive(Args)]
pub struct ReportArgs {
    /// The model bundle to report on.
    #[arg(long)]
    model: PathBuf,
    /// Export to score and plot (Parquet/CSV file, directory or glob).
    #[arg(long)]
    input: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    columns: ColumnArgs,
    /// Plot every host in the input, not only the model's own.
    #[arg(long)]
    all_hosts: bool,
}

/// One scored input row.
struct Row {
    time_ms: i64,
    host: String,
    raw: [f64; 4],
    verdict: Verdict,
    z: [f64; 3],
    component: usize,
}

/// Everything the figures draw from.
struct ReportData {
    name: String,
    bundle: Bundle,
    sha256: String,
    rows: Vec<Row>,
    skipped: usize,
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing failed: {e}")
}

pub fn run(args: ReportArgs) -> Result<()> {
    register_font(FONT_NAME, FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the bundled font cannot be loaded"))?;
    let data = load(&args)?;
    std::fs::create_dir_all(&args.out).with_context(|| args.out.display().to_string())?;
    let mut figures: Vec<(String, String)> = Vec::new();
    let mut add = |file: &str, title: &str| figures.push((file.to_string(), title.to_string()));

    render(&args.out, "scatter_cpu_mem_disk", FIGURE_SIZE, |a| {
        scatter3d(a, &data, 2, "disk busy (%)", |v| v)
    })?;
    add(
        "scatter_cpu_mem_disk",
        "CPU × memory × disk busy (anomalies in red)",
    );
    render(&args.out, "scatter_cpu_mem_net", FIGURE_SIZE, |a| {
        scatter3d(a, &data, 3, "network-in (log10 bit/s)", |v| {
            v.max(1.0).log10()
        })
    })?;
    add(
        "scatter_cpu_mem_net",
        "CPU × memory × network-in (anomalies in red)",
    );
    render(&args.out, "energy_distribution", FIGURE_SIZE, |a| {
        energy_distribution(a, &data)
    })?;
    add(
        "energy_distribution",
        "Energy distribution with the cutoffs",
    );
    let mut hosts: Vec<&str> = data.rows.iter().map(|r| r.host.as_str()).collect();
    hosts.dedup();
    let mut unique: Vec<&str> = Vec::new();
    for h in hosts {
        if !unique.contains(&h) {
            unique.push(h);
        }
    }
    for host in unique.iter().take(MAX_TIMELINES) {
        let file = format!(
            "energy_over_time_{}",
            crate::fit::model_file_name(if host.is_empty() { "all" } else { host })
        );
        render(&args.out, &file, TIMELINE_SIZE, |a| {
            timeline(a, &data, host)
        })?;
        add(
            &file,
            &format!(
                "Energy over time and the four metrics — {}",
                if host.is_empty() { "all rows" } else { host }
            ),
        );
    }
    render(&args.out, "training_curves", FIGURE_SIZE, |a| {
        training_curves(a, &data)
    })?;
    add("training_curves", "Training loss and its parts per epoch");
    render(&args.out, "latent_space", FIGURE_SIZE, |a| latent(a, &data))?;
    add("latent_space", "Latent space coloured by mixture component");
    render(&args.out, "contributions", FIGURE_SIZE, |a| {
        contributions(a, &data)
    })?;
    add("contributions", "Which metric drove each top anomaly");

    std::fs::write(args.out.join("index.html"), html(&data, &figures))
        .with_context(|| args.out.display().to_string())?;
    std::fs::write(args.out.join("README.md"), markdown(&data, &figures))
        .with_context(|| args.out.display().to_string())?;
    let anomalies = data.rows.iter().filter(|r| r.verdict.anomaly).count();
    println!(
        "report for {} ({} rows scored, {anomalies} anomalies, {} skipped): {} figures (PNG and SVG), index.html and README.md in {}",
        data.name,
        data.rows.len(),
        data.skipped,
        figures.len(),
        args.out.display()
    );
    Ok(())
}

fn load(args: &ReportArgs) -> Result<ReportData> {
    let loaded = Bundle::load(&args.model)?;
    let name = args.model.file_stem().map_or_else(
        || loaded.bundle.name.clone(),
        |s| s.to_string_lossy().into_owned(),
    );
    let read = ReadOptions {
        columns: args.columns.column_map()?,
        ..Default::default()
    };
    let table = read_metrics(&args.input, &read)?;
    let group = loaded.bundle.training.group.clone();
    let own_host = |h: &str| {
        args.all_hosts
            || group.as_deref().is_none_or(|g| g == h)
            || !table
                .host_names
                .iter()
                .any(|x| Some(x.as_str()) == group.as_deref())
    };
    let explainer = Explainer::new(loaded.bundle.model.clone());
    let mut scratch = explainer.scorer().new_scratch();
    let pre = &explainer.model().preprocessor;
    let mut rows = Vec::new();
    let mut skipped = 0;
    let mut order: Vec<usize> = (0..table.len()).collect();
    order.sort_by(|&a, &b| {
        (table.host(a), table.time_ms[a]).cmp(&(table.host(b), table.time_ms[b]))
    });
    for i in order {
        if !own_host(table.host(i)) {
            continue;
        }
        let raw = table.values[i];
        let Some(time_ms) = table.time_ms[i] else {
            skipped += 1;
            continue;
        };
        if explainer.validate(&raw).is_err() {
            skipped += 1;
            continue;
        }
        let verdict = explainer.verdict(&raw, &mut scratch);
        let x: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(j, &v)| pre.scale(j, v) as f32)
            .collect();
        let code = explainer.scorer().code(&x, &mut scratch);
        let gamma = explainer.scorer().memberships(&code, &mut scratch);
        let component = gamma
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(k, _)| k);
        rows.push(Row {
            time_ms,
            host: table.host(i).to_string(),
            raw,
            verdict,
            z: [code[0], code[1], code[2]],
            component,
        });
    }
    anyhow::ensure!(
        !rows.is_empty(),
        "{}: no rows to report on for model {name}",
        args.input
    );
    Ok(ReportData {
        name,
        bundle: loaded.bundle,
        sha256: loaded.sha256,
        rows,
        skipped,
    })
}

/// Draw one figure as `<name>.png` and `<name>.svg`.
fn render(
    dir: &Path,
    name: &str,
    size: (u32, u32),
    draw: impl Fn(DrawArea) -> Result<()>,
) -> Result<()> {
    let png = dir.join(format!("{name}.png"));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(DrawArea::Bitmap(root.clone()))?;
        root.present().map_err(err)?;
    }
    let svg = dir.join(format!("{name}.svg"));
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw(DrawArea::Svg(root.clone()))?;
        root.present().map_err(err)?;
    }
    Ok(())
}

/// The two backends every figure is drawn on.
#[derive(Clone)]
pub enum DrawArea<'a> {
    Bitmap(DrawingArea<BitMapBackend<'a>, Shift>),
    Svg(DrawingArea<SVGBackend<'a>, Shift>),
}

/// Run the same drawing code on whichever backend the area holds.
macro_rules! on_area {
    ($area:expr, |$root:ident| $body:expr) => {
        match $area {
            DrawArea::Bitmap($root) => $body,
            DrawArea::Svg($root) => $body,
        }
    };
}

/// The legend box every figure uses.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    font_size: u32,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .label_font(font(font_size))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(position)
        .draw()
        .map_err(err)
}

fn font(size: u32) -> TextStyle<'static> {
    (FONT_NAME, size).into_font().into()
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

fn scatter3d(
    area: DrawArea,
    d: &ReportData,
    third: usize,
    third_label: &str,
    axis: fn(f64) -> f64,
) -> Result<()> {
    let title = format!(
        "{}: CPU × memory × {}",
        d.name,
        third_label.split(" (").next().unwrap_or(third_label)
    );
    let (x0, x1) = range(d.rows.iter().map(|r| r.raw[0]));
    let (y0, y1) = range(d.rows.iter().map(|r| axis(r.raw[third])));
    let (z0, z1) = range(d.rows.iter().map(|r| r.raw[1]));
    let third_label = third_label.to_string();
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, font(28))
            .margin(20)
            .build_cartesian_3d(x0..x1, y0..y1, z0..z1)
            .map_err(err)?;
        chart.with_projection(|mut p| {
            p.pitch = 0.35;
            p.yaw = 0.65;
            p.scale = 0.85;
            p.into_matrix()
        });
        chart
            .configure_axes()
            .label_style(font(14))
            .x_formatter(&|v| format!("CPU {v:.0}%"))
            .z_formatter(&|v| format!("mem {v:.0}%"))
            .y_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(err)?;
        // Normal points first and small, anomalies last and larger, so none hide under the crowd.
        chart
            .draw_series(d.rows.iter().filter(|r| !r.verdict.anomaly).map(|r| {
                Circle::new(
                    (r.raw[0], axis(r.raw[third]), r.raw[1]),
                    2,
                    NORMAL.mix(0.35).filled(),
                )
            }))
            .map_err(err)?
            .label(format!(
                "normal ({})",
                d.rows.iter().filter(|r| !r.verdict.anomaly).count()
            ))
            .legend(|(x, y)| Circle::new((x + 8, y), 4, NORMAL.filled()));
        chart
            .draw_series(d.rows.iter().filter(|r| r.verdict.anomaly).map(|r| {
                Circle::new(
                    (r.raw[0], axis(r.raw[third]), r.raw[1]),
                    4,
                    ANOMALY.filled(),
                )
            }))
            .map_err(err)?
            .label(format!(
                "anomaly ({})",
                d.rows.iter().filter(|r| r.verdict.anomaly).count()
            ))
            .legend(|(x, y)| Circle::new((x + 8, y), 4, ANOMALY.filled()));
        legend(&mut chart, 18, SeriesLabelPosition::UpperRight)?;
        root.draw(&Text::new(
            format!("vertical: {third_label} · depth: memory (%) · across: CPU (%)"),
            (20, FIGURE_SIZE.1 as i32 - 30),
            font(16),
        ))
        .map_err(err)?;
        Ok::<(), anyhow::Error>(())
    })
}

fn energy_distribution(area: DrawArea, d: &ReportData) -> Result<()> {
    let t = &d.bundle.model.thresholds;
    let q = &t.quantiles;
    // The x axis covers the training distribution and the cutoffs; scored rows far beyond it
    // are counted in the legend instead of squashing the plot.
    let top = t
        .severities
        .iter()
        .map(|s| s.energy)
        .fold(t.cutoff, f64::max);
    let x0 = q[0];
    let x1 = (q[q.len() - 1]).max(top) + 0.15 * (q[q.len() - 1] - q[0]).abs().max(1.0);
    let bins = 60usize;
    let width = (x1 - x0) / bins as f64;
    let bin = |e: f64| (((e - x0) / width).floor().max(0.0) as usize).min(bins - 1);
    // Each stored quantile step holds 0.1 % of the training mass.
    let mut train = vec![0f64; bins];
    for w in q.windows(2) {
        train[bin(0.5 * (w[0] + w[1]))] += 1.0 / (q.len() - 1) as f64;
    }
    let mut scored = vec![0f64; bins];
    let mut beyond = 0;
    for r in &d.rows {
        if r.verdict.energy > x1 {
            beyond += 1;
        } else {
            scored[bin(r.verdict.energy)] += 1.0 / d.rows.len() as f64;
        }
    }
    let y1 = train.iter().chain(&scored).copied().fold(0.0, f64::max) * 1.15;
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{}: energy distribution", d.name), font(28))
            .margin(20)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, 0.0..y1)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("sample energy (higher = more anomalous)")
            .y_desc("share of samples per bin")
            .axis_desc_style(font(18))
            .label_style(font(14))
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        let bars = |values: &[f64], colour: RGBColor, filled: bool| {
            values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let left = x0 + i as f64 * width;
                    let style = if filled {
                        colour.mix(0.45).filled()
                    } else {
                        colour.stroke_width(2)
                    };
                    Rectangle::new([(left, 0.0), (left + width, v)], style)
                })
                .collect::<Vec<_>>()
        };
        chart
            .draw_series(bars(&train, NORMAL, true))
            .map_err(err)?
            .label("training window")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 6), (x + 16, y + 6)], NORMAL.mix(0.45).filled())
            });
        chart
            .draw_series(bars(&scored, RGBColor(40, 40, 40), false))
            .map_err(err)?
            .label(format!(
                "scored rows ({}; {beyond} beyond the axis)",
                d.rows.len()
            ))
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 6), (x + 16, y + 6)],
                    RGBColor(40, 40, 40).stroke_width(2),
                )
            });
        let mut lines = vec![(format!("cutoff p{}", t.percentile), t.cutoff, ANOMALY)];
        for s in &t.severities {
            if (s.energy - t.cutoff).abs() > 1e-12 {
                lines.push((
                    format!("{} p{}", s.name, s.percentile),
                    s.energy,
                    RGBColor(120, 0, 0),
                ));
            }
        }
        for (i, (label, x, colour)) in lines.into_iter().enumerate() {
            chart
                .draw_series(LineSeries::new(
                    vec![(x, 0.0), (x, y1)],
                    colour.stroke_width(3),
                ))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    label,
                    (x, y1 * (0.95 - 0.07 * i as f64)),
                    font(18).color(&colour),
                )))
                .map_err(err)?;
        }
        legend(&mut chart, 16, SeriesLabelPosition::UpperLeft)?;
        Ok::<(), anyhow::Error>(())
    })
}

fn timeline(area: DrawArea, d: &ReportData, host: &str) -> Result<()> {
    let rows: Vec<&Row> = d.rows.iter().filter(|r| r.host == host).collect();
    let t0 = rows.first().map_or(0, |r| r.time_ms);
    let hours = |ms: i64| (ms - t0) as f64 / 3_600_000.0;
    let (x0, x1) = range(rows.iter().map(|r| hours(r.time_ms)));
    let cutoff = d.bundle.model.thresholds.cutoff;
    // Clip the energy axis at a high quantile so a few huge spikes do not flatten the rest.
    let mut energies: Vec<f64> = rows.iter().map(|r| r.verdict.energy).collect();
    energies.sort_by(f64::total_cmp);
    let clip =
        energies[((energies.len() as f64 * 0.995) as usize).min(energies.len() - 1)].max(cutoff);
    let e_lo = energies[0].min(cutoff);
    let e_hi = clip + 0.1 * (clip - e_lo).abs().max(1.0);
    let panels: [(&str, usize, bool); 4] = [
        ("CPU (%)", 0, false),
        ("memory (%)", 1, false),
        ("disk busy (%)", 2, false),
        ("net-in (log10 bit/s)", 3, true),
    ];
    let start = format_time(t0);
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(
                &format!(
                    "{}: energy and metrics over time — host {}",
                    d.name,
                    if host.is_empty() { "(all)" } else { host }
                ),
                font(28),
            )
            .map_err(err)?;
        let areas = root.split_evenly((5, 1));
        {
            let mut chart = ChartBuilder::on(&areas[0])
                .margin(8)
                .x_label_area_size(20)
                .y_label_area_size(80)
                .build_cartesian_2d(x0..x1, e_lo..e_hi)
                .map_err(err)?;
            chart
                .configure_mesh()
                .y_desc("energy")
                .axis_desc_style(font(16))
                .label_style(font(13))
                .light_line_style(WHITE)
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(
                    rows.iter()
                        .map(|r| (hours(r.time_ms), r.verdict.energy.min(e_hi))),
                    NORMAL.stroke_width(1),
                ))
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(
                    vec![(x0, cutoff), (x1, cutoff)],
                    ANOMALY.stroke_width(2),
                ))
                .map_err(err)?
                .label("cutoff")
                .legend(|(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], ANOMALY.stroke_width(2))
                });
            chart
                .draw_series(rows.iter().filter(|r| r.verdict.anomaly).map(|r| {
                    Circle::new(
                        (hours(r.time_ms), r.verdict.energy.min(e_hi)),
                        3,
                        ANOMALY.filled(),
                    )
                }))
                .map_err(err)?
                .label("anomaly")
                .legend(|(x, y)| Circle::new((x + 8, y), 4, ANOMALY.filled()));
            legend(&mut chart, 14, SeriesLabelPosition::MiddleRight)?;
        }
        for (p, (label, j, log)) in panels.iter().enumerate() {
            let value = |r: &Row| {
                if *log {
                    r.raw[*j].max(1.0).log10()
                } else {
                    r.raw[*j]
                }
            };
            let (y0, y1) = range(rows.iter().map(|r| value(r)));
            let last = p == panels.len() - 1;
            let mut chart = ChartBuilder::on(&areas[p + 1])
                .margin(8)
                .x_label_area_size(if last { 45 } else { 20 })
                .y_label_area_size(80)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(err)?;
            let mut mesh = chart.configure_mesh();
            mesh.y_desc(*label)
                .axis_desc_style(font(16))
                .label_style(font(13))
                .light_line_style(WHITE);
            if last {
                mesh.x_desc(format!("hours since {start}"));
            }
            mesh.draw().map_err(err)?;
            chart
                .draw_series(LineSeries::new(
                    rows.iter().map(|r| (hours(r.time_ms), value(r))),
                    METRIC_COLOURS[*j].stroke_width(1),
                ))
                .map_err(err)?;
            chart
                .draw_series(
                    rows.iter()
                        .filter(|r| r.verdict.anomaly)
                        .map(|r| Circle::new((hours(r.time_ms), value(r)), 2, ANOMALY.filled())),
                )
                .map_err(err)?;
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn training_curves(area: DrawArea, d: &ReportData) -> Result<()> {
    let h = &d.bundle.history;
    anyhow::ensure!(!h.is_empty(), "the bundle has no training history");
    type Part = (&'static str, fn(&dagmm_model::EpochLosses) -> f64);
    let parts: [Part; 4] = [
        ("total loss", |l| l.total),
        ("reconstruction", |l| l.reconstruction),
        ("mean energy", |l| l.energy),
        ("covariance penalty", |l| l.cov_penalty),
    ];
    let epochs = h.len() as f64;
    let warmup = d
        .bundle
        .training
        .train_config
        .as_ref()
        .map(|c| (c.epochs as f64 * c.warmup_fraction).round())
        .filter(|w| *w > 0.0);
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(
                &format!("{}: training curves ({} epochs)", d.name, h.len()),
                font(28),
            )
            .map_err(err)?;
        for (i, (a, (label, part))) in root
            .split_evenly((2, 2))
            .iter()
            .zip(parts.iter())
            .enumerate()
        {
            let (y0, y1) = range(h.iter().map(part));
            let mut chart = ChartBuilder::on(a)
                .caption(*label, font(20))
                .margin(10)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(0.0..epochs, y0..y1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("epoch")
                .axis_desc_style(font(14))
                .label_style(font(13))
                .light_line_style(WHITE)
                .draw()
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new(
                    h.iter().map(|l| (l.epoch as f64, part(l))),
                    METRIC_COLOURS[i].stroke_width(2),
                ))
                .map_err(err)?;
            if let Some(w) = warmup {
                chart
                    .draw_series(LineSeries::new(
                        vec![(w, y0), (w, y1)],
                        BLACK.mix(0.5).stroke_width(1),
                    ))
                    .map_err(err)?;
                chart
                    .draw_series(std::iter::once(Text::new(
                        "joint loss starts",
                        (w, y1 - 0.06 * (y1 - y0)),
                        font(13),
                    )))
                    .map_err(err)?;
            }
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn latent(area: DrawArea, d: &ReportData) -> Result<()> {
    let k = d.bundle.model.network.gmm_k;
    let (x0, x1) = range(d.rows.iter().map(|r| r.z[0]));
    let pairs = [
        ("relative Euclidean distance", 1usize),
        ("cosine similarity", 2usize),
    ];
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let root = root
            .titled(
                &format!(
                    "{}: latent space z = [z_c, reconstruction features], by mixture component",
                    d.name
                ),
                font(24),
            )
            .map_err(err)?;
        for (a, (label, j)) in root.split_evenly((1, 2)).iter().zip(pairs) {
            let (y0, y1) = range(d.rows.iter().map(|r| r.z[j]));
            let mut chart = ChartBuilder::on(a)
                .margin(15)
                .x_label_area_size(45)
                .y_label_area_size(80)
                .build_cartesian_2d(x0..x1, y0..y1)
                .map_err(err)?;
            chart
                .configure_mesh()
                .x_desc("z_c")
                .y_desc(label)
                .axis_desc_style(font(16))
                .label_style(font(13))
                .light_line_style(WHITE)
                .draw()
                .map_err(err)?;
            for c in 0..k {
                let colour = COMPONENT_COLOURS[c % COMPONENT_COLOURS.len()];
                let n = d.rows.iter().filter(|r| r.component == c).count();
                if n == 0 {
                    continue;
                }
                chart
                    .draw_series(
                        d.rows
                            .iter()
                            .filter(|r| r.component == c)
                            .map(|r| Circle::new((r.z[0], r.z[j]), 2, colour.mix(0.5).filled())),
                    )
                    .map_err(err)?
                    .label(format!("component {c} ({n})"))
                    .legend(move |(x, y)| Circle::new((x + 8, y), 4, colour.filled()));
            }
            chart
                .draw_series(
                    d.rows
                        .iter()
                        .filter(|r| r.verdict.anomaly)
                        .map(|r| Circle::new((r.z[0], r.z[j]), 5, ANOMALY.stroke_width(2))),
                )
                .map_err(err)?
                .label("anomaly (ring)")
                .legend(|(x, y)| Circle::new((x + 8, y), 5, ANOMALY.stroke_width(2)));
            legend(&mut chart, 13, SeriesLabelPosition::MiddleRight)?;
        }
        Ok::<(), anyhow::Error>(())
    })
}

fn top_anomalies(d: &ReportData) -> Vec<&Row> {
    let mut top: Vec<&Row> = d.rows.iter().filter(|r| r.verdict.anomaly).collect();
    top.sort_by(|a, b| b.verdict.energy.total_cmp(&a.verdict.energy));
    top.truncate(TOP_ANOMALIES);
    top
}

fn contributions(area: DrawArea, d: &ReportData) -> Result<()> {
    let top = top_anomalies(d);
    let n = top.len().max(1);
    // Row labels live inside the plotting area at negative x, one per bar.
    const LABEL_SPACE: f64 = 0.62;
    on_area!(area, |root| {
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "{}: which metric drove each of the top {} anomalies",
                    d.name,
                    top.len()
                ),
                font(26),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(10)
            .build_cartesian_2d(-LABEL_SPACE..1.0, 0.0..n as f64)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("share of the anomaly (counterfactual energy drop)")
            .axis_desc_style(font(16))
            .label_style(font(13))
            .x_label_formatter(&|x| {
                if *x < -1e-9 {
                    String::new()
                } else {
                    format!("{:.1}", x.abs())
                }
            })
            .disable_y_mesh()
            .disable_y_axis()
            .light_line_style(WHITE)
            .draw()
            .map_err(err)?;
        chart
            .draw_series(top.iter().enumerate().map(|(i, r)| {
                let label = format!(
                    "{}  {}  E={:.1}",
                    format_time(r.time_ms)
                        .replace('T', " ")
                        .trim_end_matches('Z'),
                    r.host,
                    r.verdict.energy
                );
                Text::new(
                    label,
                    (-LABEL_SPACE + 0.01, (n - 1 - i) as f64 + 0.65),
                    font(14),
                )
            }))
            .map_err(err)?;
        for (j, metric) in METRICS.iter().enumerate() {
            let colour = METRIC_COLOURS[j];
            chart
                .draw_series(top.iter().enumerate().map(|(i, r)| {
                    let before: f64 = r.verdict.explanation[..j]
                        .iter()
                        .map(|e| f64::from(e.contribution))
                        .sum();
                    let share = f64::from(r.verdict.explanation[j].contribution);
                    let y = (n - 1 - i) as f64;
                    Rectangle::new(
                        [(before, y + 0.15), (before + share, y + 0.85)],
                        colour.filled(),
                    )
                }))
                .map_err(err)?
                .label(*metric)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], colour.filled())
                });
        }
        if top.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    "no anomalies in the scored rows",
                    (0.3, 0.5),
                    font(22),
                )))
                .map_err(err)?;
        }
        legend(&mut chart, 14, SeriesLabelPosition::LowerRight)?;
        Ok::<(), anyhow::Error>(())
    })
}

/// Model card rows shared by the HTML and Markdown pages.
fn card(d: &ReportData) -> Vec<(String, String)> {
    let b = &d.bundle;
    let t = &b.model.thresholds;
    let s = &b.training;
    let dropped: Vec<String> = s
        .rows_dropped
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let clipped: Vec<String> = s
        .values_clipped
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let severities: Vec<String> = t
        .severities
        .iter()
        .map(|v| format!("{} (p{}) {:.3}", v.name, v.percentile, v.energy))
        .collect();
    let mut rows = vec![
        ("model".to_string(), d.name.clone()),
        ("bundle sha256".into(), d.sha256.clone()),
        ("trained at".into(), b.created_at.clone()),
        (
            "group".into(),
            s.group.clone().unwrap_or_else(|| "all rows".into()),
        ),
        (
            "training window".into(),
            s.time_range
                .as_ref()
                .map_or("-".into(), |(a, z)| format!("{a} to {z}")),
        ),
        ("rows used".into(), s.rows_used.to_string()),
        (
            "rows dropped".into(),
            if dropped.is_empty() {
                "none".into()
            } else {
                dropped.join(", ")
            },
        ),
        (
            "values clipped".into(),
            if clipped.is_empty() {
                "none".into()
            } else {
                clipped.join(", ")
            },
        ),
        (
            "cutoff".into(),
            format!("{:.4} (p{} of training energies)", t.cutoff, t.percentile),
        ),
        ("severity cutoffs".into(), severities.join(", ")),
    ];
    if let Some(l) = &s.final_losses {
        rows.push((
            "final losses".into(),
            format!(
                "total {:.4}, reconstruction {:.4}, energy {:.4}, covariance {:.4}",
                l.total, l.reconstruction, l.energy, l.cov_penalty
            ),
        ));
    }
    let by_severity: BTreeMap<&str, usize> =
        d.rows
            .iter()
            .filter(|r| r.verdict.anomaly)
            .fold(BTreeMap::new(), |mut m, r| {
                *m.entry(r.verdict.severity.as_str()).or_default() += 1;
                m
            });
    rows.push((
        "scored rows".into(),
        format!(
            "{} ({} anomalies: {}; {} rows skipped as invalid)",
            d.rows.len(),
            by_severity.values().sum::<usize>(),
            by_severity
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            d.skipped
        ),
    ));
    rows
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn html(d: &ReportData, figures: &[(String, String)]) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>dagmm report: {0}</title>\
         <style>body{{font-family:sans-serif;max-width:1250px;margin:2em auto;color:#222}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}\
         img{{max-width:100%;border:1px solid #ddd}}figure{{margin:2em 0}}</style></head><body><h1>dagmm report: {0}</h1><h2>Model card</h2><table>",
        escape(&d.name)
    );
    for (k, v) in card(d) {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(&k), escape(&v));
    }
    h += "</table><h2>Top anomalies</h2><table><tr><th>time</th><th>host</th><th>energy</th><th>severity</th><th>top metric</th><th>value</th><th>expected</th></tr>";
    for r in top_anomalies(d) {
        let top = r
            .verdict
            .explanation
            .iter()
            .find(|e| e.metric == r.verdict.top_metric)
            .expect("top metric is explained");
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{:.3}</td><td>{}</td><td>{}</td><td>{:.4} {}</td><td>{:.4} {}</td></tr>",
            format_time(r.time_ms),
            escape(&r.host),
            r.verdict.energy,
            r.verdict.severity,
            r.verdict.top_metric,
            top.value,
            escape(&top.unit),
            top.expected,
            escape(&top.unit)
        );
    }
    h += "</table>";
    for (file, title) in figures {
        let _ = write!(
            h,
            "<figure><img src=\"{file}.png\" alt=\"{0}\"><figcaption>{0} (<a href=\"{file}.svg\">SVG</a>)</figcaption></figure>",
            escape(title)
        );
    }
    h += "</body></html>\n";
    h
}

fn markdown(d: &ReportData, figures: &[(String, String)]) -> String {
    let mut m = format!(
        "# dagmm report: {}\n\n## Model card\n\n| | |\n| --- | --- |\n",
        d.name
    );
    for (k, v) in card(d) {
        let _ = writeln!(m, "| {k} | {} |", v.replace('|', "/"));
    }
    m += "\n## Top anomalies\n\n| time | host | energy | severity | top metric |\n| --- | --- | --- | --- | --- |\n";
    for r in top_anomalies(d) {
        let _ = writeln!(
            m,
            "| {} | {} | {:.3} | {} | {} |",
            format_time(r.time_ms),
            r.host,
            r.verdict.energy,
            r.verdict.severity,
            r.verdict.top_metric
        );
    }
    for (file, title) in figures {
        let _ = write!(m, "\n## {title}\n\n![{title}]({file}.png)\n");
    }
    m
}
