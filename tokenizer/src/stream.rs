//! Incremental decoding: text out as ids arrive, whole characters only.

use crate::{Tokenizer, TokenizerError};

/// Decodes generated ids one at a time into text to print as it comes.
///
/// Byte-level and byte-fallback vocabularies split a multi-byte character (an emoji, most CJK
/// text) across tokens; the text of the ids so far then ends in an incomplete character, which
/// decodes to U+FFFD. [`TextStream::push`] holds such text back until the character is
/// complete, so what it returns, concatenated, is the decoding of every id pushed (special
/// tokens left out). Each push decodes the ids since the last text handed out plus a few
/// before them for context, so the cost per token stays constant.
#[derive(Debug)]
pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// `ids[..start]` are context only: their text was handed out already.
    start: usize,
}

/// Ids kept before the undecoded ones, so that decoders that look at neighbours (a
/// SentencePiece leading-space strip) see the same context as a whole decode.
const CONTEXT: usize = 4;

impl<'a> TextStream<'a> {
    pub(crate) fn new(tokenizer: &'a Tokenizer) -> TextStream<'a> {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            start: 0,
        }
    }

    /// Adds one id; returns the new text it completes (empty while a character is
    /// incomplete, or for a special token).
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let before = self.tokenizer.decode(&self.ids[..self.start], true)?;
        let all = self.tokenizer.decode(&self.ids, true)?;
        if all.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let new = match all.strip_prefix(&before) {
            Some(new) => new.to_string(),
            // The decoder changed text already handed out (it cannot be taken back): hand
            // out what follows the common part.
            None => {
                let common = before
                    .char_indices()
                    .zip(all.chars())
                    .find(|((_, a), b)| a != b)
                    .map_or(before.len().min(all.len()), |((i, _), _)| i);
                all.get(common..).unwrap_or_default().to_string()
            }
        };
        self.start = self.ids.len();
        if self.start > CONTEXT {
            self.ids.drain(..self.start - CONTEXT);
            self.start = CONTEXT;
        }
        Ok(new)
    }

    /// The text still held back (an incomplete character at the end, as U+FFFD).
    pub fn finish(self) -> Result<String, TokenizerError> {
        let before = self.tokenizer.decode(&self.ids[..self.start], true)?;
        let all = self.tokenizer.decode(&self.ids, true)?;
        Ok(all.strip_prefix(&before).unwrap_or(&all).to_string())
    }
}
