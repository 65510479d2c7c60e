//! What the coordinator's gRPC port admits (docs/security.md): mTLS and roles
//! ([`trellis_auth`]), the plaintext rule (loopback only unless `--insecure`), and the allowed
//! roots that every path of a submitted job spec must stay inside.
use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tonic::transport::ServerTlsConfig;
use tracing::warn;
use trellis_core::job::JobSpec;
use trellis_core::paths::AllowedRoots;
use trellis_store::{EtcdTls, StoreSpec};

/// The `--tls-cert`/`--tls-key`/`--client-ca` server config (all three or none).
pub fn server_tls(cfg: &CoordinatorConfig) -> Result<Option<ServerTlsConfig>> {
    match (&cfg.tls_cert, &cfg.tls_key, &cfg.client_ca) {
        (None, None, None) => Ok(None),
        (Some(cert), Some(key), Some(ca)) => trellis_auth::tls::server_tls(cert, key, ca)
            .map(Some)
            .map_err(|e| Error::InvalidArgument(e.to_string())),
        _ => Err(Error::InvalidArgument(
            "TLS needs all of --tls-cert, --tls-key and --client-ca (`coordctl certs init DIR` \
             writes coordinator.crt, coordinator.key and ca.crt)"
                .into(),
        )),
    }
}

/// TLS to etcd from `--etcd-ca` (and `--etcd-cert`/`--etcd-key` for client certificates):
/// required for `https://` store URLs, refused with `http://` ones; `None` for other stores.
pub fn etcd_tls(cfg: &CoordinatorConfig, store: &StoreSpec) -> Result<Option<EtcdTls>> {
    let given = cfg.etcd_ca.is_some() || cfg.etcd_cert.is_some() || cfg.etcd_key.is_some();
    let bad = |m: String| Err(Error::InvalidArgument(m));
    let StoreSpec::Etcd(urls) = store else {
        return match given {
            true => bad(format!(
                "--etcd-ca/--etcd-cert/--etcd-key are for an etcd store, but --store is {store}"
            )),
            false => Ok(None),
        };
    };
    let https = urls.iter().filter(|u| u.starts_with("https://")).count();
    if https != 0 && https != urls.len() {
        return bad(format!(
            "--store {store} mixes http:// and https:// etcd URLs: use https:// for all of them              (with --etcd-ca) or none"
        ));
    }
    match (&cfg.etcd_ca, &cfg.etcd_cert, &cfg.etcd_key) {
        (None, None, None) if https > 0 => bad(format!(
            "--store {store} uses TLS: give --etcd-ca (the CA that signed etcd's server              certificate), and --etcd-cert/--etcd-key if etcd requires client certificates"
        )),
        (None, None, None) => Ok(None),
        (Some(_), _, _) if https == 0 => bad(format!(
            "--etcd-ca is given but --store {store} has http:// URLs: use https:// URLs for TLS"
        )),
        (Some(ca), None, None) => Ok(Some(tls_for(ca, None)?)),
        (Some(ca), Some(c), Some(k)) => Ok(Some(tls_for(ca, Some((c, k)))?)),
        _ => bad(
            "TLS to etcd: --etcd-cert and --etcd-key go together, and with --etcd-ca (etcd_ca,              etcd_cert, etcd_key in the config file)"
                .into(),
        ),
    }
}

fn tls_for(ca: &Path, pair: Option<(&PathBuf, &PathBuf)>) -> Result<EtcdTls> {
    trellis_auth::tls::client_tls_for(
        ca,
        pair.map(|(c, k)| (c.as_path(), k.as_path())),
        ["--etcd-ca", "--etcd-cert", "--etcd-key"],
    )
    .map_err(|e| Error::InvalidArgument(e.to_string()))
}

/// Plaintext gRPC only on loopback, unless `--insecure` (then a warning at every start).
pub fn check_plaintext(cfg: &CoordinatorConfig, tls: bool, addr: SocketAddr) -> Result<()> {
    if tls {
        return Ok(());
    }
    if cfg.insecure {
        warn!(
            listen = %addr,
            "--insecure: gRPC is served WITHOUT TLS; anyone who reaches {addr} can submit, grow, \
             pause or join as a worker. Use --tls-cert, --tls-key and --client-ca"
        );
        return Ok(());
    }
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "refusing to serve gRPC without TLS on {addr} (not a loopback address): give --tls-cert, \
         --tls-key and --client-ca (`coordctl certs init DIR --host NAME`), listen on 127.0.0.1, \
         or pass --insecure to accept unauthenticated clients"
    )))
}

/// The paths policy of submitted job specs.
#[derive(Debug, Clone)]
pub struct Confinement {
    pub roots: AllowedRoots,
    /// The coordinator's checkpoint root (where a spec without `checkpoint.dir` writes).
    pub checkpoint_root: Option<PathBuf>,
}

/// `--allowed-root`s plus `checkpoint_root` (created if missing); `None` (paths not confined,
/// with a warning) only without allowed roots on a plaintext coordinator. With TLS, allowed
/// roots are required.
pub fn confinement(cfg: &CoordinatorConfig, tls: bool) -> Result<Option<Confinement>> {
    if cfg.allowed_roots.is_empty() {
        if tls {
            return Err(Error::InvalidArgument(
                "with TLS, give the directories job specs may use: --allowed-root DIR \
                 (repeatable; data, cache and checkpoint directories) or allowed_roots in the \
                 config file"
                    .into(),
            ));
        }
        warn!(
            "no --allowed-root: paths in submitted job specs are not confined (allowed on a \
             plaintext coordinator only)"
        );
        return Ok(None);
    }
    let invalid = |e: trellis_core::Error| Error::InvalidArgument(format!("--allowed-root: {e}"));
    let mut roots = AllowedRoots::new(&cfg.allowed_roots).map_err(invalid)?;
    if let Some(c) = &cfg.checkpoint_root {
        std::fs::create_dir_all(c).map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot create checkpoint_root {}: {e}",
                c.display()
            ))
        })?;
        roots.add(c).map_err(invalid)?;
    }
    Ok(Some(Confinement {
        roots,
        checkpoint_root: cfg.checkpoint_root.clone(),
    }))
}

impl Confinement {
    /// Refuse a spec with a path outside the allowed roots (`INVALID_ARGUMENT`, one line naming
    /// the path and the roots): data (train, valid, sources), tokenizer, cache_dir, the
    /// checkpoint directory (as the coordinator will use it) and `init_from`.
    pub fn check_spec(&self, spec_toml: &str, base_dir: &str) -> Result<()> {
        let base = if base_dir.is_empty() { "." } else { base_dir };
        let spec = JobSpec::from_toml(spec_toml, Path::new(base), "submitted job spec")?;
        let d = &spec.data;
        let mut paths: Vec<(&str, PathBuf)> = Vec::new();
        if !d.train.as_os_str().is_empty() {
            paths.push(("data.train", d.train.clone()));
        }
        if !d.valid.as_os_str().is_empty() {
            paths.push(("data.valid", d.valid.clone()));
        }
        for s in &d.sources {
            paths.push(("data.sources", s.path.clone()));
        }
        paths.extend(d.tokenizer.clone().map(|p| ("data.tokenizer", p)));
        paths.extend(d.cache_dir.clone().map(|p| ("data.cache_dir", p)));
        let ckpt = spec
            .checkpoint
            .dir
            .clone()
            .or_else(|| self.checkpoint_root.clone())
            .unwrap_or_else(|| Path::new(base).join("checkpoints"));
        paths.push(("checkpoint.dir", ckpt));
        paths.extend(
            spec.checkpoint
                .init_from
                .clone()
                .map(|p| ("checkpoint.init_from", p)),
        );
        for (field, p) in paths {
            // A relative spec path often climbs out of the spec's directory (`../../corpus`):
            // when the path exists, resolve it as the workers' open will (symlinks and `..`
            // physically); `confine` refuses a `..` it cannot resolve.
            let p = match p.components().any(|c| c == std::path::Component::ParentDir) {
                true => p.canonicalize().unwrap_or(p),
                false => p,
            };
            self.roots.confine(&p).map_err(|e| {
                Error::InvalidArgument(format!("job spec {field}: {e}").replace('\n', " "))
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(train: &str, ckpt: Option<&str>) -> String {
        let ckpt = ckpt.map_or(String::new(), |c| format!("[checkpoint]\ndir = \"{c}\"\n"));
        format!(
            "[job]\nname = \"j\"\n[model]\npreset = \"tiny\"\n[data]\ntrain = \"{train}\"\n\
             valid = \"v.txt\"\nseq_len = 16\n[train]\nglobal_batch = 2\nmax_steps = 10\n{ckpt}"
        )
    }

    #[test]
    fn spec_paths_must_stay_inside_the_roots() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let (data, out) = (root.join("data"), root.join("out"));
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&out).unwrap();
        let cfg = CoordinatorConfig {
            allowed_roots: vec![data.clone()],
            checkpoint_root: Some(root.join("ckpt")),
            ..Default::default()
        };
        let c = confinement(&cfg, true).unwrap().unwrap();
        let base = data.display().to_string();
        // Relative paths resolve against the base; checkpoints default to checkpoint_root.
        c.check_spec(&spec("t.txt", None), &base).unwrap();
        let e = c
            .check_spec(&spec(&out.join("t.txt").display().to_string(), None), &base)
            .unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
        assert!(
            msg.contains("data.train") && msg.contains("out/t.txt"),
            "{msg}"
        );
        assert!(msg.contains(&data.display().to_string()), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let e = c
            .check_spec(&spec("../out/t.txt", None), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'..'"), "{e}");
        // An existing path climbing out and back in is resolved; climbing out is refused.
        std::fs::write(data.join("t2.txt"), "x").unwrap();
        std::fs::write(out.join("t3.txt"), "x").unwrap();
        c.check_spec(&spec("../data/t2.txt", None), &base).unwrap();
        let e = c
            .check_spec(&spec("../out/t3.txt", None), &base)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside the allowed roots"), "{e}");
        let e = c
            .check_spec(&spec("t.txt", Some("/etc/trellis")), &base)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("checkpoint.dir") && e.contains("/etc/trellis"),
            "{e}"
        );
    }

    #[test]
    fn tls_requires_allowed_roots_and_all_three_files() {
        let e = confinement(&CoordinatorConfig::default(), true).unwrap_err();
        assert!(e.to_string().contains("--allowed-root"), "{e}");
        assert!(confinement(&CoordinatorConfig::default(), false)
            .unwrap()
            .is_none());
        let cfg = CoordinatorConfig {
            tls_cert: Some("c.crt".into()),
            ..Default::default()
        };
        let e = server_tls(&cfg).unwrap_err().to_string();
        assert!(e.contains("--client-ca"), "{e}");
    }

    #[test]
    fn etcd_tls_flags_match_the_store_urls() {
        let https = StoreSpec::parse("etcd:https://127.0.0.1:2379").unwrap();
        let http = StoreSpec::parse("etcd:http://127.0.0.1:2379").unwrap();
        let file = StoreSpec::parse("file:/tmp/x").unwrap();
        let none = CoordinatorConfig::default();
        assert!(etcd_tls(&none, &http).unwrap().is_none());
        assert!(etcd_tls(&none, &file).unwrap().is_none());
        let e = etcd_tls(&none, &https).unwrap_err().to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        let ca = CoordinatorConfig {
            etcd_ca: Some("/nonexistent/ca.crt".into()),
            ..Default::default()
        };
        let e = etcd_tls(&ca, &http).unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
        let e = etcd_tls(&ca, &file).unwrap_err().to_string();
        assert!(e.contains("etcd store"), "{e}");
        let e = etcd_tls(&ca, &https).unwrap_err().to_string();
        assert!(
            e.contains("--etcd-ca") && e.contains("/nonexistent/ca.crt"),
            "{e}"
        );
        let half = CoordinatorConfig {
            etcd_cert: Some("c.crt".into()),
            ..ca
        };
        let e = etcd_tls(&half, &https).unwrap_err().to_string();
        assert!(e.contains("--etcd-key"), "{e}");
        let mixed = StoreSpec::parse("etcd:https://a:1,http://b:2").unwrap();
        let e = etcd_tls(&none, &mixed).unwrap_err().to_string();
        assert!(e.contains("mixes"), "{e}");
    }

    #[test]
    fn plaintext_only_on_loopback_unless_insecure() {
        let cfg = CoordinatorConfig::default();
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let e = check_plaintext(&cfg, false, any).unwrap_err().to_string();
        assert!(e.contains("--insecure") && e.contains("--tls-cert"), "{e}");
        check_plaintext(&cfg, false, "127.0.0.1:1".parse().unwrap()).unwrap();
        check_plaintext(&cfg, true, any).unwrap();
        let insecure = CoordinatorConfig {
            insecure: true,
            ..cfg
        };
        check_plaintext(&insecure, false, any).unwrap();
    }
}
