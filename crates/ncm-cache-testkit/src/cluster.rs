//! A throwaway six-node Redis Cluster (3 primaries, 3 replicas) on loopback.

use std::time::Duration;

use crate::RedisServer;
use crate::process::{HOST, TestkitError, info_field, wait_until};
use crate::server::RedisServerBuilder;

const NODES: usize = 6;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Three primaries and three replicas, each a [`RedisServer`] started with
/// `--cluster-enabled yes --cluster-node-timeout 2000`, so a failover takes a few seconds.
/// Every process is killed on drop.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    /// How every node was started (for [`add_node`](Self::add_node)).
    builder: RedisServerBuilder,
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    /// The primary's id (replicas), `-` for a primary.
    of: String,
    port: u16,
    primary: bool,
    failed: bool,
    has_slots: bool,
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let addr = fields.get(1)?.split(['@', ',']).next()?;
            let port = addr.rsplit(':').next()?.parse().ok()?;
            let flags: Vec<&str> = fields.get(2)?.split(',').collect();
            Some(NodeLine {
                id: (*fields.first()?).to_owned(),
                of: (*fields.get(3)?).to_owned(),
                port,
                primary: flags.contains(&"master"),
                failed: flags
                    .iter()
                    .any(|f| matches!(*f, "fail" | "fail?" | "noaddr")),
                has_slots: fields.len() > 8,
            })
        })
        .collect()
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create ... --cluster-replicas 1`
    /// and waits (up to 30 s) until every node reports `cluster_state:ok` with all 16384 slots
    /// covered and every replica's link to its primary is up.
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_with(RedisServer::builder())
    }

    /// Like [`start`](Self::start), with every node configured from `builder` (binaries,
    /// password, extra arguments) plus the cluster arguments.
    pub fn start_with(builder: RedisServerBuilder) -> Result<Self, TestkitError> {
        let builder = builder.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            // Replicas may always take over, even if their link was only just established.
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
        ]);
        let nodes = (0..NODES)
            .map(|_| builder.clone().start())
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("{HOST}:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        nodes[0].cli(&args)?;
        let cluster = Self { nodes, builder };
        wait_until(
            READY_TIMEOUT,
            "waiting for the cluster to become ready",
            || cluster.check_ready(),
        )?;
        Ok(cluster)
    }

    /// Starts one more node, configured as the others, and joins it to the cluster
    /// (`CLUSTER MEET`) as a primary that serves no slot, waiting (up to 30 s) until every
    /// running node knows it and reports `cluster_state:ok`; returns its port. Move slots to it with
    /// [`begin_slot_migration`](Self::begin_slot_migration) and the rest, as a resharding
    /// onto a new node does.
    pub fn add_node(&mut self) -> Result<u16, TestkitError> {
        let node = self.builder.clone().start()?;
        let port = node.port();
        let port_text = port.to_string();
        let id = node.command(&["CLUSTER", "MYID"])?;
        self.first_running()?
            .command(&["CLUSTER", "MEET", HOST, &port_text])?;
        self.nodes.push(node);
        // Known by its ID (not a handshake still under way, whose ID is a random one) to every
        // node, the new one knowing every other without a handshake too, and the slots.
        wait_until(READY_TIMEOUT, "waiting for a new node to join", || {
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let view = node
                    .command(&["CLUSTER", "NODES"])
                    .map_err(|e| e.to_string())?;
                let joined = view.lines().any(|l| l.starts_with(id.as_str()));
                if !joined || view.contains("handshake") {
                    return Err(format!("node {} does not know every node yet", node.port()));
                }
                let info = node
                    .command(&["CLUSTER", "INFO"])
                    .map_err(|e| e.to_string())?;
                if info_field(&info, "cluster_state") != Some("ok") {
                    return Err(format!("node {} does not know the slots yet", node.port()));
                }
            }
            Ok(())
        })?;
        Ok(port)
    }

    /// All nodes, including killed ones.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The node listening on `port`.
    pub fn node(&self, port: u16) -> Option<&RedisServer> {
        self.nodes.iter().find(|n| n.port() == port)
    }

    /// The node listening on `port`, e.g. to [`restart`](RedisServer::restart) it: it rejoins
    /// the cluster with its `nodes.conf` (as a replica if it was failed over).
    pub fn node_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.nodes.iter_mut().find(|n| n.port() == port)
    }

    /// The URLs of all nodes (see [`RedisServer::url`]), to seed a cluster client.
    pub fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    fn node_or_err(&self, port: u16) -> Result<&RedisServer, TestkitError> {
        self.node(port).ok_or_else(|| TestkitError::Command {
            what: format!("finding cluster node {port}"),
            detail: "no such node in this cluster".to_owned(),
        })
    }

    fn first_running(&self) -> Result<&RedisServer, TestkitError> {
        self.nodes
            .iter()
            .find(|n| n.is_running())
            .ok_or_else(|| TestkitError::Command {
                what: "finding a running cluster node".to_owned(),
                detail: "every node has been killed".to_owned(),
            })
    }

    /// `CLUSTER INFO` as reported by the node on `port`.
    pub fn cluster_info(&self, port: u16) -> Result<String, TestkitError> {
        self.node_or_err(port)?.command(&["CLUSTER", "INFO"])
    }

    /// `CLUSTER NODES` as reported by the node on `port`.
    pub fn cluster_nodes(&self, port: u16) -> Result<String, TestkitError> {
        self.node_or_err(port)?.command(&["CLUSTER", "NODES"])
    }

    /// Ports of the current primaries serving slots (not marked failed), sorted, as seen
    /// by the first running node.
    pub fn primaries(&self) -> Result<Vec<u16>, TestkitError> {
        let view = self.first_running()?.command(&["CLUSTER", "NODES"])?;
        let mut ports: Vec<u16> = parse_nodes(&view)
            .into_iter()
            .filter(|n| n.primary && n.has_slots && !n.failed)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// A current primary other than `port` (the lowest), e.g. where to move one of `port`'s
    /// slots.
    pub fn other_primary(&self, port: u16) -> Result<u16, TestkitError> {
        self.primaries()?
            .into_iter()
            .find(|p| *p != port)
            .ok_or_else(|| TestkitError::Command {
                what: "finding another primary".to_owned(),
                detail: format!("no primary but {port}"),
            })
    }

    /// Calls of `command` since they started, summed over the current primaries (`INFO
    /// commandstats`; replicas, which run their primaries' writes again, left out).
    pub fn command_calls_on_primaries(&self, command: &str) -> Result<u64, TestkitError> {
        self.primaries()?
            .into_iter()
            .map(|p| self.node_or_err(p)?.command_calls(command))
            .sum()
    }

    /// Calls refused (`MOVED`, `ASK`, ...: [`RedisServer::rejected_calls`]) since they
    /// started, summed over the current primaries.
    pub fn rejected_calls_on_primaries(&self) -> Result<u64, TestkitError> {
        self.primaries()?
            .into_iter()
            .map(|p| self.node_or_err(p)?.rejected_calls())
            .sum()
    }

    /// Ports of the current replicas (not marked failed), sorted, as seen by the first
    /// running node.
    pub fn replicas(&self) -> Result<Vec<u16>, TestkitError> {
        let view = self.first_running()?.command(&["CLUSTER", "NODES"])?;
        let mut ports: Vec<u16> = parse_nodes(&view)
            .into_iter()
            .filter(|n| !n.primary && !n.failed)
            .map(|n| n.port)
            .collect();
        ports.sort_unstable();
        Ok(ports)
    }

    /// The port of the primary that serves `key`'s slot (the one that answers `GET key`
    /// instead of redirecting), e.g. to kill the node a channel or key lives on.
    pub fn owner_of(&self, key: &str) -> Result<u16, TestkitError> {
        for port in self.primaries()? {
            if let Some(node) = self.node(port)
                && node.command(&["GET", key]).is_ok()
            {
                return Ok(port);
            }
        }
        Err(TestkitError::Command {
            what: format!("finding the owner of {key}"),
            detail: "every primary redirected the key".to_owned(),
        })
    }

    /// The port of a replica (not failed) of the primary on `port`, as seen by that primary.
    pub fn replica_of(&self, port: u16) -> Result<u16, TestkitError> {
        let view = self.cluster_nodes(port)?;
        let lines = parse_nodes(&view);
        let id = lines
            .iter()
            .find(|n| n.port == port)
            .map(|n| n.id.clone())
            .unwrap_or_default();
        lines
            .iter()
            .find(|n| !n.primary && !n.failed && n.of == id)
            .map(|n| n.port)
            .ok_or_else(|| TestkitError::Command {
                what: format!("finding a replica of {port}"),
                detail: "no replica in CLUSTER NODES".to_owned(),
            })
    }

    /// The node ID of the node on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> Result<String, TestkitError> {
        self.node_or_err(port)?.command(&["CLUSTER", "MYID"])
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`), as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> Result<u16, TestkitError> {
        let text = self
            .first_running()?
            .command(&["CLUSTER", "KEYSLOT", key])?;
        text.trim().parse().map_err(|_| TestkitError::Command {
            what: format!("CLUSTER KEYSLOT {key}"),
            detail: format!("not a slot: {text}"),
        })
    }

    /// Starts moving `slot` from the primary on `from` to the primary on `to`, as
    /// `redis-cli --cluster reshard` does: the slot is marked `IMPORTING` on `to`, then
    /// `MIGRATING` on `from`. From then on `from` answers `ASK` for the slot's keys it no longer
    /// holds; move them with [`migrate_keys`](Self::migrate_keys), then end with
    /// [`end_slot_migration`](Self::end_slot_migration).
    pub fn begin_slot_migration(&self, slot: u16, from: u16, to: u16) -> Result<(), TestkitError> {
        let slot = slot.to_string();
        let (from_id, to_id) = (self.node_id(from)?, self.node_id(to)?);
        self.node_or_err(to)?
            .command(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])?;
        self.node_or_err(from)?
            .command(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])?;
        Ok(())
    }

    /// Moves `keys` (of a slot being migrated) from the primary on `from` to the one on `to`
    /// with one `MIGRATE`.
    pub fn migrate_keys(&self, from: u16, to: u16, keys: &[&str]) -> Result<(), TestkitError> {
        let to_port = to.to_string();
        let mut args = vec!["MIGRATE", HOST, &to_port, "", "0", "5000", "KEYS"];
        args.extend_from_slice(keys);
        self.node_or_err(from)?.command(&args)?;
        Ok(())
    }

    /// Ends a migration begun with [`begin_slot_migration`](Self::begin_slot_migration):
    /// `CLUSTER SETSLOT <slot> NODE <to>` on `to`, then on `from`, then on the other primaries,
    /// after which `from` answers `MOVED` for the slot.
    pub fn end_slot_migration(&self, slot: u16, from: u16, to: u16) -> Result<(), TestkitError> {
        let slot = slot.to_string();
        let to_id = self.node_id(to)?;
        let mut order = vec![to, from];
        order.extend(
            self.primaries()?
                .into_iter()
                .filter(|p| *p != to && *p != from),
        );
        for port in order {
            self.node_or_err(port)?
                .command(&["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])?;
        }
        Ok(())
    }

    /// Up to `count` of the keys the node on `port` holds in `slot` (`CLUSTER GETKEYSINSLOT`).
    pub fn keys_in_slot(
        &self,
        port: u16,
        slot: u16,
        count: usize,
    ) -> Result<Vec<String>, TestkitError> {
        let text = self.node_or_err(port)?.command(&[
            "CLUSTER",
            "GETKEYSINSLOT",
            &slot.to_string(),
            &count.to_string(),
        ])?;
        Ok(text
            .lines()
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect())
    }

    /// Moves `slot` from the primary on `from` to the one on `to` as `redis-cli --cluster
    /// reshard` does, while clients keep using it:
    /// [`begin_slot_migration`](Self::begin_slot_migration), half of the slot's keys migrated
    /// (rounded up), `half_moved` spent in that state (reads and writes of the moved keys meet
    /// `ASK`), then the rest migrated until the source holds none (keys written meanwhile
    /// included) and [`end_slot_migration`](Self::end_slot_migration).
    pub fn move_slot(
        &self,
        slot: u16,
        from: u16,
        to: u16,
        half_moved: Duration,
    ) -> Result<(), TestkitError> {
        self.begin_slot_migration(slot, from, to)?;
        let keys = self.keys_in_slot(from, slot, 1000)?;
        // Half, rounded up: a slot holding one key moves it now.
        let half: Vec<&str> = keys
            .iter()
            .take(keys.len().div_ceil(2))
            .map(String::as_str)
            .collect();
        if !half.is_empty() {
            self.migrate_keys(from, to, &half)?;
        }
        std::thread::sleep(half_moved);
        // Bounded: each round moves what the source still holds; writes of keys it holds may
        // add none (a key the source lacks is written on the target after `ASK`).
        for _ in 0..100 {
            let rest = self.keys_in_slot(from, slot, 1000)?;
            if rest.is_empty() {
                return self.end_slot_migration(slot, from, to);
            }
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            self.migrate_keys(from, to, &rest)?;
        }
        Err(TestkitError::Command {
            what: format!("moving slot {slot} from {from} to {to}"),
            detail: "the source still holds keys after 100 rounds of MIGRATE".to_owned(),
        })
    }

    /// Kills (SIGKILL) the primary on `port`; fails if `port` is not a current primary.
    /// Follow with [`wait_for_failover`](Self::wait_for_failover).
    pub fn kill_primary(&mut self, port: u16) -> Result<(), TestkitError> {
        let primaries = self.primaries()?;
        if !primaries.contains(&port) {
            return Err(TestkitError::Command {
                what: format!("killing primary {port}"),
                detail: format!("not a current primary; primaries are {primaries:?}"),
            });
        }
        if let Some(node) = self.node_mut(port) {
            node.kill();
        }
        Ok(())
    }

    /// Waits (up to `timeout`) until every running node reports `cluster_state:ok` with all
    /// slots covered, and sees three slot-serving primaries that are all running — i.e. the
    /// replicas of killed primaries have been promoted.
    pub fn wait_for_failover(&self, timeout: Duration) -> Result<(), TestkitError> {
        wait_until(timeout, "waiting for the cluster to fail over", || {
            self.check_failed_over()
        })
    }

    /// Checks `cluster_state:ok` and full slot coverage; returns the `CLUSTER INFO` text.
    fn check_node_state(node: &RedisServer) -> Result<String, String> {
        let info = node
            .command(&["CLUSTER", "INFO"])
            .map_err(|e| e.to_string())?;
        let state = info_field(&info, "cluster_state");
        let slots = info_field(&info, "cluster_slots_ok");
        if state != Some("ok") || slots != Some("16384") {
            return Err(format!(
                "node {}: cluster_state:{} cluster_slots_ok:{}",
                node.port(),
                state.unwrap_or("?"),
                slots.unwrap_or("?")
            ));
        }
        Ok(info)
    }

    fn check_ready(&self) -> Result<(), String> {
        for node in &self.nodes {
            let info = Self::check_node_state(node)?;
            if info_field(&info, "cluster_known_nodes") != Some("6") {
                return Err(format!("node {} does not know all nodes yet", node.port()));
            }
            let view = node
                .command(&["CLUSTER", "NODES"])
                .map_err(|e| e.to_string())?;
            let lines = parse_nodes(&view);
            let serving = lines
                .iter()
                .filter(|n| n.primary && n.has_slots && !n.failed)
                .count();
            let replicas = lines.iter().filter(|n| !n.primary && !n.failed).count();
            if (serving, replicas) != (NODES / 2, NODES / 2) {
                return Err(format!(
                    "node {} sees {serving} primaries and {replicas} replicas",
                    node.port()
                ));
            }
            let repl = node
                .command(&["INFO", "replication"])
                .map_err(|e| e.to_string())?;
            if info_field(&repl, "role") == Some("slave")
                && info_field(&repl, "master_link_status") != Some("up")
            {
                return Err(format!(
                    "replica {} is not linked to its primary yet",
                    node.port()
                ));
            }
        }
        Ok(())
    }

    fn check_failed_over(&self) -> Result<(), String> {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            Self::check_node_state(node)?;
            let view = node
                .command(&["CLUSTER", "NODES"])
                .map_err(|e| e.to_string())?;
            let serving: Vec<u16> = parse_nodes(&view)
                .into_iter()
                .filter(|n| n.primary && n.has_slots && !n.failed)
                .map(|n| n.port)
                .collect();
            let dead: Vec<u16> = serving
                .iter()
                .copied()
                .filter(|p| self.node(*p).is_none_or(|n| !n.is_running()))
                .collect();
            if serving.len() != NODES / 2 || !dead.is_empty() {
                return Err(format!(
                    "node {} sees primaries {serving:?} (killed among them: {dead:?})",
                    node.port()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_nodes;

    #[test]
    fn parses_cluster_nodes_lines() {
        let text = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002 master - 0 1426238316232 2 connected 5461-10922
e7d1 127.0.0.1:30001@40001,host myself,master - 0 0 1 connected 0-5460
6ec2 127.0.0.1:30005@40005 master,fail - 1426238316232 0 5 disconnected
";
        let nodes = parse_nodes(text);
        assert_eq!(nodes.len(), 4);
        assert!(!nodes[0].primary && !nodes[0].has_slots);
        assert!(nodes[1].primary && nodes[1].has_slots && nodes[1].port == 30002);
        assert!(nodes[2].primary && nodes[2].port == 30001);
        assert!(nodes[3].failed && !nodes[3].has_slots);
    }
}
