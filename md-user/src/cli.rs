//! Command-line interface. Global options also come from the environment so isolated labs can
//! run side by side (`MD_STATE_DIR`, `MD_BPF_PIN_DIR`, `MD_UPLINK`, ...).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "md-user",
    version = crate::VERSION,
    about = "Container networking whose datapath is eBPF, not iptables"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalOpts {
    /// Where md keeps its state (containers, addresses, rules) under a lock.
    #[arg(long, env = "MD_STATE_DIR", default_value = "/run/md", global = true)]
    pub state_dir: PathBuf,
    /// bpffs directory md pins its programs, maps and links under.
    #[arg(
        long,
        env = "MD_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/md",
        global = true
    )]
    pub pin_dir: PathBuf,
    /// Interface outbound traffic is masqueraded on [default: the default route's interface].
    #[arg(long, env = "MD_UPLINK", global = true)]
    pub uplink: Option<String>,
    /// Bridge of the default network (before the subcommand: `md-user --bridge br1 run ...`).
    #[arg(long, env = "MD_BRIDGE", default_value = "md0")]
    pub bridge: String,
    /// Subnet of the default network; the gateway is its first address (before the
    /// subcommand, like --bridge: `network create` has a --subnet of its own).
    #[arg(long, env = "MD_SUBNET", default_value = "172.18.0.0/16")]
    pub subnet: String,
    /// Make the default network dual-stack (Docker's daemon `ipv6: true`; before the
    /// subcommand, like --subnet).
    #[arg(long, env = "MD_IPV6")]
    pub ipv6: bool,
    /// IPv6 subnet of the default network [default: a /64 of a ULA /48 derived from the
    /// host's machine id, as Docker 27 does]; implies --ipv6.
    #[arg(long, env = "MD_SUBNET6")]
    pub subnet6: Option<String>,
    /// Where container DNS forwards names it does not know: this file's nameservers.
    #[arg(
        long,
        env = "MD_RESOLV_CONF",
        default_value = "/etc/resolv.conf",
        global = true
    )]
    pub resolv_conf: PathBuf,
    /// How packets md has decided on travel: `redirect` (md delivers them itself, past the
    /// bridge and the host stack) or `stack` (they walk the bridge and the host's IP stack)
    /// [default: redirect where the kernel has bpf_redirect_peer, else stack; once set, kept
    /// until changed].
    #[arg(long, env = "MD_DATAPATH", global = true, value_parser = ["redirect", "stack"])]
    pub datapath: Option<String>,
    /// The cluster store overlay networks are coordinated through:
    /// etcd://HOST:PORT[,HOST:PORT...] (`network create --driver overlay` takes one too).
    #[arg(long, env = "MD_STORE", global = true, value_name = "URL")]
    pub store: Option<String>,
    /// Seconds this host's registrations outlive it in the store (its lease's TTL): a host
    /// that dies leaves every other host's routes, maps and names within that time.
    #[arg(long, env = "MD_STORE_TTL", global = true, default_value_t = 15,
          value_parser = clap::value_parser!(u32).range(2..=3600))]
    pub store_ttl: u32,
    /// This host's underlay address for overlay networks [default: the source address of its
    /// route to the store].
    #[arg(long, env = "MD_ADVERTISE_ADDR", global = true, value_name = "IP")]
    pub advertise_addr: Option<std::net::Ipv4Addr>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in its own network namespace on an md bridge.
    Run(RunArgs),
    /// List containers.
    Ps {
        #[arg(long)]
        json: bool,
    },
    /// Stop containers: SIGTERM, then SIGKILL after the grace period.
    Stop {
        #[arg(required = true)]
        names: Vec<String>,
        /// Seconds to wait before SIGKILL.
        #[arg(short = 't', long, default_value_t = 10)]
        time: u64,
    },
    /// Run a command inside a running container's namespaces.
    Exec {
        name: String,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Print what a detached container wrote to stdout and stderr.
    Logs { name: String },
    /// Remove every container, bridge, program, pinned object and state md created.
    Down,
    /// Inter-container policy: who may open connections to whom.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Datapath counters per container, per published port, and the tracker.
    Stats {
        #[arg(long)]
        json: bool,
        /// Print what `md-user metrics` serves (Prometheus text format), once.
        #[arg(long, conflicts_with = "json")]
        prometheus: bool,
    },
    /// Stream datapath events (drops, new NAT bindings, policy verdicts) as they happen.
    Monitor {
        /// One JSON object per line, with what flow logs need (wall-clock time, the tuple
        /// before and after translation, container names, verdict, reason).
        #[arg(long)]
        json: bool,
        /// Write the lines to FILE (appending) instead of stdout, rotating it by size.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Rotate FILE once it grows past SIZE (bytes, or with a K, M or G suffix).
        #[arg(long, value_name = "SIZE", default_value = "10M", requires = "output",
              value_parser = crate::flowlog::parse_size)]
        max_size: u64,
        /// Files kept, FILE included (older ones are FILE.1, FILE.2, ...).
        #[arg(long, value_name = "N", default_value_t = 5, requires = "output",
              value_parser = clap::value_parser!(u32).range(1..=1000))]
        max_files: u32,
    },
    /// Serve /metrics in the Prometheus text format until killed (run it in md's host
    /// namespace).
    Metrics {
        /// Address and port to listen on, e.g. 127.0.0.1:9464.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: std::net::SocketAddr,
        /// Have the kernel count BPF program run time while serving (BPF_ENABLE_STATS; on
        /// for every BPF program of the host, off again when md-user exits).
        #[arg(long)]
        bpf_stats: bool,
    },
    /// User-defined networks: each its own bridge and subnet, isolated from the others.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Internal: the DNS resolver of one network (started with its first container).
    #[command(name = "__dns", hide = true)]
    Dns {
        #[arg(long)]
        network: String,
        #[arg(long)]
        listen: std::net::SocketAddrV4,
        #[arg(long)]
        ready_fd: Option<i32>,
    },
    /// Follow the host: cover interfaces that appear, forget those that go, track address
    /// changes, collect expired tracker entries. Started by the first `run` (or by systemd's
    /// md-watch.service); one per state directory.
    Watch {
        #[arg(long, hide = true)]
        ready_fd: Option<i32>,
    },
    /// Serve Docker's remote network and IPAM driver protocol on a unix socket until killed:
    /// `docker network create -d NAME --ipam-driver NAME NET` puts Docker's containers on md
    /// (run it in md's host namespace, where dockerd runs).
    DockerPlugin {
        /// The driver's name in Docker (`-d NAME`); the socket is
        /// /run/docker/plugins/NAME.sock.
        #[arg(long, default_value = "md")]
        name: String,
        /// Listen here instead (Docker names a plugin by its socket's file name).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Docker's API, where md learns the names of Docker's containers and networks.
        #[arg(
            long,
            env = "DOCKER_HOST",
            value_name = "unix://PATH",
            default_value = "unix:///var/run/docker.sock"
        )]
        docker_host: String,
    },
    /// Internal: PID 1 of a container's PID namespace; starts CMD, forwards signals, reaps.
    #[command(name = "__init", hide = true)]
    Init {
        #[arg(long)]
        ready_fd: i32,
        #[arg(long)]
        program: PathBuf,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        cmd: Vec<String>,
    },
    /// Network settings of a container (address, gateway, MAC, veth, ports, policies).
    Inspect {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Published ports of a container, as `docker port` prints them (PORT: only that container
    /// port's host addresses).
    Port {
        name: String,
        #[arg(value_name = "PRIVATE_PORT[/PROTO]")]
        port: Option<String>,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Internal: write md-user's man pages (md-user.1 and one per subcommand) into DIR.
    #[command(name = "__man", hide = true)]
    Man { dir: PathBuf },
    /// Run a packet from FROM to TO through md's programs (a private copy: nothing live
    /// changes) and show every program, map entry and verdict on the way, and the answer's
    /// way back. FROM/TO: a container name, outside:IP, host, or an address (FROM also a
    /// published HOSTIP:PORT). TO takes :PORT (TCP by default) and /tcp, /udp or /icmp
    /// (without a port: ICMP echo).
    Trace {
        from: String,
        #[arg(value_name = "TO[:PORT][/PROTO]")]
        to: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetworkCmd {
    /// Create a network: a bridge and a subnet of its own.
    Create {
        name: String,
        /// CIDR [default: the first free 172.19-31.0.0/16]. An overlay's is the whole
        /// network's (each host leases a block of it).
        #[arg(long)]
        subnet: Option<String>,
        /// `bridge` (this host only) or `overlay` (across the hosts sharing a store).
        #[arg(long, default_value = "bridge", value_parser = ["bridge", "overlay"])]
        driver: String,
        /// The overlay's store: etcd://HOST:PORT[,HOST:PORT...] [default: the global --store].
        #[arg(long, value_name = "URL")]
        store: Option<String>,
        /// Overlay: `tunnel` (VXLAN between hosts) or `native` (routed over an underlay the
        /// hosts share) [default: tunnel, or the store's for an existing network].
        #[arg(long, value_parser = ["tunnel", "native"])]
        mode: Option<String>,
        /// The bridge's address, the containers' default route [default: the subnet's first
        /// address].
        #[arg(long)]
        gateway: Option<std::net::Ipv4Addr>,
        /// Allocate container addresses from this part of the subnet only (CIDR).
        #[arg(long, value_name = "CIDR")]
        ip_range: Option<String>,
        /// MTU of the bridge, the veths and the containers' interfaces (68-65535).
        #[arg(long)]
        mtu: Option<u32>,
        /// No way out: no default route in the containers, nothing leaves by or comes in
        /// from an uplink, no published ports, no upstream DNS.
        #[arg(long)]
        internal: bool,
        /// How the network meets the outside (Docker 28's gateway_mode_ipv4): `nat`
        /// (masquerade), `routed` (container addresses routed as they are; from outside only
        /// their published ports, on their own address and port) or `isolated` (with
        /// --internal: no address on the bridge, not even the host is reachable).
        #[arg(long, value_name = "MODE")]
        gateway_mode: Option<String>,
        /// Driver option KEY=VALUE: com.docker.network.bridge.name,
        /// com.docker.network.driver.mtu, com.docker.network.bridge.gateway_mode_ipv4.
        #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
        opt: Vec<String>,
        /// Dual-stack: containers get an IPv6 address too.
        #[arg(long)]
        ipv6: bool,
        /// IPv6 CIDR [default: the next free /64 of a ULA /48 derived from the host's
        /// machine id]; implies --ipv6.
        #[arg(long)]
        subnet6: Option<String>,
        /// `nat` (masquerade, as IPv4) or `routed` (no NAT66: container addresses are
        /// reachable directly, on their published ports only); Docker's gateway_mode_ipv6.
        #[arg(long, value_parser = ["nat", "routed"], default_value = "nat")]
        gateway_mode_ipv6: String,
    },
    /// Show a network as `docker network inspect` does (--json: its JSON array).
    Inspect {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List networks.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove networks (refused while containers use them).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Give a running container an interface on NETWORK.
    Connect {
        network: String,
        container: String,
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Static IPv6 address on a dual-stack NETWORK.
        #[arg(long)]
        ip6: Option<std::net::Ipv6Addr>,
        /// Another name for the container on NETWORK (repeatable; any number of containers
        /// may share one: DNS answers with all of them).
        #[arg(long = "alias", value_name = "NAME")]
        aliases: Vec<String>,
    },
    /// Remove a running container's interface on NETWORK.
    Disconnect { network: String, container: String },
}

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Stop FROM opening connections to TO (TCP, UDP, ICMP). Replies to TO's own
    /// connections still flow.
    Deny {
        from: String,
        to: String,
        /// Both directions.
        #[arg(long)]
        both: bool,
    },
    /// Lift a deny; under `policy default deny`, grant FROM → TO.
    Allow {
        from: String,
        to: String,
        #[arg(long)]
        both: bool,
    },
    /// Apply many rules at once from a file (`-` for stdin): one `deny|allow FROM TO [--both]`
    /// per line, `#` comments. All or nothing: a bad line changes nothing.
    Import { file: PathBuf },
    /// List rules and the default.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Verdict between containers without a rule (deny = Docker's --icc=false).
    Default {
        #[arg(value_parser = ["allow", "deny"])]
        verdict: String,
    },
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Container name (unique); generated when absent.
    #[arg(long)]
    pub name: Option<String>,
    /// Return once the network is ready; a supervisor tears it down when CMD exits.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Publish a port: [IP:][HOST:]CONTAINER[/tcp|udp], ranges as H1-H2:C1-C2; without
    /// HOST (`-p 80`, `-p 127.0.0.1::80`) on a random free host port.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Publish every --expose'd port on a random free host port.
    #[arg(short = 'P', long = "publish-all")]
    pub publish_all: bool,
    /// Expose a port or range: PORT[-END][/tcp|udp] (published with -P).
    #[arg(long, value_name = "PORT")]
    pub expose: Vec<String>,
    /// Another name for the container on its network (repeatable; shared names answer with
    /// every container that has them).
    #[arg(long = "network-alias", value_name = "NAME")]
    pub network_alias: Vec<String>,
    /// Add a line to /etc/hosts: NAME:IP (IP may be `host-gateway`: the host, at the
    /// network's gateway).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// A nameserver md's resolver forwards this container's other names to (instead of the
    /// host's).
    #[arg(long, value_name = "IP")]
    pub dns: Vec<String>,
    /// A search domain for resolv.conf (`.`: none) [default: the host's].
    #[arg(long = "dns-search", value_name = "DOMAIN")]
    pub dns_search: Vec<String>,
    /// An option for resolv.conf, like ndots:2 [default: the host's, and ndots:0].
    #[arg(long = "dns-option", value_name = "OPT")]
    pub dns_option: Vec<String>,
    /// The container's MAC address [default: 02:42 and its IPv4 address].
    #[arg(long = "mac-address", value_name = "MAC")]
    pub mac_address: Option<String>,
    /// Network: `bridge` (default), a network from `network create`, `none` (only lo),
    /// `host` (the host's namespace) or `container:NAME` (share NAME's).
    #[arg(long, default_value = "bridge")]
    pub network: String,
    /// Hostname inside the container [default: the name].
    #[arg(long)]
    pub hostname: Option<String>,
    /// Static address on the network (checked for conflicts).
    #[arg(long)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Static IPv6 address on a dual-stack network.
    #[arg(long)]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// Keep every capability and the host's PID namespace. By default CMD gets Docker's
    /// default capabilities and a PID namespace of its own.
    #[arg(long)]
    pub privileged: bool,
    /// Internal: run as the detached supervisor, reporting readiness on this fd.
    #[arg(long, hide = true)]
    pub ready_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true)]
    pub cmd: Vec<String>,
}

impl GlobalOpts {
    /// md-user itself (for the supervisor and resolvers), with this invocation's options.
    pub fn self_command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--bridge")
            .arg(&self.bridge)
            .arg("--subnet")
            .arg(&self.subnet)
            .arg("--resolv-conf")
            .arg(&self.resolv_conf);
        if let Some(u) = &self.uplink {
            cmd.arg("--uplink").arg(u);
        }
        if let Some(d) = &self.datapath {
            cmd.arg("--datapath").arg(d);
        }
        if self.ipv6 {
            cmd.arg("--ipv6");
        }
        if let Some(s) = &self.subnet6 {
            cmd.arg("--subnet6").arg(s);
        }
        if let Some(s) = &self.store {
            cmd.arg("--store").arg(s);
        }
        if let Some(a) = &self.advertise_addr {
            cmd.arg("--advertise-addr").arg(a.to_string());
        }
        cmd.arg("--store-ttl").arg(self.store_ttl.to_string());
        cmd
    }
}
