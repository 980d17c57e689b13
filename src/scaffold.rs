//! `strategy new`: writes a standalone strategy project from the templates
//! embedded in the binary (`templates/strategy/<lang>/`), with the 0.2.0
//! contract beside it, so an installed balancer needs no checkout to start
//! a module.
//!
//! Every template file is copied to the same relative path, `{{name}}` and
//! `{{crate_name}}` in its text replaced by the project's name (the
//! folder's last part, made a valid package name) and that name with `_`
//! for `-`; `*.sh` files are made executable; `wit/strategy.wit` is the
//! 0.2.0 contract exactly.

use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir, DirEntry};

static RUST: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates/strategy/rust");
static JAVASCRIPT: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates/strategy/js");
static C: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/templates/strategy/c");

/// The contract a new project is written against.
pub const CONTRACT: &str = include_str!("../wit/0.2.0/strategy.wit");

/// A starter's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// Rust on `wasm32-unknown-unknown`, with wit-bindgen.
    Rust,
    /// JavaScript with componentize-qjs.
    JavaScript,
    /// C with clang, wasi-libc and `wit-bindgen c`.
    C,
}

impl Lang {
    fn template(self) -> &'static Dir<'static> {
        match self {
            Lang::Rust => &RUST,
            Lang::JavaScript => &JAVASCRIPT,
            Lang::C => &C,
        }
    }

    /// `rust`, `js` or `c`, as `--lang` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::JavaScript => "js",
            Lang::C => "c",
        }
    }
}

/// Why a project could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The folder exists and has something in it.
    #[error("{} is not empty: strategy new writes into an empty or new folder", .0.display())]
    NotEmpty(PathBuf),
    /// The folder's name gives no usable module name.
    #[error("{}: cannot name a module after this folder; give a folder such as ./my-strategy", .0.display())]
    NoName(PathBuf),
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A project just written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    /// Its folder.
    pub dir: PathBuf,
    /// The module's name: the output is `<dir>/<name>.wasm`.
    pub name: String,
    /// The starter's language.
    pub lang: Lang,
    /// The files written, relative to `dir`.
    pub files: Vec<PathBuf>,
    /// The next commands, from the project's README.
    pub next_steps: Vec<String>,
}

impl Project {
    /// What `strategy new` prints: what was written and the next commands
    /// (the code block under the README's `## Next steps`).
    pub fn summary(&self) -> String {
        let mut out = format!(
            "wrote a {} strategy project in {} ({} files; contract loadbalancer:strategy@0.2.0 in wit/)\n\nnext:\n  cd {}\n",
            self.lang.as_str(),
            self.dir.display(),
            self.files.len(),
            self.dir.display()
        );
        for command in &self.next_steps {
            out.push_str("  ");
            out.push_str(command);
            out.push('\n');
        }
        out.push_str("\nREADME.md in the project says more.");
        out
    }
}

/// The commands of the first code block under `## Next steps` in `readme`.
fn next_steps(readme: &str) -> Vec<String> {
    readme
        .split_once("## Next steps")
        .and_then(|(_, rest)| rest.split_once("```"))
        .and_then(|(_, block)| block.split_once('\n'))
        .and_then(|(_, block)| block.split_once("```"))
        .map(|(commands, _)| {
            commands
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// The module name for a project folder: its last part, lowercase, with
/// anything but `a-z`, `0-9` and `-` made `-`, and a `strategy-` prefix
/// when it would not start with a letter.
pub fn project_name(dir: &Path) -> Option<String> {
    let last = dir.file_name()?.to_str()?;
    let mut name: String = last
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    name = name.trim_end_matches('-').to_string();
    if name.trim_matches('-').is_empty() {
        return None;
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        name = format!("strategy-{}", name.trim_start_matches('-'));
    }
    Some(name)
}

/// Writes a new `lang` project into `dir`, which must be empty or absent.
pub fn new_project(dir: &Path, lang: Lang) -> Result<Project, ScaffoldError> {
    let name = project_name(dir).ok_or_else(|| ScaffoldError::NoName(dir.to_path_buf()))?;
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Write { path, source }
    };
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ScaffoldError::NotEmpty(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(write_error(dir)(e)),
    }
    let crate_name = name.replace('-', "_");
    let mut files = Vec::new();
    let mut steps = Vec::new();
    let mut pending: Vec<&Dir<'static>> = vec![lang.template()];
    while let Some(folder) = pending.pop() {
        for entry in folder.entries() {
            match entry {
                DirEntry::Dir(sub) => pending.push(sub),
                DirEntry::File(file) => {
                    let relative = file.path().to_path_buf();
                    let text = String::from_utf8_lossy(file.contents())
                        .replace("{{name}}", &name)
                        .replace("{{crate_name}}", &crate_name);
                    if relative == Path::new("README.md") {
                        steps = next_steps(&text);
                    }
                    write(dir, &relative, &text)?;
                    files.push(relative);
                }
            }
        }
    }
    let wit = PathBuf::from("wit/strategy.wit");
    write(dir, &wit, CONTRACT)?;
    files.push(wit);
    files.sort();
    Ok(Project {
        dir: dir.to_path_buf(),
        name,
        lang,
        files,
        next_steps: steps,
    })
}

/// Writes `text` to `dir/relative`, creating folders; `*.sh` executable.
fn write(dir: &Path, relative: &Path, text: &str) -> Result<(), ScaffoldError> {
    let path = dir.join(relative);
    let error = |source| ScaffoldError::Write {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    std::fs::write(&path, text).map_err(error)?;
    if path.extension().is_some_and(|e| e == "sh") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_folder() {
        let name = |p: &str| project_name(Path::new(p));
        assert_eq!(name("/tmp/my-strategy").as_deref(), Some("my-strategy"));
        assert_eq!(name("./My Strategy_2").as_deref(), Some("my-strategy-2"));
        assert_eq!(name("2fast").as_deref(), Some("strategy-2fast"));
        assert_eq!(name("-x-").as_deref(), Some("strategy-x"));
        assert_eq!(name("/").as_deref(), None);
        assert_eq!(name("___").as_deref(), None);
    }

    #[test]
    fn every_template_names_three_next_steps() {
        for lang in [Lang::Rust, Lang::JavaScript, Lang::C] {
            let readme = lang
                .template()
                .get_file("README.md")
                .and_then(|f| f.contents_utf8())
                .unwrap_or_else(|| panic!("{lang:?} has no README.md"));
            let steps = next_steps(readme);
            assert_eq!(steps.len(), 3, "{lang:?}: {steps:?}");
            assert!(steps[1].contains("strategy test"), "{lang:?}: {steps:?}");
        }
    }

    #[test]
    fn the_contract_written_is_0_2_0() {
        assert!(CONTRACT.starts_with("package loadbalancer:strategy@0.2.0;"));
    }

    #[test]
    fn a_non_empty_folder_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mine.txt"), "keep").unwrap();
        let error = new_project(dir.path(), Lang::Rust).unwrap_err();
        assert!(matches!(error, ScaffoldError::NotEmpty(_)), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
