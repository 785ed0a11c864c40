//! The input line of the terminal chat: a single line of text with a cursor, the usual
//! editing keys (readline's where they exist) and a history of what was entered, like a shell's.
//!
//! The text is kept as `char`s so that the cursor never lands inside a character; its screen
//! column comes from the characters' display widths (a CJK character takes two columns).

use unicode_width::UnicodeWidthChar;

/// Characters the line may hold (a message body's limit is in bytes and checked by the
/// server; this keeps a pasted file from making the editor the problem).
pub const MAX_CHARS: usize = 8 * 1024;
/// Lines of history kept.
const HISTORY: usize = 200;

#[derive(Debug, Default)]
pub struct LineEditor {
    chars: Vec<char>,
    cursor: usize,
    history: Vec<String>,
    /// While browsing the history: the entry shown and the line that was being typed.
    browsing: Option<(usize, String)>,
}

impl LineEditor {
    pub fn text(&self) -> String {
        self.chars.iter().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    /// The cursor's screen column (display width of the text before it).
    pub fn cursor_column(&self) -> usize {
        self.chars[..self.cursor].iter().map(|c| c.width().unwrap_or(0)).sum()
    }

    pub fn insert(&mut self, c: char) {
        // Control characters (a pasted tab or newline) become spaces: the line is one line.
        let c = if c.is_control() { ' ' } else { c };
        if self.chars.len() < MAX_CHARS {
            self.chars.insert(self.cursor, c);
            self.cursor += 1;
        }
        self.browsing = None;
    }

    pub fn insert_str(&mut self, text: &str) {
        for c in text.chars() {
            self.insert(c);
        }
    }

    pub fn backspace(&mut self) {
        if self.cursor > 0 {
            self.cursor -= 1;
            self.chars.remove(self.cursor);
        }
    }

    pub fn delete(&mut self) {
        if self.cursor < self.chars.len() {
            self.chars.remove(self.cursor);
        }
    }

    pub fn left(&mut self) {
        self.cursor = self.cursor.saturating_sub(1);
    }

    pub fn right(&mut self) {
        self.cursor = (self.cursor + 1).min(self.chars.len());
    }

    pub fn home(&mut self) {
        self.cursor = 0;
    }

    pub fn end(&mut self) {
        self.cursor = self.chars.len();
    }

    /// Ctrl-U: deletes everything before the cursor.
    pub fn kill_to_start(&mut self) {
        self.chars.drain(..self.cursor);
        self.cursor = 0;
    }

    /// Ctrl-K: deletes everything from the cursor on.
    pub fn kill_to_end(&mut self) {
        self.chars.truncate(self.cursor);
    }

    /// Ctrl-W: deletes the word before the cursor (and the spaces after it).
    pub fn delete_word_back(&mut self) {
        let mut start = self.cursor;
        while start > 0 && self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        while start > 0 && !self.chars[start - 1].is_whitespace() {
            start -= 1;
        }
        self.chars.drain(start..self.cursor);
        self.cursor = start;
    }

    /// Alt-B / Ctrl-Left: to the start of the word before the cursor.
    pub fn word_left(&mut self) {
        while self.cursor > 0 && self.chars[self.cursor - 1].is_whitespace() {
            self.cursor -= 1;
        }
        while self.cursor > 0 && !self.chars[self.cursor - 1].is_whitespace() {
            self.cursor -= 1;
        }
    }

    /// Alt-F / Ctrl-Right: past the end of the word after the cursor.
    pub fn word_right(&mut self) {
        let n = self.chars.len();
        while self.cursor < n && self.chars[self.cursor].is_whitespace() {
            self.cursor += 1;
        }
        while self.cursor < n && !self.chars[self.cursor].is_whitespace() {
            self.cursor += 1;
        }
    }

    /// Up: the previous history entry (the line being typed is kept for Down).
    pub fn history_prev(&mut self) {
        let at = match &self.browsing {
            Some((at, _)) if *at == 0 => return,
            Some((at, _)) => at - 1,
            None if self.history.is_empty() => return,
            None => {
                self.browsing = Some((self.history.len(), self.text()));
                self.history.len() - 1
            }
        };
        if let Some((shown, _)) = &mut self.browsing {
            *shown = at;
        }
        self.show(self.history[at].clone());
    }

    /// Down: the next history entry, and after the newest the line that was being typed.
    pub fn history_next(&mut self) {
        let Some((at, draft)) = self.browsing.take() else { return };
        if at + 1 < self.history.len() {
            self.browsing = Some((at + 1, draft));
            self.show(self.history[at + 1].clone());
        } else {
            self.show(draft);
        }
    }

    fn show(&mut self, text: String) {
        self.chars = text.chars().take(MAX_CHARS).collect();
        self.cursor = self.chars.len();
    }

    /// Enter: the line, which is cleared and (unless blank or a repeat) remembered.
    pub fn take(&mut self) -> String {
        let text = self.text();
        self.chars.clear();
        self.cursor = 0;
        self.browsing = None;
        if !text.trim().is_empty() && self.history.last() != Some(&text) {
            if self.history.len() == HISTORY {
                self.history.remove(0);
            }
            self.history.push(text.clone());
        }
        text
    }

    /// Clears the line without remembering it (Esc).
    pub fn clear(&mut self) {
        self.chars.clear();
        self.cursor = 0;
        self.browsing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(text: &str) -> LineEditor {
        let mut e = LineEditor::default();
        e.insert_str(text);
        e
    }

    #[test]
    fn edits_happen_at_the_cursor() {
        let mut e = typed("helo");
        e.left();
        e.insert('l');
        assert_eq!(e.text(), "hello");
        e.home();
        e.delete();
        e.insert('H');
        e.end();
        e.backspace();
        assert_eq!(e.text(), "Hell");
        e.home();
        e.right();
        e.kill_to_end();
        assert_eq!(e.text(), "H");
        e.insert_str("ow are");
        e.home();
        e.word_right();
        e.kill_to_start();
        assert_eq!(e.text(), " are");
    }

    #[test]
    fn ctrl_w_deletes_the_word_before_the_cursor() {
        let mut e = typed("send this  now ");
        e.delete_word_back();
        assert_eq!(e.text(), "send this  ");
        e.delete_word_back();
        assert_eq!(e.text(), "send ");
        e.word_left();
        assert_eq!(e.cursor_column(), 0);
    }

    #[test]
    fn the_cursor_column_counts_display_width() {
        let e = typed("日本a");
        assert_eq!(e.cursor_column(), 5);
    }

    #[test]
    fn a_pasted_newline_or_tab_stays_on_the_line_and_the_length_is_bounded() {
        let mut e = typed("a\tb\nc");
        assert_eq!(e.text(), "a b c");
        e.insert_str(&"x".repeat(MAX_CHARS * 2));
        assert_eq!(e.text().chars().count(), MAX_CHARS);
    }

    #[test]
    fn history_goes_back_and_returns_to_the_draft() {
        let mut e = LineEditor::default();
        for line in ["first", "second", "second", "   "] {
            e.insert_str(line);
            e.take();
        }
        e.insert_str("draft");
        e.history_prev();
        assert_eq!(e.text(), "second", "repeats and blank lines are not remembered");
        e.history_prev();
        assert_eq!(e.text(), "first");
        e.history_prev();
        assert_eq!(e.text(), "first", "the oldest entry stays");
        e.history_next();
        assert_eq!(e.text(), "second");
        e.history_next();
        assert_eq!(e.text(), "draft");
        e.history_next();
        assert_eq!(e.text(), "draft");
    }
}
