//! A split as the trainer sees it: one or more weighted sources, each the concatenation of its
//! files' tokens, cut into windows of `seq_len + 1` tokens at stride `seq_len`. Window ids are
//! global over the split: source 0's windows first, then source 1's, and so on.
use std::path::PathBuf;

use crate::{Error, Result, Sampler, TokenFile};

/// One source of a split: its files' tokens, joined in path order.
#[derive(Debug)]
pub struct Source {
    /// The spec path (file, directory or glob) it came from.
    pub spec: PathBuf,
    pub weight: f64,
    files: Vec<TokenFile>,
    /// Token offset of each file within the source, plus the total at the end.
    starts: Vec<u64>,
}

impl Source {
    pub fn new(spec: PathBuf, weight: f64, files: Vec<TokenFile>) -> Source {
        let mut starts = Vec::with_capacity(files.len() + 1);
        let mut at = 0u64;
        for f in &files {
            starts.push(at);
            at += f.len() as u64;
        }
        starts.push(at);
        Source {
            spec,
            weight,
            files,
            starts,
        }
    }

    pub fn files(&self) -> &[TokenFile] {
        &self.files
    }

    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn num_windows(&self, seq_len: usize) -> u64 {
        let n = self.len();
        if seq_len == 0 || n < seq_len as u64 + 1 {
            return 0;
        }
        (n - 1) / seq_len as u64
    }

    /// Append tokens `[start, end)` of the joined stream to `out`.
    fn copy(&self, start: u64, end: u64, out: &mut Vec<i64>) {
        let mut f = self.starts.partition_point(|&s| s <= start) - 1;
        let mut at = start;
        while at < end {
            let (lo, hi) = (self.starts[f], self.starts[f + 1]);
            let take_end = end.min(hi);
            if take_end > at {
                self.files[f].copy_range((at - lo) as usize..(take_end - lo) as usize, out);
            }
            at = take_end;
            f += 1;
        }
    }
}

/// A split: weighted sources (one for `data.train` or `data.valid`, several for a mixture).
#[derive(Debug)]
pub struct Dataset {
    sources: Vec<Source>,
    eos_id: u32,
}

impl From<TokenFile> for Dataset {
    fn from(f: TokenFile) -> Dataset {
        let eos_id = f.eos_id();
        let spec = f.path().to_path_buf();
        Dataset::new(vec![Source::new(spec, 1.0, vec![f])], eos_id)
    }
}

impl Dataset {
    pub fn new(sources: Vec<Source>, eos_id: u32) -> Dataset {
        Dataset { sources, eos_id }
    }

    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Every token file of every source, in order.
    pub fn files(&self) -> impl Iterator<Item = &TokenFile> {
        self.sources.iter().flat_map(|s| s.files.iter())
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Tokens over all sources.
    pub fn len(&self) -> usize {
        self.sources.iter().map(Source::len).sum::<u64>() as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Windows over all sources (a window never spans two sources).
    pub fn num_windows(&self, seq_len: usize) -> u64 {
        self.sources.iter().map(|s| s.num_windows(seq_len)).sum()
    }

    /// The source holding global window `i`, and the window's index inside it.
    pub fn locate(&self, i: u64, seq_len: usize) -> Option<(usize, u64)> {
        let mut i = i;
        for (k, s) in self.sources.iter().enumerate() {
            let n = s.num_windows(seq_len);
            if i < n {
                return Some((k, i));
            }
            i -= n;
        }
        None
    }

    /// Window `i`: `seq_len + 1` tokens (inputs are `[..seq_len]`, targets `[1..]`), or an
    /// error if `i >= num_windows(seq_len)`.
    pub fn try_window(&self, i: u64, seq_len: usize) -> Result<Vec<i64>> {
        let Some((k, w)) = self.locate(i, seq_len) else {
            return Err(Error::Invalid(format!(
                "window {i} out of range: the data has {} windows of seq_len {seq_len}",
                self.num_windows(seq_len)
            )));
        };
        let start = w * seq_len as u64;
        let mut out = Vec::with_capacity(seq_len + 1);
        self.sources[k].copy(start, start + seq_len as u64 + 1, &mut out);
        Ok(out)
    }

    /// [`Dataset::try_window`] that panics on an out-of-range id (a caller bug, like slice
    /// indexing).
    pub fn window(&self, i: u64, seq_len: usize) -> Vec<i64> {
        match self.try_window(i, seq_len) {
            Ok(w) => w,
            Err(e) => panic!("{e}"),
        }
    }

    /// The deterministic order of this split's windows for `seq_len` and `seed`: the plain
    /// permutation of [`Sampler::new`] for one source, the weighted mixture of
    /// [`Sampler::mixture`] for several. Its window ids are this dataset's global ids.
    pub fn sampler(&self, seq_len: usize, seed: u64) -> Result<Sampler> {
        if self.sources.len() == 1 {
            return Ok(Sampler::new(self.num_windows(seq_len), seed));
        }
        let parts: Vec<(u64, f64)> = self
            .sources
            .iter()
            .map(|s| (s.num_windows(seq_len), s.weight))
            .collect();
        Sampler::mixture(&parts, seed)
    }
}
