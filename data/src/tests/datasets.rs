//! Dataset formats, mixtures, exact tokenization with cut documents, and the cheap cache key.
//! Every input file is made by the real library (`zstandard`, `gzip`, `pyarrow`, `numpy`,
//! `tokenizers`) through `TRELLIS_PYTHON`.
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use trellis_core::job::{DataSection, DataSource};

use super::{repo_root, tiny_text, UNICODE};
use crate::source::{Format, InputFile};
use crate::tokens::{tokenize_input, Progress, TokenizeOpts};
use crate::*;

fn python() -> PathBuf {
    match std::env::var_os("TRELLIS_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "set TRELLIS_PYTHON to a python with tokenizers, pyarrow, zstandard and numpy \
             (e.g. /root/.cache/trellis/venv-torch2.11.0/bin/python; scripts/setup.sh installs them)"
        ),
    }
}

/// Run a Python script with `args`; panics with its stderr on failure.
fn run_python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("cannot run TRELLIS_PYTHON");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Paragraphs of tinyshakespeare (blank-line separated), about `bytes` in all.
fn paragraphs(bytes: usize) -> Vec<String> {
    tiny_text(bytes)
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .map(|p| format!("{p}\n"))
        .collect()
}

/// A mixture corpus under `dir`: source A = three `.jsonl.zst` shards (zstandard) of lowercased
/// paragraphs in field `text`; source B = one parquet file (pyarrow, several row groups, one null)
/// of uppercased paragraphs in column `content`; validation = one `.jsonl.gz` (gzip).
fn mixture_corpus(dir: &Path) {
    let mut docs = paragraphs(300_000).into_iter();
    let a: Vec<String> = docs.by_ref().take(400).map(|p| p.to_lowercase()).collect();
    let b: Vec<String> = docs.by_ref().take(300).map(|p| p.to_uppercase()).collect();
    let v: Vec<String> = docs.take(100).collect();
    assert!(a.len() == 400 && b.len() == 300 && v.len() > 50);
    let spec = serde_json::json!({"a": a, "b": b, "v": v});
    let spec_path = dir.join("docs.json");
    fs::write(&spec_path, spec.to_string()).unwrap();
    let script = r#"
import gzip, json, os, sys
import pyarrow as pa, pyarrow.parquet as pq, zstandard
d = json.load(open(sys.argv[1], encoding="utf-8"))
out = sys.argv[2]
os.makedirs(os.path.join(out, "shards"), exist_ok=True)
for i in range(3):
    lines = "".join(json.dumps({"id": f"a{j}", "text": t}) + "\n" for j, t in enumerate(d["a"]) if j % 3 == i)
    with open(os.path.join(out, "shards", f"part-{i:02d}.jsonl.zst"), "wb") as f:
        f.write(zstandard.ZstdCompressor(level=3).compress(lines.encode("utf-8")))
content = d["b"][:150] + [None] + d["b"][150:]
pq.write_table(pa.table({"content": content, "n": list(range(len(content)))}),
               os.path.join(out, "books.parquet"), row_group_size=64)
with gzip.open(os.path.join(out, "valid.jsonl.gz"), "wt", encoding="utf-8") as f:
    for t in d["v"]:
        f.write(json.dumps({"text": t}) + "\n")
"#;
    run_python(script, &[&spec_path, dir]);
}

fn mixture_section(dir: &Path, seq_len: usize) -> DataSection {
    let mut s = DataSection::new(PathBuf::new(), dir.join("valid.jsonl.gz"), seq_len);
    s.vocab_size = 400;
    s.sources = vec![
        DataSource {
            path: dir.join("shards/*.jsonl.zst"),
            weight: 0.7,
            text_field: None,
            format: None,
        },
        DataSource {
            path: dir.join("books.parquet"),
            weight: 0.3,
            text_field: Some("content".into()),
            format: None,
        },
    ];
    s
}

/// The text of global window `w` without special tokens.
fn window_text(p: &PreparedData, w: u64, seq: usize) -> String {
    let ids: Vec<u32> = p
        .train
        .window(w, seq)
        .into_iter()
        .map(|t| t as u32)
        .filter(|&t| t != p.tokenizer.eos_id())
        .collect();
    p.tokenizer.decode(&ids).unwrap()
}

#[test]
fn mixture_of_jsonl_zst_shards_and_parquet() {
    let dir = tempfile::tempdir().unwrap();
    mixture_corpus(dir.path());
    let seq = 16;
    let s = mixture_section(dir.path(), seq);
    let cache = dir.path().join("cache");
    let p = prepare(&s, &cache).unwrap();
    let srcs = p.train.sources();
    assert_eq!(srcs.len(), 2);
    assert_eq!(srcs[0].files().len(), 3, "three shards");
    assert_eq!(srcs[1].files().len(), 1);
    // Every document ends with EOS: 400 jsonl documents, 300 parquet rows (the null skipped).
    let eos = p.tokenizer.eos_id();
    let count_eos = |src: &Source| -> usize {
        src.files()
            .iter()
            .map(|f| f.all().iter().filter(|&&t| t == eos).count())
            .sum()
    };
    assert_eq!(count_eos(&srcs[0]), 400);
    assert_eq!(count_eos(&srcs[1]), 300);
    assert!(p.valid.num_windows(seq) > 10);

    let sampler = p.sampler(seq, 1234).unwrap();
    // Proportions: exact up to one slot per block over aligned blocks, and within the stated
    // tolerance of 1 percentage point over a prefix that is not block-aligned.
    let frac_a =
        |n: u64| (0..n).filter(|&i| sampler.source_sample(i).0 == 0).count() as f64 / n as f64;
    let exact = frac_a(2 * MIX_BLOCK);
    assert!((exact - 0.7).abs() <= 1.0 / MIX_BLOCK as f64, "{exact}");
    let prefix = frac_a(10_007);
    assert!((prefix - 0.7).abs() <= 0.01, "{prefix}");
    eprintln!("mixture: source A share {exact:.5} over 2 blocks, {prefix:.5} over 10007 samples (weight 0.7)");

    // Each sample reads a window of its own source: A is lowercase, B uppercase text.
    let (na, nb) = (srcs[0].num_windows(seq), srcs[1].num_windows(seq));
    let mut seen_a = HashSet::new();
    for i in 0..3000u64 {
        let (src, k) = sampler.source_sample(i);
        let w = sampler.window(i);
        let (located, local) = p.train.locate(w, seq).unwrap();
        assert_eq!(located, src, "sample {i}");
        let text = window_text(&p, w, seq);
        let (upper, lower) = (
            text.chars().any(|c| c.is_ascii_uppercase()),
            text.chars().any(|c| c.is_ascii_lowercase()),
        );
        match src {
            0 => assert!(!upper, "sample {i} of source A reads {text:?}"),
            _ => assert!(!lower, "sample {i} of source B reads {text:?}"),
        }
        // No window of a source repeats within that source's epoch.
        if src == 0 && k < na {
            assert!(
                seen_a.insert(local),
                "source A window {local} read twice in one epoch"
            );
        }
    }
    assert!(na > 1000 && nb > 500, "{na} {nb}");

    // Resume and a DP change: a run at dp = 2 stopped after 5 steps, then restarted in a new
    // process (the data prepared again from the cache) at dp = 4, reads exactly the sample ids
    // and windows of an uninterrupted single-rank run: none skipped, none repeated.
    let gb = 8usize;
    let steps = 12u64;
    let reference: Vec<(u64, u64)> = (0..steps * gb as u64)
        .map(|i| (i, sampler.window(i)))
        .collect();
    let mut read: Vec<(u64, u64)> = Vec::new();
    let mut run = |p: &PreparedData, from: u64, to: u64, dp: usize| {
        let sm = p.sampler(seq, 1234).unwrap();
        for step in from..to {
            for r in 0..dp {
                for i in rank_samples(step * gb as u64, gb, r, dp) {
                    read.push((i, sm.window(i)));
                }
            }
        }
    };
    run(&p, 0, 5, 2);
    drop(p);
    let (tr, tk) = work_counters();
    let again = prepare(&s, &cache).unwrap();
    assert_eq!(work_counters(), (tr, tk), "the restart re-tokenized");
    run(&again, 5, steps, 4);
    assert_eq!(read, reference);
}

/// The ids Python's `tokenizers` gives each whole document, then the ids of the same documents
/// tokenized here with many cut points.
#[test]
fn llama3_pretokenizer_cut_documents_match_tokenizers() {
    let dir = tempfile::tempdir().unwrap();
    let train = dir.path().join("train.txt");
    fs::write(&train, tiny_text(200_000)).unwrap();
    // Documents with many cut points: paragraphs joined, unicode, CRLF, "end.\n" everywhere.
    let mut docs: Vec<String> = paragraphs(400_000)
        .chunks(150)
        .map(|c| c.join("\n"))
        .take(6)
        .collect();
    docs.push(format!("{UNICODE}{}", UNICODE.replace('\n', "\r\n")));
    docs.push("Short.\nEnd.\nYes!\n'Tis so.\n12\n34 end\nx".into());
    let docs_path = dir.path().join("docs.json");
    fs::write(&docs_path, serde_json::to_string(&docs).unwrap()).unwrap();
    let script = r#"
import json, sys
from tokenizers import Tokenizer, Regex, models, pre_tokenizers, decoders, trainers, processors
train, docs_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
docs = json.load(open(docs_path, encoding="utf-8"))
res = {}
for name, prefix_space in [("llama3", False), ("prefix_space", True)]:
    tok = Tokenizer(models.BPE())
    if prefix_space:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, show_progress=False,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([train], trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(f"{out}/{name}.json")
    res[name] = {"ids": [tok.encode(d).ids for d in docs], "bos": bos,
                 "eos": tok.token_to_id("<|end_of_text|>"),
                 "dot_newline": tok.token_to_id(".\u010a")}
print(json.dumps(res))
"#;
    let out = run_python(script, &[&train, &docs_path, dir.path()]);
    let res: serde_json::Value = serde_json::from_str(&out).unwrap();
    let jsonl = dir.path().join("docs.jsonl");
    let lines: String = docs
        .iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    fs::write(&jsonl, lines).unwrap();
    let input = InputFile {
        path: jsonl.clone(),
        format: Format::Jsonl {
            text_field: "text".into(),
        },
    };
    for (name, cuts) in [("llama3", true), ("prefix_space", false)] {
        let r = &res[name];
        let tok = Tokenizer::load(&dir.path().join(format!("{name}.json"))).unwrap();
        let bos = r["bos"].as_u64().unwrap() as u32;
        let eos = r["eos"].as_u64().unwrap() as u32;
        assert_eq!(tok.eos_id(), eos);
        // The post-processor's BOS is added to every document; EOS ends each one.
        assert_eq!(tok.document_affixes(), (&[bos][..], &[][..]), "{name}");
        assert_eq!(tok.cuts_documents(), cuts, "{name}: the cut rule check");
        let want: Vec<u32> = serde_json::from_value::<Vec<Vec<u32>>>(r["ids"].clone())
            .unwrap()
            .into_iter()
            .flat_map(|mut ids| {
                ids.push(eos);
                ids
            })
            .collect();
        for chunk in [7, 37, 4096] {
            let dest = dir.path().join(format!("{name}-{chunk}.u32"));
            let progress = Progress::new(name, 0);
            let opts = TokenizeOpts {
                chunk_bytes: chunk,
                close_last: false,
            };
            let (tf, _) =
                tokenize_input(&tok, "t", &input, "s", &dest, &opts, &progress, 0).unwrap();
            let got = tf.all();
            if let Some(i) = (0..got.len().min(want.len())).find(|&i| got[i] != want[i]) {
                panic!("{name}, chunks of {chunk}: first difference at token {i}");
            }
            assert_eq!(got.len(), want.len(), "{name}, chunks of {chunk}");
        }
        if cuts {
            // The cut points are many, and a naive cut (before each newline, exact for GPT-2's
            // pre-tokenizer) would change the ids: Llama 3's merges ".\n".
            let doc = &docs[0];
            let pieces = crate::text::split_document(doc, 7);
            assert!(pieces.len() > 300, "{}", pieces.len());
            assert!(r["dot_newline"].is_u64(), "the BPE learned '.\\n'");
            let mut naive = Vec::new();
            let mut start = 0;
            for (j, _) in doc.match_indices(".\n") {
                naive.extend(tok.encode(&doc[start..j + 1]).unwrap());
                start = j + 1;
            }
            naive.extend(tok.encode(&doc[start..]).unwrap());
            assert_ne!(
                naive,
                tok.encode(doc).unwrap(),
                "the naive cut should differ"
            );
        }
    }
}

#[test]
fn unchanged_corpus_is_not_read_again() {
    let dir = tempfile::tempdir().unwrap();
    mixture_corpus(dir.path());
    let s = mixture_section(dir.path(), 16);
    let cache = dir.path().join("cache");
    let corpus_bytes: u64 = ["shards", "books.parquet", "valid.jsonl.gz"]
        .iter()
        .map(|n| {
            let p = dir.path().join(n);
            if p.is_dir() {
                fs::read_dir(&p)
                    .unwrap()
                    .map(|e| e.unwrap().metadata().unwrap().len())
                    .sum()
            } else {
                fs::metadata(&p).unwrap().len()
            }
        })
        .sum();
    let files = 5u64;
    let (r0, _) = read_counters();
    let (tr0, tk0) = work_counters();
    let a = prepare(&s, &cache).unwrap();
    let (r1, s1) = read_counters();
    // First start: hashed and tokenized (and trained on) in full.
    assert!(
        r1 - r0 >= 2 * corpus_bytes,
        "{} < 2 × {corpus_bytes}",
        r1 - r0
    );
    assert_eq!(work_counters(), (tr0 + 1, tk0 + files));
    // Second start on the unchanged corpus: nothing read in full, only fingerprint samples.
    let b = prepare(&s, &cache).unwrap();
    let (r2, s2) = read_counters();
    assert_eq!(r2, r1, "an unchanged corpus was read again");
    assert!(s2 - s1 <= files * FINGERPRINT_BYTES, "{}", s2 - s1);
    assert_eq!(work_counters(), (tr0 + 1, tk0 + files));
    assert_eq!(b.train.len(), a.train.len());
    // Touched (new mtime, same bytes): that file alone is hashed in full, nothing re-tokenized.
    let touched = dir.path().join("books.parquet");
    let f = fs::File::options().write(true).open(&touched).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(f);
    prepare(&s, &cache).unwrap();
    let (r3, _) = read_counters();
    assert_eq!(r3 - r2, fs::metadata(&touched).unwrap().len());
    assert_eq!(work_counters(), (tr0 + 1, tk0 + files));
    // A file the glob does not match changes nothing.
    fs::copy(
        dir.path().join("valid.jsonl.gz"),
        dir.path().join("shards/part-03.jsonl.gz"),
    )
    .unwrap();
    let c = prepare(&s, &cache).unwrap();
    assert_eq!(
        c.train.sources()[0].files().len(),
        3,
        "a glob of .jsonl.zst only"
    );
    fs::remove_file(dir.path().join("shards/part-03.jsonl.gz")).unwrap();
    // Changed content: hashed again and the tokenizer retrained (it was trained on this source).
    let shard = dir.path().join("shards/part-01.jsonl.zst");
    let other = fs::read(dir.path().join("shards/part-02.jsonl.zst")).unwrap();
    fs::write(&shard, other).unwrap();
    prepare(&s, &cache).unwrap();
    assert_eq!(work_counters().0, tr0 + 2);
}

#[test]
fn pre_tokenized_uint16_and_uint32_files() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("t.txt");
    fs::write(&text, tiny_text(20_000)).unwrap();
    let tok = Tokenizer::train(&text, 300).unwrap();
    let tok_path = dir.path().join("tokenizer.json");
    tok.save(&tok_path).unwrap();
    let script = r#"
import sys, numpy as np
out = sys.argv[1]
(np.arange(5000) % 300).astype(np.uint16).tofile(f"{out}/a.bin")
((np.arange(3000) * 7) % 300).astype(np.uint32).tofile(f"{out}/b.bin")
np.array([1, 400, 3], dtype=np.uint16).tofile(f"{out}/big.bin")
"#;
    run_python(script, &[dir.path()]);
    let seq = 32;
    let mut s = DataSection::new(dir.path().join("a.bin"), dir.path().join("a.bin"), seq);
    s.tokenizer = Some(tok_path.clone());
    s.token_dtype = Some("uint16".into());
    let cache = dir.path().join("cache");
    let p = prepare(&s, &cache).unwrap();
    assert_eq!(p.train.len(), 5000);
    assert_eq!(p.train.num_windows(seq), (5000 - 1) / 32);
    let w = p.train.window(3, seq);
    assert_eq!(w, (96..129).map(|i| (i % 300) as i64).collect::<Vec<_>>());
    // uint32, and the file used as it is (nothing copied into the cache).
    s.train = dir.path().join("b.bin");
    s.token_dtype = Some("uint32".into());
    s.valid = dir.path().join("b.bin");
    let p = prepare(&s, &cache).unwrap();
    assert_eq!(
        p.train.files().next().unwrap().path(),
        dir.path().join("b.bin")
    );
    assert_eq!(p.train.window(0, seq)[5], 35);
    assert!(!fs::read_dir(&cache).unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("tokens-")));
    // Errors: ids beyond the vocabulary, a size that is no whole number of ids, no dtype, no
    // tokenizer.
    let err = |s: &DataSection| match prepare(s, &cache) {
        Ok(_) => panic!("prepare accepted {s:?}"),
        Err(e) => e.to_string(),
    };
    let mut bad = s.clone();
    bad.train = dir.path().join("big.bin");
    bad.token_dtype = Some("uint16".into());
    let m = err(&bad);
    assert!(
        m.contains("big.bin") && m.contains("400") && m.contains("300"),
        "{m}"
    );
    bad.token_dtype = Some("uint32".into());
    let m = err(&bad);
    assert!(
        m.contains("big.bin") && m.contains("not a whole number"),
        "{m}"
    );
    bad.token_dtype = None;
    let m = err(&bad);
    assert!(m.contains("data.token_dtype"), "{m}");
    let mut no_tok = s.clone();
    no_tok.tokenizer = None;
    let m = err(&no_tok);
    assert!(m.contains("data.tokenizer") && m.contains("b.bin"), "{m}");
}

#[test]
fn directories_globs_and_format_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("corpus");
    fs::create_dir_all(d.join("sub")).unwrap();
    let text = tiny_text(40_000);
    let (x, y) = text.split_at(text.find("\n\n").unwrap() + 1);
    fs::write(d.join("b.txt"), y).unwrap();
    fs::write(d.join("sub/a.txt"), x).unwrap();
    fs::write(d.join("README.md"), "ignored").unwrap();
    let valid = dir.path().join("v.txt");
    fs::write(&valid, tiny_text(5_000)).unwrap();
    let mut s = DataSection::new(d.clone(), valid.clone(), 16);
    s.vocab_size = 300;
    let cache = dir.path().join("cache");
    let p = prepare(&s, &cache).unwrap();
    let files: Vec<&Path> = p.train.files().map(|f| f.path()).collect();
    assert_eq!(files.len(), 2, "README.md is skipped");
    // Files joined in path order, each one's last document closed with EOS.
    let eos = p.tokenizer.eos_id();
    let joined: Vec<u32> = p.train.files().flat_map(|f| f.all().to_vec()).collect();
    let mut want = p.tokenizer.encode(y).unwrap();
    want.push(eos);
    want.extend(p.tokenizer.encode(x).unwrap());
    want.push(eos);
    assert_eq!(joined, want);
    let w = p.train.num_windows(16);
    // A window spanning the two files reads across the boundary.
    let cross = (joined.len() / 2 / 16) as u64;
    assert!(cross < w);
    assert_eq!(
        p.train.window(cross, 16),
        joined[cross as usize * 16..cross as usize * 16 + 17]
            .iter()
            .map(|&t| t as i64)
            .collect::<Vec<_>>()
    );
    let msg = |s: &DataSection| match prepare(s, &cache) {
        Ok(_) => panic!("accepted {s:?}"),
        Err(e) => e.to_string(),
    };
    s.train = d.join("*.nothing");
    let m = msg(&s);
    assert!(m.contains("data.train") && m.contains("*.nothing"), "{m}");
    s.train = d.join("*.md");
    let m = msg(&s);
    assert!(m.contains("README.md") && m.contains("data.format"), "{m}");
    s.train = repo_root().join("data/src/tests/missing-dir/");
    assert!(matches!(prepare(&s, &cache), Err(Error::NotFound { .. })));
    // jsonl without the field names the line, the fields and the setting.
    let j = dir.path().join("x.jsonl");
    fs::write(&j, "{\"text\": \"a\"}\n{\"body\": \"b\", \"id\": 1}\n").unwrap();
    s.train = j;
    let m = msg(&s);
    assert!(
        m.contains("x.jsonl")
            && m.contains("line 2")
            && m.contains("body")
            && m.contains("data.text_field"),
        "{m}"
    );
}

#[test]
fn data_section_in_job_specs() {
    use trellis_core::job::JobSpec;
    let spec = |data: &str| {
        let text = format!(
            "[job]\nname = \"x\"\n[model]\n[train]\nglobal_batch = 2\nmax_steps = 3\n[data]\nseq_len = 8\n{data}"
        );
        JobSpec::from_toml(&text, Path::new("/base"), "x.toml")
    };
    let s = spec(
        "valid = \"v.jsonl.gz\"\ntext_field = \"body\"\n\
         [[data.sources]]\npath = \"web/*.jsonl.zst\"\nweight = 3\n\
         [[data.sources]]\npath = \"/abs/books.parquet\"\nweight = 1\ntext_field = \"content\"\n",
    )
    .unwrap();
    assert_eq!(s.data.sources.len(), 2);
    assert_eq!(s.data.sources[0].path, Path::new("/base/web/*.jsonl.zst"));
    assert_eq!(s.data.sources[1].path, Path::new("/abs/books.parquet"));
    assert_eq!(s.data.valid, Path::new("/base/v.jsonl.gz"));
    assert!(s.data.train.as_os_str().is_empty());
    // The old single-file form is unchanged.
    let s = spec("train = \"t.txt\"\nvalid = \"v.txt\"\n").unwrap();
    assert_eq!(s.data.train_sources()[0].path, Path::new("/base/t.txt"));
    for (data, want) in [
        ("valid = \"v\"\n", "set data.train"),
        (
            "train = \"t\"\nvalid = \"v\"\n[[data.sources]]\npath = \"a\"\nweight = 1\n",
            "not both",
        ),
        (
            "valid = \"v\"\n[[data.sources]]\npath = \"a\"\nweight = 0\n",
            "data.sources[0].weight",
        ),
        ("train = \"t\"\nvalid = \"v\"\nformat = \"csv\"\n", "'csv'"),
        (
            "train = \"t\"\nvalid = \"v\"\ntoken_dtype = \"int8\"\n",
            "data.token_dtype",
        ),
    ] {
        let e = spec(data).unwrap_err().to_string();
        assert!(e.contains(want), "{data:?}: {e}");
    }
}

#[test]
fn parquet_required_columns_and_unsupported_codecs() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
import sys, pyarrow as pa, pyarrow.parquet as pq
out = sys.argv[1]
docs = [f"document number {i}, some words.\n" * 3 for i in range(200)]
schema = pa.schema([pa.field("text", pa.string(), nullable=False)])
pq.write_table(pa.table({"text": docs}, schema=schema), f"{out}/required.parquet", row_group_size=50)
pq.write_table(pa.table({"text": docs}), f"{out}/plain.parquet", compression="none")
pq.write_table(pa.table({"text": docs}), f"{out}/brotli.parquet", compression="brotli")
pq.write_table(pa.table({"other": docs}), f"{out}/other.parquet")
"#;
    run_python(script, &[dir.path()]);
    let mut s = DataSection::new(
        dir.path().join("required.parquet"),
        dir.path().join("plain.parquet"),
        8,
    );
    s.vocab_size = 300;
    let cache = dir.path().join("cache");
    let p = prepare(&s, &cache).unwrap();
    let eos = p.tokenizer.eos_id();
    for d in [&p.train, &p.valid] {
        let n = d
            .files()
            .flat_map(|f| f.all())
            .filter(|&&t| t == eos)
            .count();
        assert_eq!(n, 200, "one EOS per row");
    }
    let first: Vec<u32> = p.train.files().next().unwrap().all()[..]
        .iter()
        .copied()
        .take_while(|&t| t != eos)
        .collect();
    assert_eq!(
        p.tokenizer.decode(&first).unwrap(),
        "document number 0, some words.\n".repeat(3)
    );
    let err = |s: &DataSection| match prepare(s, &cache) {
        Ok(_) => panic!("accepted {s:?}"),
        Err(e) => e.to_string(),
    };
    s.valid = dir.path().join("brotli.parquet");
    let m = err(&s);
    assert!(
        m.contains("brotli.parquet")
            && m.contains("compressed with brotli")
            && m.contains("snappy"),
        "{m}"
    );
    s.valid = dir.path().join("other.parquet");
    let m = err(&s);
    assert!(
        m.contains("other.parquet")
            && m.contains("'text'")
            && m.contains("other")
            && m.contains("data.text_field"),
        "{m}"
    );
}
