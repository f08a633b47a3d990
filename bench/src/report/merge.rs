//! `run --only SECTION --merge`: one section measured alone replaces its
//! part of an existing BENCHMARKS.md — its subsection (from its heading to
//! the next heading of the same or a higher level) and its rows of the
//! targets table — and leaves every other line as it was.

/// What a section owns in the full report.
#[derive(Debug, Clone, Copy)]
pub struct Part {
    /// Its heading line, e.g. `### Signer vs OpenBao PKI`.
    pub heading: &'static str,
    /// When the report has no such heading: insert before the first line
    /// starting with this (else at the end).
    pub before: Option<&'static str>,
    /// Its target rows are the table rows starting `| <prefix>`.
    pub check_prefix: &'static str,
}

/// The targets table's header line.
const TARGETS_HEADER: &str = "| target | measured | wanted | met |";

fn heading_level(line: &str) -> Option<usize> {
    let hashes = line.chars().take_while(|&c| c == '#').count();
    (hashes > 0 && line.get(hashes..).is_some_and(|rest| rest.starts_with(' '))).then_some(hashes)
}

/// `existing` with `part`'s subsection replaced by `section` (which starts
/// with the heading) and its target rows by `target_rows`.
pub fn splice(existing: &str, part: &Part, section: &str, target_rows: &[String]) -> String {
    let row_prefix = format!("| {}", part.check_prefix);
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| !l.starts_with(&row_prefix))
        .map(str::to_string)
        .collect();
    if let Some(header) = lines.iter().position(|l| l == TARGETS_HEADER) {
        let end = lines
            .iter()
            .skip(header)
            .position(|l| !l.starts_with('|'))
            .map_or(lines.len(), |n| header + n);
        lines.splice(end..end, target_rows.iter().cloned());
    }
    let new: Vec<String> = section.lines().map(str::to_string).collect();
    let level = heading_level(part.heading).unwrap_or(1);
    match lines.iter().position(|l| l.trim_end() == part.heading) {
        Some(start) => {
            let end = lines
                .iter()
                .skip(start + 1)
                .position(|l| heading_level(l).is_some_and(|h| h <= level))
                .map_or(lines.len(), |n| start + 1 + n);
            lines.splice(start..end, new);
        }
        None => {
            let at = part
                .before
                .and_then(|b| lines.iter().position(|l| l.starts_with(b)))
                .unwrap_or(lines.len());
            lines.splice(at..at, new);
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PART: Part = Part {
        heading: "### B vs C",
        before: Some("## 2. "),
        check_prefix: "vs C, ",
    };

    const REPORT: &str = "# Benchmarks

## Targets

| target | measured | wanted | met |
| --- | --- | --- | --- |
| signer / bound | 0.3 | ≥ 0.8 | **no** |
| vs C, old | 4.0× | ≥ 5× | **no** |
| in Envoy, x | 1 | 2 | yes |

- not measured: something

## 1. Signer throughput

rows

### B vs C

old figures

## 2. Mass restart

restart figures
";

    #[test]
    fn the_section_and_its_target_rows_are_replaced_and_nothing_else() {
        let rows = vec!["| vs C, new | 6.0× | ≥ 5× | yes |".to_string()];
        let out = splice(REPORT, &PART, "### B vs C\n\nnew figures\n\n", &rows);
        assert!(
            !out.contains("old figures") && !out.contains("vs C, old"),
            "{out}"
        );
        assert!(out.contains(
            "| in Envoy, x | 1 | 2 | yes |\n| vs C, new | 6.0× | ≥ 5× | yes |\n\n- not measured"
        ));
        assert!(out.contains(
            "rows\n\n### B vs C\n\nnew figures\n\n## 2. Mass restart\n\nrestart figures\n"
        ));
        // Merging again gives the same file.
        assert_eq!(
            splice(&out, &PART, "### B vs C\n\nnew figures\n\n", &rows),
            out
        );
    }

    #[test]
    fn a_report_without_the_section_gets_it_before_the_anchor() {
        let old = REPORT.replace("### B vs C\n\nold figures\n\n", "");
        let out = splice(&old, &PART, "### B vs C\n\nnew\n\n", &[]);
        assert!(
            out.contains("rows\n\n### B vs C\n\nnew\n\n## 2. Mass restart"),
            "{out}"
        );
        let no_anchor = Part {
            before: None,
            ..PART
        };
        let out = splice("# x\n", &no_anchor, "### B vs C\n\nnew\n", &[]);
        assert_eq!(out, "# x\n### B vs C\n\nnew\n");
    }

    #[test]
    fn a_top_level_section_runs_to_the_next_top_level_heading_only() {
        let part = Part {
            heading: "## 5. E",
            before: None,
            check_prefix: "in E, ",
        };
        let text = "# x\n\n## 5. E\n\nold\n\n### sub\n\nold too\n";
        assert_eq!(
            splice(text, &part, "## 5. E\n\nnew\n", &[]),
            "# x\n\n## 5. E\n\nnew\n"
        );
    }
}
