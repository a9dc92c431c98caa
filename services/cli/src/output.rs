//! How results are printed: tables for people, JSON (`--json`) for scripts.
//! Colours only when stdout is a terminal and `NO_COLOR` is unset (no-color.org);
//! progress bars only when stderr is a terminal.

use std::io::IsTerminal;

use serde::Serialize;
use vm0_api_types::runs::RunStatus;

#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
    pub color: bool,
}

impl Output {
    pub fn new(json: bool) -> Output {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
            || std::env::var("TERM").is_ok_and(|t| t == "dumb");
        Output {
            json,
            color: !json && !no_color && std::io::stdout().is_terminal(),
        }
    }

    /// `value` as pretty JSON, one document.
    pub fn json(&self, value: &impl Serialize) -> anyhow::Result<()> {
        println!("{}", serde_json::to_string_pretty(value)?);
        Ok(())
    }

    /// Columns padded to their widest cell; the header dimmed on a terminal.
    pub fn table(&self, headers: &[&str], rows: &[Vec<String>]) {
        let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
        for row in rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(visible_width(cell));
            }
        }
        let line = |cells: Vec<String>| {
            let last = cells.len().saturating_sub(1);
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                out.push_str(cell);
                if i < last {
                    out.push_str(&" ".repeat(w - visible_width(cell) + 2));
                }
            }
            out
        };
        let header = line(headers.iter().map(|h| h.to_string()).collect());
        println!("{}", self.paint(&header, "1"));
        for row in rows {
            println!("{}", line(row.clone()));
        }
    }

    /// `text` in the SGR style `code` on a terminal, as is elsewhere.
    pub fn paint(&self, text: &str, code: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub fn status(&self, status: RunStatus) -> String {
        let code = match status {
            RunStatus::Completed => "32",
            RunStatus::Failed | RunStatus::Timeout => "31",
            RunStatus::Cancelled => "33",
            RunStatus::Pending | RunStatus::Running => "36",
        };
        self.paint(status.as_str(), code)
    }
}

/// Width without SGR escapes (cells may be painted).
fn visible_width(cell: &str) -> usize {
    let mut width = 0;
    let mut in_escape = false;
    for c in cell.chars() {
        match (in_escape, c) {
            (false, '\x1b') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, _) => width += 1,
        }
    }
    width
}

/// Bytes for people: `1.5 MiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// An optional cell.
pub fn or_dash(value: Option<impl ToString>) -> String {
    value.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn painted_cells_are_padded_by_what_shows() {
        assert_eq!(super::visible_width("\x1b[32mcompleted\x1b[0m"), 9);
        assert_eq!(super::bytes(1536), "1.5 KiB");
        assert_eq!(super::bytes(12), "12 B");
    }
}
