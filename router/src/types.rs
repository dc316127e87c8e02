//! The router's own view of workers and requests, independent of the wire format.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1::WorkerIdentity;
pub use tandem_sim::admission::Priority;

/// What a worker does; `Aggregated` workers are candidates for both legs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Computes prompts and pushes their KV.
    Prefill,
    /// Holds reserved KV and generates.
    Decode,
    /// Both, in one process.
    Aggregated,
}

impl Role {
    /// Lower-case name, for ids, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
            Role::Aggregated => "aggregated",
        }
    }

    /// Whether a worker of this role may run the given leg.
    pub fn serves(self, leg: Leg) -> bool {
        matches!(
            (self, leg),
            (Role::Aggregated, _) | (Role::Prefill, Leg::Prefill) | (Role::Decode, Leg::Decode)
        )
    }
}

/// One of the two legs of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Leg {
    /// Prompt processing and KV push.
    Prefill,
    /// Reservation and generation.
    Decode,
}

impl std::fmt::Display for Leg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Leg::Prefill => "prefill",
            Leg::Decode => "decode",
        })
    }
}

/// A worker's lifecycle; only `Ready` workers take new work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Registered, still loading or warming up.
    #[default]
    Starting,
    /// Takes new work.
    Ready,
    /// Finishing what it has; takes nothing new.
    Draining,
}

/// A worker's load: as reported by its heartbeat, or (inside the registry's candidate tables) with
/// the work placed since then added optimistically.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Lifecycle state.
    pub state: WorkerState,
    /// Prompt tokens queued or being prefilled.
    pub queued_prefill_tokens: u64,
    /// Sequences running (decode batch) or being prefilled.
    pub running_seqs: u32,
    /// Sequences accepted but not yet running.
    pub waiting_seqs: u32,
    /// KV blocks neither reserved nor in use.
    pub free_kv_blocks: u64,
    /// KV blocks in the pool.
    pub total_kv_blocks: u64,
    /// Measured prefill speed, tokens per second (0 until measured).
    pub prefill_tokens_per_s: f32,
    /// Measured decode speed, tokens per second over the batch (0 until measured).
    pub decode_tokens_per_s: f32,
    /// Reservations held.
    pub reservations: u32,
    /// Decode: tokens the running sequences attend to, summed.
    pub decode_context_tokens: u64,
    /// Decode: reservations not yet running, and their prompt tokens.
    pub reserved_seqs: u32,
    pub reserved_prompt_tokens: u64,
    /// Decode: the tightest ITL budget among its sequences, in milliseconds; 0 for none.
    pub tightest_itl_budget_ms: u32,
}

/// What placement needs to know about one request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestShape {
    /// Requested model; empty means the only model served.
    pub model: String,
    /// Prompt length in tokens (at least 1).
    pub prompt_tokens: u32,
    /// Most tokens to generate (at least 1).
    pub max_new_tokens: u32,
    /// Hashes of the prompt's full blocks, for prefix-aware policies.
    pub prefix_block_hashes: Vec<u64>,
    /// Time-to-first-token budget, if any.
    pub ttft_budget: Option<Duration>,
    /// Inter-token latency budget, if any.
    pub itl_budget: Option<Duration>,
    /// Critical work is ordered first when it must wait; sheddable work leaves headroom and is
    /// shed first.
    pub priority: Priority,
    /// Worker ids not to place on (a failover moving a stream off its failed worker).
    pub exclude: Vec<String>,
}

impl RequestShape {
    /// Whether `worker_id` is excluded.
    pub fn excludes(&self, worker_id: &str) -> bool {
        self.exclude.iter().any(|e| e == worker_id)
    }
}

/// The pair chosen for a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    /// Where to prefill.
    pub prefill: Arc<WorkerIdentity>,
    /// Where to reserve and decode.
    pub decode: Arc<WorkerIdentity>,
    /// What admission predicted for the request on this pair; `None` while the router has no
    /// step-time model for the workers yet.
    pub predicted: Option<Predicted>,
}

impl Placement {
    /// The predicted time to first token (the median), if any.
    pub fn predicted_ttft(&self) -> Option<Duration> {
        self.predicted.map(|p| p.ttft)
    }
}

/// Latencies admission predicted for a placed request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Predicted {
    /// Time to first token from the router's arrival of the request: the median expected.
    pub ttft: Duration,
    /// Inter-token latency after the first token: the median expected.
    pub itl: Duration,
    /// The two before calibration, which the gateway's [`Feedback`] compares measurements with.
    pub raw_ttft: Duration,
    pub raw_itl: Duration,
    /// The load regime the two were calibrated in, which the [`Feedback`] echoes.
    pub regime: u8,
    /// Identifies the placement in [`Feedback`]: admission counts it in flight until its end.
    pub ticket: u64,
}

/// What an admitted request measured, sent back so that predictions stay calibrated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Feedback {
    /// The model it was placed for (empty: the only one).
    pub model: String,
    pub prompt_tokens: u32,
    /// `Predicted::raw_ttft` and `raw_itl` of its placement.
    pub raw_ttft: Duration,
    pub raw_itl: Duration,
    /// Time to first token, from the placement (what the raw prediction counts from); zero in the
    /// report of the request's end, sent once per placement (with the ITL if it finished).
    pub ttft: Duration,
    /// Mean time per output token after the first; `None` for fewer than two tokens.
    pub itl: Option<Duration>,
    /// KV transfer left exposed after the prefill's compute; `None` when there was none.
    pub exposed_transfer: Option<Duration>,
    /// `Predicted::regime` and `Predicted::ticket` of its placement.
    pub regime: u8,
    pub ticket: u64,
}

/// One registered worker as of a snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerView {
    /// Who it is.
    pub identity: Arc<WorkerIdentity>,
    /// Its role, parsed from the identity.
    pub role: Role,
    /// Its last reported load.
    pub load: Load,
    /// Lease time left when the snapshot was taken.
    pub lease_left: Duration,
}

/// The whole registered set, in every state, ordered by worker id.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSet {
    /// Bumped on every change of membership or state.
    pub version: u64,
    /// The workers.
    pub workers: Vec<WorkerView>,
}

impl WorkerSet {
    /// Whether the worker is in the set (its lease is live: it has been heartbeating).
    pub fn contains(&self, worker_id: &str) -> bool {
        self.workers
            .iter()
            .any(|w| w.identity.worker_id == worker_id)
    }

    /// Workers in the `Ready` state that serve `leg`, for readiness checks.
    pub fn ready_for(&self, leg: Leg) -> usize {
        self.workers
            .iter()
            .filter(|w| w.load.state == WorkerState::Ready && w.role.serves(leg))
            .count()
    }
}
