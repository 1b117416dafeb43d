//! The benchmark's plot: normalized accuracy per method, one panel per suite, as SVG and PNG.
//! Both are drawn from one list of shapes; the PNG is rasterized here with an 8×8 bitmap font,
//! so no font or graphics library has to be installed.

use super::report::{Kind, SuiteReport};
use anyhow::Result;
use std::path::Path;

type Rgb = [u8; 3];

const GREY: Rgb = [150, 150, 150];
const BLUE: Rgb = [66, 114, 196];
const ORANGE: Rgb = [230, 126, 34];
const BLACK: Rgb = [0, 0, 0];
const RED: Rgb = [200, 40, 40];

enum Shape {
    Rect {
        x: i32,
        y: i32,
        w: i32,
        h: i32,
        color: Rgb,
    },
    /// A vertical line, dashed.
    Rule {
        x: i32,
        y0: i32,
        y1: i32,
        color: Rgb,
    },
    /// Text whose top-left corner is at (x, y); `right` aligns its end there instead.
    Text {
        x: i32,
        y: i32,
        text: String,
        right: bool,
    },
}

const ROW: i32 = 14;
const LABEL: i32 = 150;
const BARS: i32 = 300;
const PANEL: i32 = LABEL + BARS + 60;
const TOP: i32 = 40;
const CHAR: i32 = 8;

/// The shapes of all panels and the picture's size.
fn draw(reports: &[SuiteReport]) -> (Vec<Shape>, i32, i32) {
    let mut shapes = Vec::new();
    let mut height = 0;
    for (p, report) in reports.iter().enumerate() {
        let left = p as i32 * PANEL + 10;
        let mut rows: Vec<(String, f64, Rgb)> = Vec::new();
        for row in &report.rows {
            let value = report.normalized(row);
            if !value.is_finite() {
                continue;
            }
            let color = match row.kind {
                Kind::Base | Kind::Expert => GREY,
                Kind::DataFree => BLUE,
                Kind::DataAware => ORANGE,
            };
            if row.kind == Kind::Expert
                && report.best(Kind::Expert).map(|b| &b.name) != Some(&row.name)
            {
                continue;
            }
            let name = match row.kind {
                Kind::Expert => "best single expert".to_string(),
                _ => row.name.clone(),
            };
            rows.push((name, 100.0 * value, color));
        }
        let (references, mut methods): (Vec<_>, Vec<_>) =
            rows.into_iter().partition(|r| r.2 == GREY);
        methods.sort_by(|a, b| b.1.total_cmp(&a.1));
        let rows: Vec<_> = references.into_iter().chain(methods).collect();
        let max = rows.iter().map(|r| r.1).fold(100.0f64, f64::max) + 5.0;
        let x_of = |v: f64| left + LABEL + (v.max(0.0) / max * BARS as f64) as i32;
        shapes.push(Shape::Text {
            x: left,
            y: 10,
            text: format!("{} suite: normalized accuracy (%)", report.name),
            right: false,
        });
        for (i, (name, value, color)) in rows.iter().enumerate() {
            let y = TOP + i as i32 * ROW;
            shapes.push(Shape::Text {
                x: left + LABEL - 6,
                y: y + 2,
                text: name.clone(),
                right: true,
            });
            shapes.push(Shape::Rect {
                x: left + LABEL,
                y,
                w: x_of(*value) - left - LABEL,
                h: ROW - 3,
                color: *color,
            });
            shapes.push(Shape::Text {
                x: x_of(*value) + 4,
                y: y + 2,
                text: format!("{value:.1}"),
                right: false,
            });
        }
        let bottom = TOP + rows.len() as i32 * ROW;
        for target in [96.0, 99.0] {
            shapes.push(Shape::Rule {
                x: x_of(target),
                y0: TOP - 4,
                y1: bottom,
                color: RED,
            });
        }
        shapes.push(Shape::Text {
            x: x_of(96.0) - 4 * CHAR,
            y: TOP - 14,
            text: "96 99".into(),
            right: false,
        });
        shapes.push(Shape::Text {
            x: left,
            y: bottom + 8,
            text: "grey: references  blue: data-free  orange: data-aware".into(),
            right: false,
        });
        height = height.max(bottom + 30);
    }
    (shapes, reports.len() as i32 * PANEL + 10, height)
}

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn svg(shapes: &[Shape], width: i32, height: i32) -> String {
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         font-family=\"monospace\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for shape in shapes {
        out += &match shape {
            Shape::Rect { x, y, w, h, color } => format!(
                "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"{}\"/>\n",
                hex(*color)
            ),
            Shape::Rule { x, y0, y1, color } => format!(
                "<line x1=\"{x}\" y1=\"{y0}\" x2=\"{x}\" y2=\"{y1}\" stroke=\"{}\" stroke-dasharray=\"3,3\"/>\n",
                hex(*color)
            ),
            Shape::Text { x, y, text, right } => format!(
                "<text x=\"{x}\" y=\"{}\" text-anchor=\"{}\" fill=\"{}\">{}</text>\n",
                y + 8,
                if *right { "end" } else { "start" },
                hex(BLACK),
                text.replace('&', "&amp;").replace('<', "&lt;")
            ),
        };
    }
    out + "</svg>\n"
}

/// RGB pixels of the shapes.
fn raster(shapes: &[Shape], width: i32, height: i32) -> Vec<u8> {
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    let mut put = |x: i32, y: i32, c: Rgb| {
        if (0..width).contains(&x) && (0..height).contains(&y) {
            let i = ((y * width + x) * 3) as usize;
            pixels[i..i + 3].copy_from_slice(&c);
        }
    };
    for shape in shapes {
        match shape {
            Shape::Rect { x, y, w, h, color } => {
                for yy in *y..y + h {
                    for xx in *x..x + w {
                        put(xx, yy, *color);
                    }
                }
            }
            Shape::Rule { x, y0, y1, color } => {
                for yy in (*y0..*y1).filter(|yy| (yy / 3) % 2 == 0) {
                    put(*x, yy, *color);
                }
            }
            Shape::Text { x, y, text, right } => {
                let start = if *right {
                    x - text.chars().count() as i32 * CHAR
                } else {
                    *x
                };
                for (i, ch) in text.chars().enumerate() {
                    let glyph = glyph(ch);
                    for (row, bits) in glyph.iter().enumerate() {
                        for col in 0..8 {
                            if bits >> col & 1 == 1 {
                                put(start + i as i32 * CHAR + col, y + row as i32, BLACK);
                            }
                        }
                    }
                }
            }
        }
    }
    pixels
}

fn glyph(ch: char) -> [u8; 8] {
    use font8x8::UnicodeFonts;
    font8x8::BASIC_FONTS
        .get(ch)
        .or_else(|| font8x8::BASIC_FONTS.get('?'))
        .unwrap_or([0; 8])
}

/// `quality.svg` and `quality.png` in `dir`.
pub fn write(dir: &Path, reports: &[SuiteReport]) -> Result<()> {
    let (shapes, width, height) = draw(reports);
    std::fs::write(dir.join("quality.svg"), svg(&shapes, width, height))?;
    let file = std::io::BufWriter::new(std::fs::File::create(dir.join("quality.png"))?);
    let mut encoder = png::Encoder::new(file, width as u32, height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()?
        .write_image_data(&raster(&shapes, width, height))?;
    Ok(())
}
