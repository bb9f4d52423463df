//! Keeping the agent's resident memory to what it runs: the code and read-only data that only start-up
//! touched are handed back to the kernel once the agent has settled.
//!
//! Most of an agent's resident memory is its own binary mapped from disk, not its heap (docs/benchmarks.md,
//! Agent memory): parsing the config, setting up TLS, optimising a model with tract and the rest of start-up
//! run code once, and its pages stay resident until memory runs short. [`release_file_pages`] asks the
//! kernel (`MADV_PAGEOUT`, Linux 5.4 and later) to reclaim the pages of every read-only file mapping now.
//! Pages that the agent still runs fault back in from the file at their next use; those that only start-up
//! ran stay out. Pages that another process maps too (a shared library's) are left alone by the kernel, and
//! anonymous memory (heap, stacks, sled's cache) is never advised: without swap it could go nowhere, and
//! with swap it would be written out.
//!
//! The agent binary does this [`SETTLE`] after it starts and every [`AGAIN`] after that (a model update
//! runs tract's optimiser again); an agent run inside another process (the simulators) never does.

use std::time::Duration;

/// How long after start the first release waits: connecting, enrolling, loading the model and the first
/// windows are done by then.
pub const SETTLE: Duration = Duration::from_secs(10);
/// How often the release is repeated after the first.
pub const AGAIN: Duration = Duration::from_secs(3600);

/// One read-only, file-backed mapping of a `/proc/<pid>/maps` listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    pub start: usize,
    pub len: usize,
    pub path: String,
}

/// The mappings of a `/proc/<pid>/maps` text that may be paged out: backed by a file (an inode and an
/// absolute path) and not writable, so that their pages are clean copies of the file. Lines that do not
/// parse are skipped.
pub fn file_mappings(maps: &str) -> Vec<FileMapping> {
    maps.lines().filter_map(file_mapping).collect()
}

fn file_mapping(line: &str) -> Option<FileMapping> {
    let mut fields = line.split_whitespace();
    let (range, perms, _offset, _dev, inode) =
        (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    let path = fields.collect::<Vec<_>>().join(" ");
    let (start, end) = range.split_once('-')?;
    let (start, end) = (usize::from_str_radix(start, 16).ok()?, usize::from_str_radix(end, 16).ok()?);
    let readonly = perms.as_bytes().get(1) == Some(&b'-');
    let from_file = inode != "0" && path.starts_with('/') && !path.ends_with(" (deleted)");
    (readonly && from_file && end > start).then(|| FileMapping { start, len: end - start, path })
}

/// What one release did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// Mappings advised.
    pub mappings: usize,
    /// Their total size (what was advised, not what was resident).
    pub bytes: u64,
    /// The process's file-backed resident memory before and after (`RssFile` of `/proc/self/status`).
    pub rss_file_kib: (u64, u64),
}

/// Asks the kernel to reclaim the pages of this process's read-only file mappings (see the module
/// documentation). A mapping the kernel refuses (one unmapped since the listing was read, or a kernel
/// without `MADV_PAGEOUT`) is skipped; an error is returned only when nothing could be advised. Blocking.
#[cfg(target_os = "linux")]
pub fn release_file_pages() -> std::io::Result<Released> {
    let rss_before = rss_file_kib()?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = Released::default();
    let mut last_error = None;
    for m in file_mappings(&maps) {
        match pageout(m.start, m.len) {
            Ok(()) => {
                released.mappings += 1;
                released.bytes += m.len as u64;
            }
            Err(e) => last_error = Some(e),
        }
    }
    if released.mappings == 0 {
        if let Some(e) = last_error {
            return Err(e);
        }
    }
    released.rss_file_kib = (rss_before, rss_file_kib()?);
    Ok(released)
}

/// Elsewhere there is nothing to release this way.
#[cfg(not(target_os = "linux"))]
pub fn release_file_pages() -> std::io::Result<Released> {
    Ok(Released::default())
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn pageout(start: usize, len: usize) -> std::io::Result<()> {
    // SAFETY: `madvise` with `MADV_PAGEOUT` is advice: it changes no byte of any mapping and unmaps nothing.
    // The kernel drops a clean file page only where this process alone maps it, and the next access reads it
    // back from the file. The range comes from `/proc/self/maps`; if it was unmapped since, the call fails
    // with `ENOMEM` and touches nothing.
    // `MADV_RANDOM` first: a page faulted back in is read alone, without the read-around that would bring
    // its neighbours back too.
    let addr = start as *mut libc::c_void;
    let rc = unsafe { libc::madvise(addr, len, libc::MADV_RANDOM) };
    let rc = if rc == 0 { unsafe { libc::madvise(addr, len, libc::MADV_PAGEOUT) } } else { rc };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `RssFile` of `/proc/self/status`, KiB.
#[cfg(target_os = "linux")]
fn rss_file_kib() -> std::io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| std::io::Error::other("/proc/self/status has no RssFile line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_file_mappings_are_released() {
        let maps = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fd:01 1234 /usr/bin/edgeloop-agent
55d0c0b00000-55d0c1000000 r-xp 00100000 fd:01 1234 /usr/bin/edgeloop-agent
55d0c1000000-55d0c1010000 rw-p 00600000 fd:01 1234 /usr/bin/edgeloop-agent
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r--s 00000000 fd:01 99 /var/lib/edgeloop/a file with spaces
7f0000002000-7f0000003000 r-xp 00000000 fd:01 77 /tmp/old-build (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
7f0000004000-7f0000005000 ---p 00000000 00:00 0
garbage line
";
        let found = file_mappings(maps);
        let spans: Vec<(usize, usize, &str)> = found.iter().map(|m| (m.start, m.len, m.path.as_str())).collect();
        assert_eq!(
            spans,
            vec![
                (0x55d0c0a00000, 0x100000, "/usr/bin/edgeloop-agent"),
                (0x55d0c0b00000, 0x500000, "/usr/bin/edgeloop-agent"),
                (0x7f0000000000, 0x1000, "/var/lib/edgeloop/a file with spaces"),
            ]
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn releasing_drops_file_pages_of_this_process() {
        // A file of 8 MiB on disk (beside the crate: a temporary directory may be in memory, where there is
        // nothing to page out to), mapped read-only by this process alone and read through, so that its
        // pages are resident and this process's own, whatever else maps this test binary.
        const LEN: usize = 8 << 20;
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("resident");
        std::fs::write(&path, vec![7u8; LEN]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = MappedFile::new(&file, LEN);
        assert_eq!(map.sum(), 7 * LEN as u64);
        let r = release_file_pages().unwrap();
        assert!(r.mappings > 0 && r.bytes >= LEN as u64, "{r:?}");
        let (before, after) = r.rss_file_kib;
        assert!(
            before >= after + 4 * 1024,
            "file-backed RSS went from {before} to {after} KiB: the file's 8 MiB stayed"
        );
        // The pages read back as they were.
        assert_eq!(map.sum(), 7 * LEN as u64);
    }

    /// A read-only private mapping of a file, unmapped when dropped (the test's own, since the crate maps
    /// nothing itself).
    #[cfg(target_os = "linux")]
    struct MappedFile {
        at: *const u8,
        len: usize,
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    impl MappedFile {
        fn new(file: &std::fs::File, len: usize) -> MappedFile {
            use std::os::fd::AsRawFd;
            // SAFETY: a fresh read-only mapping of `len` bytes of a file this test wrote and no one changes.
            let at = unsafe {
                libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, file.as_raw_fd(), 0)
            };
            assert_ne!(at, libc::MAP_FAILED, "mmap: {}", std::io::Error::last_os_error());
            MappedFile { at: at as *const u8, len }
        }

        /// Reads every byte (which makes every page resident).
        fn sum(&self) -> u64 {
            // SAFETY: `at` maps `len` readable bytes until `drop`.
            let bytes = unsafe { std::slice::from_raw_parts(self.at, self.len) };
            bytes.iter().map(|&b| u64::from(b)).sum()
        }
    }

    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    impl Drop for MappedFile {
        fn drop(&mut self) {
            // SAFETY: unmaps the mapping `new` made, once; no reference into it outlives `sum`.
            unsafe { libc::munmap(self.at as *mut libc::c_void, self.len) };
        }
    }
}
