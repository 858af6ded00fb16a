//! `nanochat_rustbpe`: a fast byte-level BPE trainer for Python (PyO3).
//!
//! Training has two phases.
//!
//! 1. **Count chunks.** Texts are pulled from a Python iterator in buffers. Each buffer is
//!    split with the regex pattern (GPT-4 style by default) and the distinct chunks are
//!    counted in parallel with rayon, with the GIL released. BPE never merges across chunk
//!    boundaries, so a corpus of gigabytes shrinks to a table of (chunk, count).
//! 2. **Merge.** Every distinct chunk becomes a "word" of token ids (its UTF-8 bytes), and
//!    the most frequent adjacent pair becomes a new token, again and again. Recounting all
//!    pairs after each merge would be O(corpus) per merge, so the counts are kept up to date
//!    by deltas: a pair -> words index says which words a merge can touch, and a max-heap
//!    with lazy updates finds the next best pair.
//!
//! Ties are broken deterministically: highest count first, then the smallest pair of ids
//! (lexicographic). The pure-Python reference in `tests/test_rustbpe.py` uses the same
//! rule, and the tests check that both produce identical merges.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::AHashMap;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};
use rayon::prelude::*;

/// The GPT-4 (cl100k) split pattern, except that numbers split into groups of at most
/// two digits (`\p{N}{1,2}`, as nanochat does) instead of three: a small vocabulary
/// should not spend hundreds of tokens on three-digit numbers.
pub const GPT4_SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

// ---------------------------------------------------------------------------------------
// Splitting text into chunks
// ---------------------------------------------------------------------------------------

/// Splits text into chunks. fancy-regex handles any pattern but backtracks, which would
/// make it the bottleneck of training, so the GPT-4 pattern family gets a fast path.
enum Splitter {
    /// The GPT-4 pattern: an ASCII scanner for the common case, else the pattern rewritten
    /// for the `regex` crate (a DFA, no backtracking). Its possessive quantifiers cannot
    /// change a match here, so they become plain ones; the one construct `regex` lacks,
    /// the `\s+(?!\S)` alternative, is emulated in `regex_chunk_end`.
    Gpt4 { re: regex::Regex, max_digits: usize },
    /// Any other pattern: a backtracking engine with lookaround support.
    Fancy(fancy_regex::Regex),
}

impl Splitter {
    fn new(pattern: &str) -> Result<Self, String> {
        // The family differs only in the digit-group length: {1,2} here, {1,3} in cl100k.
        for max_digits in 1..=3 {
            let variant =
                GPT4_SPLIT_PATTERN.replace(r"\p{N}{1,2}", &format!(r"\p{{N}}{{1,{max_digits}}}"));
            if pattern == variant {
                let plain =
                    variant.replace("?+", "?").replace("++", "+").replace(r"|\s+(?!\S)", "");
                let re = regex::Regex::new(&plain).map_err(|e| e.to_string())?;
                return Ok(Splitter::Gpt4 { re, max_digits });
            }
        }
        fancy_regex::Regex::new(pattern).map(Splitter::Fancy).map_err(|e| e.to_string())
    }

    /// Calls `f` on every non-empty chunk of `text`, in order.
    fn for_each<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
        match self {
            Splitter::Gpt4 { re, max_digits } => {
                let mut pos = 0;
                while pos < text.len() {
                    let end = ascii_chunk_end(text.as_bytes(), pos, *max_digits)
                        .unwrap_or_else(|| regex_chunk_end(re, text, pos));
                    f(&text[pos..end]);
                    pos = end;
                }
            }
            Splitter::Fancy(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| e.to_string())?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
            }
        }
        Ok(())
    }
}

/// End of the GPT-4 chunk at `pos`, found with the regex (every char fits an alternative).
/// A match ending in whitespace other than \r \n comes from the last alternative, `\s+`,
/// so it is a maximal run. GPT-4's `\s+(?!\S)` would give back its last char when the run
/// has 2+ chars and does not end the text, so that " word" stays one chunk: do the same.
fn regex_chunk_end(re: &regex::Regex, text: &str, pos: usize) -> usize {
    let end = re.find_at(text, pos).map_or(text.len(), |m| m.end());
    match text[pos..end].chars().next_back() {
        Some(c) if c.is_whitespace() && !matches!(c, '\r' | '\n') && end < text.len() => {
            end - if end - pos > c.len_utf8() { c.len_utf8() } else { 0 }
        }
        _ => end,
    }
}

/// ASCII character classes of the GPT-4 pattern. `\s` is Unicode White_Space, which in
/// ASCII is \t \n \v \f \r and space (not the \x1c-\x1f that Python's str.isspace adds).
#[derive(Clone, Copy, PartialEq)]
enum Class {
    Letter,
    Digit,
    Space,
    Other,
    /// A non-ASCII char: its class needs Unicode tables, so the regex decides.
    Unicode,
    End,
}

fn class_at(b: &[u8], i: usize) -> Class {
    match b.get(i) {
        None => Class::End,
        Some(c) if c.is_ascii_alphabetic() => Class::Letter,
        Some(c) if c.is_ascii_digit() => Class::Digit,
        Some(b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ') => Class::Space,
        Some(c) if c.is_ascii() => Class::Other,
        Some(_) => Class::Unicode,
    }
}

/// The GPT-4 pattern hand-compiled for ASCII text, which is most of a typical corpus and
/// several times faster than the regex. Returns the end of the chunk starting at `pos`,
/// or None whenever a non-ASCII char could change the answer (and for contractions).
fn ascii_chunk_end(b: &[u8], pos: usize, max_digits: usize) -> Option<usize> {
    // End of the run of `class` from `i`; None if a non-ASCII char might extend it.
    let run = |mut i: usize, class: Class| {
        while class_at(b, i) == class {
            i += 1;
        }
        (class_at(b, i) != Class::Unicode).then_some(i)
    };
    let first = b[pos];
    let next = class_at(b, pos + 1);
    match class_at(b, pos) {
        Class::Unicode | Class::End => None,
        Class::Other if first == b'\'' => None, // `'(?i:[sdmt]|ll|ve|re)`: left to the regex
        // `[^\r\n\p{L}\p{N}]?+\p{L}+`
        Class::Letter => run(pos, Class::Letter),
        Class::Other | Class::Space
            if next == Class::Letter && first != b'\r' && first != b'\n' =>
        {
            run(pos + 1, Class::Letter)
        }
        _ if next == Class::Unicode => None,
        // `\p{N}{1,max_digits}`
        Class::Digit => {
            let mut end = pos;
            while end - pos < max_digits && class_at(b, end) == Class::Digit {
                end += 1;
            }
            (end - pos == max_digits || class_at(b, end) != Class::Unicode).then_some(end)
        }
        // ` ?[^\s\p{L}\p{N}]++[\r\n]*`
        Class::Other => run(pos, Class::Other).map(|end| end + newlines(&b[end..])),
        Class::Space if first == b' ' && next == Class::Other => {
            run(pos + 1, Class::Other).map(|end| end + newlines(&b[end..]))
        }
        // `\s*[\r\n]` up to the run's last newline, else `\s+(?!\S)|\s+`
        Class::Space => {
            let end = run(pos, Class::Space)?;
            match b[pos..end].iter().rposition(|&c| c == b'\r' || c == b'\n') {
                Some(i) => Some(pos + i + 1),
                None if end == b.len() || end - pos == 1 => Some(end),
                None => Some(end - 1),
            }
        }
    }
}

/// Length of the run of \r and \n at the start of `b`.
fn newlines(b: &[u8]) -> usize {
    b.iter().take_while(|&&c| c == b'\r' || c == b'\n').count()
}

/// Splits a buffer of texts in parallel and adds its chunk counts to `counts`.
fn count_chunks(
    splitter: &Splitter,
    texts: &[String],
    counts: &mut AHashMap<String, i64>,
) -> Result<(), String> {
    // rayon folds runs of texts into thread-local maps, then merges those pairwise in
    // parallel; each map borrows its chunks (&str) from the buffer, no copies.
    let local = texts
        .par_iter()
        .try_fold(AHashMap::new, |mut local: AHashMap<&str, i64>, text| {
            splitter.for_each(text, |chunk| *local.entry(chunk).or_insert(0) += 1)?;
            Ok::<_, String>(local)
        })
        .try_reduce(AHashMap::new, |a, b| {
            let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
            for (chunk, n) in small {
                *big.entry(chunk).or_insert(0) += n;
            }
            Ok(big)
        })?;
    // Only chunks new to the global table get copied into owned Strings.
    counts.reserve(local.len());
    for (chunk, n) in local {
        match counts.get_mut(chunk) {
            Some(c) => *c += n,
            None => {
                counts.insert(chunk.to_owned(), n);
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Merging
// ---------------------------------------------------------------------------------------

/// A pair of token ids packed as `(left << 32) | right`: one cheap hash key, ordered
/// like the pair (lexicographically).
type Pair = u64;

fn pair(a: u32, b: u32) -> Pair {
    ((a as u64) << 32) | b as u64
}

fn unpair(p: Pair) -> (u32, u32) {
    ((p >> 32) as u32, p as u32)
}

/// All distinct chunks as words of token ids, stored back to back in one flat array
/// (cache-friendly, one allocation). A merge only shrinks a word, so it is done in place.
struct Words {
    ids: Vec<u32>,
    info: Vec<WordInfo>,
}

/// Where a word lives in `Words::ids` and how often its chunk occurs. Kept together so
/// that visiting a word costs one cache miss, not three.
struct WordInfo {
    start: usize,
    len: usize,
    freq: i64,
}

impl Words {
    fn new(counts: AHashMap<String, i64>) -> Self {
        let mut w = Words { ids: Vec::new(), info: Vec::new() };
        // Single-byte chunks hold no pair and can never take part in a merge.
        for (chunk, n) in counts.into_iter().filter(|(c, _)| c.len() > 1) {
            w.info.push(WordInfo { start: w.ids.len(), len: chunk.len(), freq: n });
            w.ids.extend(chunk.bytes().map(u32::from));
        }
        w
    }

    fn word(&self, i: usize) -> &[u32] {
        let WordInfo { start, len, .. } = self.info[i];
        &self.ids[start..start + len]
    }
}

/// Initial pair counts and the pair -> words index, built in parallel. Every id is still
/// a byte here, so each task counts into a dense 256x256 table instead of a hash map.
fn initial_pairs(words: &Words) -> (AHashMap<Pair, i64>, AHashMap<Pair, Vec<u32>>) {
    let n = words.info.len();
    let n_tasks = rayon::current_num_threads().max(1);
    let per_task = n.div_ceil(n_tasks).max(1);
    let parts: Vec<(Vec<i64>, Vec<Vec<u32>>)> = (0..n_tasks)
        .into_par_iter()
        .map(|t| {
            let mut counts = vec![0i64; 1 << 16];
            let mut where_: Vec<Vec<u32>> = vec![Vec::new(); 1 << 16];
            for i in (t * per_task).min(n)..((t + 1) * per_task).min(n) {
                for ab in words.word(i).windows(2) {
                    let k = (ab[0] as usize) << 8 | ab[1] as usize;
                    counts[k] += words.info[i].freq;
                    // A word lists each of its pairs once (a repeat comes right after itself).
                    if where_[k].last() != Some(&(i as u32)) {
                        where_[k].push(i as u32);
                    }
                }
            }
            (counts, where_)
        })
        .collect();
    let mut counts = AHashMap::new();
    let mut where_ = AHashMap::new();
    for k in 0..1usize << 16 {
        let total: i64 = parts.iter().map(|p| p.0[k]).sum();
        if total > 0 {
            let p = pair((k >> 8) as u32, (k & 0xff) as u32);
            counts.insert(p, total);
            where_.insert(p, parts.iter().flat_map(|p| p.1[k].iter().copied()).collect());
        }
    }
    (counts, where_)
}

/// Runs up to `n_merges` merges; returns them in order as (left, right) pairs, the new
/// token of merge i being 256 + i. Stops early when no pair is left.
fn train_merges(mut words: Words, n_merges: usize) -> Vec<(u32, u32)> {
    let (mut counts, mut where_) = initial_pairs(&words);
    // A max-heap of (count, Reverse(pair)): the highest count first, and among equal
    // counts the smallest pair. This is the tie rule shared with the Python reference.
    let mut heap: BinaryHeap<(i64, Reverse<Pair>)> =
        counts.iter().map(|(&p, &count)| (count, Reverse(p))).collect();
    let mut merges = Vec::with_capacity(n_merges);
    // This merge's changes to pairs with the new token, as (pair, word, count delta).
    let mut created: Vec<(Pair, u32, i64)> = Vec::new();
    while merges.len() < n_merges {
        // An empty heap means no pair is left: the data is exhausted.
        let Some((count, Reverse(top))) = heap.pop() else { break };
        // Lazy update: counts only ever drop for pairs already in the heap, so a stale
        // entry overstates its count. Re-queue it with the true count and look again.
        let current = counts.get(&top).copied().unwrap_or(0);
        if current != count {
            if current > 0 {
                heap.push((current, Reverse(top)));
            }
            continue;
        }
        let (a, b) = unpair(top);
        let new_id = 256 + merges.len() as u32;
        merges.push((a, b));
        // Every occurrence of (a, b) disappears; words that no longer hold it (the index
        // is not pruned) are scanned for nothing.
        counts.remove(&top);
        created.clear();
        for w in where_.remove(&top).unwrap_or_default() {
            let WordInfo { start, len, freq: f } = words.info[w as usize];
            let s = &mut words.ids[start..start + len];
            // Merge left to right in place, writing at `wr` while reading at `rd`. Around
            // each merged (a, b), the left neighbour (already written, maybe the new token
            // itself) and the right one (not yet read) trade their pair with a or b for a
            // pair with the new token.
            let (mut rd, mut wr) = (0, 0);
            while rd < len {
                if rd + 1 < len && s[rd] == a && s[rd + 1] == b {
                    if wr > 0 {
                        let left = s[wr - 1];
                        if left == new_id {
                            created.push((pair(new_id, a), w, -f));
                        } else {
                            *counts.entry(pair(left, a)).or_insert(0) -= f;
                        }
                        created.push((pair(left, new_id), w, f));
                    }
                    if rd + 2 < len {
                        let right = s[rd + 2];
                        *counts.entry(pair(b, right)).or_insert(0) -= f;
                        created.push((pair(new_id, right), w, f));
                    }
                    s[wr] = new_id;
                    rd += 2;
                } else {
                    s[wr] = s[rd];
                    rd += 1;
                }
                wr += 1;
            }
            words.info[w as usize].len = wr;
        }
        // Pairs with the new token are all new: sum their deltas per pair, index their
        // words, and queue them. They only shrink after this merge, so one heap entry
        // each, with the final count, is enough.
        created.sort_unstable_by_key(|&(p, w, _)| (p, w));
        for group in created.chunk_by(|x, y| x.0 == y.0) {
            let count: i64 = group.iter().map(|&(_, _, d)| d).sum();
            if count > 0 {
                let p = group[0].0;
                counts.insert(p, count);
                let mut ws: Vec<u32> = group.iter().map(|&(_, w, _)| w).collect();
                ws.dedup();
                where_.insert(p, ws);
                heap.push((count, Reverse(p)));
            }
        }
    }
    merges
}

// ---------------------------------------------------------------------------------------
// Python API
// ---------------------------------------------------------------------------------------

/// A byte-level BPE tokenizer: train it, then hand its ranks to tiktoken for fast encoding.
#[pyclass]
struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    merges: Vec<(u32, u32)>,
    /// Bytes of every token: 256 single bytes, then one entry per merge.
    vocab: Vec<Vec<u8>>,
    /// Inverse of `vocab`, for `encode`.
    ranks: AHashMap<Vec<u8>, u32>,
}

impl Tokenizer {
    fn build(pattern: String, splitter: Splitter, merges: Vec<(u32, u32)>) -> Self {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for &(a, b) in &merges {
            let token = [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat();
            vocab.push(token);
        }
        let ranks = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        Tokenizer { pattern, splitter, merges, vocab, ranks }
    }

    /// BPE on one chunk, the way tiktoken does it (so that results match): the whole chunk
    /// if it is a token, else repeatedly merge the adjacent parts whose concatenation has
    /// the lowest rank, leftmost first. Quadratic, but only used for tests and small inputs.
    fn encode_chunk(&self, chunk: &[u8], out: &mut Vec<u32>) {
        if let Some(&r) = self.ranks.get(chunk) {
            out.push(r);
            return;
        }
        let mut bounds: Vec<usize> = (0..=chunk.len()).collect();
        loop {
            let best = bounds
                .windows(3)
                .enumerate()
                .filter_map(|(i, w)| self.ranks.get(&chunk[w[0]..w[2]]).map(|&r| (r, i)))
                .min();
            match best {
                Some((_, i)) => {
                    bounds.remove(i + 1);
                }
                None => break,
            }
        }
        out.extend(bounds.windows(2).map(|w| self.ranks[&chunk[w[0]..w[1]]]));
    }
}

#[pymethods]
impl Tokenizer {
    #[new]
    fn new() -> Self {
        let splitter = Splitter::new(GPT4_SPLIT_PATTERN).expect("the default pattern compiles");
        Tokenizer::build(GPT4_SPLIT_PATTERN.to_string(), splitter, Vec::new())
    }

    /// Train on an iterator of str until the vocabulary holds `vocab_size` tokens (256
    /// bytes + merges). Stops early, with fewer tokens, if the data runs out of pairs.
    /// The GIL is held only while pulling `buffer_size` texts at a time from the iterator.
    #[args(buffer_size = "8192", pattern = "None")]
    #[pyo3(text_signature = "(self, iterator, vocab_size, buffer_size=8192, pattern=None)")]
    fn train_from_iterator(
        &mut self,
        py: Python<'_>,
        iterator: &PyAny,
        vocab_size: i64,
        buffer_size: usize,
        pattern: Option<String>,
    ) -> PyResult<()> {
        if !(256..=u32::MAX as i64).contains(&vocab_size) {
            return Err(PyValueError::new_err(format!(
                "vocab_size must be at least 256 (one token per byte), got {vocab_size}"
            )));
        }
        if buffer_size == 0 {
            return Err(PyValueError::new_err("buffer_size must be at least 1"));
        }
        let pattern = pattern.unwrap_or_else(|| GPT4_SPLIT_PATTERN.to_string());
        let splitter = Splitter::new(&pattern).map_err(|e| {
            PyValueError::new_err(format!("invalid split pattern {pattern:?}: {e}"))
        })?;

        let mut counts: AHashMap<String, i64> = AHashMap::new();
        let mut iter = iterator.iter()?;
        let mut buffer: Vec<String> = Vec::with_capacity(buffer_size);
        let mut exhausted = false;
        while !exhausted {
            buffer.clear();
            {
                // Python objects pulled in this round are freed when this pool drops, so a
                // long generator does not pile up in memory. Safe: none of them escapes
                // the block; the text is copied into `buffer`.
                let pool = unsafe { py.new_pool() };
                let _py = pool.python();
                while buffer.len() < buffer_size {
                    let Some(item) = iter.next() else {
                        exhausted = true;
                        break;
                    };
                    let item = item?; // an exception raised by the iterator propagates
                    let text = item.downcast::<PyString>().map_err(|_| {
                        let type_name = item.get_type().name().unwrap_or("?").to_string();
                        PyTypeError::new_err(format!(
                            "train_from_iterator expects str items, got {type_name}"
                        ))
                    })?;
                    buffer.push(text.to_str()?.to_owned());
                }
            }
            py.allow_threads(|| count_chunks(&splitter, &buffer, &mut counts))
                .map_err(|e| PyValueError::new_err(format!("splitting failed: {e}")))?;
        }

        let n_merges = (vocab_size - 256) as usize;
        let merges = py.allow_threads(|| train_merges(Words::new(counts), n_merges));
        *self = Tokenizer::build(pattern, splitter, merges);
        Ok(())
    }

    /// The regex pattern used to split text into chunks.
    fn get_pattern(&self) -> String {
        self.pattern.clone()
    }

    /// Every token as (bytes, rank): the 256 bytes, then the merges in order. Ready for
    /// `tiktoken.Encoding(mergeable_ranks=dict(...))`.
    fn get_mergeable_ranks<'py>(&self, py: Python<'py>) -> Vec<(&'py PyBytes, u32)> {
        self.vocab.iter().enumerate().map(|(i, t)| (PyBytes::new(py, t), i as u32)).collect()
    }

    /// The merges in order, as ((left, right), new_id).
    fn get_merges(&self) -> Vec<((u32, u32), u32)> {
        self.merges.iter().enumerate().map(|(i, &ab)| (ab, 256 + i as u32)).collect()
    }

    /// Encode text to token ids (same result as tiktoken with these ranks).
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        let mut out = Vec::new();
        self.splitter
            .for_each(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out))
            .map_err(PyValueError::new_err)?;
        Ok(out)
    }
}

#[pymodule]
fn nanochat_rustbpe(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_class::<Tokenizer>()?;
    m.add("GPT4_SPLIT_PATTERN", GPT4_SPLIT_PATTERN)?;
    Ok(())
}
