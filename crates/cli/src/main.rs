//! The one `tandem` binary: parse, build, hand over to a library.
use clap::{Parser, Subcommand};

mod admission_args;
mod bench;
mod engine_args;
mod generate;
mod operate;
mod profile;
mod profile_served;
mod roles;
mod setup;
mod supervise;
mod up;

#[derive(Parser, Debug)]
#[command(
    name = "tandem",
    version,
    about = "Disaggregated LLM serving: prefill and decode on separate workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt in this process (the single-process reference).
    Generate(generate::GenerateArgs),
    /// Measure the native engine's step times into a profile for `tandem plan --profile`.
    Profile(profile::ProfileArgs),
    /// Size a cluster for a workload: GPUs and nodes as the sizing calculator counts them, or a
    /// simulated continuous-batching search with the prefill:decode ratio (--method simulate).
    Plan(tandem_sim::PlanArgs),
    /// Load-test an OpenAI-compatible endpoint: TTFT, ITL, throughput, goodput.
    Bench(bench::BenchCmd),
    /// Start a local cluster: gateway and router, N prefill and M decode worker processes.
    Up(up::UpArgs),
    /// Run the OpenAI-compatible gateway with an embedded router that workers register with.
    Gateway(up::GatewayArgs),
    /// Run a prefill worker that registers with a router.
    PrefillWorker(roles::PrefillArgs),
    /// Run a decode worker that registers with a router.
    DecodeWorker(roles::DecodeArgs),
    /// Run a standalone router (the gateway embeds one; this serves gateways on other hosts).
    Router(roles::RouterArgs),
    /// List the workers registered with a router: id, role, state, address, model.
    Workers(operate::WorkersArgs),
    /// Drain a worker: it takes no new work, finishes what it holds within a grace, then stops.
    Drain(operate::DrainArgs),
}

fn main() -> std::process::ExitCode {
    tandem_runtime::init_logging();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One readable line with its causes; no backtrace, whatever RUST_BACKTRACE says.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Plan(args) => {
            print!("{}", tandem_sim::run_plan(&args)?);
            Ok(())
        }
        Command::Bench(cmd) => bench::run(cmd),
        Command::Up(args) => up::run_up(args),
        Command::Gateway(args) => up::run_gateway(args),
        Command::PrefillWorker(args) => roles::run_prefill(args),
        Command::DecodeWorker(args) => roles::run_decode(args),
        Command::Router(args) => roles::run_router(args),
        Command::Workers(args) => operate::run_workers(args),
        Command::Drain(args) => operate::run(args),
    }
}
