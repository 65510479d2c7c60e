mod common;
use common::*;
use std::path::Path;
use trellis_core::checkpoint::{
    self, finalize, gc, gc_keeping, latest, list, set_latest, shard_dim, shard_range, tmp_dir,
    write_shard, Checkpoint, HostTensor, Manifest, ShardKind,
};
use trellis_core::config::names;
use trellis_core::Error;

#[test]
fn shard_dims_follow_megatron() {
    for s in ["q_proj", "k_proj", "v_proj"] {
        assert_eq!(
            shard_dim(&format!("model.layers.3.self_attn.{s}.weight")),
            Some(0)
        );
    }
    for s in ["gate_proj", "up_proj"] {
        assert_eq!(
            shard_dim(&format!("model.layers.0.mlp.{s}.weight")),
            Some(0)
        );
    }
    assert_eq!(shard_dim("model.layers.0.self_attn.o_proj.weight"), Some(1));
    assert_eq!(shard_dim("model.layers.0.mlp.down_proj.weight"), Some(1));
    assert_eq!(
        shard_dim("model.layers.0.mlp.down_proj.weight.exp_avg"),
        Some(1)
    );
    assert_eq!(
        shard_dim("model.layers.0.self_attn.q_proj.weight.exp_avg_sq"),
        Some(0)
    );
    for n in [
        names::EMBED,
        names::NORM,
        names::LM_HEAD,
        "model.layers.1.input_layernorm.weight",
        "lm_head.weight.exp_avg",
    ] {
        assert_eq!(shard_dim(n), None, "{n}");
    }
    assert_eq!(shard_range(24, 0, 4), 0..6);
    assert_eq!(shard_range(24, 3, 4), 18..24);
    assert_eq!(shard_range(24, 0, 1), 0..24);
    assert_eq!(shard_range(5, 1, 2), 2..5);
    assert_eq!(shard_range(5, 0, 0), 0..5);
}

fn assert_all_equal(ck: &Checkpoint, full: &[(String, HostTensor)], tp: usize) {
    for (name, t) in full {
        for r in 0..tp {
            let got = ck.read(name, r, tp).unwrap();
            let want = match shard_dim(name) {
                Some(d) => t.narrow(d, shard_range(t.shape[d], r, tp)).unwrap(),
                None => t.clone(),
            };
            assert_eq!(got.shape, want.shape, "{name} rank {r}/{tp}");
            // Bit-exact.
            let gb: Vec<u32> = got.data.iter().map(|v| v.to_bits()).collect();
            let wb: Vec<u32> = want.data.iter().map(|v| v.to_bits()).collect();
            assert!(gb == wb, "{name} rank {r}/{tp} differs");
            // read_into: the same values straight into a caller's buffer (every one written).
            assert_eq!(ck.slice_shape(name, r, tp).unwrap(), want.shape);
            let mut buf = vec![f32::NAN; want.data.len()];
            ck.read_into(name, r, tp, &mut buf).unwrap();
            let ib: Vec<u32> = buf.iter().map(|v| v.to_bits()).collect();
            assert!(ib == wb, "{name} rank {r}/{tp}: read_into differs");
        }
    }
}

#[test]
fn round_trip_tp_1_2_4_1() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny(2);
    let model = model_tensors(&cfg, 1);
    let optim = optim_tensors(&cfg, 1);

    // Write with tp=1.
    let d1 = write_ckpt(root, 10, 1, &model, &optim, &state(&cfg, 10, 1));
    let c1 = Checkpoint::open(&d1).unwrap();
    for tp in [1, 2, 4] {
        assert_all_equal(&c1, &model, tp);
        assert_all_equal(&c1, &optim, tp);
    }

    // Write with tp=2 as two separate writers, each with its local shards read from c1.
    let tmp = tmp_dir(root, 20);
    let mut reports = Vec::new();
    for r in 0..2 {
        let local = |names: Vec<String>| -> Vec<(String, HostTensor)> {
            names
                .into_iter()
                .map(|n| {
                    let t = c1.read(&n, r, 2).unwrap();
                    (n, t)
                })
                .collect()
        };
        let m = local(c1.names(ShardKind::Model));
        let o = local(c1.names(ShardKind::Optim));
        reports.push(write_shard(&tmp, r, 2, &m, &o).unwrap());
    }
    let d2 = finalize(&tmp, &state(&cfg, 20, 2), &reports).unwrap();
    assert_eq!(d2, root.join("step-20"));
    assert!(!tmp.exists());
    let c2 = Checkpoint::open(&d2).unwrap();
    for f in [
        "model-tp0-of-2.safetensors",
        "model-tp1-of-2.safetensors",
        "optim-tp0-of-2.safetensors",
        "optim-tp1-of-2.safetensors",
    ] {
        assert!(d2.join(f).is_file(), "{f}");
    }
    for tp in [1, 2, 4] {
        assert_all_equal(&c2, &model, tp);
        assert_all_equal(&c2, &optim, tp);
    }
    // Replicated tensors only in rank 0's file.
    let e = &c2.manifest.tensors[names::EMBED];
    assert_eq!(e.slices.len(), 1);
    assert_eq!(e.slices[0].file, "model-tp0-of-2.safetensors");
    let q = &c2.manifest.tensors["model.layers.1.self_attn.q_proj.weight"];
    assert_eq!(q.shape, vec![16, 16]);
    assert_eq!(q.shard_dim, Some(0));
    assert_eq!(
        q.slices
            .iter()
            .map(|s| (s.offset, s.length))
            .collect::<Vec<_>>(),
        vec![(0, 8), (8, 8)]
    );

    // tp=4 from c2, then back to tp=1.
    let full: Vec<(String, HostTensor)> = c2
        .names(ShardKind::Model)
        .into_iter()
        .map(|n| {
            let t = c2.read_full(&n).unwrap();
            (n, t)
        })
        .collect();
    let d4 = write_ckpt(root, 30, 4, &full, &[], &state(&cfg, 30, 4));
    let c4 = Checkpoint::open(&d4).unwrap();
    assert!(!c4.has_optim());
    for tp in [1, 2, 4] {
        assert_all_equal(&c4, &model, tp);
    }
    let back: Vec<(String, HostTensor)> = c4
        .names(ShardKind::Model)
        .into_iter()
        .map(|n| {
            let t = c4.read_full(&n).unwrap();
            (n, t)
        })
        .collect();
    let d5 = write_ckpt(root, 40, 1, &back, &[], &state(&cfg, 40, 1));
    assert_all_equal(&Checkpoint::open(&d5).unwrap(), &model, 1);
    assert_eq!(Checkpoint::open(&d5).unwrap().state, state(&cfg, 40, 1));
}

#[test]
fn read_touches_only_overlapping_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1);
    let model = model_tensors(&cfg, 2);
    let d = write_ckpt(dir.path(), 5, 2, &model, &[], &state(&cfg, 5, 2));
    let ck = Checkpoint::open(&d).unwrap();
    std::fs::remove_file(d.join("model-tp1-of-2.safetensors")).unwrap();
    let q = "model.layers.0.self_attn.q_proj.weight";
    // TP=4 ranks 0,1 live in tp0's file only.
    ck.read(q, 0, 4).unwrap();
    ck.read(q, 1, 4).unwrap();
    ck.read(q, 0, 2).unwrap();
    let e = ck.read(q, 1, 2).unwrap_err().to_string();
    assert!(e.contains("model-tp1-of-2.safetensors"), "{e}");
}

#[test]
fn manifest_lists_every_file_including_tokenizer_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny(1);
    let tmp = tmp_dir(root, 3);
    let r =
        checkpoint::write_full(&tmp, 2, &model_tensors(&cfg, 3), &optim_tensors(&cfg, 3)).unwrap();
    std::fs::write(tmp.join("tokenizer.json"), b"{\"model\": {}}").unwrap();
    let d = finalize(&tmp, &state(&cfg, 3, 2), &[r]).unwrap();
    let m: Manifest =
        serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
    let mut listed: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    listed.sort();
    let mut on_disk: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .collect();
    on_disk.sort();
    assert_eq!(
        listed,
        on_disk.iter().map(|s| s.as_str()).collect::<Vec<_>>()
    );
    assert!(listed.contains(&"tokenizer.json") && listed.contains(&"trainer_state.json"));
    for f in &m.files {
        let (size, sha) = checkpoint::file_digest(&d.join(&f.path)).unwrap();
        assert_eq!(
            (size, sha.as_str()),
            (f.size, f.sha256.as_str()),
            "{}",
            f.path
        );
    }
    let ck = Checkpoint::open(&d).unwrap();
    assert!(ck.has_file("tokenizer.json"));
}

#[test]
fn flipped_byte_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(2);
    let d = write_ckpt(
        dir.path(),
        7,
        2,
        &model_tensors(&cfg, 4),
        &optim_tensors(&cfg, 4),
        &state(&cfg, 7, 2),
    );
    let f = d.join("optim-tp1-of-2.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&f, bytes).unwrap();
    let e = Checkpoint::open(&d).unwrap_err();
    match &e {
        Error::HashMismatch {
            path,
            expected,
            actual,
        } => {
            assert_eq!(path, &f);
            assert_ne!(expected, actual);
        }
        other => panic!("expected HashMismatch, got {other}"),
    }
    assert!(e.to_string().contains("optim-tp1-of-2.safetensors"), "{e}");

    // A truncated file is refused too.
    let d2 = write_ckpt(
        dir.path(),
        8,
        1,
        &model_tensors(&cfg, 4),
        &[],
        &state(&cfg, 8, 1),
    );
    let f2 = d2.join("model-tp0-of-1.safetensors");
    let bytes = std::fs::read(&f2).unwrap();
    std::fs::write(&f2, &bytes[..bytes.len() - 4]).unwrap();
    assert!(matches!(
        Checkpoint::open(&d2),
        Err(Error::HashMismatch { .. })
    ));
}

#[test]
fn shape_mismatch_is_refused_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(2);
    let d = write_ckpt(
        dir.path(),
        9,
        1,
        &model_tensors(&cfg, 5),
        &[],
        &state(&cfg, 9, 1),
    );
    // Tamper with the manifest's shape of one tensor.
    let mp = d.join("manifest.json");
    let mut m: Manifest = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    m.tensors.get_mut(name).unwrap().shape = vec![24, 8];
    std::fs::write(&mp, serde_json::to_vec(&m).unwrap()).unwrap();
    let e = Checkpoint::open(&d).unwrap_err().to_string();
    assert!(
        e.contains(name) && e.contains("[24, 8]") && e.contains("[24, 16]"),
        "{e}"
    );

    // finalize refuses tensors that do not match the config.
    let mut model = model_tensors(&cfg, 5);
    model[3].1 = HostTensor::zeros(&[16, 8]);
    let bad = model[3].0.clone();
    let tmp = tmp_dir(dir.path(), 11);
    let r = checkpoint::write_full(&tmp, 1, &model, &[]).unwrap();
    let e = finalize(&tmp, &state(&cfg, 11, 1), &[r])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&bad) && e.contains("[16, 8]") && e.contains("[16, 16]"),
        "{e}"
    );

    // A missing tensor, and an incomplete set of TP reports.
    let tmp = tmp_dir(dir.path(), 12);
    let r = checkpoint::write_full(&tmp, 1, &model_tensors(&cfg, 5)[1..], &[]).unwrap();
    let e = finalize(&tmp, &state(&cfg, 12, 1), &[r])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.embed_tokens.weight") && e.contains("missing"),
        "{e}"
    );
    let tmp = tmp_dir(dir.path(), 13);
    let full = model_tensors(&cfg, 5);
    let c = {
        let d = write_ckpt(dir.path(), 14, 2, &full, &[], &state(&cfg, 14, 2));
        Checkpoint::open(&d).unwrap()
    };
    let local: Vec<(String, HostTensor)> = c
        .names(ShardKind::Model)
        .into_iter()
        .map(|n| {
            let t = c.read(&n, 0, 2).unwrap();
            (n, t)
        })
        .collect();
    let r0 = write_shard(&tmp, 0, 2, &local, &[]).unwrap();
    let e = finalize(&tmp, &state(&cfg, 13, 2), &[r0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("did every TP rank report"), "{e}");
}

#[test]
fn bad_inputs_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1);
    let tmp = tmp_dir(dir.path(), 1);
    let bad = vec![(
        "x".to_string(),
        HostTensor {
            shape: vec![2, 2],
            data: vec![1.0],
        },
    )];
    assert!(write_shard(&tmp, 0, 1, &bad, &[]).is_err());
    assert!(write_shard(&tmp, 2, 2, &model_tensors(&cfg, 1), &[]).is_err());
    assert!(write_shard(&tmp, 0, 0, &model_tensors(&cfg, 1), &[]).is_err());
    assert!(checkpoint::write_full(&tmp, 3, &model_tensors(&cfg, 1), &[]).is_err()); // 16 % 3 != 0
    let e = Checkpoint::open(&tmp).unwrap_err().to_string();
    assert!(e.contains("no manifest.json"), "{e}");
    let d = write_ckpt(
        dir.path(),
        2,
        1,
        &model_tensors(&cfg, 1),
        &[],
        &state(&cfg, 2, 1),
    );
    let ck = Checkpoint::open(&d).unwrap();
    assert!(ck
        .read("nope", 0, 1)
        .unwrap_err()
        .to_string()
        .contains("no tensor 'nope'"));
    assert!(ck.read(names::EMBED, 1, 1).is_err());
    let n = ck
        .slice_shape(names::EMBED, 0, 1)
        .unwrap()
        .iter()
        .product::<usize>();
    let e = ck
        .read_into(names::EMBED, 0, 1, &mut vec![0.0; n - 1])
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("needs {n}")), "{e}");
    assert!(ck
        .read("model.layers.0.self_attn.q_proj.weight", 0, 3)
        .is_err());
}

#[test]
fn finalize_replaces_an_existing_step() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1);
    let a = model_tensors(&cfg, 1);
    let b = model_tensors(&cfg, 2);
    write_ckpt(dir.path(), 5, 1, &a, &[], &state(&cfg, 5, 1));
    let d = write_ckpt(dir.path(), 5, 2, &b, &[], &state(&cfg, 5, 2));
    let ck = Checkpoint::open(&d).unwrap();
    assert_eq!(ck.state.layout.tp, 2);
    assert_eq!(ck.read_full(names::EMBED).unwrap(), b[0].1);
    assert!(!dir.path().join("step-5.old").exists());
    assert!(!d.join("model-tp0-of-1.safetensors").exists());
}

fn names_of(v: &[std::path::PathBuf]) -> Vec<String> {
    let mut n: Vec<String> = v
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    n.sort();
    n
}

#[test]
fn latest_list_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    assert_eq!(latest(root).unwrap(), None);
    assert!(list(root).unwrap().is_empty());
    assert!(list(&root.join("nope")).unwrap().is_empty());
    let cfg = tiny(1);
    let m = model_tensors(&cfg, 1);
    for s in [10, 20, 30, 40, 100] {
        write_ckpt(root, s, 1, &m, &[], &state(&cfg, s, 1));
    }
    let steps: Vec<u64> = list(root).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(
        steps,
        vec![10, 20, 30, 40, 100],
        "numeric order, not lexical"
    );
    set_latest(root, &root.join("step-20")).unwrap();
    assert_eq!(latest(root).unwrap(), Some(root.join("step-20")));
    assert_eq!(
        std::fs::read_to_string(root.join("latest")).unwrap().trim(),
        "step-20"
    );
    std::fs::create_dir(root.join("step-5.tmp")).unwrap();
    std::fs::create_dir(root.join("step-200.tmp")).unwrap();
    std::fs::create_dir(root.join("other")).unwrap();
    let removed = gc(root, 2).unwrap();
    assert_eq!(names_of(&removed), vec!["step-10", "step-30", "step-5.tmp"]);
    let steps: Vec<u64> = list(root).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![20, 40, 100]);
    assert!(
        root.join("step-200.tmp").exists(),
        "an in-progress newer write is kept"
    );
    assert!(root.join("other").exists());
    set_latest(root, &root.join("step-100")).unwrap();
    let removed = gc(root, 1).unwrap();
    assert_eq!(names_of(&removed), vec!["step-20", "step-40"]);
    // set_latest refuses dirs outside the job root or missing.
    assert!(set_latest(root, &root.join("step-999")).is_err());
    let other = tempfile::tempdir().unwrap();
    assert!(set_latest(root, other.path()).is_err());
    // A dangling latest is an error, not a silent None.
    std::fs::write(root.join("latest"), "step-77\n").unwrap();
    assert!(latest(root).unwrap_err().to_string().contains("step-77"));
}

#[test]
fn gc_keeping_removes_only_what_the_coordinator_retired() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny(1);
    let m = model_tensors(&cfg, 1);
    for s in [10, 20, 30, 40, 50] {
        write_ckpt(root, s, 1, &m, &[], &state(&cfg, s, 1));
    }
    std::fs::create_dir(root.join("step-15.tmp")).unwrap();
    std::fs::create_dir(root.join("step-60.tmp")).unwrap();
    std::fs::create_dir(root.join("step-5.unusable")).unwrap();
    // Rank 0 just finalized step 40; the coordinator's catalogue is {20, 30} (30 its restore
    // point). 50 is newer than the commit (e.g. left by an epoch that was rolled back): kept.
    let keep = [20, 30].into_iter().collect();
    let removed = gc_keeping(root, &keep, 40).unwrap();
    assert_eq!(names_of(&removed), vec!["step-10", "step-15.tmp"]);
    let steps: Vec<u64> = list(root).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, vec![20, 30, 40, 50]);
    assert!(
        root.join("step-60.tmp").exists(),
        "a newer write in flight is kept"
    );
    assert!(
        root.join("step-5.unusable").exists(),
        "set-aside checkpoints are never collected"
    );
}

#[test]
fn an_interrupted_replace_keeps_the_good_copy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cfg = tiny(1);
    let a = model_tensors(&cfg, 1);
    let d = write_ckpt(root, 5, 1, &a, &[], &state(&cfg, 5, 1));
    // A crash between the two renames of a replace: only `step-5.old` is left.
    std::fs::rename(&d, root.join("step-5.old")).unwrap();
    let keep = [5].into_iter().collect();
    let removed = gc_keeping(root, &keep, 10).unwrap();
    assert!(removed.is_empty(), "{removed:?}");
    let ck = Checkpoint::open(&d).expect("the good copy is back under its name");
    assert_eq!(ck.read_full(names::EMBED).unwrap(), a[0].1);
    // The same for standalone GC and for the next finalize of that step.
    std::fs::rename(&d, root.join("step-5.old")).unwrap();
    gc(root, 3).unwrap();
    assert!(d.join("manifest.json").is_file());
    std::fs::rename(&d, root.join("step-5.old")).unwrap();
    let b = model_tensors(&cfg, 2);
    let d2 = write_ckpt(root, 5, 1, &b, &[], &state(&cfg, 5, 1));
    assert_eq!(
        Checkpoint::open(&d2)
            .unwrap()
            .read_full(names::EMBED)
            .unwrap(),
        b[0].1
    );
    assert!(!root.join("step-5.old").exists());
}

/// Any safetensors reader must read the shard files (needs the venv: make test provides it).
#[test]
fn python_safetensors_reads_shards() {
    assert!(
        Path::new(&python()).exists(),
        "{} not found: run scripts/setup.sh (make test does) or set TRELLIS_PYTHON",
        python()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(1);
    let model = model_tensors(&cfg, 9);
    let d = write_ckpt(dir.path(), 1, 2, &model, &[], &state(&cfg, 1, 2));
    let q = &model
        .iter()
        .find(|(n, _)| n == "model.layers.0.self_attn.q_proj.weight")
        .unwrap()
        .1;
    let script = format!(
        "from safetensors.numpy import load_file\n\
         a = load_file('{}')\n\
         b = load_file('{}')\n\
         q = a['model.layers.0.self_attn.q_proj.weight']\n\
         print(q.dtype, q.shape, repr(float(q[0,0])), repr(float(b['model.layers.0.self_attn.q_proj.weight'][0,0])), 'model.embed_tokens.weight' in a, 'model.embed_tokens.weight' in b)",
        d.join("model-tp0-of-2.safetensors").display(),
        d.join("model-tp1-of-2.safetensors").display()
    );
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let parts: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(parts[0], "float32");
    assert_eq!(parts[1..3].join(" "), "(8, 16)");
    assert_eq!(parts[3].parse::<f32>().unwrap(), q.data[0]);
    assert_eq!(parts[4].parse::<f32>().unwrap(), q.data[8 * 16]);
    assert_eq!(&parts[5..], &["True", "False"]);
}
