//! Experiment tracking: a run directory gets `metrics.jsonl` (one JSON object per line, each
//! with `kind` and `step`) and TensorBoard event files (`events.out.tfevents.*`: TFRecord
//! framing with masked CRC32C around `Event` protobufs, written here with `prost`).
//!
//! [`Tracker::event`] writes a line to `metrics.jsonl` and every number in it as a TensorBoard
//! scalar `KIND/FIELD` (nested objects as `KIND/FIELD/SUB`); an event with string fields (e.g.
//! a growth's operator) also becomes a TensorBoard text entry under `KIND`. [`Tracker::scalar`]
//! writes a TensorBoard scalar alone.
//!
//! Resuming: [`Tracker::open`] keeps the `metrics.jsonl` lines the caller still stands behind and
//! starts a new event file with a `SessionLog START` at the first step that will be logged again;
//! TensorBoard's reader then drops the older files' points from that step on, so a run restarted
//! from a checkpoint shows one clean curve.
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::Error;

/// The TensorBoard protobufs a scalar / text writer needs (field numbers as in TensorFlow's
/// `event.proto`, `summary.proto`, `tensor.proto`).
mod pb {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Event {
        #[prost(double, tag = "1")]
        pub wall_time: f64,
        #[prost(int64, tag = "2")]
        pub step: i64,
        #[prost(oneof = "What", tags = "3, 5, 7")]
        pub what: Option<What>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum What {
        #[prost(string, tag = "3")]
        FileVersion(String),
        #[prost(message, tag = "5")]
        Summary(Summary),
        #[prost(message, tag = "7")]
        SessionLog(SessionLog),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SessionLog {
        /// 1 = START.
        #[prost(int32, tag = "1")]
        pub status: i32,
        #[prost(string, tag = "3")]
        pub msg: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Summary {
        #[prost(message, repeated, tag = "1")]
        pub value: Vec<Value>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Value {
        #[prost(string, tag = "1")]
        pub tag: String,
        #[prost(message, optional, tag = "9")]
        pub metadata: Option<SummaryMetadata>,
        #[prost(oneof = "Kind", tags = "2, 8")]
        pub kind: Option<Kind>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Kind {
        #[prost(float, tag = "2")]
        SimpleValue(f32),
        #[prost(message, tag = "8")]
        Tensor(TensorProto),
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SummaryMetadata {
        #[prost(message, optional, tag = "1")]
        pub plugin_data: Option<PluginData>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PluginData {
        #[prost(string, tag = "1")]
        pub plugin_name: String,
        #[prost(bytes = "vec", tag = "2")]
        pub content: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        /// 7 = DT_STRING.
        #[prost(int32, tag = "1")]
        pub dtype: i32,
        #[prost(message, optional, tag = "2")]
        pub tensor_shape: Option<TensorShape>,
        #[prost(bytes = "vec", repeated, tag = "8")]
        pub string_val: Vec<Vec<u8>>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorShape {
        #[prost(message, repeated, tag = "2")]
        pub dim: Vec<Dim>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dim {
        #[prost(int64, tag = "1")]
        pub size: i64,
    }
}

/// CRC-32C (Castagnoli), as TFRecord frames use it.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Tracking {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `metrics.jsonl` and TensorBoard event files into one run directory.
pub struct Tracker {
    dir: PathBuf,
    metrics_path: PathBuf,
    metrics: File,
    events_path: PathBuf,
    events: BufWriter<File>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("dir", &self.dir)
            .field("events", &self.events_path)
            .finish()
    }
}

/// The `step` of a `metrics.jsonl` line (0 if it has none).
pub fn line_step(line: &Value) -> u64 {
    line.get("step").and_then(Value::as_u64).unwrap_or(0)
}

impl Tracker {
    /// Open run directory `dir` (created if needed). `metrics.jsonl` keeps the existing lines
    /// for which `keep` is true (a fresh run keeps none) and is appended to from then on; a new
    /// event file starts with a `SessionLog START` at `first_step`, the first step that will be
    /// logged (again): TensorBoard drops what older event files hold from that step on, and the
    /// kept lines at or after it are written to the new file again. Returns the kept lines.
    pub fn open(
        dir: &Path,
        first_step: u64,
        mut keep: impl FnMut(&Value) -> bool,
    ) -> Result<(Tracker, Vec<Value>), Error> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let metrics_path = dir.join("metrics.jsonl");
        let kept: Vec<Value> = std::fs::read_to_string(&metrics_path)
            .map(|s| {
                s.lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|v| keep(v))
                    .collect()
            })
            .unwrap_or_default();
        let mut text = String::new();
        for v in &kept {
            text.push_str(&v.to_string());
            text.push('\n');
        }
        std::fs::write(&metrics_path, text).map_err(io_err(&metrics_path))?;
        let metrics = OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(io_err(&metrics_path))?;
        static N: AtomicU64 = AtomicU64::new(0);
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && !h.contains('/'))
            .unwrap_or_else(|| "trellis".into());
        let events_path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}.{}",
            now() as u64,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::create(&events_path).map_err(io_err(&events_path))?;
        let mut t = Tracker {
            dir: dir.to_path_buf(),
            metrics_path,
            metrics,
            events_path,
            events: BufWriter::new(file),
        };
        t.write_event(0, pb::What::FileVersion("brain.Event:2".into()))?;
        t.write_event(
            first_step,
            pb::What::SessionLog(pb::SessionLog {
                status: 1,
                msg: format!("(re)start at step {first_step}"),
            }),
        )?;
        for v in kept.iter().filter(|v| line_step(v) >= first_step) {
            t.summaries(v)?;
        }
        t.flush()?;
        Ok((t, kept))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The event file this tracker writes.
    pub fn events_path(&self) -> &Path {
        &self.events_path
    }

    fn write_event(&mut self, step: u64, what: pb::What) -> Result<(), Error> {
        let ev = pb::Event {
            wall_time: now(),
            step: step as i64,
            what: Some(what),
        };
        let bytes = prost::Message::encode_to_vec(&ev);
        self.events
            .write_all(&frame(&bytes))
            .map_err(io_err(&self.events_path))
    }

    /// A TensorBoard scalar `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> Result<(), Error> {
        self.write_summary(step, vec![scalar_value(tag, value)])?;
        self.flush()
    }

    fn write_summary(&mut self, step: u64, value: Vec<pb::Value>) -> Result<(), Error> {
        if value.is_empty() {
            return Ok(());
        }
        self.write_event(step, pb::What::Summary(pb::Summary { value }))
    }

    /// The TensorBoard form of a `metrics.jsonl` line: its numbers as scalars, its strings as one
    /// text entry.
    fn summaries(&mut self, line: &Value) -> Result<(), Error> {
        let step = line_step(line);
        let kind = line.get("kind").and_then(Value::as_str).unwrap_or("event");
        let mut values = Vec::new();
        let mut strings = Vec::new();
        if let Some(o) = line.as_object() {
            flatten(kind, o, &mut values, &mut strings);
        }
        if !strings.is_empty() {
            let text = strings.join(", ");
            values.push(text_value(kind, &text));
        }
        self.write_summary(step, values)
    }

    /// Append `fields` (an object) as a `metrics.jsonl` line with `kind` and `step`, and write its
    /// TensorBoard form. Both files are flushed.
    pub fn event(&mut self, kind: &str, step: u64, fields: Value) -> Result<(), Error> {
        let mut line = Map::new();
        line.insert("kind".into(), Value::from(kind));
        line.insert("step".into(), Value::from(step));
        if let Value::Object(o) = fields {
            for (k, v) in o {
                if k != "kind" && k != "step" {
                    line.insert(k, v);
                }
            }
        }
        let line = Value::Object(line);
        let mut s = line.to_string();
        s.push('\n');
        self.metrics
            .write_all(s.as_bytes())
            .map_err(io_err(&self.metrics_path))?;
        self.summaries(&line)?;
        self.flush()
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.events.flush().map_err(io_err(&self.events_path))
    }
}

fn scalar_value(tag: &str, v: f64) -> pb::Value {
    pb::Value {
        tag: tag.to_string(),
        metadata: None,
        kind: Some(pb::Kind::SimpleValue(v as f32)),
    }
}

fn text_value(tag: &str, text: &str) -> pb::Value {
    pb::Value {
        tag: tag.to_string(),
        metadata: Some(pb::SummaryMetadata {
            plugin_data: Some(pb::PluginData {
                plugin_name: "text".into(),
                content: Vec::new(),
            }),
        }),
        kind: Some(pb::Kind::Tensor(pb::TensorProto {
            dtype: 7,
            tensor_shape: Some(pb::TensorShape {
                dim: vec![pb::Dim { size: 1 }],
            }),
            string_val: vec![text.as_bytes().to_vec()],
        })),
    }
}

/// Numbers of `o` as scalars `prefix/key` (nested objects recursively), other leaves as
/// `key=value` strings. `kind` and `step` are the line's own keys, not data.
fn flatten(
    prefix: &str,
    o: &Map<String, Value>,
    values: &mut Vec<pb::Value>,
    strings: &mut Vec<String>,
) {
    for (k, v) in o {
        if k == "kind" || k == "step" {
            continue;
        }
        let tag = format!("{prefix}/{k}");
        match v {
            Value::Number(n) => {
                if let Some(f) = n.as_f64() {
                    values.push(scalar_value(&tag, f));
                }
            }
            Value::Bool(b) => values.push(scalar_value(&tag, f64::from(u8::from(*b)))),
            Value::Object(inner) => flatten(&tag, inner, values, strings),
            Value::String(s) => strings.push(format!("{k}={s}")),
            Value::Null | Value::Array(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 B.4 test vectors.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}

/// What TensorBoard's own reader (`EventAccumulator`, run by `python`, which needs the
/// `tensorboard` package) sees in a run directory: `{"scalars": {tag: [[step, value]]},
/// "text": {tag: [[step, text]]}}`. For tests and tools that check what people will see.
pub fn read_with_tensorboard(python: &Path, dir: &Path) -> Result<Value, String> {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
    "text": {t: [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(t)]
             for t in tags["tensors"]},
}))
"#;
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the TensorBoard reader failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("unreadable reader output: {e}"))
}
