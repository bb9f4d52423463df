//! The standard process metrics (`process_*`), read from `/proc/self` at each scrape: resident memory, CPU
//! time, open file descriptors and start time. Where `/proc` cannot be read the values stay as they were.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Clock ticks per second of `/proc/self/stat`'s times (`USER_HZ`, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Default)]
pub struct Process {
    resident: Gauge,
    cpu: Counter<f64, AtomicU64>,
    open_fds: Gauge,
    start_time: Gauge,
}

impl Process {
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit("process_resident_memory", "Resident memory", Unit::Bytes, self.resident.clone());
        registry.register_with_unit("process_cpu", "User and system CPU time", Unit::Seconds, self.cpu.clone());
        registry.register("process_open_fds", "Open file descriptors", self.open_fds.clone());
        registry.register_with_unit(
            "process_start_time",
            "Start time since the Unix epoch",
            Unit::Seconds,
            self.start_time.clone(),
        );
    }

    pub fn update(&self) {
        if let Some(kb) = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| vm_rss_kb(&s)) {
            self.resident.set(i64::try_from(kb * 1024).unwrap_or(i64::MAX));
        }
        if let Ok(n) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(i64::try_from(n.count()).unwrap_or(i64::MAX));
        }
        let Some(stat) = std::fs::read_to_string("/proc/self/stat").ok().and_then(|s| StatTimes::parse(&s)) else {
            return;
        };
        let cpu = (stat.utime + stat.stime) as f64 / TICKS_PER_SEC;
        let seen = self.cpu.get();
        if cpu > seen {
            self.cpu.inc_by(cpu - seen);
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| boot_time(&s));
        if let Some(boot) = boot {
            let start = boot + (stat.starttime as f64 / TICKS_PER_SEC) as u64;
            self.start_time.set(i64::try_from(start).unwrap_or(i64::MAX));
        }
    }
}

fn vm_rss_kb(status: &str) -> Option<u64> {
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

fn boot_time(stat: &str) -> Option<u64> {
    stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()
}

/// The fields of `/proc/self/stat` read here, counted after the command name (which may hold spaces).
#[derive(Debug, PartialEq)]
struct StatTimes {
    utime: u64,
    stime: u64,
    starttime: u64,
}

impl StatTimes {
    fn parse(stat: &str) -> Option<StatTimes> {
        let after_name = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = after_name.split(' ').collect();
        // Fields 14, 15 and 22 of proc(5), here counted from field 3 (the state).
        Some(StatTimes {
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
            starttime: f.get(19)?.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (edge loop) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 8 0 123456 100000 2000 18446744073709551615";
        assert_eq!(StatTimes::parse(stat), Some(StatTimes { utime: 250, stime: 50, starttime: 123456 }));
        assert_eq!(vm_rss_kb("Name:\tx\nVmRSS:\t   20480 kB\n"), Some(20480));
        assert_eq!(boot_time("cpu 1 2 3\nbtime 1700000000\n"), Some(1_700_000_000));
        let p = Process::default();
        p.update();
        assert!(p.resident.get() > 0 && p.open_fds.get() > 0 && p.start_time.get() > 1_600_000_000);
    }
}
