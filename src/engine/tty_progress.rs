//! Reads what a command draws on a terminal: output lines and the percentages that
//! progress bars print (tqdm, Rich, curl `-#`, apt …).
//!
//! Pure and incremental: feed raw output chunks as they arrive ([`TtyParser::feed`]),
//! then [`TtyParser::finish`] at the end. The model of the terminal is deliberately
//! small:
//!
//! - `\n` commits the current line; `\r` returns to the start of the line, and the
//!   next printed character starts a fresh render of it (a *redraw*), so a bar that
//!   redraws itself a hundred times commits one line, its last render. `\r\n` (what a
//!   TTY turns every `\n` into) is a plain line end.
//! - ANSI escapes are parsed and dropped: colours (`CSI … m`), cursor visibility
//!   (`CSI ?25l`), erase in line (`CSI K`, `CSI 2K`: a redraw), erase display, OSC
//!   titles and links. Cursor up (`CSI nA`, `CSI nF`) means the next `n` committed
//!   lines redraw lines already seen (multi-bar displays): they are not emitted again.
//! - Consecutive identical lines are emitted once; empty lines are not emitted.
//! - A percentage is `\d{1,3}(\.\d+)?%` (at most 100, not preceded by a digit or a
//!   dot); the first one of each render counts, and a value is reported when it
//!   differs from the last one reported.
//!
//! Invalid UTF-8 becomes U+FFFD; a multi-byte character split across chunks is kept
//! whole.

use std::sync::LazyLock;

use regex::Regex;

/// Longest line kept; characters beyond it are dropped (a stream with no line end
/// cannot grow memory without bound).
const MAX_LINE_CHARS: usize = 4096;

static PERCENT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?:^|[^\d.])(\d{1,3}(?:\.\d+)?)%").expect("valid percent regex"));

/// What the parser found in the output so far.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TtyEvent {
    /// A committed line of output (escape codes removed, redraws collapsed).
    Line(String),
    /// A new percentage (0.0–100.0) drawn on the terminal.
    Percent(f64),
}

#[derive(Clone, Debug, Default)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// ESC followed by a character-set designator (`(`, `)` …): one more byte.
    Charset,
    /// Inside `ESC [`: parameter and intermediate bytes so far.
    Csi(String),
    /// Inside `ESC ]` (an OSC string), until BEL or ESC `\`.
    Osc,
    /// ESC seen inside an OSC string.
    OscEnd,
}

/// Incremental parser of terminal output. See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct TtyParser {
    line: String,
    line_chars: usize,
    /// A `\r` was seen: the next printed character starts a new render of the line.
    pending_cr: bool,
    escape: Escape,
    /// Bytes of an incomplete UTF-8 character at the end of the last chunk.
    partial: Vec<u8>,
    /// Committed lines still to come that redraw lines already emitted.
    redraws: usize,
    last_line: Option<String>,
    last_percent: Option<f64>,
}

impl TtyParser {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// The line as currently drawn (not yet committed).
    pub(crate) fn current(&self) -> &str {
        &self.line
    }

    /// Parses one chunk of raw output.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Vec<TtyEvent> {
        let mut events = Vec::new();
        self.partial.extend_from_slice(bytes);
        let data = std::mem::take(&mut self.partial);
        let mut rest = &data[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.chars(text, &mut events);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    self.chars(
                        std::str::from_utf8(valid).expect("valid prefix"),
                        &mut events,
                    );
                    match e.error_len() {
                        // Incomplete character at the end: wait for the next chunk.
                        None => {
                            self.partial = after.to_vec();
                            break;
                        }
                        Some(n) => {
                            self.chars("\u{FFFD}", &mut events);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        // What is drawn at the end of a chunk is what a viewer sees now.
        self.render(&mut events);
        events
    }

    /// Ends the output: an incomplete character becomes U+FFFD and the line being
    /// drawn is committed.
    pub(crate) fn finish(&mut self) -> Vec<TtyEvent> {
        let mut events = Vec::new();
        if !self.partial.is_empty() {
            self.partial.clear();
            self.chars("\u{FFFD}", &mut events);
        }
        self.redraws = 0;
        self.commit(&mut events);
        events
    }

    fn chars(&mut self, text: &str, events: &mut Vec<TtyEvent>) {
        for c in text.chars() {
            self.char(c, events);
        }
    }

    fn char(&mut self, c: char, events: &mut Vec<TtyEvent>) {
        match std::mem::take(&mut self.escape) {
            Escape::None => {}
            Escape::Start => {
                self.escape = match c {
                    '[' => Escape::Csi(String::new()),
                    ']' => Escape::Osc,
                    '(' | ')' | '*' | '+' | '#' | '%' => Escape::Charset,
                    // Two-character escapes (ESC 7, ESC 8, ESC M …): nothing to draw.
                    _ => Escape::None,
                };
                return;
            }
            Escape::Charset => return,
            Escape::Csi(mut params) => {
                if ('\x40'..='\x7e').contains(&c) {
                    self.csi(&params, c, events);
                } else if params.len() < 32 {
                    params.push(c);
                    self.escape = Escape::Csi(params);
                } else {
                    self.escape = Escape::Csi(params);
                }
                return;
            }
            Escape::Osc => {
                self.escape = match c {
                    '\x07' => Escape::None,
                    '\x1b' => Escape::OscEnd,
                    _ => Escape::Osc,
                };
                return;
            }
            Escape::OscEnd => {
                // ESC \ ends the string; anything else: still inside.
                self.escape = if c == '\\' { Escape::None } else { Escape::Osc };
                return;
            }
        }
        match c {
            '\x1b' => self.escape = Escape::Start,
            '\n' => self.commit(events),
            '\r' => {
                self.render(events);
                self.pending_cr = true;
            }
            '\x08' => {
                if !self.pending_cr && self.line.pop().is_some() {
                    self.line_chars -= 1;
                }
            }
            '\t' => self.print(' '),
            c if c.is_control() => {}
            c => self.print(c),
        }
    }

    fn print(&mut self, c: char) {
        if self.pending_cr {
            self.clear();
        }
        if self.line_chars < MAX_LINE_CHARS {
            self.line.push(c);
            self.line_chars += 1;
        }
    }

    fn clear(&mut self) {
        self.line.clear();
        self.line_chars = 0;
        self.pending_cr = false;
    }

    fn csi(&mut self, params: &str, command: char, events: &mut Vec<TtyEvent>) {
        let n = |default: usize| -> usize {
            params
                .trim_start_matches(['?', '>', '<', '='])
                .split(';')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(default)
        };
        match command {
            // Erase in line: 0 (to the end) only matters at the start of the line.
            'K' => match n(0) {
                0 if !self.pending_cr => {}
                _ => {
                    self.render(events);
                    self.clear();
                }
            },
            // Erase in display.
            'J' => {
                self.render(events);
                self.clear();
            }
            // Cursor up / previous line: the lines below are drawn again.
            'A' | 'F' => {
                self.render(events);
                self.clear();
                self.redraws += n(1).max(1);
            }
            // Cursor to column 1: a carriage return.
            'G' if n(1) <= 1 => {
                self.render(events);
                self.pending_cr = true;
            }
            // Colours, modes (`?25l`), other cursor moves: nothing to read.
            _ => {}
        }
    }

    /// Reads the percentage of the line as drawn now.
    fn render(&mut self, events: &mut Vec<TtyEvent>) {
        if self.pending_cr {
            return;
        }
        if let Some(p) = percent_of(&self.line)
            && self.last_percent != Some(p)
        {
            self.last_percent = Some(p);
            events.push(TtyEvent::Percent(p));
        }
    }

    fn commit(&mut self, events: &mut Vec<TtyEvent>) {
        self.pending_cr = false;
        self.render(events);
        let line = std::mem::take(&mut self.line);
        self.line_chars = 0;
        if self.redraws > 0 {
            self.redraws -= 1;
            return;
        }
        let line = line.trim_end().to_owned();
        if line.trim().is_empty() || self.last_line.as_deref() == Some(line.as_str()) {
            return;
        }
        self.last_line = Some(line.clone());
        events.push(TtyEvent::Line(line));
    }
}

/// The first percentage in `text` (0–100), if any.
pub(crate) fn percent_of(text: &str) -> Option<f64> {
    PERCENT.captures_iter(text).find_map(|c| {
        let v: f64 = c[1].parse().ok()?;
        (v <= 100.0).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<TtyEvent> {
        let mut p = TtyParser::new();
        let mut events = Vec::new();
        for c in chunks {
            events.extend(p.feed(c));
        }
        events.extend(p.finish());
        events
    }

    fn percents(events: &[TtyEvent]) -> Vec<f64> {
        events
            .iter()
            .filter_map(|e| match e {
                TtyEvent::Percent(p) => Some(*p),
                _ => None,
            })
            .collect()
    }

    fn lines(events: &[TtyEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                TtyEvent::Line(l) => Some(l.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn percentages_in_text() {
        assert_eq!(percent_of("45%"), Some(45.0));
        assert_eq!(percent_of("Downloading ━━━━  12.5% 0:00:03"), Some(12.5));
        assert_eq!(percent_of("100%|██████████| 10/10"), Some(100.0));
        assert_eq!(percent_of("(3%) then 90%"), Some(3.0));
        assert_eq!(percent_of("1234% nope"), None);
        assert_eq!(percent_of("0.5% ok"), Some(0.5));
        assert_eq!(percent_of("1.2.50% nope"), None);
        assert_eq!(percent_of("101%"), None);
        assert_eq!(percent_of("% Total    % Received"), None);
        assert_eq!(percent_of("no percent here"), None);
    }

    #[test]
    fn carriage_return_redraws_collapse_to_one_line() {
        // The hook of the integration test: printf "\r%d%%" for 10..100, no newline.
        let chunks: Vec<Vec<u8>> = (1..=10)
            .map(|i| format!("\r{}%", i * 10).into_bytes())
            .collect();
        let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
        let events = parse(&refs);
        assert_eq!(
            percents(&events),
            vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0, 100.0]
        );
        assert_eq!(lines(&events), vec!["100%"]);
    }

    #[test]
    fn every_redraw_in_one_chunk_counts() {
        let events = parse(&[b"\r10%\r20%\r30%"]);
        assert_eq!(percents(&events), vec![10.0, 20.0, 30.0]);
        assert_eq!(lines(&events), vec!["30%"]);
    }

    #[test]
    fn tty_line_endings_are_plain_line_ends() {
        // A TTY turns "\n" into "\r\n".
        let events = parse(&[b"first line\r\nsecond\r", b"\nthird\r\n"]);
        assert_eq!(lines(&events), vec!["first line", "second", "third"]);
        assert!(percents(&events).is_empty());
    }

    #[test]
    fn tqdm_recording() {
        // tqdm under a TTY: "\r" redraws, a cursor hide/show pair, a final "\n".
        let raw: &[u8] = b"\x1b[?25l\r  0%|          | 0/4 [00:00<?, ?it/s]\
\r 25%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8c       | 1/4 [00:00<00:01,  2.00it/s]\
\r 50%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88     | 2/4 [00:01<00:01,  2.00it/s]\
\r 75%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8c  | 3/4 [00:01<00:00,  2.00it/s]\
\r100%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88| 4/4 [00:02<00:00,  2.00it/s]\
\x1b[?25h\r\n";
        // Split in the middle of a UTF-8 character and of an escape sequence.
        let (a, rest) = raw.split_at(60);
        let (b, c) = rest.split_at(rest.len() - 8);
        let events = parse(&[a, b, c]);
        assert_eq!(percents(&events), vec![0.0, 25.0, 50.0, 75.0, 100.0]);
        assert_eq!(
            lines(&events),
            vec!["100%|██████████| 4/4 [00:02<00:00,  2.00it/s]"]
        );
    }

    #[test]
    fn rich_single_bar_recording() {
        // Rich's live display: "\r\x1b[2K" before each frame, colours, cursor hidden.
        let raw = "\x1b[?25l\r\x1b[2KDownloading \x1b[38;5;237m━━━━━━━━━━\x1b[0m \x1b[35m  0%\x1b[0m \x1b[36m-:--:--\x1b[0m\
\r\x1b[2KDownloading \x1b[38;2;249;38;114m━━━━\x1b[0m\x1b[38;5;237m━━━━━━\x1b[0m \x1b[35m 40%\x1b[0m \x1b[36m0:00:02\x1b[0m\
\r\x1b[2KDownloading \x1b[38;2;249;38;114m━━━━━━━━\x1b[0m\x1b[38;5;237m━━\x1b[0m \x1b[35m 80%\x1b[0m \x1b[36m0:00:01\x1b[0m\
\r\x1b[2KDownloading \x1b[38;2;114;156;31m━━━━━━━━━━\x1b[0m \x1b[35m100%\x1b[0m \x1b[36m0:00:00\x1b[0m\
\r\x1b[2KDownloading \x1b[38;2;114;156;31m━━━━━━━━━━\x1b[0m \x1b[35m100%\x1b[0m \x1b[36m0:00:00\x1b[0m\r\n\x1b[?25h";
        // Byte by byte: the worst case for split escapes and characters.
        let bytes = raw.as_bytes();
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        let events = parse(&chunks);
        assert_eq!(percents(&events), vec![0.0, 40.0, 80.0, 100.0]);
        assert_eq!(lines(&events), vec!["Downloading ━━━━━━━━━━ 100% 0:00:00"]);
    }

    #[test]
    fn rich_multi_bar_redraws_are_not_repeated() {
        // Two bars: each frame moves up one line and redraws both.
        let frame =
            |a: u32, b: u32| format!("\r\x1b[2K\x1b[1A\x1b[2Kfetch  {a:>3}%\nbuild  {b:>3}%");
        let mut raw = String::from("\x1b[?25lfetch    0%\nbuild    0%");
        raw.push_str(&frame(50, 10));
        raw.push_str(&frame(100, 60));
        raw.push_str(&frame(100, 100));
        raw.push_str("\n\x1b[?25h");
        let events = parse(&[raw.as_bytes()]);
        assert_eq!(lines(&events), vec!["fetch    0%", "build  100%"]);
        let p = percents(&events);
        assert_eq!(p.first(), Some(&0.0));
        assert_eq!(p.last(), Some(&100.0));
        for v in [50.0, 10.0, 60.0] {
            assert!(p.contains(&v), "{v} in {p:?}");
        }
    }

    #[test]
    fn curl_progress_bar_recording() {
        // curl -# draws "#" bars with a percentage at the end of the line.
        let raw: &[u8] = b"\r                                                    0.0%\
\r######                                                  9.4%\
\r###################################                    48.8%\
\r######################################################## 100.0%\n";
        let events = parse(&[raw]);
        assert_eq!(percents(&events), vec![0.0, 9.4, 48.8, 100.0]);
        assert_eq!(lines(&events).len(), 1);
    }

    #[test]
    fn split_percentages_are_not_misread() {
        // "100%" split after "10": the partial render must not read as 10%.
        let events = parse(&[b"\r 5", b"0%", b"\r 10", b"0%"]);
        assert_eq!(percents(&events), vec![50.0, 100.0]);
    }

    #[test]
    fn repeated_lines_and_blank_lines_are_emitted_once() {
        let events = parse(&[b"a\na\n\n  \nb\na\n"]);
        assert_eq!(lines(&events), vec!["a", "b", "a"]);
    }

    #[test]
    fn osc_titles_and_charsets_are_dropped() {
        let events =
            parse(&[b"\x1b]0;my title\x07\x1b(Bhello \x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\n"]);
        assert_eq!(lines(&events), vec!["hello link"]);
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let events = parse(&[b"bad \xff byte\n", b"cut \xe2\x94"]);
        assert_eq!(lines(&events), vec!["bad \u{FFFD} byte", "cut \u{FFFD}"]);
    }

    #[test]
    fn current_is_the_line_as_drawn_now() {
        let mut p = TtyParser::new();
        p.feed(b"one\ntw");
        assert_eq!(p.current(), "tw");
        p.feed(b"o\r");
        assert_eq!(p.current(), "two", "a return alone does not erase");
        p.feed(b"X");
        assert_eq!(p.current(), "X", "the next character starts a fresh render");
        p.feed(b"\n");
        assert_eq!(p.current(), "");
    }

    #[test]
    fn cursor_up_by_more_than_one_line_redraws_that_many() {
        // Three bars; each frame goes up two lines and redraws all three.
        let frame = |a: u32| format!("\r\x1b[2K\x1b[2A\x1b[2Ka {a}%\nb {a}%\nc {a}%");
        let mut raw = String::from("a 0%\nb 0%\nc 0%");
        raw.push_str(&frame(50));
        raw.push_str(&frame(100));
        raw.push('\n');
        let events = parse(&[raw.as_bytes()]);
        assert_eq!(lines(&events), vec!["a 0%", "b 0%", "c 100%"]);
    }

    #[test]
    fn control_characters_are_not_printed() {
        let events = parse(&[b"a\x00b\x07c\x0bd\n"]);
        assert_eq!(lines(&events), vec!["abcd"]);
    }

    #[test]
    fn backspace_at_the_start_of_a_line_and_the_length_after_it() {
        let events = parse(&[b"\x08\x08ok\n"]);
        assert_eq!(lines(&events), vec!["ok"]);
        // Backspaces give their room back: a full line, ten erased, ten new.
        let mut raw = vec![b'x'; MAX_LINE_CHARS];
        raw.extend_from_slice(&[0x08; 10]);
        raw.extend_from_slice(b"0123456789\n");
        let events = parse(&[&raw]);
        let line = &lines(&events)[0];
        assert_eq!(line.len(), MAX_LINE_CHARS);
        assert!(line.ends_with("0123456789"), "{}", &line[line.len() - 20..]);
    }

    #[test]
    fn erase_in_line_clears_only_at_the_start_of_a_render() {
        // `CSI K` after text erases what is right of the cursor: nothing yet.
        let events = parse(&[b"abc\x1b[Kdef\n"]);
        assert_eq!(lines(&events), vec!["abcdef"]);
        // After a return, `CSI K` erases the old render.
        let events = parse(&[b"old line\r\x1b[Knew\n"]);
        assert_eq!(lines(&events), vec!["new"]);
        // …even when nothing is drawn after it: the line ends empty.
        let events = parse(&[b"old line\r\x1b[K\n"]);
        assert!(lines(&events).is_empty(), "{events:?}");
        // `CSI 2K` erases the whole line wherever the cursor is.
        let events = parse(&[b"gone\x1b[2Kkept\n"]);
        assert_eq!(lines(&events), vec!["kept"]);
    }

    #[test]
    fn erase_display_starts_the_line_again() {
        let events = parse(&[b"10% old\x1b[2J20% new\n"]);
        assert_eq!(lines(&events), vec!["20% new"]);
        assert_eq!(percents(&events), vec![10.0, 20.0]);
    }

    #[test]
    fn cursor_to_column_one_is_a_return_and_other_columns_are_not() {
        let events = parse(&[b"50%\x1b[1G60%\n"]);
        assert_eq!(percents(&events), vec![50.0, 60.0]);
        assert_eq!(lines(&events), vec!["60%"]);
        let events = parse(&[b"50%\x1b[G60%\n"]);
        assert_eq!(lines(&events), vec!["60%"], "no column means column 1");
        let events = parse(&[b"ab\x1b[5Gcd\n"]);
        assert_eq!(
            lines(&events),
            vec!["abcd"],
            "another column is not a return"
        );
    }

    #[test]
    fn backspace_and_long_lines() {
        let events = parse(&[b"abX\x08c\n"]);
        assert_eq!(lines(&events), vec!["abc"]);
        let long = vec![b'x'; MAX_LINE_CHARS * 2];
        let events = parse(&[&long]);
        assert_eq!(lines(&events)[0].len(), MAX_LINE_CHARS);
    }
}
