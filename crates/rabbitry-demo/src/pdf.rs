//! Rendering the PDF the service sends back: one A4 page that shows the
//! document's title, written with the `pdf-writer` library.

use pdf_writer::{Content, Finish, Name, Pdf, Rect, Ref, Str};

/// Encodes text for a standard Type 1 font with WinAnsi encoding: Latin-1
/// characters map to themselves, anything else becomes `?`.
fn win_ansi(text: &str) -> Vec<u8> {
    text.chars()
        .map(|c| match u32::from(c) {
            0x20..=0x7e | 0xa0..=0xff => c as u8,
            _ => b'?',
        })
        .collect()
}

/// A valid one-page PDF showing `title` and a subtitle.
pub fn render(title: &str, subtitle: &str) -> Vec<u8> {
    let mut pdf = Pdf::new();
    let catalog = Ref::new(1);
    let pages = Ref::new(2);
    let page = Ref::new(3);
    let font = Ref::new(4);
    let body_font = Ref::new(5);
    let content_id = Ref::new(6);
    pdf.catalog(catalog).pages(pages);
    pdf.pages(pages).kids([page]).count(1);
    let mut p = pdf.page(page);
    p.media_box(Rect::new(0.0, 0.0, 595.0, 842.0));
    p.parent(pages);
    p.contents(content_id);
    let mut resources = p.resources();
    let mut fonts = resources.fonts();
    fonts.pair(Name(b"F1"), font);
    fonts.pair(Name(b"F2"), body_font);
    fonts.finish();
    resources.finish();
    p.finish();
    pdf.type1_font(font)
        .base_font(Name(b"Helvetica-Bold"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));
    pdf.type1_font(body_font)
        .base_font(Name(b"Helvetica"))
        .encoding_predefined(Name(b"WinAnsiEncoding"));

    let title = win_ansi(title);
    let subtitle = win_ansi(subtitle);
    let mut content = Content::new();
    content
        .begin_text()
        .set_font(Name(b"F1"), 28.0)
        .next_line(72.0, 740.0)
        .show(Str(&title))
        .end_text();
    content
        .begin_text()
        .set_font(Name(b"F2"), 12.0)
        .next_line(72.0, 712.0)
        .show(Str(&subtitle))
        .end_text();
    pdf.stream(content_id, &content.finish());
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_pdf_with_the_title() {
        let bytes = render("Hello World!", "rendered by the demo");
        assert!(bytes.starts_with(b"%PDF-"));
        assert!(bytes.trim_ascii_end().ends_with(b"%%EOF"));
        let doc = lopdf::Document::load_mem(&bytes).unwrap();
        let text = doc.extract_text(&[1]).unwrap();
        assert!(text.contains("Hello World!"), "{text}");
    }

    #[test]
    fn non_latin_characters_do_not_break_the_pdf() {
        let bytes = render("Grüße ✓", "");
        let doc = lopdf::Document::load_mem(&bytes).unwrap();
        assert!(doc.extract_text(&[1]).unwrap().contains("Grüße"));
    }
}
