//! Crate tests. Fast (small vocabularies, small corpora); generated files go to temp dirs.
use std::fs;
use std::path::{Path, PathBuf};

use trellis_core::job::DataSection;

use crate::text::{Chunker, Piece};
use crate::tokens::tokenize_file_chunked;
use crate::*;

mod datasets;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}
fn tiny(name: &str) -> PathBuf {
    repo_root().join("corpus/tiny").join(name)
}
fn tiny_text(max: usize) -> String {
    let t = fs::read_to_string(tiny("train.txt")).unwrap();
    let mut end = max.min(t.len());
    while !t.is_char_boundary(end) {
        end -= 1;
    }
    t[..end].to_string()
}

const UNICODE: &str = "“Où est-il?” demanda-t-elle — l’été à Noël, naïve café crème.\n\
    Ærøskøbing; Straße; Ελληνικά; русский; 日本語のテキスト; emoji 🎉👍🏽.\n\
    \ttabs\tand  double  spaces,   trailing   \r\nCRLF line\r\n\n\n\
    «guillemets» ‘single’ … ellipsis – en dash – ½ ¼ € £ ¥\u{a0}nbsp\u{200b}zwsp\n";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// A small multi-document corpus: tinyshakespeare pieces and unicode text.
fn small_corpus(dir: &Path) -> PathBuf {
    let t = tiny_text(120_000);
    let t = &t[..t.rfind('\n').unwrap() + 1];
    let (a, b) = t.split_at(t.find("\n\n").unwrap() + 2);
    let text = format!("{a}{EOS_TOKEN}\n{UNICODE}{EOS_TOKEN}\n{b}{EOS_TOKEN}\n");
    write(dir, "small.txt", &text)
}

fn section(train: &Path, valid: &Path, vocab: usize, seq_len: usize) -> DataSection {
    let mut s = DataSection::new(train.to_path_buf(), valid.to_path_buf(), seq_len);
    s.vocab_size = vocab;
    s
}

/// The tokens of a single-file split.
fn all(d: &Dataset) -> &[u32] {
    let files: Vec<&TokenFile> = d.files().collect();
    assert_eq!(files.len(), 1);
    files[0].all()
}

#[test]
fn round_trip_tinyshakespeare() {
    let t0 = std::time::Instant::now();
    let tok = Tokenizer::train(&tiny("train.txt"), 512).unwrap();
    let train_s = t0.elapsed().as_secs_f64();
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.id_to_token(tok.eos_id()).as_deref(), Some(EOS_TOKEN));
    let valid = fs::read_to_string(tiny("valid.txt")).unwrap();
    let t1 = std::time::Instant::now();
    let ids = tok.encode(&valid).unwrap();
    let enc_s = t1.elapsed().as_secs_f64();
    eprintln!(
        "tinyshakespeare: train 1.0 MB vocab 512 in {train_s:.2} s; encode {} B -> {} tokens \
         in {enc_s:.3} s ({:.2} MB/s single-threaded, this build profile)",
        valid.len(),
        ids.len(),
        valid.len() as f64 / 1e6 / enc_s
    );
    assert!(
        ids.len() * 3 < valid.len() * 2,
        "BPE should compress: {}",
        ids.len()
    );
    assert_eq!(tok.decode(&ids).unwrap(), valid);
    // Text beginning with a space and special token inline.
    for s in [
        " leading space",
        "a<|endoftext|>b",
        "",
        "\n\n\n",
        "ROMEO:\n  x  \n",
    ] {
        assert_eq!(tok.decode(&tok.encode(s).unwrap()).unwrap(), s);
    }
    assert_eq!(
        tok.encode("a<|endoftext|>b")
            .unwrap()
            .iter()
            .filter(|&&i| i == tok.eos_id())
            .count(),
        1
    );
}

#[test]
fn round_trip_unicode() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("{}{}", UNICODE.repeat(20), tiny_text(30_000));
    let p = write(dir.path(), "u.txt", &text);
    let tok = Tokenizer::train(&p, 400).unwrap();
    for s in [
        UNICODE,
        &text,
        "unseen: 한국어, عربى, עברית, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, \u{1F9EC}, combining e\u{301}",
        "  two leading spaces",
    ] {
        let ids = tok.encode(s).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), s);
    }
    // Saved and reloaded: same ids.
    let saved = dir.path().join("tokenizer.json");
    tok.save(&saved).unwrap();
    let back = Tokenizer::load(&saved).unwrap();
    assert_eq!(back.encode(UNICODE).unwrap(), tok.encode(UNICODE).unwrap());
    assert_eq!(back.vocab_size(), tok.vocab_size());
    assert_eq!(back.eos_id(), tok.eos_id());
    // Bad ids are an error, not a panic or silent drop.
    assert!(tok.decode(&[u32::MAX]).is_err());
}

#[test]
fn training_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let p = small_corpus(dir.path());
    let a = Tokenizer::train(&p, 600).unwrap().to_json().unwrap();
    let b = Tokenizer::train(&p, 600).unwrap().to_json().unwrap();
    assert!(a == b, "two trainings on the same text differ");
    let c = Tokenizer::train(&p, 650).unwrap().to_json().unwrap();
    assert!(a != c);
    // The separator is a special token, never learned from the text.
    assert!(a.contains(r#""special": true"#));
}

#[test]
fn vocab_too_small_is_an_error() {
    let err = Tokenizer::train(&tiny("valid.txt"), 100)
        .unwrap_err()
        .to_string();
    assert!(err.contains("at least 257"), "{err}");
}

#[test]
fn chunked_tokenization_equals_whole_documents() {
    let dir = tempfile::tempdir().unwrap();
    let p = small_corpus(dir.path());
    let tok = Tokenizer::train(&p, 500).unwrap();
    let text = fs::read_to_string(&p).unwrap();
    // Reference: each document encoded whole, EOS after each separator line.
    let mut want = Vec::new();
    for doc in text.split(&format!("{EOS_TOKEN}\n")) {
        if !doc.is_empty() {
            want.extend(tok.encode(doc).unwrap());
        }
        want.push(tok.eos_id());
    }
    want.pop(); // the split's last (empty) remainder has no separator after it
    for chunk in [1, 37, 1000, 1 << 20] {
        let dest = dir.path().join(format!("t{chunk}.u32"));
        let tf = tokenize_file_chunked(&tok, "tsha", &p, "ssha", &dest, chunk).unwrap();
        let got = tf.all();
        if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
            let lo = i.saturating_sub(5);
            panic!(
                "chunk size {chunk}: first difference at token {i}: got {:?} want {:?}",
                tok.decode(&got[lo..(i + 5).min(got.len())]).unwrap(),
                tok.decode(&want[lo..(i + 5).min(want.len())]).unwrap()
            );
        }
        assert_eq!(
            got.len(),
            want.len(),
            "chunk size {chunk}: tails {:?} / {:?}",
            &got[got.len().saturating_sub(4)..],
            &want[want.len().saturating_sub(4)..]
        );
    }
    // Small chunks really were cut.
    let pieces = Chunker::new(
        fs::File::open(&p).map(std::io::BufReader::new).unwrap(),
        &p,
        37,
    )
    .filter(|p| matches!(p, Ok(Piece::Text(_))))
    .count();
    assert!(pieces > 100, "{pieces}");
}

#[test]
fn document_separators() {
    let dir = tempfile::tempdir().unwrap();
    let train = write(dir.path(), "t.txt", &tiny_text(20_000));
    let tok = Tokenizer::train(&train, 300).unwrap();
    let eos = tok.eos_id();
    let p = write(
        dir.path(),
        "d.txt",
        "one\n<|endoftext|>\ntwo\r\n<|endoftext|>\r\nthree <|endoftext|>\n<|endoftext|>",
    );
    let tf = tokenize_file(&tok, "t", &p, "s", &dir.path().join("d.u32")).unwrap();
    let mut want = tok.encode("one\n").unwrap();
    want.push(eos);
    want.extend(tok.encode("two\r\n").unwrap());
    want.push(eos);
    want.extend(tok.encode("three <|endoftext|>\n").unwrap());
    want.push(eos);
    assert_eq!(tf.all(), &want[..]);
    // No separator: one document, no EOS.
    let p = write(dir.path(), "n.txt", "just text\n");
    let tf = tokenize_file(&tok, "t", &p, "s", &dir.path().join("n.u32")).unwrap();
    assert_eq!(tf.all(), &tok.encode("just text\n").unwrap()[..]);
    // Invalid UTF-8 names the file and line.
    let bad = dir.path().join("bad.txt");
    fs::write(&bad, b"ok\n\xff\xfe\n").unwrap();
    let err = tokenize_file(&tok, "t", &bad, "s", &dir.path().join("b.u32"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bad.txt") && err.contains("line 2"), "{err}");
}

#[test]
fn zstd_input_multi_frame() {
    use ruzstd::encoding::{compress_to_vec, CompressionLevel};
    let dir = tempfile::tempdir().unwrap();
    let plain = small_corpus(dir.path());
    let text = fs::read(&plain).unwrap();
    let (a, b) = text.split_at(text.len() / 3);
    let mut z = compress_to_vec(a, CompressionLevel::Fastest);
    // A skippable frame between two data frames.
    z.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    z.extend_from_slice(&5u32.to_le_bytes());
    z.extend_from_slice(b"skip!");
    z.extend(compress_to_vec(b, CompressionLevel::Fastest));
    let zp = dir.path().join("small.txt.zst");
    fs::write(&zp, z).unwrap();
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut open_text(&zp).unwrap(), &mut back).unwrap();
    assert!(back == text);
    let tok = Tokenizer::train(&zp, 400).unwrap();
    assert_eq!(
        tok.to_json().unwrap(),
        Tokenizer::train(&plain, 400).unwrap().to_json().unwrap()
    );
    let t1 = tokenize_file(&tok, "t", &zp, "s", &dir.path().join("z.u32")).unwrap();
    let t2 = tokenize_file(&tok, "t", &plain, "s", &dir.path().join("p.u32")).unwrap();
    assert_eq!(t1.all(), t2.all());
    // Garbage with a .zst name is a clear error.
    let g = write(dir.path(), "garbage.zst", "not zstd at all");
    let err = open_text(&g).err().unwrap().to_string();
    assert!(err.contains("garbage.zst"), "{err}");
}

#[test]
fn token_file_and_index() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.u32");
    let toks: Vec<u32> = (0..103).map(|i| i * 7 + 1).collect();
    let tf = TokenFile::create(&p, &toks, TokenIndex::new(103, "src", "tok", 5)).unwrap();
    let tf2 = TokenFile::open(&p).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), 103 * 4);
    assert_eq!(&fs::read(&p).unwrap()[..8], &[1, 0, 0, 0, 8, 0, 0, 0]);
    let idx: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(index_path(&p)).unwrap()).unwrap();
    assert_eq!(idx["num_tokens"], 103);
    assert_eq!(idx["source_sha256"], "src");
    assert_eq!(idx["tokenizer_sha256"], "tok");
    assert_eq!(idx["eos_id"], 5);
    assert_eq!(idx["format"], TOKEN_FORMAT);
    for f in [&tf, &tf2] {
        assert_eq!(f.len(), 103);
        assert_eq!(f.eos_id(), 5);
        assert_eq!(f.tokens(2..4), &[15, 22]);
        // 103 tokens, windows of 11 at stride 10: starts 0,10,..,90 (90+11 = 101 ≤ 103).
        assert_eq!(f.num_windows(10), 10);
        assert_eq!(f.num_windows(102), 1);
        assert_eq!(f.num_windows(103), 0);
        assert_eq!(f.num_windows(0), 0);
        let w = f.window(9, 10);
        assert_eq!(w.len(), 11);
        assert_eq!(w[0], 90 * 7 + 1);
        assert_eq!(w[10], 100 * 7 + 1);
        assert!(f.try_window(10, 10).is_err());
    }
    // Empty file.
    let e = TokenFile::create(
        &dir.path().join("e.u32"),
        &[],
        TokenIndex::new(0, "", "", 0),
    )
    .unwrap();
    assert!(e.is_empty());
    assert_eq!(e.num_windows(1), 0);
    // Size mismatch and missing index are errors naming the file.
    fs::write(&p, [0u8; 12]).unwrap();
    let err = TokenFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("x.u32") && err.contains("103 tokens"), "{err}");
    fs::remove_file(index_path(&p)).unwrap();
    let err = TokenFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("x.u32.json"), "{err}");
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn prepare_caches_and_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_corpus(dir.path());
    let valid = write(
        dir.path(),
        "valid.txt",
        &fs::read_to_string(tiny("valid.txt")).unwrap()[..20_000],
    );
    let cache = dir.path().join("cache");
    let s = section(&train, &valid, 512, 64);
    let (tr0, tk0) = work_counters();
    let a = prepare(&s, &cache).unwrap();
    assert_eq!(work_counters(), (tr0 + 1, tk0 + 2));
    assert!(a.tokenizer_path.starts_with(&cache));
    assert_eq!(a.tokenizer.vocab_size(), 512);
    assert_eq!(a.train.eos_id(), a.tokenizer.eos_id());
    assert_eq!(
        all(&a.train)
            .iter()
            .filter(|&&t| t == a.tokenizer.eos_id())
            .count(),
        3
    );
    assert!(a.train.num_windows(64) > 100);
    let files = list(&cache);
    // tokenizer + 2 × (tokens + index) + the inputs' fingerprint records
    assert_eq!(files.len(), 6, "{files:?}");
    assert_eq!(list(&cache.join("inputs")).len(), 2);
    let mtime = |p: &Path| fs::metadata(p).unwrap().modified().unwrap();
    let m = (
        mtime(&a.tokenizer_path),
        mtime(a.train.files().next().unwrap().path()),
    );
    // Second call: nothing retrained or re-tokenized.
    let b = prepare(&s, &cache).unwrap();
    assert_eq!(work_counters(), (tr0 + 1, tk0 + 2));
    assert_eq!(
        (
            mtime(&b.tokenizer_path),
            mtime(b.train.files().next().unwrap().path())
        ),
        m
    );
    assert_eq!(b.tokenizer_path, a.tokenizer_path);
    assert_eq!(all(&b.train), all(&a.train));
    assert_eq!(all(&b.valid), all(&a.valid));
    assert_eq!(list(&cache), files);
    // A given tokenizer: loaded, copied into the cache, never trained.
    let mut s2 = s.clone();
    let given = dir.path().join("given.json");
    fs::copy(&a.tokenizer_path, &given).unwrap();
    s2.tokenizer = Some(given.clone());
    s2.vocab_size = 999; // ignored with a given tokenizer
    let c = prepare(&s2, &cache).unwrap();
    assert_eq!(work_counters().0, tr0 + 1);
    assert!(c.tokenizer_path.starts_with(&cache));
    assert_eq!(
        fs::read(&c.tokenizer_path).unwrap(),
        fs::read(&given).unwrap()
    );
    assert_eq!(all(&c.train), all(&a.train));
    // A changed input is re-tokenized.
    fs::write(&valid, "changed validation text, long enough? ".repeat(100)).unwrap();
    let d = prepare(&s, &cache).unwrap();
    assert_eq!(work_counters(), (tr0 + 1, tk0 + 3));
    assert_ne!(all(&d.valid), all(&a.valid));
}

#[test]
fn prepare_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let train = small_corpus(dir.path());
    let valid = write(dir.path(), "valid.txt", &tiny_text(30_000));
    let cache = dir.path().join("cache");
    let s = section(&train, &valid, 400, 32);
    let results: Vec<_> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..3)
            .map(|_| sc.spawn(|| prepare(&s, &cache).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results[1..] {
        assert_eq!(r.tokenizer_path, results[0].tokenizer_path);
        assert_eq!(all(&r.train), all(&results[0].train));
        assert_eq!(all(&r.valid), all(&results[0].valid));
    }
    let files = list(&cache);
    assert_eq!(files.len(), 6, "leftover temp or lock files: {files:?}");
    let inputs = list(&cache.join("inputs"));
    assert_eq!(inputs.len(), 2, "leftover temp files: {inputs:?}");
}

#[test]
fn prepare_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let train = write(dir.path(), "train.txt", &tiny_text(20_000));
    let valid = write(dir.path(), "valid.txt", &tiny_text(5_000));
    let missing = dir.path().join("nope.txt");
    let e = |s: &DataSection| match prepare(s, &cache) {
        Ok(_) => panic!("prepare succeeded on {s:?}"),
        Err(e) => e,
    };

    let err = e(&section(&missing, &valid, 300, 8));
    assert!(matches!(err, Error::NotFound { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("data.train") && msg.contains("nope.txt"),
        "{msg}"
    );
    let msg = e(&section(&train, &missing, 300, 8)).to_string();
    assert!(
        msg.contains("data.valid") && msg.contains("nope.txt"),
        "{msg}"
    );
    let mut s = section(&train, &valid, 300, 8);
    s.tokenizer = Some(dir.path().join("no-tokenizer.json"));
    let msg = e(&s).to_string();
    assert!(
        msg.contains("data.tokenizer") && msg.contains("no-tokenizer.json"),
        "{msg}"
    );
    let bad = write(dir.path(), "bad.json", "{\"not\": \"a tokenizer\"}");
    s.tokenizer = Some(bad);
    let msg = e(&s).to_string();
    assert!(msg.contains("bad.json"), "{msg}");

    for empty_text in ["", "<|endoftext|>\n<|endoftext|>\n", "  \n\n"] {
        let empty = write(dir.path(), "empty.txt", empty_text);
        let msg = e(&section(&empty, &valid, 300, 8)).to_string();
        assert!(
            msg.contains("empty") && msg.contains("empty.txt"),
            "{empty_text:?}: {msg}"
        );
    }
    let short = write(dir.path(), "short.txt", "Hi\n");
    let err = e(&section(&train, &short, 300, 8));
    let Error::CorpusTooShort {
        tokens, seq_len, ..
    } = &err
    else {
        panic!("{err}")
    };
    assert_eq!(*seq_len, 8);
    let msg = err.to_string();
    assert!(
        msg.contains("short.txt")
            && msg.contains(&format!("{tokens} tokens"))
            && msg.contains("at least 9"),
        "{msg}"
    );
    let msg = e(&section(&train, &valid, 300, 1_000_000)).to_string();
    assert!(
        msg.contains("data.train") && msg.contains("1000001"),
        "{msg}"
    );
    let msg = e(&section(&train, &valid, 300, 0)).to_string();
    assert!(msg.contains("seq_len"), "{msg}");
}

#[test]
fn sampler_is_a_bijection_per_epoch() {
    for n in [1u64, 2, 3, 5, 7, 16, 17, 100, 1000, 4097] {
        for seed in [0u64, 1, 42] {
            let s = Sampler::new(n, seed);
            for e in 0..3 {
                let mut seen = vec![false; n as usize];
                for p in 0..n {
                    let w = s.window(e * n + p);
                    assert!(w < n);
                    assert!(!seen[w as usize], "n={n} seed={seed} epoch={e}: {w} twice");
                    seen[w as usize] = true;
                }
            }
        }
    }
    assert_eq!(Sampler::new(0, 1).window(5), 0);
}

#[test]
fn sampler_differs_across_epochs_and_seeds() {
    let n = 1000;
    let order = |seed, e: u64| -> Vec<u64> {
        let s = Sampler::new(n, seed);
        (0..n).map(|p| s.window(e * n + p)).collect()
    };
    let base = order(7, 0);
    assert_ne!(base, order(7, 1));
    assert_ne!(base, order(8, 0));
    assert_ne!(order(7, 1), order(7, 2));
    assert_ne!(base, (0..n).collect::<Vec<_>>());
    // Shuffled, not just rotated: few fixed neighbours.
    let adjacent = base.windows(2).filter(|w| w[1] == w[0] + 1).count();
    assert!(adjacent < 20, "{adjacent}");
    // Huge domains work in O(1).
    let big = Sampler::new(u64::MAX - 3, 1);
    assert!(big.window(u64::MAX - 1) < u64::MAX - 3);
}

#[test]
fn sampler_order_is_frozen() {
    // These values pin the permutation forever: resumed jobs must read the same stream.
    let s = Sampler::new(1000, 42);
    let got: Vec<u64> = (0..8)
        .map(|i| s.window(i))
        .chain([s.window(1000), s.window(123_456)])
        .collect();
    assert_eq!(got, GOLDEN_ORDER, "the sampler's order changed");
}
const GOLDEN_ORDER: [u64; 10] = [25, 809, 266, 554, 846, 452, 40, 963, 786, 179];

#[test]
fn rank_samples_cover_the_single_rank_range() {
    for dp in [1usize, 2, 4] {
        for (cursor, batch) in [(0u64, 8usize), (40, 16), (1_000_003, 32)] {
            let mut all: Vec<u64> = (0..dp)
                .flat_map(|r| rank_samples(cursor, batch, r, dp))
                .collect();
            all.sort();
            assert_eq!(
                all,
                (cursor..cursor + batch as u64).collect::<Vec<_>>(),
                "dp={dp}"
            );
            // Contiguous blocks in rank order.
            assert_eq!(rank_samples(cursor, batch, 0, dp).start, cursor);
        }
    }
}

#[test]
fn validation_windows_are_spaced() {
    let dir = tempfile::tempdir().unwrap();
    let toks: Vec<u32> = (0..1001).collect();
    let tf: Dataset = TokenFile::create(
        &dir.path().join("v.u32"),
        &toks,
        TokenIndex::new(1001, "", "", 0),
    )
    .unwrap()
    .into();
    let v = validation_windows(&tf, 10, 7); // 100 windows
    assert_eq!(v, vec![0, 14, 28, 42, 57, 71, 85]);
    assert_eq!(validation_windows(&tf, 10, 7), v);
    assert_eq!(
        validation_windows(&tf, 10, 500),
        (0..100).collect::<Vec<_>>()
    );
    assert!(validation_windows(&tf, 10, 0).is_empty());
    assert!(validation_windows(&tf, 5000, 4).is_empty());
}

/// Python's `tokenizers` and `transformers` read the saved `tokenizer.json` with identical ids.
#[test]
fn python_reads_saved_tokenizer_with_identical_ids() {
    let Some(python) = std::env::var_os("TRELLIS_PYTHON") else {
        panic!(
            "set TRELLIS_PYTHON to a python with `tokenizers` and `transformers` \
             (e.g. /root/.cache/trellis/venv-torch2.11.0/bin/python) to run this test"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let train = small_corpus(dir.path());
    let tok = Tokenizer::train(&train, 600).unwrap();
    let tpath = dir.path().join("tokenizer.json");
    tok.save(&tpath).unwrap();
    let samples = vec![
        UNICODE.to_string(),
        tiny_text(3000),
        format!("doc one{EOS_TOKEN}doc two"),
        " leading space and unseen 한국어 🧬".to_string(),
    ];
    let spath = dir.path().join("samples.json");
    fs::write(&spath, serde_json::to_string(&samples).unwrap()).unwrap();
    let script = r#"
import json, sys
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
tpath, spath = sys.argv[1], sys.argv[2]
samples = json.load(open(spath, encoding="utf-8"))
tk = Tokenizer.from_file(tpath)
hf = PreTrainedTokenizerFast(tokenizer_file=tpath, eos_token="<|endoftext|>")
out = {
    "tokenizers": [tk.encode(s, add_special_tokens=False).ids for s in samples],
    "transformers": [hf.encode(s, add_special_tokens=False) for s in samples],
    "decoded": [tk.decode(tk.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) for s in samples],
    "vocab_size": tk.get_vocab_size(with_added_tokens=True),
    "eos_id": hf.eos_token_id,
}
print(json.dumps(out))
"#;
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&tpath)
        .arg(&spath)
        .output()
        .unwrap_or_else(|e| panic!("cannot run TRELLIS_PYTHON={python:?}: {e}"));
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: Vec<Vec<u32>> = samples.iter().map(|s| tok.encode(s).unwrap()).collect();
    let got_tk: Vec<Vec<u32>> = serde_json::from_value(v["tokenizers"].clone()).unwrap();
    let got_hf: Vec<Vec<u32>> = serde_json::from_value(v["transformers"].clone()).unwrap();
    let decoded: Vec<String> = serde_json::from_value(v["decoded"].clone()).unwrap();
    assert_eq!(got_tk, want, "python tokenizers ids differ");
    assert_eq!(got_hf, want, "transformers ids differ");
    assert_eq!(decoded, samples);
    assert_eq!(v["vocab_size"], tok.vocab_size());
    assert_eq!(v["eos_id"], tok.eos_id());
}

/// The main corpus end to end (ignored: minutes in debug builds). Run with
/// `cargo test -p trellis-data --release -- --ignored --nocapture gutenberg`;
/// `TRELLIS_CORPUS_DIR` names the corpus directory (train.txt.zst, valid.txt).
#[test]
#[ignore]
fn gutenberg_prepare_speed() {
    let dir = PathBuf::from(
        std::env::var_os("TRELLIS_CORPUS_DIR")
            .expect("set TRELLIS_CORPUS_DIR to a directory with train.txt.zst and valid.txt"),
    );
    let vocab = std::env::var("TRELLIS_VOCAB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    let cache = tempfile::tempdir().unwrap();
    let s = section(
        &dir.join("train.txt.zst"),
        &dir.join("valid.txt"),
        vocab,
        512,
    );
    let t0 = std::time::Instant::now();
    let p = prepare(&s, cache.path()).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let hwm = fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("VmHWM"))
            .map(str::to_string)
    });
    eprintln!(
        "gutenberg: vocab {} train {} tokens ({} windows of 512), valid {} tokens, {secs:.1} s total, {hwm:?}",
        p.tokenizer.vocab_size(),
        p.train.len(),
        p.train.num_windows(512),
        p.valid.len()
    );
    assert_eq!(
        all(&p.train)
            .iter()
            .filter(|&&t| t == p.tokenizer.eos_id())
            .count(),
        298
    );
    assert_eq!(
        all(&p.valid)
            .iter()
            .filter(|&&t| t == p.tokenizer.eos_id())
            .count(),
        6
    );
    let t1 = std::time::Instant::now();
    let again = prepare(&s, cache.path()).unwrap();
    eprintln!(
        "gutenberg: cached prepare {:.2} s",
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(again.train.len(), p.train.len());
    // Spot-check the round trip of the first document.
    let first: Vec<u32> = all(&p.train)
        .iter()
        .copied()
        .take_while(|&t| t != p.tokenizer.eos_id())
        .collect();
    let text = p.tokenizer.decode(&first).unwrap();
    let mut raw = String::new();
    std::io::Read::read_to_string(&mut open_text(&s.train).unwrap(), &mut raw).unwrap();
    assert!(raw.starts_with(&format!("{text}{EOS_TOKEN}\n")));
}
