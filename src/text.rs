//! Small text helpers every layer shares: cutting text to a size in bytes without splitting a
//! character (for messages with a size limit: Kubernetes termination messages, status fields, e-mail
//! lines, errors quoting a server), lowercase hex (checksums, ETags), and escaping text for HTML
//! (e-mail, the sandbox's notes).

use std::borrow::Cow;

/// The mark that ends a shortened text.
pub const ELLIPSIS: char = '…';

/// The longest prefix of `text` that is at most `max` bytes long and ends on a character boundary.
pub fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` if it is at most `max` bytes long; else cut (on a character boundary) and ended with `…`,
/// the whole at most `max` bytes.
pub fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut cut = truncate(text, max.saturating_sub(ELLIPSIS.len_utf8())).to_owned();
    cut.push(ELLIPSIS);
    Cow::Owned(cut)
}

/// Lowercase hexadecimal, two digits a byte.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_never_split_a_character() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abc", 2), "ab");
        // "é" is two bytes: a cut inside it moves back before it.
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate("", 0), "");
        for max in 0..12 {
            let s = "añ漢🙂b";
            let t = truncate(s, max);
            assert!(t.len() <= max && s.starts_with(t));
            let short = shorten(s, max.max(3));
            assert!(short.len() <= max.max(3), "{max}: {short}");
        }
        assert_eq!(shorten("abcdef", 6), "abcdef");
        assert_eq!(shorten("abcdefg", 6), "abc…");
    }

    #[test]
    fn hex_is_lowercase_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(hex(&[]), "");
    }
}
