//! Several "hosts" on one machine: network namespaces joined by veth to a bridge in the test's
//! own namespace (root and iproute2, as CI has), and the faults a network has, both silent
//! (packets vanish, nothing is refused): a host cut off, or the link between two hosts cut.
//! Addresses come from 198.18.0.0/15, the range set aside for network tests.
use std::process::{Child, Command, Stdio};

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A MAC address no interface has: a host told that a peer lives there reaches nobody.
const NOWHERE: &str = "02:00:00:00:00:01";

/// A bridge and its namespaces; dropping it removes them.
pub struct Net {
    bridge: String,
    /// The subnet's first three octets.
    prefix: String,
    hosts: Vec<Host>,
}

/// One namespace on the bridge.
#[derive(Clone)]
pub struct Host {
    pub ns: String,
    pub ip: String,
    /// Its veth's end on the bridge, in the test's namespace.
    port: String,
}

impl Net {
    /// A bridge with `n` hosts on it; the test's own namespace is [`Net::gateway_ip`]. Panics
    /// with the reason when namespaces cannot be made (not root, no iproute2): CI runs as root,
    /// and a test that needs them must not pass without them.
    pub fn new(n: usize) -> Net {
        // One subnet per test process, named after it so that a crashed run's leftovers with the
        // same number are found and removed first.
        let tag = std::process::id() % 250;
        let bridge = format!("tandem-br{tag}");
        let prefix = format!("198.18.{tag}");
        let _ = ip(&["link", "del", &bridge]);
        let hosts: Vec<Host> = (0..n)
            .map(|i| Host {
                ns: format!("tandem{tag}-{i}"),
                ip: format!("{prefix}.{}", i + 2),
                port: format!("tandem{tag}v{i}"),
            })
            .collect();
        for h in &hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let net = Net {
            bridge,
            prefix,
            hosts,
        };
        if let Err(e) = net.build() {
            panic!("cannot make network namespaces (this test needs root and iproute2): {e}");
        }
        net
    }

    fn build(&self) -> Result<(), String> {
        let b = self.bridge.as_str();
        ip(&["link", "add", b, "type", "bridge"])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/24", self.gateway_ip()),
            "dev",
            b,
        ])?;
        ip(&["link", "set", b, "up"])?;
        for h in &self.hosts {
            ip(&["netns", "add", &h.ns])?;
            ip(&[
                "link", "add", &h.port, "type", "veth", "peer", "name", "eth0", "netns", &h.ns,
            ])?;
            ip(&["link", "set", &h.port, "master", b, "up"])?;
            let addr = format!("{}/24", h.ip);
            ip(&["-n", &h.ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &h.ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h.ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// The test's own address on the bridge.
    pub fn gateway_ip(&self) -> String {
        format!("{}.1", self.prefix)
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Starts `tandem <args>` inside host `i`; it stops when the returned child's stdin closes
    /// (the `--exit-with-stdin` workers take) or it is killed.
    pub fn spawn(&self, i: usize, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.hosts[i].ns, super::BIN])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting a process in a namespace")
    }

    /// Cuts host `i` off from everyone (`up: false`), or joins it again.
    pub fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["link", "set", &self.hosts[i].port, state]).unwrap();
    }

    /// Cuts the link between hosts `a` and `b` (`up: false`), or mends it: each is told that the
    /// other lives at an address no interface has.
    pub fn link_between(&self, a: usize, b: usize, up: bool) {
        for (from, to) in [(a, b), (b, a)] {
            let (from, to) = (&self.hosts[from], &self.hosts[to]);
            if up {
                ip(&["-n", &from.ns, "neigh", "del", &to.ip, "dev", "eth0"]).unwrap();
            } else {
                ip(&[
                    "-n",
                    &from.ns,
                    "neigh",
                    "replace",
                    &to.ip,
                    "lladdr",
                    NOWHERE,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ])
                .unwrap();
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
