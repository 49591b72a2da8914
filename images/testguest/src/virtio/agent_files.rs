//! The test guest agent's files: a few small files kept in RAM, so state set up before a
//! snapshot (`put`, `WriteFile`) can be read back after a restore (`cat`, `ReadFile`). Not a
//! file system: paths are opaque byte strings, there are no directories, and a full table or
//! an oversized path or file is refused.

/// Files the table holds.
const MAX_FILES: usize = 4;
/// The longest path.
const MAX_PATH: usize = 64;
/// The largest file.
pub const MAX_DATA: usize = 512;

#[derive(Clone, Copy)]
struct Slot {
    used: bool,
    path_len: usize,
    path: [u8; MAX_PATH],
    len: usize,
    data: [u8; MAX_DATA],
}

const EMPTY: Slot = Slot {
    used: false,
    path_len: 0,
    path: [0; MAX_PATH],
    len: 0,
    data: [0; MAX_DATA],
};

/// The table.
pub struct Files {
    slots: [Slot; MAX_FILES],
}

impl Files {
    /// An empty table.
    pub const fn new() -> Self {
        Self {
            slots: [EMPTY; MAX_FILES],
        }
    }

    fn find(&self, path: &[u8]) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.used && &s.path[..s.path_len] == path)
    }

    /// The file at `path`.
    pub fn get(&self, path: &[u8]) -> Option<&[u8]> {
        self.find(path).map(|i| {
            let s = &self.slots[i];
            &s.data[..s.len]
        })
    }

    /// Creates or replaces the file at `path` with `data`.
    pub fn put(&mut self, path: &[u8], data: &[u8]) -> Result<(), &'static str> {
        if path.is_empty() || path.len() > MAX_PATH {
            return Err("a path of 1 to 64 bytes");
        }
        if data.len() > MAX_DATA {
            return Err("a file over 512 bytes");
        }
        let i = match self.find(path) {
            Some(i) => i,
            None => self
                .slots
                .iter()
                .position(|s| !s.used)
                .ok_or("the table of 4 files is full")?,
        };
        let s = &mut self.slots[i];
        s.used = true;
        s.path_len = path.len();
        s.path[..path.len()].copy_from_slice(path);
        s.len = data.len();
        s.data[..data.len()].copy_from_slice(data);
        Ok(())
    }
}
