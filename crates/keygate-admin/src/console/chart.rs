//! Stacked bar charts as inline SVG, drawn on the server, with the same figures in a table
//! for screen readers and keyboards.

use std::fmt::Write;

use super::html::esc;

/// Colours with at least 3:1 contrast on white, for the bars.
const PALETTE: [&str; 9] = [
    "#0b4f9c", "#a4000f", "#b35900", "#6a3d9a", "#1b7837", "#8c510a", "#c51b7d", "#4d4d4d",
    "#01665e",
];

/// One stacked series: a label and a value per bucket.
pub(crate) struct Series {
    pub(crate) label: String,
    pub(crate) values: Vec<u64>,
}

/// A chart of `series` stacked over `buckets` (their labels), titled `title`; `id` names
/// its elements. An empty chart says so instead.
pub(crate) fn stacked(id: &str, title: &str, buckets: &[String], series: &[Series]) -> String {
    let totals: Vec<u64> = (0..buckets.len())
        .map(|i| {
            series
                .iter()
                .map(|s| s.values.get(i).copied().unwrap_or(0))
                .sum()
        })
        .collect();
    let max = totals.iter().copied().max().unwrap_or(0);
    let mut out = format!(
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption>",
        esc(title)
    );
    if buckets.is_empty() || max == 0 {
        out.push_str("<p>Nothing counted in this period.</p></figure>");
        return out;
    }
    let (w, h, left, bottom, top) = (720.0_f64, 220.0_f64, 56.0_f64, 28.0_f64, 10.0_f64);
    let plot_w = w - left - 8.0;
    let plot_h = h - bottom - top;
    let step = plot_w / buckets.len() as f64;
    let bar = (step * 0.8).max(1.0);
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         role=\"img\" aria-labelledby=\"{id}-title\"><title id=\"{id}-title\">{t}</title>\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{base}\" stroke=\"#111\"/>\
         <line x1=\"{left}\" y1=\"{base}\" x2=\"{right}\" y2=\"{base}\" stroke=\"#111\"/>\
         <text x=\"{lx}\" y=\"{ty}\" text-anchor=\"end\" font-size=\"11\">{max}</text>\
         <text x=\"{lx}\" y=\"{base}\" text-anchor=\"end\" font-size=\"11\">0</text>",
        t = esc(title),
        base = top + plot_h,
        right = w - 8.0,
        lx = left - 4.0,
        ty = top + 8.0,
    );
    for (i, label) in buckets.iter().enumerate() {
        let x = left + step * i as f64 + (step - bar) / 2.0;
        let mut y = top + plot_h;
        for (k, s) in series.iter().enumerate() {
            let v = s.values.get(i).copied().unwrap_or(0);
            if v == 0 {
                continue;
            }
            let hgt = plot_h * v as f64 / max as f64;
            y -= hgt;
            let _ = write!(
                out,
                "<rect class=\"bar\" data-series=\"{sl}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{hgt:.1}\" fill=\"{c}\">\
                 <title>{sl} {bl}: {v}</title></rect>",
                sl = esc(&s.label),
                bl = esc(label),
                c = PALETTE[k % PALETTE.len()],
            );
        }
    }
    // Bucket labels: the first, the middle and the last.
    let mut marks = vec![0, buckets.len() / 2, buckets.len() - 1];
    marks.dedup();
    let last = buckets.len() - 1;
    for i in marks {
        // The first label starts at its bar, the last ends at its bar: none is cut off.
        let (x, anchor) = match i {
            0 => (left + step * i as f64, "start"),
            i if i == last => (left + step * (i + 1) as f64, "end"),
            _ => (left + step * i as f64 + step / 2.0, "middle"),
        };
        let _ = write!(
            out,
            "<text x=\"{x:.1}\" y=\"{y}\" text-anchor=\"{anchor}\" font-size=\"11\">{}</text>",
            esc(&buckets[i]),
            y = h - 8.0
        );
    }
    out.push_str("</svg><p class=\"legend\">");
    for (k, s) in series.iter().enumerate() {
        let _ = write!(
            out,
            "<span><svg class=\"swatch\" width=\"12\" height=\"12\" aria-hidden=\"true\"><rect width=\"12\" height=\"12\" fill=\"{c}\"/></svg>{}</span>",
            esc(&s.label),
            c = PALETTE[k % PALETTE.len()]
        );
    }
    out.push_str("</p><details><summary>The figures</summary><table><thead><tr><th scope=\"col\">Period</th>");
    for s in series {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(&s.label));
    }
    out.push_str("<th scope=\"col\">Total</th></tr></thead><tbody>");
    for (i, label) in buckets.iter().enumerate() {
        let _ = write!(out, "<tr><th scope=\"row\">{}</th>", esc(label));
        for s in series {
            let _ = write!(out, "<td>{}</td>", s.values.get(i).copied().unwrap_or(0));
        }
        let _ = write!(out, "<td>{}</td></tr>", totals[i]);
    }
    out.push_str("</tbody></table></details></figure>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_stack_to_the_bucket_total_and_empty_charts_say_so() {
        let svg = stacked(
            "c",
            "Requests",
            &["a".into(), "b".into()],
            &[
                Series {
                    label: "allowed".into(),
                    values: vec![3, 1],
                },
                Series {
                    label: "<denied>".into(),
                    values: vec![1, 0],
                },
            ],
        );
        assert_eq!(svg.matches("class=\"bar\"").count(), 3, "no bar for a zero");
        // The tallest bucket (4) fills the plot height (182): 3/4 and 1/4 of it.
        assert!(svg.contains("height=\"136.5\""), "{svg}");
        assert!(svg.contains("height=\"45.5\""), "{svg}");
        assert!(svg.contains("&lt;denied&gt;") && !svg.contains("<denied>"));
        assert!(svg.contains("<td>4</td>"));
        let empty = stacked("e", "Requests", &["a".into()], &[]);
        assert!(empty.contains("Nothing counted"));
    }
}
