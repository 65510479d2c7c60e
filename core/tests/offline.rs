mod common;
use common::*;
use std::path::Path;
use trellis_core::checkpoint::{moment_names, Checkpoint, HostTensor, ShardKind};
use trellis_core::config::{names, ModelConfig};
use trellis_core::growth::{GrowthSpec, Operator, OptimizerPolicy};
use trellis_core::offline::{
    export_hf, export_hf_as, grow_checkpoint, grow_checkpoint_with, ResetSchedule, SplitMix64,
};

fn gqa(layers: usize) -> ModelConfig {
    ModelConfig {
        num_key_value_heads: 2,
        ..tiny(layers)
    }
}

fn spec(operator: Operator, factor: usize, optimizer: OptimizerPolicy) -> GrowthSpec {
    GrowthSpec {
        factor,
        operator,
        optimizer,
    }
}

fn input(root: &Path, cfg: &ModelConfig, tp: usize, with_tokenizer: bool) -> std::path::PathBuf {
    let st = state(cfg, 50, tp);
    let tmp = trellis_core::checkpoint::tmp_dir(root, 50);
    let r = trellis_core::checkpoint::write_full(
        &tmp,
        tp,
        &model_tensors(cfg, 1),
        &optim_tensors(cfg, 1),
    )
    .unwrap();
    if with_tokenizer {
        std::fs::write(tmp.join("tokenizer.json"), b"{\"version\":\"1.0\"}").unwrap();
    }
    trellis_core::checkpoint::finalize(&tmp, &st, &[r]).unwrap()
}

#[test]
fn grow_stack_reset_tensor_by_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gqa(2);
    let src_dir = input(dir.path(), &cfg, 2, true);
    let out = dir.path().join("grown");
    let plan = grow_checkpoint(
        &src_dir,
        &out,
        &spec(Operator::Stack, 4, OptimizerPolicy::Reset),
        1,
    )
    .unwrap();
    assert_eq!(plan.new.num_hidden_layers, 8);
    let src = Checkpoint::open(&src_dir).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert!(!out.with_file_name("grown.tmp").exists());
    assert_eq!(ck.state.model, gqa(8));
    for (name, shape) in gqa(8).tensor_shapes() {
        let want = match names::parse_layer(&name) {
            Some((t, suffix)) => src.read_full(&names::layer(t % 2, suffix)).unwrap(),
            None => src.read_full(&name).unwrap(),
        };
        let got = ck.read_full(&name).unwrap();
        assert_eq!(got.shape, shape);
        assert_eq!(got, want, "{name}");
    }
    // Same TP layout as the input, no optimizer file under reset.
    assert!(
        out.join("model-tp0-of-2.safetensors").is_file()
            && out.join("model-tp1-of-2.safetensors").is_file()
    );
    assert!(!ck.has_optim());
    assert!(!out.join("optim-tp0-of-2.safetensors").exists());
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"version\":\"1.0\"}"
    );
    assert!(ck.has_file("tokenizer.json"));
    // Trainer state.
    let s = &ck.state;
    assert_eq!(s.generation, 1);
    assert_eq!(
        (s.step, s.tokens, s.data_cursor),
        (50, src.state.tokens, src.state.data_cursor)
    );
    assert_eq!(s.optimizer_step, 0);
    assert_eq!(s.schedule.start_step, 50);
    assert_eq!(s.schedule.end_step, 1000);
    assert_eq!(
        (
            s.schedule.peak_lr,
            s.schedule.min_lr,
            s.schedule.warmup_steps
        ),
        (3e-4, 3e-5, 20)
    );
    assert_eq!(s.layout, src.state.layout);
    assert_eq!(s.growth_history.len(), 1);
    let g = &s.growth_history[0];
    assert_eq!(
        (
            g.generation,
            g.at_step,
            g.factor,
            g.from_layers,
            g.to_layers
        ),
        (1, 50, 4, 2, 8)
    );
    assert_eq!(g.operator, "stack");
    assert_eq!(s.mask, None);

    // Refuses to overwrite, and a second growth stacks on top (generation 2).
    let e = grow_checkpoint(
        &src_dir,
        &out,
        &spec(Operator::Stack, 4, OptimizerPolicy::Reset),
        1,
    )
    .unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    let out2 = dir.path().join("grown2");
    grow_checkpoint_with(
        &out,
        &out2,
        &spec(Operator::Interpolate, 2, OptimizerPolicy::Reset),
        1,
        &ResetSchedule {
            peak_lr: 1e-4,
            min_lr: 1e-5,
            warmup_steps: Some(5),
        },
    )
    .unwrap();
    let c2 = Checkpoint::open(&out2).unwrap();
    assert_eq!(c2.state.generation, 2);
    assert_eq!(c2.state.model.num_hidden_layers, 16);
    assert_eq!(c2.state.growth_history.len(), 2);
    assert_eq!(
        (c2.state.schedule.peak_lr, c2.state.schedule.warmup_steps),
        (1e-4, 5)
    );
}

#[test]
fn grow_zero_carry_grows_moments() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(2);
    let src_dir = input(dir.path(), &cfg, 1, false);
    let out = dir.path().join("z");
    grow_checkpoint(
        &src_dir,
        &out,
        &spec(Operator::Zero, 2, OptimizerPolicy::Carry),
        3,
    )
    .unwrap();
    let src = Checkpoint::open(&src_dir).unwrap();
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.state.optimizer_step, src.state.optimizer_step);
    assert_eq!(ck.state.schedule, src.state.schedule);
    assert_eq!(
        ck.names(ShardKind::Optim).len(),
        2 * tiny(4).tensor_shapes().len()
    );
    for (name, shape) in tiny(4).tensor_shapes() {
        let (src_name, zeroed) = match names::parse_layer(&name) {
            Some((t, suffix)) => (
                names::layer(t % 2, suffix),
                t >= 2 && (suffix == "self_attn.o_proj.weight" || suffix == "mlp.down_proj.weight"),
            ),
            None => (name.clone(), false),
        };
        let w = ck.read_full(&name).unwrap();
        if zeroed {
            assert_eq!(w, HostTensor::zeros(&shape), "{name}");
        } else {
            assert_eq!(w, src.read_full(&src_name).unwrap(), "{name}");
        }
        for (m, sm) in moment_names(&name)
            .iter()
            .zip(moment_names(&src_name).iter())
        {
            let got = ck.read_full(m).unwrap();
            if zeroed {
                assert_eq!(got, HostTensor::zeros(&shape), "{m}");
            } else {
                assert_eq!(got, src.read_full(sm).unwrap(), "{m}");
            }
        }
    }
}

#[test]
fn grow_random_is_deterministic_and_has_the_right_scale() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        ..tiny(2)
    };
    let src_dir = input(dir.path(), &cfg, 1, false);
    let s = spec(
        Operator::Random {
            mask_ramp_steps: 30,
        },
        2,
        OptimizerPolicy::Carry,
    );
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    grow_checkpoint(&src_dir, &a, &s, 11).unwrap();
    grow_checkpoint(&src_dir, &b, &s, 11).unwrap();
    grow_checkpoint(&src_dir, &c, &s, 12).unwrap();
    let (ca, cb, cc) = (
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&c).unwrap(),
    );
    let q = names::layer(3, "self_attn.q_proj.weight");
    assert_eq!(ca.read_full(&q).unwrap(), cb.read_full(&q).unwrap());
    assert_ne!(ca.read_full(&q).unwrap(), cc.read_full(&q).unwrap());
    let std_of = |t: &HostTensor| {
        let n = t.data.len() as f64;
        let mean = t.data.iter().map(|&v| v as f64).sum::<f64>() / n;
        (t.data
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    };
    let want_q = (2.0f64 / (5.0 * 64.0)).sqrt();
    let got_q = std_of(&ca.read_full(&q).unwrap());
    assert!((got_q / want_q - 1.0).abs() < 0.05, "{got_q} vs {want_q}");
    let d = names::layer(2, "mlp.down_proj.weight");
    let want_d = 1.0 / 128f64.sqrt() / 4.0;
    let got_d = std_of(&ca.read_full(&d).unwrap());
    assert!((got_d / want_d - 1.0).abs() < 0.05, "{got_d} vs {want_d}");
    let norm = ca
        .read_full(&names::layer(3, "input_layernorm.weight"))
        .unwrap();
    assert!(norm.data.iter().all(|&v| v == 1.0));
    // Kept layers unchanged; fresh tensors have zero moments.
    let src = Checkpoint::open(&src_dir).unwrap();
    let k1 = names::layer(1, "mlp.up_proj.weight");
    assert_eq!(ca.read_full(&k1).unwrap(), src.read_full(&k1).unwrap());
    let m = format!("{q}.exp_avg_sq");
    assert!(ca.read_full(&m).unwrap().data.iter().all(|&v| v == 0.0));
    let mask = ca.state.mask.clone().unwrap();
    assert_eq!(
        (mask.layers, mask.start_step, mask.ramp_steps),
        (vec![2, 3], 50, 30)
    );
}

#[test]
fn grow_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(2);
    // No moments in the input but carry requested.
    let st = state(&cfg, 5, 1);
    let d = write_ckpt(dir.path(), 5, 1, &model_tensors(&cfg, 1), &[], &st);
    let e = grow_checkpoint(
        &d,
        &dir.path().join("o"),
        &spec(Operator::Stack, 2, OptimizerPolicy::Carry),
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("optimizer=reset"), "{e}");
    let e = grow_checkpoint(
        &d,
        &dir.path().join("o"),
        &spec(Operator::Stack, 1, OptimizerPolicy::Reset),
        0,
    )
    .unwrap_err();
    assert!(e.to_string().contains("≥ 2"), "{e}");
    let e =
        grow_checkpoint(&d, &d, &spec(Operator::Stack, 2, OptimizerPolicy::Reset), 0).unwrap_err();
    assert!(
        e.to_string().contains("choose a new directory") || e.to_string().contains("not empty"),
        "{e}"
    );
    assert!(!dir.path().join("o").exists() && !dir.path().join("o.tmp").exists());
}

#[test]
fn splitmix_normals_are_standard() {
    let mut r = SplitMix64::new(42);
    let xs: Vec<f64> = (0..100_000).map(|_| r.normal()).collect();
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
    assert!(
        mean.abs() < 0.02 && (var - 1.0).abs() < 0.02,
        "{mean} {var}"
    );
    assert!(xs.iter().all(|x| x.is_finite()));
}

#[test]
fn export_hf_writes_config_and_full_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = gqa(2);
    let src_dir = input(dir.path(), &cfg, 2, true);
    let out = dir.path().join("hf");
    export_hf(&src_dir, &out).unwrap();
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["architectures"][0], "LlamaForCausalLM");
    assert_eq!(conf["model_type"], "llama");
    assert_eq!(conf["hidden_act"], "silu");
    assert_eq!(conf["tie_word_embeddings"], false);
    assert_eq!(conf["attention_bias"], false);
    assert_eq!(conf["mlp_bias"], false);
    assert_eq!(conf["torch_dtype"], "float32");
    assert_eq!(conf["num_key_value_heads"], 2);
    assert_eq!(conf["head_dim"], 4);
    assert_eq!(conf["vocab_size"], 40);
    assert_eq!(conf["rope_theta"], 10000.0);
    assert_eq!(conf["rms_norm_eps"], 1e-5);
    assert_eq!(conf["max_position_embeddings"], 64);
    assert!(out.join("tokenizer.json").is_file());
    let tensors =
        trellis_core::checkpoint::read_safetensors(&out.join("model.safetensors")).unwrap();
    let src = Checkpoint::open(&src_dir).unwrap();
    let mut want = cfg.tensor_shapes();
    want.sort();
    assert_eq!(
        tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.shape.clone()))
            .collect::<Vec<_>>(),
        want
    );
    for (n, t) in &tensors {
        assert_eq!(t, &src.read_full(n).unwrap(), "{n}");
    }
    // Export again over the same dir is fine (replaces the files).
    export_hf(&src_dir, &out).unwrap();
}

/// transformers loads the export as LlamaForCausalLM with the same weights (needs the venv).
#[test]
fn transformers_loads_the_export() {
    assert!(
        Path::new(&python()).exists(),
        "{} not found: run scripts/setup.sh (make test does) or set TRELLIS_PYTHON",
        python()
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = gqa(2);
    let src_dir = input(dir.path(), &cfg, 1, false);
    let out = dir.path().join("hf");
    export_hf(&src_dir, &out).unwrap();
    let script = format!(
        "import torch, transformers\n\
         from safetensors.torch import load_file\n\
         m = transformers.LlamaForCausalLM.from_pretrained('{0}')\n\
         sd = load_file('{0}/model.safetensors')\n\
         msd = m.state_dict()\n\
         assert set(msd) == set(sd), (set(msd) ^ set(sd))\n\
         assert all(torch.equal(msd[k], sd[k]) for k in sd)\n\
         c = m.config\n\
         assert (c.num_hidden_layers, c.num_key_value_heads, c.head_dim, c.vocab_size) == (2, 2, 4, 40)\n\
         out = m(torch.tensor([[1, 2, 3]])).logits\n\
         assert out.shape == (1, 3, 40) and torch.isfinite(out).all()\n\
         print('ok')",
        out.display()
    );
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `--dtype bf16`: the weights rounded to nearest bfloat16, `torch_dtype` says so, and
/// transformers loads them as bf16, equal to PyTorch's own rounding of the fp32 export.
#[test]
fn a_bf16_export_rounds_to_nearest_and_transformers_loads_it() {
    use trellis_core::checkpoint::f32_to_bf16;
    use trellis_core::offline::ExportDtype;
    // Rounding: exact values stay, ties go to even, NaN stays NaN.
    assert_eq!(f32_to_bf16(1.0), 0x3f80);
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8000)), 0x3f80); // tie, even stays
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f81_8000)), 0x3f82); // tie, odd rounds up
    assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
    assert_eq!(f32_to_bf16(f32::NAN) & 0x7fc0, 0x7fc0);

    let dir = tempfile::tempdir().unwrap();
    let cfg = gqa(2);
    let src_dir = input(dir.path(), &cfg, 1, false);
    let (f32_out, bf16_out) = (dir.path().join("hf32"), dir.path().join("hf16"));
    export_hf(&src_dir, &f32_out).unwrap();
    export_hf_as(&src_dir, &bf16_out, ExportDtype::Bf16).unwrap();
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bf16_out.join("config.json")).unwrap()).unwrap();
    assert_eq!(conf["torch_dtype"], "bfloat16");
    let bytes = std::fs::read(bf16_out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let src = Checkpoint::open(&src_dir).unwrap();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
        let want: Vec<u8> = src
            .read_full(&name)
            .unwrap()
            .data
            .iter()
            .flat_map(|&x| f32_to_bf16(x).to_le_bytes())
            .collect();
        assert_eq!(view.data(), &want[..], "{name}");
    }
    assert!(
        std::fs::metadata(bf16_out.join("model.safetensors"))
            .unwrap()
            .len()
            * 2
            < std::fs::metadata(f32_out.join("model.safetensors"))
                .unwrap()
                .len()
                + 4096
    );
    let script = format!(
        "import torch, transformers\n\
         a = transformers.LlamaForCausalLM.from_pretrained('{0}', dtype=torch.float32)\n\
         b = transformers.LlamaForCausalLM.from_pretrained('{1}')\n\
         assert next(b.parameters()).dtype == torch.bfloat16, next(b.parameters()).dtype\n\
         sa, sb = a.state_dict(), b.state_dict()\n\
         assert set(sa) == set(sb)\n\
         bad = [k for k in sa if not torch.equal(sa[k].to(torch.bfloat16), sb[k])]\n\
         assert not bad, bad\n\
         out = b(torch.tensor([[1, 2, 3, 4]])).logits\n\
         assert torch.isfinite(out.float()).all()\n\
         print('ok')",
        f32_out.display(),
        bf16_out.display()
    );
    let o = std::process::Command::new(python())
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A tied, explicit-head_dim, llama3-scaled model: grown it stays tied; exported, config.json
/// says all of it and names the tokenizer's BOS/EOS ids; a small `max_shard_size` shards the
/// weights with an index as transformers does, and a later unsharded export replaces them.
#[test]
fn a_tied_llama3_model_grows_tied_and_exports_sharded() {
    use trellis_core::config::{names, RopeScaling, RopeType};
    use trellis_core::offline::{export_hf_with, ExportDtype, ExportOptions};
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        head_dim: Some(6),
        tie_word_embeddings: true,
        rope_theta: 500000.0,
        rope_scaling: Some(RopeScaling {
            rope_type: RopeType::Llama3,
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        }),
        ..gqa(2)
    };
    let src_dir = input(dir.path(), &cfg, 2, false);
    let grown = dir.path().join("grown");
    grow_checkpoint(
        &src_dir,
        &grown,
        &spec(Operator::Stack, 2, OptimizerPolicy::Carry),
        1,
    )
    .unwrap();
    let ck = Checkpoint::open(&grown).unwrap();
    assert_eq!(ck.state.model, cfg.with_layers(4));
    assert!(!ck.manifest.tensors.contains_key(names::LM_HEAD));
    assert!(!ck.manifest.tensors.contains_key("lm_head.weight.exp_avg"));
    let src = Checkpoint::open(&src_dir).unwrap();
    assert_eq!(
        ck.read_full(names::EMBED).unwrap(),
        src.read_full(names::EMBED).unwrap()
    );

    // A Llama-3-style tokenizer.json: BOS from the post-processor, EOS by name.
    let tok = serde_json::json!({
        "added_tokens": [
            {"id": 38, "content": "<|begin_of_text|>", "special": true},
            {"id": 39, "content": "<|end_of_text|>", "special": true}],
        "post_processor": {"type": "TemplateProcessing", "single": [
            {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}}]},
        "model": {"type": "BPE", "vocab": {}},
    });
    let with_tok = dir.path().join("tok");
    {
        let tmp = trellis_core::checkpoint::tmp_dir(&with_tok, 50);
        let r =
            trellis_core::checkpoint::write_full(&tmp, 1, &model_tensors(&cfg, 1), &[]).unwrap();
        std::fs::write(tmp.join("tokenizer.json"), tok.to_string()).unwrap();
        trellis_core::checkpoint::finalize(&tmp, &state(&cfg, 50, 1), &[r]).unwrap();
    }
    let ck_dir = with_tok.join("step-50");
    let out = dir.path().join("hf");
    let opts = ExportOptions {
        dtype: ExportDtype::Bf16,
        max_shard_size: 1000, // the embedding (40×16 bf16 = 1280 B) gets a shard of its own
    };
    export_hf_with(&ck_dir, &out, &opts).unwrap();
    let read = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(out.join(p)).unwrap()).unwrap()
    };
    let conf = read("config.json");
    assert_eq!(conf["tie_word_embeddings"], true);
    assert_eq!(conf["head_dim"], 6);
    assert_eq!(conf["rope_theta"], 500000.0);
    assert_eq!(conf["rope_scaling"]["rope_type"], "llama3");
    assert_eq!(conf["rope_scaling"]["original_max_position_embeddings"], 16);
    assert_eq!(conf["rope_parameters"]["rope_theta"], 500000.0);
    assert_eq!(
        (conf["bos_token_id"].clone(), conf["eos_token_id"].clone()),
        (38.into(), 39.into())
    );
    assert_eq!(conf["torch_dtype"], "bfloat16");
    let tc = read("tokenizer_config.json");
    assert_eq!(tc["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(tc["bos_token"], "<|begin_of_text|>");
    assert_eq!(tc["eos_token"], "<|end_of_text|>");
    assert_eq!(read("generation_config.json")["eos_token_id"], 39);

    let index = read("model.safetensors.index.json");
    let map = index["weight_map"].as_object().unwrap();
    let names_in_map: std::collections::BTreeSet<&str> = map.keys().map(|k| k.as_str()).collect();
    let want: std::collections::BTreeSet<String> =
        cfg.tensor_shapes().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names_in_map,
        want.iter()
            .map(|s| s.as_str())
            .collect::<std::collections::BTreeSet<_>>()
    );
    let files: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    let n = files.len();
    assert!(n > 2, "{files:?}");
    let mut total = 0u64;
    for (i, f) in files.iter().enumerate() {
        assert_eq!(*f, format!("model-{:05}-of-{n:05}.safetensors", i + 1));
        let bytes = std::fs::read(out.join(f)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            assert_eq!(map[&name], *f);
            total += view.data().len() as u64;
        }
    }
    assert_eq!(index["metadata"]["total_size"], total);
    assert!(!out.join("model.safetensors").exists());

    // Unsharded again: the shards and the index of the earlier export are gone.
    export_hf(&ck_dir, &out).unwrap();
    assert!(out.join("model.safetensors").is_file());
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("model"))
        .collect();
    assert_eq!(left, ["model.safetensors"]);
}
