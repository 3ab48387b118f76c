//! Rendering the PDF the service sends back: one A4 page with the
//! document's title (wrapped to the page, long words broken), the
//! correlation id on a line of its own, and `/Title` metadata. The text is
//! set in DejaVu Sans (Debian's `fonts-dejavu-core`, which the scripts
//! install), embedded as a subset of the glyphs used, with a `ToUnicode`
//! map so that the text can be searched and extracted. A character the font
//! lacks is not drawn as `?`: it is listed in [`Rendered::missing`], and
//! the site shows the list on the document.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use pdf_writer::types::{CidFontType, FontFlags, SystemInfo, UnicodeCmap};
use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str, TextStr};

/// Where the fonts are read from, unless `RABBITRY_DEMO_FONTS` says.
pub const FONT_DIR: &str = "/usr/share/fonts/truetype/dejavu";

/// A4, in points.
const PAGE: (f32, f32) = (595.0, 842.0);
/// The left and right margin.
const MARGIN: f32 = 72.0;

/// A rendered PDF, and the characters of the title the font cannot draw.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The PDF file.
    pub pdf: Vec<u8>,
    /// Characters left out, each once, in order of appearance.
    pub missing: Vec<char>,
}

/// The two faces the page uses.
struct Fonts {
    regular: Vec<u8>,
    bold: Vec<u8>,
}

fn fonts() -> Result<&'static Fonts, String> {
    static FONTS: OnceLock<Result<Fonts, String>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let dir = std::env::var_os("RABBITRY_DEMO_FONTS")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(FONT_DIR));
            let read = |name: &str| {
                let path = dir.join(name);
                std::fs::read(&path).map_err(|e| {
                    // The path is for the operator's log; the reason that
                    // travels to the site (and its users) names the font.
                    tracing::error!(path = %path.display(), error = %e, "the PDF font cannot be read");
                    format!(
                        "the PDF font {name} cannot be read on the PDF service's host ({}); its operator installs Debian's fonts-dejavu-core (scripts/demo does) or sets RABBITRY_DEMO_FONTS",
                        e.kind()
                    )
                })
            };
            Ok(Fonts {
                regular: read("DejaVuSans.ttf")?,
                bold: read("DejaVuSans-Bold.ttf")?,
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// One face as used on this page: the glyphs drawn, remapped for its
/// subset.
struct Face<'a> {
    data: &'a [u8],
    face: ttf_parser::Face<'a>,
    remapper: subsetter::GlyphRemapper,
    /// New glyph id to the character it draws (for `ToUnicode`).
    chars: BTreeMap<u16, char>,
    scale: f32,
}

impl<'a> Face<'a> {
    fn new(data: &'a [u8]) -> Result<Face<'a>, String> {
        let face = ttf_parser::Face::parse(data, 0).map_err(|e| format!("font: {e}"))?;
        let scale = 1000.0 / f32::from(face.units_per_em());
        Ok(Face {
            data,
            face,
            remapper: subsetter::GlyphRemapper::new(),
            chars: BTreeMap::new(),
            scale,
        })
    }

    /// The advance of `c` at size 1000 (PDF glyph space), if the font has it.
    fn advance(&self, c: char) -> Option<f32> {
        let g = self.face.glyph_index(c)?;
        Some(f32::from(self.face.glyph_hor_advance(g).unwrap_or(0)) * self.scale)
    }

    /// The width of `text` at `size` points; characters the font lacks
    /// take no room.
    fn width(&self, text: &str, size: f32) -> f32 {
        text.chars().filter_map(|c| self.advance(c)).sum::<f32>() * size / 1000.0
    }

    /// `text` as the bytes a `Tj` shows (two-byte new glyph ids), and the
    /// characters the font lacks.
    fn encode(&mut self, text: &str, missing: &mut Vec<char>) -> Vec<u8> {
        let mut out = Vec::with_capacity(text.len() * 2);
        for c in text.chars() {
            match self.face.glyph_index(c) {
                Some(g) => {
                    let new = self.remapper.remap(g.0);
                    self.chars.entry(new).or_insert(c);
                    out.extend_from_slice(&new.to_be_bytes());
                }
                None => {
                    if !missing.contains(&c) {
                        missing.push(c);
                    }
                }
            }
        }
        out
    }

    /// Writes the face as a Type 0 font with its subset embedded.
    fn write(&self, pdf: &mut Pdf, refs: [Ref; 5], name: &[u8]) -> Result<(), String> {
        let [type0, cid, descriptor, file, cmap] = refs;
        let subset = subsetter::subset(self.data, 0, &self.remapper)
            .map_err(|e| format!("subsetting the font: {e}"))?;
        // A subset's name carries a six-letter tag (PDF 1.7, 9.6.4).
        let mut base = b"RBTRYD+".to_vec();
        base.extend_from_slice(name);
        let system = SystemInfo {
            registry: Str(b"Adobe"),
            ordering: Str(b"Identity"),
            supplement: 0,
        };
        pdf.type0_font(type0)
            .base_font(Name(&base))
            .encoding_predefined(Name(b"Identity-H"))
            .descendant_font(cid)
            .to_unicode(cmap);
        let mut widths = vec![0.0; usize::from(self.remapper.num_gids())];
        for (new, c) in &self.chars {
            widths[usize::from(*new)] = self.advance(*c).unwrap_or(0.0);
        }
        let mut cid_font = pdf.cid_font(cid);
        cid_font
            .subtype(CidFontType::Type2)
            .base_font(Name(&base))
            .system_info(system)
            .font_descriptor(descriptor)
            .default_width(0.0)
            .cid_to_gid_map_predefined(Name(b"Identity"));
        cid_font.widths().consecutive(0, widths);
        cid_font.finish();
        let bbox = self.face.global_bounding_box();
        let s = self.scale;
        pdf.font_descriptor(descriptor)
            .name(Name(&base))
            .flags(FontFlags::NON_SYMBOLIC)
            .bbox(Rect::new(
                f32::from(bbox.x_min) * s,
                f32::from(bbox.y_min) * s,
                f32::from(bbox.x_max) * s,
                f32::from(bbox.y_max) * s,
            ))
            .italic_angle(0.0)
            .ascent(f32::from(self.face.ascender()) * s)
            .descent(f32::from(self.face.descender()) * s)
            .cap_height(f32::from(self.face.capital_height().unwrap_or(0)) * s)
            .stem_v(80.0)
            .font_file2(file);
        pdf.stream(file, &subset);
        let mut map = UnicodeCmap::new(Name(b"Custom"), system);
        for (new, c) in &self.chars {
            map.pair(*new, *c);
        }
        pdf.cmap(cmap, &map.finish());
        Ok(())
    }
}

/// The page's text as it is set, line after line from the top.
struct Lines {
    content: Content,
    /// Where the next line's baseline goes.
    y: f32,
    /// Characters no face could draw.
    missing: Vec<char>,
}

impl Lines {
    /// Sets `text` in `face` (the page's font `font`) at `size`, wrapped
    /// to the text width.
    fn put(&mut self, face: &mut Face<'_>, font: &[u8], size: f32, text: &str) {
        for line in wrap(face, text, size, PAGE.0 - 2.0 * MARGIN) {
            let shown = face.encode(&line, &mut self.missing);
            self.content
                .begin_text()
                .set_font(Name(font), size)
                .next_line(MARGIN, self.y)
                .show(Str(&shown))
                .end_text();
            self.y -= size * 1.3;
        }
    }
}

/// Breaks `text` into lines no wider than `width` at `size`: at spaces,
/// and inside a word that is wider than a line on its own.
fn wrap(face: &Face<'_>, text: &str, size: f32, width: f32) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let candidate = if line.is_empty() {
            word.to_owned()
        } else {
            format!("{line} {word}")
        };
        if face.width(&candidate, size) <= width {
            line = candidate;
            continue;
        }
        if !line.is_empty() {
            lines.push(std::mem::take(&mut line));
        }
        // The word alone: broken wherever it reaches the edge.
        for c in word.chars() {
            let mut next = line.clone();
            next.push(c);
            if face.width(&next, size) > width && !line.is_empty() {
                lines.push(std::mem::take(&mut line));
                line.push(c);
            } else {
                line = next;
            }
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines
}

/// The PDF for `title`, with `lines` under it (each on its own line,
/// wrapped too).
pub fn render(title: &str, lines: &[String]) -> Result<Rendered, String> {
    let fonts = fonts()?;
    let mut bold = Face::new(&fonts.bold)?;
    let mut regular = Face::new(&fonts.regular)?;
    let mut page = Lines {
        content: Content::new(),
        y: PAGE.1 - 100.0,
        missing: Vec::new(),
    };
    page.put(&mut bold, b"F1", 26.0, title);
    page.y -= 10.0;
    for line in lines {
        page.put(&mut regular, b"F2", 11.0, line);
    }
    if !page.missing.is_empty() {
        let list: Vec<String> = page
            .missing
            .iter()
            .map(|c| format!("U+{:04X}", u32::from(*c)))
            .collect();
        let note = format!("Not in the font, left out: {}", list.join(" "));
        page.put(&mut regular, b"F2", 11.0, &note);
    }
    let Lines {
        content, missing, ..
    } = page;

    let mut pdf = Pdf::new();
    let (catalog, pages, page, content_id, info) = (
        Ref::new(1),
        Ref::new(2),
        Ref::new(3),
        Ref::new(4),
        Ref::new(5),
    );
    let bold_refs = [6, 7, 8, 9, 10].map(Ref::new);
    let regular_refs = [11, 12, 13, 14, 15].map(Ref::new);
    pdf.catalog(catalog).pages(pages);
    pdf.pages(pages).kids([page]).count(1);
    let mut p = pdf.page(page);
    p.media_box(Rect::new(0.0, 0.0, PAGE.0, PAGE.1));
    p.parent(pages);
    p.contents(content_id);
    let mut resources = p.resources();
    let mut font_dict = resources.fonts();
    font_dict.pair(Name(b"F1"), bold_refs[0]);
    font_dict.pair(Name(b"F2"), regular_refs[0]);
    font_dict.finish();
    resources.finish();
    p.finish();
    bold.write(&mut pdf, bold_refs, b"DejaVuSans-Bold")?;
    regular.write(&mut pdf, regular_refs, b"DejaVuSans")?;
    pdf.document_info(info)
        .title(TextStr(title))
        .producer(TextStr("rabbitry demo PDF service"));
    pdf.stream(content_id, &content.finish());
    Ok(Rendered {
        pdf: pdf.finish(),
        missing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(pdf: &[u8]) -> String {
        let doc = lopdf::Document::load_mem(pdf).unwrap();
        doc.extract_text(&[1]).unwrap()
    }

    #[test]
    fn renders_the_title_and_its_lines_as_searchable_text() {
        let r = render("Hello World!", &["correlation id 3f45de0d".into()]).unwrap();
        assert!(r.pdf.starts_with(b"%PDF-"));
        assert!(r.pdf.trim_ascii_end().ends_with(b"%%EOF"));
        let text = text_of(&r.pdf);
        assert!(text.contains("Hello World!"), "{text}");
        assert!(text.contains("3f45de0d"), "{text}");
        assert!(r.missing.is_empty());
        // A subset, not the whole 700 KB font.
        assert!(r.pdf.len() < 120_000, "{} bytes", r.pdf.len());
    }

    #[test]
    fn any_script_is_drawn_and_what_the_font_lacks_is_reported() {
        let title = "Grüße — Привет €";
        let r = render(&format!("{title} 🐇"), &[]).unwrap();
        let text = text_of(&r.pdf);
        assert!(text.contains(title), "{text}");
        assert_eq!(r.missing, ['🐇']);
        assert!(text.contains("U+1F407"), "{text}");
    }

    #[test]
    fn long_titles_wrap_and_long_words_break() {
        let fonts = fonts().unwrap();
        let face = Face::new(&fonts.bold).unwrap();
        let word = "x".repeat(200);
        let lines = wrap(&face, &format!("a {word} b"), 26.0, 451.0);
        assert!(lines.len() > 3, "{lines:?}");
        assert!(
            lines.iter().all(|l| face.width(l, 26.0) <= 451.0),
            "{lines:?}"
        );
        assert_eq!(lines.concat().replace(' ', ""), format!("a{word}b"));
    }
}
