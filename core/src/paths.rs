//! Confining paths from job specs to the directories the operator allows (checkpoints, data,
//! cache), so that a spec cannot make workers read or write anywhere else.
//!
//! [`confine`] refuses a path that is relative, contains `..`, or — after resolving every
//! symlink along the part of it that exists — lies outside every allowed root. It returns the
//! resolved path: use that one, not the original, so a symlink swapped in later is not
//! followed by accident (what does not exist yet is appended as given and has no `..`).
use crate::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// The directories paths must stay inside, each resolved (symlinks followed) when added.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedRoots {
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    /// Resolve each root; every root must exist and be a directory.
    pub fn new<I, P>(roots: I) -> Result<AllowedRoots>
    where
        I: IntoIterator<Item = P>,
        P: AsRef<Path>,
    {
        let mut out = AllowedRoots::default();
        for r in roots {
            out.add(r.as_ref())?;
        }
        Ok(out)
    }

    /// Add one root (resolved; it must be an existing directory).
    pub fn add(&mut self, root: &Path) -> Result<()> {
        let real = root.canonicalize().map_err(|e| {
            Error::io(
                format!(
                    "allowed root {} cannot be resolved; create it or fix the path",
                    root.display()
                ),
                e,
            )
        })?;
        if !real.is_dir() {
            return Err(Error::io(
                format!("allowed root {} is not a directory", root.display()),
                std::io::Error::from(std::io::ErrorKind::NotADirectory),
            ));
        }
        if !self.roots.contains(&real) {
            self.roots.push(real);
        }
        Ok(())
    }

    /// The resolved roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `/a, /b` (or `none configured`), for messages.
    pub fn describe(&self) -> String {
        if self.roots.is_empty() {
            return "none configured".into();
        }
        self.roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// See [`confine`].
    pub fn confine(&self, path: &Path) -> Result<PathBuf> {
        confine(path, self)
    }
}

/// `path` resolved, if it is absolute, has no `..`, and resolves (symlinks along its existing
/// part followed) to a place inside one of `roots`; else [`Error::PathNotAllowed`] naming the
/// path and the roots.
pub fn confine(path: &Path, roots: &AllowedRoots) -> Result<PathBuf> {
    let refuse = |reason: String| Error::PathNotAllowed {
        path: path.display().to_string(),
        reason,
        roots: roots.describe(),
    };
    if !path.is_absolute() {
        return Err(refuse(
            "is relative (resolve it against the job spec's directory first)".into(),
        ));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("contains '..'".into()));
    }
    // The longest prefix that exists (as an entry: a dangling symlink counts), resolved, plus
    // the rest as given.
    let mut existing = path;
    let mut rest = Vec::new();
    while existing.symlink_metadata().is_err() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                existing = parent;
            }
            _ => break,
        }
    }
    let mut resolved = existing.canonicalize().map_err(|e| {
        refuse(format!(
            "cannot be resolved at {} ({e}; a dangling symlink?)",
            existing.display()
        ))
    })?;
    for name in rest.iter().rev() {
        resolved.push(name);
    }
    if roots.roots.iter().any(|r| resolved.starts_with(r)) {
        return Ok(resolved);
    }
    Err(refuse(if resolved.as_path() == path {
        "is outside the allowed roots".into()
    } else {
        format!(
            "resolves to {} (through a symlink), outside the allowed roots",
            resolved.display()
        )
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct Fixture {
        _t: tempfile::TempDir,
        base: PathBuf,
        data: PathBuf,
        ckpt: PathBuf,
        outside: PathBuf,
        roots: AllowedRoots,
    }

    fn fixture() -> Fixture {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let (data, ckpt, outside) = (base.join("data"), base.join("ckpt"), base.join("outside"));
        for d in [&data, &ckpt, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(data.join("tokens.bin"), b"x").unwrap();
        std::fs::write(outside.join("secret"), b"x").unwrap();
        let roots = AllowedRoots::new([&data, &ckpt]).unwrap();
        Fixture {
            _t: t,
            base,
            data,
            ckpt,
            outside,
            roots,
        }
    }

    fn refused(f: &Fixture, p: &Path) -> String {
        let e = f.roots.confine(p).unwrap_err();
        assert!(matches!(e, Error::PathNotAllowed { .. }), "{e}");
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        assert!(m.contains(&p.display().to_string()), "no path in: {m}");
        for r in [&f.data, &f.ckpt] {
            assert!(m.contains(&r.display().to_string()), "no root in: {m}");
        }
        m
    }

    #[test]
    fn paths_inside_the_roots_resolve() {
        let f = fixture();
        let p = f.data.join("tokens.bin");
        assert_eq!(f.roots.confine(&p).unwrap(), p);
        // Not existing yet, several levels deep: appended as given.
        let p = f.ckpt.join("job-1/step-20/model.safetensors");
        assert_eq!(f.roots.confine(&p).unwrap(), p);
        assert_eq!(f.roots.confine(&f.data).unwrap(), f.data);
    }

    #[test]
    fn paths_outside_are_refused_naming_path_and_roots() {
        let f = fixture();
        let m = refused(&f, &f.outside.join("secret"));
        assert!(m.contains("outside the allowed roots"), "{m}");
        refused(&f, Path::new("/etc/passwd"));
        refused(&f, &f.base);
        // A sibling whose name starts like a root is not inside it.
        std::fs::create_dir(f.base.join("data2")).unwrap();
        refused(&f, &f.base.join("data2/x"));
        let m = refused(&f, Path::new("data/tokens.bin"));
        assert!(m.contains("relative"), "{m}");
    }

    #[test]
    fn dot_dot_is_refused_even_when_it_stays_inside() {
        let f = fixture();
        let m = refused(&f, &f.data.join("../outside/secret"));
        assert!(m.contains("'..'"), "{m}");
        let m = refused(&f, &f.data.join("sub/../tokens.bin"));
        assert!(m.contains("'..'"), "{m}");
    }

    #[test]
    fn symlinks_out_of_the_roots_are_refused() {
        let f = fixture();
        symlink(&f.outside, f.data.join("escape")).unwrap();
        let m = refused(&f, &f.data.join("escape/secret"));
        assert!(m.contains("through a symlink"), "{m}");
        assert!(m.contains(&f.outside.display().to_string()), "{m}");
        // Also for a file that does not exist yet behind the link (a write target).
        refused(&f, &f.data.join("escape/new/file"));
        // A link to a file outside.
        symlink(f.outside.join("secret"), f.ckpt.join("s")).unwrap();
        refused(&f, &f.ckpt.join("s"));
        // A dangling link pointing outside, where a write would create the target.
        symlink(f.outside.join("not-yet"), f.ckpt.join("dangling")).unwrap();
        let m = refused(&f, &f.ckpt.join("dangling"));
        assert!(m.contains("dangling"), "{m}");
    }

    #[test]
    fn symlinks_that_stay_inside_are_followed() {
        let f = fixture();
        symlink(&f.data, f.ckpt.join("to-data")).unwrap();
        assert_eq!(
            f.roots.confine(&f.ckpt.join("to-data/tokens.bin")).unwrap(),
            f.data.join("tokens.bin")
        );
        // A root given through a symlink is compared by where it really is.
        let link = f.base.join("data-link");
        symlink(&f.data, &link).unwrap();
        let roots = AllowedRoots::new([&link]).unwrap();
        assert_eq!(roots.roots(), [f.data.clone()]);
        assert_eq!(
            roots.confine(&link.join("tokens.bin")).unwrap(),
            f.data.join("tokens.bin")
        );
    }

    #[test]
    fn roots_must_exist_and_none_refuses_everything() {
        let f = fixture();
        let e = AllowedRoots::new([f.base.join("missing")]).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let e = AllowedRoots::new([f.data.join("tokens.bin")]).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let none = AllowedRoots::default();
        let e = none.confine(&f.data.join("tokens.bin")).unwrap_err();
        assert!(e.to_string().contains("none configured"), "{e}");
    }
}
