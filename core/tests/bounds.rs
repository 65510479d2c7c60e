//! Oversized and overflowing job specs are refused at parse time with one line naming the field
//! and the limit, before any process allocates anything.
use trellis_core::job::JobSpec;

fn spec(model: &str, data: &str, train: &str, parallel: &str) -> String {
    format!(
        "[job]\nname = \"b\"\n[model]\npreset = \"tiny\"\n{model}\n[data]\ntrain = \"t.txt\"\nvalid = \"v.txt\"\nseq_len = 32\n{data}\n[train]\nglobal_batch = 4\nmax_steps = 10\n{train}\n[parallel]\n{parallel}\n"
    )
}

/// The error of the spec, as one line, and the model config's error (sizes are judged there).
fn refused(text: &str) -> String {
    let e = match JobSpec::from_toml(text, std::path::Path::new("/tmp"), "spec") {
        Err(e) => e.to_string(),
        Ok(s) => s
            .model_config(256)
            .expect_err("an oversized spec is refused")
            .to_string(),
    };
    assert!(!e.contains('\n'), "one line: {e}");
    e
}

#[test]
fn oversized_model_sizes_name_the_field_and_the_limit() {
    for (field, line, limit) in [
        (
            "model.intermediate_size",
            "intermediate_size = 10000000000000",
            "262144",
        ),
        ("model.hidden_size", "hidden_size = 1000000", "65536"),
        ("model.vocab_size", "vocab_size = 100000000000", "4194304"),
        (
            "model.num_hidden_layers",
            "num_hidden_layers = 100000",
            "4096",
        ),
        (
            "model.num_attention_heads",
            "num_attention_heads = 4096",
            "1024",
        ),
    ] {
        let e = refused(&spec(line, "", "", ""));
        assert!(e.contains(field) && e.contains(limit), "{field}: {e}");
    }
    // Each size within its limit, the product not: the parameter count is bounded too.
    let e = refused(&spec(
        "hidden_size = 65536\nintermediate_size = 262144\nnum_hidden_layers = 4096\nnum_attention_heads = 1024\nnum_key_value_heads = 1024",
        "",
        "",
        "",
    ));
    assert!(e.contains("parameters"), "{e}");
}

#[test]
fn oversized_layouts_batches_and_runs_are_refused() {
    let cases = [
        ("parallel.dp", spec("", "", "", "dp = 30000000000")),
        (
            "parallel.dp × parallel.tp",
            spec("", "", "", "dp = 60000\ntp = 60000"),
        ),
        (
            "data.seq_len",
            spec("", "", "", "").replace("seq_len = 32", "seq_len = 100000000"),
        ),
        (
            "train.global_batch",
            spec("", "", "", "").replace("global_batch = 4", "global_batch = 1000000000"),
        ),
        (
            "train.max_steps × train.global_batch × data.seq_len",
            spec("", "", "", "")
                .replace("max_steps = 10", "max_steps = 1000000000000")
                .replace("global_batch = 4", "global_batch = 16000000")
                .replace("seq_len = 32", "seq_len = 1000000"),
        ),
    ];
    for (field, text) in cases {
        let e = refused(&text);
        assert!(e.contains(field) && e.contains("limit"), "{field}: {e}");
    }
}
