//! NAB's files: `<category>/<file>.csv` with `timestamp,value`, and `labels/combined_windows.json`.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One series.
#[derive(Debug, Clone)]
pub struct Series {
    /// `<category>/<file>.csv`, as NAB keys it.
    pub key: String,
    pub path: PathBuf,
    /// The timestamps as written, to echo them in the output.
    pub stamps: Vec<String>,
    pub ts_ms: Vec<u64>,
    pub values: Vec<f64>,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC) to Unix milliseconds.
pub fn parse_timestamp(s: &str) -> Option<u64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-');
    let (y, mo, da) = (d.next()?.parse::<i64>().ok()?, d.next()?.parse::<u32>().ok()?, d.next()?.parse::<u32>().ok()?);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, mi, se) = (t.next()?.parse::<u64>().ok()?, t.next()?.parse::<u64>().ok()?, t.next()?.parse::<u64>().ok()?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let ms_frac = if frac.is_empty() { 0 } else { format!("{frac:0<3}")[..3].parse::<u64>().ok()? };
    let days = days_from_civil(y, mo, da);
    if days < 0 {
        return None;
    }
    Some(((days as u64 * 86_400 + h * 3600 + mi * 60 + se) * 1000) + ms_frac)
}

/// Reads one CSV. Errors name the file and line.
pub fn read_series(root: &Path, path: &Path) -> anyhow::Result<Series> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let key = path.strip_prefix(root).unwrap_or(path).to_string_lossy().replace('\\', "/");
    let mut s = Series { key, path: path.to_path_buf(), stamps: Vec::new(), ts_ms: Vec::new(), values: Vec::new() };
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let (ts, v) = line
            .split_once(',')
            .with_context(|| format!("{}:{}: expected `timestamp,value`", path.display(), i + 1))?;
        let t = parse_timestamp(ts).with_context(|| format!("{}:{}: bad timestamp `{ts}`", path.display(), i + 1))?;
        let v: f64 = v.trim().parse().with_context(|| format!("{}:{}: bad value `{v}`", path.display(), i + 1))?;
        s.stamps.push(ts.to_string());
        s.ts_ms.push(t);
        s.values.push(v);
    }
    anyhow::ensure!(!s.values.is_empty(), "{}: no rows", path.display());
    Ok(s)
}

/// Every `<category>/<file>.csv` under `root` (the `labels` folder excluded), sorted by key.
pub fn find_series(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for cat in std::fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let cat = cat?.path();
        if !cat.is_dir() || cat.file_name().is_some_and(|n| n == "labels") {
            continue;
        }
        for f in std::fs::read_dir(&cat)? {
            let f = f?.path();
            if f.extension().is_some_and(|e| e == "csv") {
                out.push(f);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Anomaly windows per file key, as Unix milliseconds.
pub fn read_windows(root: &Path) -> anyhow::Result<BTreeMap<String, Vec<(u64, u64)>>> {
    let path = root.join("labels/combined_windows.json");
    let raw: BTreeMap<String, Vec<(String, String)>> =
        serde_json::from_str(&std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("{}: not the expected JSON", path.display()))?;
    raw.into_iter()
        .map(|(k, ws)| {
            let ws = ws
                .iter()
                .map(|(a, b)| {
                    Ok((
                        parse_timestamp(a).with_context(|| format!("{k}: bad window start `{a}`"))?,
                        parse_timestamp(b).with_context(|| format!("{k}: bad window end `{b}`"))?,
                    ))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok((k, ws))
        })
        .collect()
}

/// A detector's scores for one file, as NAB lays its results out: `<results>/<category>/<prefix><name>` with
/// a header naming `timestamp` and `anomaly_score` columns (others, such as `value` or `label`, are ignored).
/// Errors name the file and line.
pub fn read_results(results: &Path, key: &str, prefix: &str) -> anyhow::Result<(Vec<u64>, Vec<f64>)> {
    let (category, name) = key.split_once('/').with_context(|| format!("`{key}` is not `<category>/<file>`"))?;
    let path = results.join(category).join(format!("{prefix}{name}"));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').map(str::trim).collect();
    let column = |name: &str| {
        header.iter().position(|h| *h == name).with_context(|| format!("{}: no `{name}` column", path.display()))
    };
    let (t_col, s_col) = (column("timestamp")?, column("anomaly_score")?);
    let (mut ts, mut scores) = (Vec::new(), Vec::new());
    for (i, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = line.split(',').collect();
        let cell =
            |c: usize| cells.get(c).copied().with_context(|| format!("{}:{}: too few columns", path.display(), i + 2));
        let (t, s) = (cell(t_col)?, cell(s_col)?);
        ts.push(parse_timestamp(t).with_context(|| format!("{}:{}: bad timestamp `{t}`", path.display(), i + 2))?);
        let score: f64 =
            s.trim().parse().with_context(|| format!("{}:{}: bad anomaly_score `{s}`", path.display(), i + 2))?;
        scores.push(score);
    }
    Ok((ts, scores))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(parse_timestamp("2014-07-01 00:30:00"), Some(1_404_174_600_000));
        assert_eq!(parse_timestamp("2014-03-14 03:31:00.000000"), Some(1_394_767_860_000));
        assert_eq!(parse_timestamp("2000-02-29 12:00:00.5"), Some(951_825_600_500));
        assert_eq!(parse_timestamp("2014-13-01 00:00:00"), None);
        assert_eq!(parse_timestamp("yesterday"), None);
    }
}
