//! Command builders and reply parsing shared by the async and the blocking client.

use std::time::Duration;

use ncm_cache_core::{CacheError, KeyTtl, Result};
use redis::{Cmd, FromRedisValue, Value, cmd};

/// `SET key value [PX ms]`.
pub(crate) fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Cmd {
    let mut c = cmd("SET");
    c.arg(key).arg(value);
    if let Some(ttl) = ttl {
        c.arg("PX").arg(millis(ttl));
    }
    c
}

/// `SET key value NX [PX ms]`: written only if the key holds nothing (reply `OK` or nil).
pub(crate) fn set_nx(key: &str, value: &[u8], ttl: Option<Duration>) -> Cmd {
    let mut c = set(key, value, ttl);
    c.arg("NX");
    c
}

/// TTL in whole milliseconds, at least 1 (Redis cannot store less) and at most
/// [`ncm_cache_core::MAX_WAIT`] (Redis refuses an expiry past the largest time it can hold:
/// `Duration::MAX`, "never", keeps the key about 30 years).
pub(crate) fn millis(ttl: Duration) -> u64 {
    u64::try_from(ncm_cache_core::capped(ttl).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

pub(crate) fn get(key: &str) -> Cmd {
    let mut c = cmd("GET");
    c.arg(key);
    c
}

/// `GETEX key PX ms` (Redis 6.2+): a read that re-arms the TTL in the same round trip.
pub(crate) fn getex(key: &str, ttl: Duration) -> Cmd {
    let mut c = cmd("GETEX");
    c.arg(key).arg("PX").arg(millis(ttl));
    c
}

pub(crate) fn unlink<K: redis::ToRedisArgs>(keys: K) -> Cmd {
    let mut c = cmd("UNLINK");
    c.arg(keys);
    c
}

pub(crate) fn exists(key: &str) -> Cmd {
    let mut c = cmd("EXISTS");
    c.arg(key);
    c
}

pub(crate) fn mget<K: redis::ToRedisArgs>(keys: K) -> Cmd {
    let mut c = cmd("MGET");
    c.arg(keys);
    c
}

/// An `MGET` reply of `got` values for `asked` keys: an error unless they match (a broken
/// proxy or hostile endpoint: never pair values with the wrong keys).
pub(crate) fn check_mget(got: usize, asked: usize) -> Result<()> {
    if got == asked {
        return Ok(());
    }
    Err(CacheError::backend(
        format!("MGET returned {got} values for {asked} keys"),
        None,
    ))
}

pub(crate) fn pttl(key: &str) -> Cmd {
    let mut c = cmd("PTTL");
    c.arg(key);
    c
}

pub(crate) fn pexpire(key: &str, ttl: Duration) -> Cmd {
    let mut c = cmd("PEXPIRE");
    c.arg(key).arg(millis(ttl));
    c
}

/// `SCAN cursor MATCH pattern COUNT 1000`.
pub(crate) fn scan(cursor: u64, pattern: &str) -> Cmd {
    let mut c = cmd("SCAN");
    c.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(SCAN_COUNT);
    c
}

/// Keys asked for per SCAN step and deleted per UNLINK.
pub(crate) const SCAN_COUNT: usize = 1000;

/// Reads a `PTTL` reply.
pub(crate) fn key_ttl(ms: i64) -> KeyTtl {
    match ms {
        -2 => KeyTtl::Missing,
        -1 => KeyTtl::Persistent,
        ms => KeyTtl::Expires(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
    }
}

/// Rejects zero TTLs (Redis would reject `PX 0` with a less helpful error).
pub(crate) fn check_ttl(ttl: Option<Duration>) -> Result<()> {
    if ttl.is_some_and(|t| t.is_zero()) {
        return Err(CacheError::InvalidArgument(
            "a TTL must be greater than zero (delete the key instead)".into(),
        ));
    }
    Ok(())
}

/// Rejects values over the configured maximum.
pub(crate) fn check_size(len: usize, max: usize) -> Result<()> {
    if len > max {
        return Err(CacheError::ValueTooLarge { size: len, max });
    }
    Ok(())
}

/// Parses `used_memory:<n>` out of `INFO memory`.
pub(crate) fn used_memory(info: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The primaries in a `CLUSTER NODES` reply that are not failed (a suspected failure,
/// `fail?`, still counts: it may take writes), sorted and distinct.
pub(crate) fn cluster_masters(nodes: &str) -> Vec<(String, u16)> {
    primaries_where(nodes, |flags, _| {
        !flags
            .iter()
            .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
    })
}

/// The primaries in a `CLUSTER NODES` reply flagged `fail` that still own slots: nobody has
/// taken their slots over, so one that answers again takes writes for them at once (the
/// cluster clears the flag only later). Sorted and distinct.
pub(crate) fn failed_slot_owners(nodes: &str) -> Vec<(String, u16)> {
    primaries_where(nodes, |flags, owns_slots| {
        owns_slots && flags.contains(&"fail") && !flags.contains(&"noaddr")
    })
}

/// The addresses of the primaries whose flags (and whether they own slots) pass `keep`.
fn primaries_where(nodes: &str, keep: impl Fn(&[&str], bool) -> bool) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?;
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            if !flags.contains(&"master") || !keep(&flags, fields.len() > 8) {
                return None;
            }
            // `host:port@cport[,hostname]`
            let hostport = addr.split(['@', ',']).next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            let port: u16 = port.parse().ok()?;
            (!host.is_empty() && port != 0).then(|| (host.to_owned(), port))
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The failovers under way, from a `CLUSTER NODES` text: the address (sorted) of each primary
/// flagged `fail` that still owns slots while a replica of it is flagged neither `fail` nor
/// `nofailover` — that replica is about to take over, and its writes would go unseen by a
/// client that tracked only the other primaries. A primary is not listed once its replica has
/// taken over (it owns no slots any more), or when no replica of it may promote itself (the
/// shard is lost, or its replicas are set to `cluster-replica-no-failover`).
pub(crate) fn failover_pending(nodes: &str) -> Vec<String> {
    // (id, address, flags, primary's id, owns slots)
    let lines: Vec<(&str, &str, Vec<&str>, &str, bool)> = nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let flags = fields.get(2)?.split(',').collect();
            Some((
                *fields.first()?,
                *fields.get(1)?,
                flags,
                *fields.get(3)?,
                fields.len() > 8,
            ))
        })
        .collect();
    let mut out: Vec<String> = lines
        .iter()
        .filter(|(id, _, flags, _, slots)| {
            *slots
                && flags.contains(&"master")
                && flags.contains(&"fail")
                && lines.iter().any(|(_, _, f, of, _)| {
                    of == id && !f.contains(&"fail") && !f.contains(&"nofailover")
                })
        })
        .map(|(_, addr, ..)| addr.split(['@', ',']).next().unwrap_or(addr).to_owned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The address of the node that wrote a `CLUSTER NODES` text (`myself`) if it is a primary
/// owning slots. A failed primary back up never flags itself `fail`, so its own text says
/// nothing of the failover the others still see under way.
pub(crate) fn reporting_primary(nodes: &str) -> Option<String> {
    nodes.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags: Vec<&str> = fields.get(2)?.split(',').collect();
        (flags.contains(&"myself") && flags.contains(&"master") && fields.len() > 8).then(|| {
            fields[1]
                .split(['@', ','])
                .next()
                .unwrap_or(fields[1])
                .to_owned()
        })
    })
}

/// The distinct primary addresses in a `CLUSTER SLOTS` reply.
pub(crate) fn cluster_primaries(slots: Value) -> Vec<(String, u16)> {
    let mut out: Vec<(String, u16)> = Vec::new();
    if let Value::Array(ranges) = slots {
        for range in ranges {
            if let Value::Array(items) = range
                && let Some(Value::Array(primary)) = items.get(2)
            {
                let host = primary
                    .first()
                    .and_then(|v| String::from_redis_value(v.clone()).ok());
                let port = primary
                    .get(1)
                    .and_then(|v| i64::from_redis_value(v.clone()).ok())
                    .and_then(|p| u16::try_from(p).ok());
                if let (Some(host), Some(port)) = (host, port)
                    && !out.iter().any(|(h, p)| *h == host && *p == port)
                {
                    out.push((host, port));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_masters_skips_failed_replicas_and_unknown_addresses() {
        let nodes = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:30002@40002,host2 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:30003@40003 master,fail - 0 0 3 disconnected 10923-16383
a4 127.0.0.1:30004@40004 slave a1 0 0 1 connected
a5 127.0.0.1:30005@40005 master,fail? - 0 0 5 connected
a6 :0@0 master,noaddr - 0 0 6 disconnected
a7 127.0.0.1:30007@40007 master - 0 0 7 connected
";
        assert_eq!(
            cluster_masters(nodes),
            vec![
                ("127.0.0.1".to_owned(), 30001),
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30005),
                ("127.0.0.1".to_owned(), 30007),
            ]
        );
        assert!(cluster_masters("").is_empty());
    }

    #[test]
    fn a_failover_is_pending_while_a_failed_primary_with_a_live_replica_owns_slots() {
        let failing = "\
a1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:30002@40002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:30003@40003,host3 master,fail - 0 0 3 disconnected 10923-16383
a4 127.0.0.1:30004@40004 slave a1 0 0 1 connected
a5 127.0.0.1:30005@40005 slave a2 0 0 2 connected
a6 127.0.0.1:30006@40006 slave,fail? a3 0 0 3 connected
";
        assert_eq!(
            failover_pending(failing),
            vec!["127.0.0.1:30003".to_owned()]
        );
        assert_eq!(
            failed_slot_owners(failing),
            vec![("127.0.0.1".to_owned(), 30003)]
        );
        assert_eq!(
            reporting_primary(failing).as_deref(),
            Some("127.0.0.1:30001")
        );
        assert_eq!(reporting_primary(&failing.replace("myself,", "")), None);
        // Only suspected (`fail?`): not yet a failover, the node may come back.
        let suspected = failing.replace("master,fail -", "master,fail? -");
        assert!(failover_pending(&suspected).is_empty());
        // The replica took over: the failed node owns nothing.
        let done = failing
            .replace(
                "master,fail - 0 0 3 disconnected 10923-16383",
                "master,fail - 0 0 3 disconnected",
            )
            .replace(
                "slave,fail? a3 0 0 3 connected",
                "master - 0 0 4 connected 10923-16383",
            );
        assert!(failover_pending(&done).is_empty());
        assert!(failed_slot_owners(&done).is_empty());
        // Its only replica failed too: the shard is lost, nothing will take over.
        let lost = failing.replace("slave,fail? a3", "slave,fail a3");
        assert!(failover_pending(&lost).is_empty());
        // Two under way: both, in the same order whatever the order of the lines (each node
        // lists them in its own).
        let two = failing.replace(
            "a2 127.0.0.1:30002@40002 master -",
            "a2 127.0.0.1:30002@40002 master,fail -",
        );
        let reversed: String = two.lines().rev().map(|l| format!("{l}\n")).collect();
        let both = vec!["127.0.0.1:30002".to_owned(), "127.0.0.1:30003".to_owned()];
        assert_eq!(failover_pending(&two), both);
        assert_eq!(failover_pending(&reversed), both);
        // Its replica never promotes itself (`cluster-replica-no-failover`): nothing to wait for.
        let manual = failing.replace("slave,fail? a3", "slave,nofailover a3");
        assert!(failover_pending(&manual).is_empty());
        assert!(failover_pending("").is_empty());
    }
}
