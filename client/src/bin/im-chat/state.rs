//! What im-chat keeps on disk between runs: the session (server, user,
//! token) in `session.json`, readable by the owner only, and the delivery
//! cursors of each user in `cursors-<user_id>.json`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The logged-in session saved by `login` and `register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSession {
    pub server: String,
    pub user_id: u64,
    pub username: String,
    pub token: String,
    pub token_expires_at_ms: i64,
    /// The connection speaks TLS (with `ca_file`'s roots, else the
    /// system's).
    #[serde(default)]
    pub tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct SavedCursors {
    /// Conversation id → highest seq already shown.
    cursors: HashMap<u64, u64>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    pub fn new(path: PathBuf) -> Self {
        StateDir { path }
    }

    /// `<user config dir>/im-chat`.
    pub fn default_path() -> Result<PathBuf> {
        let base = dirs::config_dir().context("no user config directory; pass --dir")?;
        Ok(base.join("im-chat"))
    }

    fn session_file(&self) -> PathBuf {
        self.path.join("session.json")
    }

    fn cursors_file(&self, user_id: u64) -> PathBuf {
        self.path.join(format!("cursors-{user_id}.json"))
    }

    pub fn load_session(&self) -> Result<Option<SavedSession>> {
        read_json(&self.session_file())
    }

    pub fn save_session(&self, session: &SavedSession) -> Result<()> {
        write_private(&self.session_file(), &serde_json::to_vec_pretty(session)?)
    }

    /// Removes the saved session; true if there was one.
    pub fn remove_session(&self) -> Result<bool> {
        match std::fs::remove_file(self.session_file()) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).context("removing the session file"),
        }
    }

    pub fn load_cursors(&self, user_id: u64) -> Result<HashMap<u64, u64>> {
        let saved: Option<SavedCursors> = read_json(&self.cursors_file(user_id))?;
        Ok(saved.unwrap_or_default().cursors)
    }

    pub fn save_cursors(&self, user_id: u64, cursors: &HashMap<u64, u64>) -> Result<()> {
        let saved = SavedCursors {
            cursors: cursors.clone(),
        };
        write_private(&self.cursors_file(user_id), &serde_json::to_vec(&saved)?)
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("{} is damaged; remove it", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// crash never leaves half a file; the file is readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("state file without a directory")?;
    create_private_dir(dir)?;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn create_private_dir(dir: &Path) -> Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_and_cursors_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("nested").join("im-chat"));
        assert_eq!(dir.load_session().unwrap(), None);
        let session = SavedSession {
            server: "127.0.0.1:7000".into(),
            user_id: 42,
            username: "alice".into(),
            token: "secret".into(),
            token_expires_at_ms: 1_700_000_000_000,
            tls: true,
            ca_file: Some("ca.pem".into()),
        };
        dir.save_session(&session).unwrap();
        assert_eq!(dir.load_session().unwrap(), Some(session));

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.session_file())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        let cursors = HashMap::from([((1 << 62) | 5, 17), ((3 << 31) | 4, 2)]);
        dir.save_cursors(42, &cursors).unwrap();
        assert_eq!(dir.load_cursors(42).unwrap(), cursors);
        assert!(dir.load_cursors(43).unwrap().is_empty());

        assert!(dir.remove_session().unwrap());
        assert!(!dir.remove_session().unwrap());
        assert_eq!(dir.load_session().unwrap(), None);
    }

    #[test]
    fn damaged_file_is_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().to_path_buf());
        std::fs::write(tmp.path().join("session.json"), b"{not json").unwrap();
        let err = dir.load_session().unwrap_err();
        assert!(format!("{err:#}").contains("damaged"));
    }
}
