//! What the tools read about processes from `/proc` (Linux): CPU time, memory,
//! open sockets, the open-file limit, a process's children; and about the
//! kernel's own memory (`/proc/meminfo`'s slab, `/proc/net/sockstat`'s TCP
//! sockets). One reader for the simulator, the perf figures and the
//! black-box tests.
//!
//! Each reader is a file read plus a parser of its text; the parsers are
//! plain functions on `&str`, tested on sample text, and return `None` on
//! anything unexpected instead of panicking: a process may exit between two
//! reads, and a field may be missing on another kernel.

use std::path::PathBuf;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`): 100 on
/// every Linux this runs on.
pub const TICKS_PER_S: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The file is not there or not readable: usually, the process is gone.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} has no readable {field}")]
    Field { path: PathBuf, field: &'static str },
}

/// What `/proc/<pid>/stat` says about a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z` (zombie: exited, not yet reaped), `X` (dead), …
    pub state: char,
    /// The parent's pid.
    pub ppid: u32,
    /// CPU time in user and in kernel mode, clock ticks.
    pub utime_ticks: u64,
    pub stime_ticks: u64,
    /// When the process started, clock ticks after boot: with the pid, it
    /// tells a process from a later one that reuses its pid.
    pub start_ticks: u64,
}

impl Stat {
    /// Parses the text of a stat file. The command name in parentheses may
    /// hold spaces and parentheses, so fields are counted after the last `)`.
    pub fn parse(text: &str) -> Option<Stat> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        // stat fields 3 (state), 4 (ppid), 14 (utime), 15 (stime) and 22
        // (starttime), counted from 1: the 1st, 2nd, 12th, 13th and 20th
        // after the name.
        Some(Stat {
            state: fields.first()?.chars().next()?,
            ppid: u32::try_from(number(1)?).ok()?,
            utime_ticks: number(11)?,
            stime_ticks: number(12)?,
            start_ticks: number(19)?,
        })
    }

    /// User plus system CPU seconds.
    pub fn cpu_s(&self) -> f64 {
        (self.utime_ticks + self.stime_ticks) as f64 / TICKS_PER_S
    }

    /// The process has exited (a zombie waiting to be reaped counts).
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// `/proc/<pid>/stat`, or `None` if the process is gone or the file odd.
pub fn stat(pid: u32) -> Option<Stat> {
    Stat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// User plus system CPU seconds of process `pid` so far.
pub fn cpu_s(pid: u32) -> Option<f64> {
    stat(pid).map(|s| s.cpu_s())
}

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size (`VmRSS`), bytes.
    pub rss: u64,
    /// Its anonymous part (`RssAnon`: heap and stacks, not file pages), bytes.
    pub anon: u64,
    pub threads: u64,
}

impl Memory {
    /// Parses the text of a status file; `Err` names the first field missing.
    pub fn parse(text: &str) -> Result<Memory, &'static str> {
        Ok(Memory {
            rss: status_kb(text, "VmRSS").ok_or("VmRSS")? * 1024,
            anon: status_kb(text, "RssAnon").ok_or("RssAnon")? * 1024,
            threads: status_field(text, "Threads").and_then(|v| v.parse().ok()).ok_or("Threads")?,
        })
    }
}

/// The value of `<name>:` in a status file's text, trimmed.
fn status_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).map(str::trim)
}

/// A `<name>: <n> kB` field of a status file's text, in kB.
fn status_kb(text: &str, name: &str) -> Option<u64> {
    let value = status_field(text, name)?;
    value.strip_suffix("kB").unwrap_or(value).trim().parse().ok()
}

/// Memory of process `pid` now.
pub fn memory(pid: u32) -> Result<Memory, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/status"));
    let text = std::fs::read_to_string(&path).map_err(|source| ProcError::Read { path: path.clone(), source })?;
    Memory::parse(&text).map_err(|field| ProcError::Field { path, field })
}

/// Resident set size of process `pid`, bytes (only `VmRSS` is needed).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(status_kb(&text, "VmRSS")? * 1024)
}

/// The CPUs process `pid` may run on, as its status lists them
/// (`Cpus_allowed_list`: `0`, `0-1`, `0,2-3`); `None` if it is gone.
pub fn cpus_allowed(pid: u32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field(&text, "Cpus_allowed_list").map(str::to_owned)
}

/// What the scheduler says about a thread (`schedstat`): time on a CPU,
/// time runnable but waiting for one, and how many times it got one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStat {
    pub run_ns: u64,
    pub wait_ns: u64,
    pub slices: u64,
}

impl SchedStat {
    /// Parses the text of a schedstat file: three numbers.
    pub fn parse(text: &str) -> Option<SchedStat> {
        let mut n = text.split_whitespace().map(|f| f.parse::<u64>().ok());
        Some(SchedStat { run_ns: n.next()??, wait_ns: n.next()??, slices: n.next()?? })
    }

    /// What changed since `before` (the same thread earlier).
    pub fn since(&self, before: &SchedStat) -> SchedStat {
        SchedStat {
            run_ns: self.run_ns.saturating_sub(before.run_ns),
            wait_ns: self.wait_ns.saturating_sub(before.wait_ns),
            slices: self.slices.saturating_sub(before.slices),
        }
    }
}

/// Every thread of process `pid`: (thread id, name, schedstat); empty if
/// the process is gone. A thread that ends between the listing and the
/// read is left out.
pub fn thread_schedstats(pid: u32) -> Vec<(u32, String, SchedStat)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else { continue };
        let name = std::fs::read_to_string(task.path().join("comm")).map(|n| n.trim().to_owned());
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok().and_then(|t| SchedStat::parse(&t));
        if let (Ok(name), Some(stat)) = (name, stat) {
            out.push((tid, name, stat));
        }
    }
    out
}

/// The calling thread's schedstat.
pub fn this_thread_schedstat() -> Option<SchedStat> {
    SchedStat::parse(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// Socket descriptors process `pid` holds: connections, listeners, socket
/// pairs (`/proc/<pid>/fd` entries linking to `socket:[…]`). Reading another
/// user's process needs the right to.
pub fn socket_fds(pid: u32) -> Result<usize, ProcError> {
    let path = PathBuf::from(format!("/proc/{pid}/fd"));
    let fds = std::fs::read_dir(&path).map_err(|source| ProcError::Read { path, source })?;
    // A descriptor closed between the listing and the readlink is skipped.
    Ok(fds.flatten().filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| is_socket_link(&l))).count())
}

fn is_socket_link(target: &std::path::Path) -> bool {
    target.to_string_lossy().starts_with("socket:")
}

/// The processes whose parent is `pid` (`/proc/*/stat`), in no order. A
/// process that exits during the scan is left out.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&child| stat(child).is_some_and(|s| s.ppid == pid && !s.exited()))
        .collect()
}

/// The kernel's slab memory (`/proc/meminfo`), bytes: where socket
/// structures, their inodes and dentries live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slab {
    /// `Slab`: the two below together.
    pub total: u64,
    /// `SReclaimable`: caches the kernel may drop (dentries, inodes).
    pub reclaimable: u64,
    /// `SUnreclaim`: the rest (the sockets themselves).
    pub unreclaimable: u64,
}

impl Slab {
    /// Parses the text of `/proc/meminfo` (`Name:   123 kB` lines).
    pub fn parse(text: &str) -> Option<Slab> {
        Some(Slab {
            total: status_kb(text, "Slab")? * 1024,
            reclaimable: status_kb(text, "SReclaimable")? * 1024,
            unreclaimable: status_kb(text, "SUnreclaim")? * 1024,
        })
    }
}

/// `/proc/meminfo`'s slab figures now.
pub fn slab() -> Option<Slab> {
    Slab::parse(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The `TCP:` line of `/proc/net/sockstat`: the whole machine's TCP sockets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpSockets {
    /// Sockets in use (established, listening, …).
    pub inuse: u64,
    /// Sockets allocated (in use, orphaned, in TIME_WAIT, …).
    pub alloc: u64,
    /// Pages charged to TCP socket buffers (`mem`, in pages, not bytes).
    pub mem_pages: u64,
}

impl TcpSockets {
    /// Parses the text of `/proc/net/sockstat`: the line
    /// `TCP: inuse 5 orphan 0 tw 0 alloc 7 mem 3`, whose fields come as
    /// name-value pairs.
    pub fn parse(text: &str) -> Option<TcpSockets> {
        let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let field = |name: &str| {
            words.chunks_exact(2).find(|pair| pair[0] == name).and_then(|pair| pair[1].parse::<u64>().ok())
        };
        Some(TcpSockets { inuse: field("inuse")?, alloc: field("alloc")?, mem_pages: field("mem")? })
    }
}

/// `/proc/net/sockstat`'s TCP line now.
pub fn tcp_sockets() -> Option<TcpSockets> {
    TcpSockets::parse(&std::fs::read_to_string("/proc/net/sockstat").ok()?)
}

/// The page size `sockstat`'s `mem` counts in (`getconf PAGESIZE`; 4096 if
/// that cannot tell, as on every x86-64 Linux).
pub fn page_size() -> u64 {
    std::process::Command::new("getconf")
        .arg("PAGESIZE")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|t| t.trim().parse().ok())
        .filter(|&p: &u64| p > 0)
        .unwrap_or(4096)
}

/// The soft limit on open files of this process (`Max open files` in
/// `/proc/self/limits`); `None` if unlimited or unreadable.
pub fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// The soft `Max open files` limit in the text of a limits file.
pub fn parse_open_files_limit(text: &str) -> Option<u64> {
    let values = text.lines().find_map(|l| l.strip_prefix("Max open files"))?;
    values.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (tokio (rt) x) S 1 4242 4242 0 -1 4194560 1534 0 0 0 250 130 0 0 20 0 3 0 \
                        987654 2223456256 4321 18446744073709551615 1 1 0 0 0 0 0 4096 17610 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let s = Stat::parse(STAT).unwrap();
        assert_eq!(s, Stat { state: 'S', ppid: 1, utime_ticks: 250, stime_ticks: 130, start_ticks: 987654 });
        assert_eq!(s.cpu_s(), 3.8);
        assert!(!s.exited());
        assert!(Stat::parse("7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 55 0 0").unwrap().exited());
    }

    #[test]
    fn odd_stat_text_is_none_not_a_panic() {
        for text in ["", "4242", "4242 (x", "4242 (x) ", "4242 (x) S 1 2", "4242 (x) S 1 2 3 4 5 6 7 8 9 ten 11"] {
            assert_eq!(Stat::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn status_fields_parse_and_a_missing_one_is_named() {
        let status = "Name:\thongbao\nState:\tS (sleeping)\nThreads:\t5\nVmRSS:\t   10240 kB\nRssAnon:\t    4096 kB\n\
                      RssFile:\t    6144 kB\n";
        assert_eq!(Memory::parse(status), Ok(Memory { rss: 10_485_760, anon: 4_194_304, threads: 5 }));
        assert_eq!(Memory::parse("VmRSS:\t1 kB\nThreads:\t1\n"), Err("RssAnon"));
        assert_eq!(Memory::parse("VmRSS:\tlots kB\n"), Err("VmRSS"));
        assert_eq!(Memory::parse(""), Err("VmRSS"));
        // A field whose name only starts like another's is not mistaken for it.
        assert_eq!(status_kb("VmRSSx:\t1 kB\n", "VmRSS"), None);
    }

    #[test]
    fn schedstat_is_three_numbers() {
        let s = SchedStat::parse("102059766 217507490 8244\n").unwrap();
        assert_eq!(s, SchedStat { run_ns: 102_059_766, wait_ns: 217_507_490, slices: 8244 });
        let later = SchedStat { run_ns: 102_059_800, wait_ns: 217_507_500, slices: 8245 };
        assert_eq!(later.since(&s), SchedStat { run_ns: 34, wait_ns: 10, slices: 1 });
        assert_eq!(SchedStat::parse("1 2"), None);
        assert_eq!(SchedStat::parse("1 x 3"), None);
    }

    #[test]
    fn the_soft_open_files_limit_is_read() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            20000                40000                files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20_000));
        assert_eq!(parse_open_files_limit("Max open files            unlimited            unlimited  files"), None);
        assert_eq!(parse_open_files_limit("Max cpu time  unlimited  unlimited  seconds\n"), None);
        assert_eq!(parse_open_files_limit(""), None);
    }

    #[test]
    fn this_process_is_readable() {
        let me = std::process::id();
        let s = stat(me).unwrap();
        assert!(matches!(s.state, 'R' | 'S'), "{s:?}");
        assert!(cpu_s(me).is_some());
        let m = memory(me).unwrap();
        assert!(m.rss > 0 && m.anon <= m.rss && m.threads >= 1, "{m:?}");
        assert!(rss_bytes(me).is_some_and(|r| r > 0));
        assert!(cpus_allowed(me).is_some_and(|c| c.starts_with(|ch: char| ch.is_ascii_digit())));
        assert!(thread_schedstats(me).iter().any(|(tid, _, s)| *tid == me && s.slices > 0));
        assert!(this_thread_schedstat().is_some_and(|s| s.run_ns > 0));
        assert!(socket_fds(me).is_ok());
        assert!(stat(u32::MAX).is_none() && matches!(memory(u32::MAX), Err(ProcError::Read { .. })));
    }

    #[test]
    fn meminfo_slab_parses_and_a_missing_field_is_none() {
        let meminfo = "MemTotal:       24576000 kB\nMemAvailable:   23811196 kB\nSlab:             737888 kB\n\
                       SReclaimable:     658244 kB\nSUnreclaim:        79644 kB\nKernelStack:        5000 kB\n";
        let slab = Slab::parse(meminfo).unwrap();
        assert_eq!(slab, Slab { total: 737_888 * 1024, reclaimable: 658_244 * 1024, unreclaimable: 79_644 * 1024 });
        assert_eq!(Slab::parse("Slab: 1 kB\nSReclaimable: 1 kB\n"), None);
        assert_eq!(Slab::parse("Slab: x kB\nSReclaimable: 1 kB\nSUnreclaim: 1 kB\n"), None);
        assert_eq!(Slab::parse(""), None);
    }

    #[test]
    fn sockstat_tcp_line_parses_by_field_name() {
        let sockstat = "sockets: used 14\nTCP: inuse 3 orphan 0 tw 2 alloc 9 mem 203\nUDP: inuse 0 mem 0\n";
        assert_eq!(TcpSockets::parse(sockstat), Some(TcpSockets { inuse: 3, alloc: 9, mem_pages: 203 }));
        // UDP's `mem` is not TCP's; a missing TCP line or field is `None`.
        assert_eq!(TcpSockets::parse("UDP: inuse 0 mem 5\n"), None);
        assert_eq!(TcpSockets::parse("TCP: inuse 3 orphan 0 tw 2 alloc 9\n"), None);
        assert_eq!(TcpSockets::parse("TCP: inuse three orphan 0 tw 2 alloc 9 mem 1\n"), None);
        // Field order is not relied on.
        assert_eq!(
            TcpSockets::parse("TCP: mem 1 alloc 2 inuse 3\n"),
            Some(TcpSockets { inuse: 3, alloc: 2, mem_pages: 1 })
        );
    }

    #[test]
    fn the_machine_and_this_process_family_are_readable() {
        assert!(slab().is_some_and(|s| s.total > 0));
        assert!(tcp_sockets().is_some());
        assert!(page_size() >= 4096);
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let found = children(std::process::id()).contains(&child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(found, "a child of this process is found by its ppid");
    }

    #[test]
    fn only_socket_links_count_as_sockets() {
        assert!(is_socket_link(std::path::Path::new("socket:[123]")));
        assert!(!is_socket_link(std::path::Path::new("/dev/null")));
        assert!(!is_socket_link(std::path::Path::new("pipe:[9]")));
    }
}
