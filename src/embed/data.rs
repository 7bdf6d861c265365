//! Point sets for the embedding solvers: CSV loading with errors that name the file, line and
//! column, and the translating-squares images generated in code.
//!
//! CSV format: one point a row, comma-separated numbers. A first line whose fields are all
//! non-numeric is a header; a header column named `label` (any case) is dropped from the
//! features (so `digits.csv`, whose last column is the digit, loads as 64-dimensional points).
//! Blank lines are skipped. Ragged rows, fields that are not finite numbers and fewer than two
//! points are errors.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// `n` points of dimension `d`, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    pub name: String,
    pub n: usize,
    pub d: usize,
    pub x: Vec<f64>,
}

impl Dataset {
    /// The first `k` points (all of them if there are fewer).
    pub fn first(&self, k: usize) -> Dataset {
        let k = k.min(self.n);
        Dataset {
            name: format!("{} (first {k})", self.name),
            n: k,
            d: self.d,
            x: self.x[..k * self.d].to_vec(),
        }
    }
}

/// 16 × 16 images, each with an 8 × 8 square of ones at one of the 9 × 9 positions: 81
/// points in 256 dimensions (Hegde et al.'s translating-squares manifold).
pub fn translating_squares() -> Dataset {
    const SIDE: usize = 16;
    const SQUARE: usize = 8;
    let positions = SIDE - SQUARE + 1;
    let mut x = Vec::with_capacity(positions * positions * SIDE * SIDE);
    for top in 0..positions {
        for left in 0..positions {
            for row in 0..SIDE {
                for col in 0..SIDE {
                    let inside =
                        (top..top + SQUARE).contains(&row) && (left..left + SQUARE).contains(&col);
                    x.push(if inside { 1.0 } else { 0.0 });
                }
            }
        }
    }
    Dataset {
        name: "translating-squares".into(),
        n: positions * positions,
        d: SIDE * SIDE,
        x,
    }
}

/// Loads `path` (see the module documentation for the format).
pub fn load_csv(path: &Path) -> Result<Dataset> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_csv(&text, &path.display().to_string())
}

/// Parses CSV `text`; `name` (the file) prefixes every error.
pub fn parse_csv(text: &str, name: &str) -> Result<Dataset> {
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim_end_matches('\r')))
        .filter(|(_, line)| !line.trim().is_empty())
        .peekable();
    let mut keep: Option<Vec<bool>> = None;
    let mut width: Option<(usize, usize)> = None;
    if let Some(&(line_no, line)) = rows.peek() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.iter().all(|f| f.parse::<f64>().is_err()) {
            keep = Some(
                fields
                    .iter()
                    .map(|f| !f.eq_ignore_ascii_case("label"))
                    .collect(),
            );
            width = Some((fields.len(), line_no));
            rows.next();
        }
    }
    let mut x = Vec::new();
    let mut n = 0;
    let mut d = 0;
    for (line_no, line) in rows {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        match width {
            Some((w, first)) if fields.len() != w => bail!(
                "{name} line {line_no}: {} fields, but line {first} has {w} (ragged rows)",
                fields.len()
            ),
            None => width = Some((fields.len(), line_no)),
            _ => {}
        }
        let mut row_d = 0;
        for (column, field) in fields.iter().enumerate() {
            if let Some(keep) = &keep {
                if !keep[column] {
                    continue;
                }
            }
            let value: f64 = field
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite())
                .with_context(|| {
                    format!(
                        "{name} line {line_no}, column {}: `{field}` is not a finite number",
                        column + 1
                    )
                })?;
            x.push(value);
            row_d += 1;
        }
        d = row_d;
        n += 1;
    }
    if n < 2 {
        bail!("{name}: {n} data row(s); at least 2 points are needed to form a secant");
    }
    if d == 0 {
        bail!("{name}: no feature columns");
    }
    Ok(Dataset {
        name: name.to_string(),
        n,
        d,
        x,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squares_are_translates() {
        let s = translating_squares();
        assert_eq!((s.n, s.d), (81, 256));
        for p in 0..s.n {
            let ones: f64 = s.x[p * 256..(p + 1) * 256].iter().sum();
            assert_eq!(ones, 64.0);
        }
    }

    #[test]
    fn header_and_label_are_dropped() {
        let d = parse_csv("a,b,label\n1,2,7\n3,4,8\n\n", "t.csv").unwrap();
        assert_eq!((d.n, d.d), (2, 2));
        assert_eq!(d.x, vec![1.0, 2.0, 3.0, 4.0]);
    }
}
